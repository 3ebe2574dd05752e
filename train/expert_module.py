"""The LightningModule of one expert: rectified-flow training of the MM-DiT on its own shards.

Per step: latents x0 (or frames encoded by the VAE in raw-frames mode), logit-normal t shifted for the
video geometry, x_t and the velocity target from ``ddm.flow``, CFG text dropout (T5 and CLIP
independently), and an Open-Sora-style conditioning mixture (t2v / first / last / both-end frames given
through ``cond_in``). The loss is the mean squared velocity error over all latent frames (or, with
``conditioning.loss_on_given_frames=false``, only over the frames the model has to generate).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ddm import flow
from ddm.conditioning import CONDITION_MODES, batch_frame_mask, i2v_condition, sample_condition_modes
from ddm.models.layouts import detect_layout, load_expert_state_dict
from ddm.models.mmdit import MMDiT
from ddm.models.presets import ExpertConfig
from train.ema import ema_copy_from
from train.flow_module import TrainingModule, masked_mean
from train.settings import ExpertSettings
from train.sharding import is_sharded, load_full_into_shards_, zero_modules_


class ExpertModule(TrainingModule):
    """One expert (or the monolith): rectified flow with CFG dropout and the i2v conditioning mixture."""

    settings_class = ExpertSettings

    def __init__(self, model_cfg: dict[str, Any], train: ExpertSettings | Mapping[str, Any], null_t5: torch.Tensor,
                 null_clip: torch.Tensor, export_metadata: dict[str, Any],
                 init_state_dict: dict[str, torch.Tensor] | None = None,
                 vae: torch.nn.Module | None = None) -> None:
        super().__init__(train, init_state_dict, vae)
        self.save_hyperparameters({"model_cfg": model_cfg, "train": self.settings.to_dict(),
                                   "export_metadata": export_metadata})
        self.expert_cfg = ExpertConfig.from_dict(model_cfg)
        self.register_buffer("null_t5", null_t5.float(), persistent=False)
        self.register_buffer("null_clip", null_clip.float(), persistent=False)

    meta_init = True  # under FSDP2: meta build, shard, then train.sharding.replay_init_

    def build_network(self) -> torch.nn.Module:
        net = MMDiT(self.expert_cfg)
        zero_modules_(net, self._init_zeroed(net))
        return net

    def _init_zeroed(self, net: MMDiT) -> tuple[str, ...]:
        """The modules ``model.init`` zeroes after PyTorch's default init (adaLN-Zero's; none for torch)."""
        return net.adaln_zero_modules() if self.settings.init == "adaln_zero" else ()

    def zero_init_modules(self) -> tuple[str, ...]:
        # called on the built (meta) network, before replay_init_ draws the default values
        return (("cond_in",) if self.expert_cfg.cond_embed else ()) + self._init_zeroed(self.model)

    def after_build(self) -> None:
        if self._init_state_dict is not None:
            if is_sharded(self.model):
                found = detect_layout(self._init_state_dict)
                if found != self.model.layout:
                    raise ValueError(f"init_from weights are in the {found!r} layout, the model in {self.model.layout!r}"
                                     ": convert them with ddm.models.layouts.convert_state_dict first")
                load_full_into_shards_(self.model, self._init_state_dict)
            else:
                load_expert_state_dict(self.model, self._init_state_dict)
            ema_copy_from(self.ema_model, self.model)
            self._init_state_dict = None
        if self.settings.activation_checkpointing:
            self.model.set_activation_checkpointing(True)
        if self.settings.compile:
            for block in self.model.blocks():
                block.compile()

    def flow_patch_size(self) -> tuple[int, int, int]:
        """The expert's own patch."""
        return tuple(self.expert_cfg.patch_size)

    def training_step(self, batch: dict, batch_idx: int):
        x0 = self.latents(batch)
        b, _, n_frames, _, _ = x0.shape
        fs = self.settings.flow
        t = self.sample_t(x0)
        noise = torch.randn_like(x0)
        x_t = flow.interpolate(x0, noise, t)
        # velocity (default), or epsilon / x0 for a heterogeneous pool's expert (converted at sampling)
        target = flow.training_target(fs.prediction, x0, noise)
        t5, clip, _, _ = flow.drop_text(batch["t5"].float(), batch["clip"].float(), self.null_t5, self.null_clip,
                                        fs.text_dropout_t5, fs.text_dropout_clip)
        cond: dict[str, torch.Tensor] = {"t5": t5, "clip": clip}
        modes = ["t2v"] * b
        if self.expert_cfg.cond_embed:
            modes = sample_condition_modes(b, {m: p for m, p in self.settings.conditioning.items()
                                               if m in CONDITION_MODES})
            frame_mask = batch_frame_mask(modes, n_frames).to(x0.device)
            cond["i2v"] = i2v_condition(x0, frame_mask)
        else:
            frame_mask = torch.zeros(b, n_frames, dtype=torch.bool, device=x0.device)
        v = self.model(x_t, t, cond)
        sq_err = (v.float() - target) ** 2
        generate = (~frame_mask).float()[:, None, :, None, None]
        # Given frames can stay in the loss (their velocity follows from x_t and the condition): that
        # direct signal is what teaches cond_in quickly; sampling writes those frames back anyway.
        in_loss = torch.ones_like(generate) if self.settings.conditioning.get("loss_on_given_frames", True) \
            else generate
        per_sample = masked_mean(sq_err, in_loss)
        loss = per_sample.mean()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        if self.is_log_step():
            self.log_mode_losses(modes, per_sample, sq_err, generate, n_frames)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return self.guard_nonfinite(loss)

    def log_mode_losses(self, modes: list[str], per_sample: torch.Tensor, sq_err: torch.Tensor,
                        generate: torch.Tensor, n_frames: int) -> None:
        """Loss per conditioning mode; and per mode on latent frames 1.. only."""
        # Per mode, also on latent frames 1.. only: the same frames for t2v and first-frame samples, so the
        # two losses compare like with like (is the given first frame used to generate the rest?).
        later = generate.clone()
        later[:, :, 0] = 0
        later_per_sample = masked_mean(sq_err, later) if n_frames > 1 else per_sample
        for mode in CONDITION_MODES:
            sel = [i for i, m in enumerate(modes) if m == mode]
            if sel:
                self.log(f"train/loss_{mode}", per_sample[sel].mean(), on_step=True, on_epoch=False)
                self.log(f"train/loss_later_{mode}", later_per_sample[sel].mean(), on_step=True, on_epoch=False)
