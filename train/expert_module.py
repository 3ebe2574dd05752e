"""The LightningModule of one expert: rectified-flow training of the MM-DiT on its own shards.

Per step: latents x0 (or frames encoded by the VAE in raw-frames mode), logit-normal t shifted for the
video geometry, x_t and the velocity target from ``ddm.flow``, CFG text dropout (T5 and CLIP
independently), and an Open-Sora-style conditioning mixture (t2v / first / last / both-end frames given
through ``cond_in``). The loss is the mean squared velocity error over all latent frames (or, with
``conditioning.loss_on_given_frames=false``, only over the frames the model has to generate).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch

from ddm import flow
from ddm.conditioning import CONDITION_MODES, batch_frame_mask, i2v_condition, sample_condition_modes
from ddm.models.layouts import load_expert_state_dict
from ddm.models.mmdit import MMDiT
from ddm.models.presets import ExpertConfig
from train.ema import ema_copy_from, ema_decay_at, ema_update, make_ema_twin

log = logging.getLogger("ddm.train")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of ``values`` (B, C, T, H, W) over the positions where ``mask`` (B, 1, T, 1, 1) is 1."""
    weight = mask.expand_as(values)
    return (values * weight).sum(dim=(1, 2, 3, 4)) / weight.sum(dim=(1, 2, 3, 4)).clamp_min(1)


def lr_lambda(warmup_steps: int, schedule: str, max_steps: int, min_lr_ratio: float):
    """LR multiplier: linear warm-up, then constant or cosine down to ``min_lr_ratio``."""
    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        raise ValueError(f"unknown LR schedule {schedule!r}: expected constant or cosine")
    return fn


class FlowMatchingModule(L.LightningModule):
    """What the expert and router modules share: optimiser, LR schedule, EMA twin, non-finite guard."""

    def __init__(self, optim: dict, max_steps: int, max_nonfinite_steps: int, grad_clip_in_module: bool) -> None:
        super().__init__()
        self.optim_cfg = dict(optim)
        self.max_steps = int(max_steps)
        self.max_nonfinite_steps = int(max_nonfinite_steps)
        self.grad_clip_in_module = grad_clip_in_module
        self.nonfinite_steps = 0
        self.model: torch.nn.Module | None = None
        self.ema_model: torch.nn.Module | None = None

    # -- subclasses build self.model in build_network() --------------------------------------------
    def build_network(self) -> torch.nn.Module:
        raise NotImplementedError

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self.build_network()
        self.ema_model = make_ema_twin(self.model)
        self.after_build()
        strategy = self._trainer.strategy if self._trainer is not None else None
        if strategy is not None and type(strategy).__name__ == "ModelParallelStrategy":
            self._fully_shard(strategy)

    def after_build(self) -> None:
        """Hook: switches such as activation checkpointing or torch.compile."""

    def _fully_shard(self, strategy) -> None:
        """FSDP2: shard every transformer block, then the rest, for both the model and its EMA twin."""
        from torch.distributed.fsdp import fully_shard

        mesh = strategy.device_mesh["data_parallel"]
        for net in (self.model, self.ema_model):
            for block in net.blocks():
                fully_shard(block, mesh=mesh)
            fully_shard(net, mesh=mesh)

    def configure_optimizers(self):
        o = self.optim_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=float(o["lr"]), betas=tuple(o["betas"]), eps=float(o["eps"]),
                                weight_decay=float(o["weight_decay"]))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(int(o["warmup_steps"]), o["schedule"], self.max_steps, float(o["min_lr_ratio"])))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def guard_nonfinite(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Return None (skip the step on every rank) for a NaN/Inf loss; abort after too many."""
        finite = bool(torch.isfinite(loss).all())
        if self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            return loss
        self.nonfinite_steps += 1
        log.warning("non-finite loss at step %d: step skipped (%d so far)", self.global_step, self.nonfinite_steps)
        if self.nonfinite_steps > self.max_nonfinite_steps:
            raise RuntimeError(f"{self.nonfinite_steps} non-finite losses (limit trainer.max_nonfinite_steps="
                               f"{self.max_nonfinite_steps}): check the learning rate and the data")
        return None

    def on_before_optimizer_step(self, optimizer) -> None:
        clip = float(self.optim_cfg.get("grad_clip") or 0.0)
        if self.grad_clip_in_module and clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        else:
            norms = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm.float(), on_step=True, on_epoch=False)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: checkpoint callbacks run before the module's batch-end
        # hook, so an EMA updated there would be one step behind the weights in every checkpoint.
        decay = ema_decay_at(self.global_step, float(self.optim_cfg["ema_decay"]), bool(self.optim_cfg["ema_warmup"]))
        ema_update(self.ema_model, self.model, decay)
        self.log("train/ema_decay", decay, on_step=True, on_epoch=False)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "skipped"):
            self.log("data/skipped_samples", float(dm.skipped), on_step=True, on_epoch=False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ddm_nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite_steps = int(checkpoint.get("ddm_nonfinite_steps", 0))

    def load_initial_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Weights-only start: load into the model strictly and make the EMA twin equal to it."""
        self.model.load_state_dict(state_dict, strict=True)
        ema_copy_from(self.ema_model, self.model)


class ExpertModule(FlowMatchingModule):
    """One expert (or the monolith): rectified flow with CFG dropout and the i2v conditioning mixture."""

    def __init__(self, model_cfg: dict[str, Any], train: dict[str, Any], null_t5: torch.Tensor,
                 null_clip: torch.Tensor, export_metadata: dict[str, Any],
                 init_state_dict: dict[str, torch.Tensor] | None = None,
                 vae: torch.nn.Module | None = None) -> None:
        super().__init__(train["optim"], train["max_steps"], train["max_nonfinite_steps"],
                         train["grad_clip_in_module"])
        self.save_hyperparameters({"model_cfg": model_cfg, "train": train, "export_metadata": export_metadata})
        self.expert_cfg = ExpertConfig.from_dict(model_cfg)
        self.train_cfg = train
        self.register_buffer("null_t5", null_t5.float(), persistent=False)
        self.register_buffer("null_clip", null_clip.float(), persistent=False)
        self._init_state_dict = init_state_dict
        self.vae = vae  # only in raw-frames mode; frozen, not saved in checkpoints
        if vae is not None:
            vae.requires_grad_(False)

    def build_network(self) -> torch.nn.Module:
        return MMDiT(self.expert_cfg)

    def after_build(self) -> None:
        if self._init_state_dict is not None:
            load_expert_state_dict(self.model, self._init_state_dict)
            ema_copy_from(self.ema_model, self.model)
            self._init_state_dict = None
        if self.train_cfg.get("activation_checkpointing"):
            self.model.set_activation_checkpointing(True)
        if self.train_cfg.get("compile"):
            for block in self.model.blocks():
                block.compile()

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        return {k: v for k, v in sd.items() if not k.startswith("vae.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.vae is not None:
            state_dict = dict(state_dict)
            state_dict.update({f"vae.{k}": v for k, v in self.vae.state_dict().items()})
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def latents(self, batch: dict) -> torch.Tensor:
        if "latent" in batch:
            return batch["latent"].float()
        if self.vae is None:
            raise ValueError("batch holds raw frames but no VAE was given (set data.raw_frames and the vae config)")
        with torch.no_grad():
            return self.vae.encode(batch["frames"]).float()

    def shift_alpha(self, x0: torch.Tensor) -> float:
        if self.train_cfg["flow"].get("shift") is not None:
            return float(self.train_cfg["flow"]["shift"])
        _, _, t, h, w = x0.shape
        _, ph, pw = self.expert_cfg.patch_size
        return flow.video_shift_alpha((h // ph) * (w // pw), t)

    def training_step(self, batch: dict, batch_idx: int):
        x0 = self.latents(batch)
        b, _, n_frames, _, _ = x0.shape
        fcfg = self.train_cfg["flow"]
        t = flow.shift_time(flow.sample_logit_normal(b, device=x0.device, mean=fcfg["logit_mean"],
                                                     std=fcfg["logit_std"]), self.shift_alpha(x0))
        noise = torch.randn_like(x0)
        x_t = flow.interpolate(x0, noise, t)
        target = flow.velocity_target(x0, noise)
        t5, clip, _, _ = flow.drop_text(batch["t5"].float(), batch["clip"].float(), self.null_t5, self.null_clip,
                                        fcfg["text_dropout_t5"], fcfg["text_dropout_clip"])
        cond: dict[str, torch.Tensor] = {"t5": t5, "clip": clip}
        modes = ["t2v"] * b
        if self.expert_cfg.cond_embed:
            modes = sample_condition_modes(b, {m: p for m, p in self.train_cfg["conditioning"].items()
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
        in_loss = torch.ones_like(generate) if self.train_cfg["conditioning"].get("loss_on_given_frames", True) \
            else generate
        per_sample = masked_mean(sq_err, in_loss)
        loss = per_sample.mean()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
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
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return self.guard_nonfinite(loss)
