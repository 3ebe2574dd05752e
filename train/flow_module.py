"""What the expert and router LightningModules share (:class:`TrainingModule`): the latents both train on
(shard latents, or raw frames encoded by a frozen training VAE that never enters a checkpoint but is put
back on load so a strict resume finds its keys), the experts' video shift of t, AdamW with warm-up +
constant/cosine LR, the EMA twin (updated right after each optimizer step), FSDP2 sharding of both,
gradient-norm logging and clipping, and the guard that skips NaN/Inf losses on every rank and aborts after
too many. Subclasses build their network in ``build_network``, name the experts' patch in
``flow_patch_size`` and write ``training_step``: the expert a flow-matching regression, the router a
classifier of noised latents.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import lightning as L
import torch

from ddm import flow
from train.ema import ema_copy_from, ema_decay_at, ema_update, make_ema_twin
from train.settings import TrainSettings
from train.sharding import is_sharded, load_full_into_shards_, replay_init_
from ddm.models.context_parallel import apply_context_parallel, fully_shard_dp_cp, transformer_blocks

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


class TrainingModule(L.LightningModule):
    """Base of the expert (flow matching) and router (classifier) modules: the latents and noise geometry
    they train on, optimiser, LR schedule, EMA twin, FSDP2 sharding, non-finite guard."""

    settings_class: type[TrainSettings] = TrainSettings  # the subclass's own settings type

    def __init__(self, train: TrainSettings | Mapping[str, Any], init_state_dict: dict[str, torch.Tensor] | None = None,
                 vae: torch.nn.Module | None = None) -> None:
        """``train``: the job's typed training settings (:mod:`train.settings`; a dict of them, as a checkpoint's
        hyper-parameters hold them, is read too); ``init_state_dict``: weights-only start; ``vae``: only in
        raw-frames mode (frozen, not saved)."""
        super().__init__()
        self.settings = self.settings_class.coerce(train)
        self._init_state_dict = init_state_dict
        self.vae = vae
        if vae is not None:
            vae.requires_grad_(False)
        self.nonfinite_steps = 0
        self.model: torch.nn.Module | None = None
        self.ema_model: torch.nn.Module | None = None

    # -- subclasses build self.model in build_network() --------------------------------------------
    def build_network(self) -> torch.nn.Module:
        """The network to train (``self.model``; its EMA twin is made from it)."""
        raise NotImplementedError

    def flow_patch_size(self) -> tuple[int, int, int]:
        """The experts' (t, h, w) patch: the video shift of t counts the experts' tokens per frame."""
        raise NotImplementedError

    # -- the latents both modules train on ----------------------------------------------------------
    def latents(self, batch: dict) -> torch.Tensor:
        """x0 of a batch (B, C, T, H, W) float32: the shards' latents, or its raw frames through the VAE."""
        if "latent" in batch:
            return batch["latent"].float()
        if self.vae is None:
            raise ValueError("batch holds raw frames but no VAE was given (set data.raw_frames and the vae config)")
        with torch.no_grad():
            return self.vae.encode(batch["frames"]).float()

    def shift_alpha(self, x0: torch.Tensor) -> float:
        """The shift of the logit-normal t: ``flow.shift`` if set, else the video shift for x0's geometry in
        the experts' tokens (the router noises exactly like the experts, whatever its own patch)."""
        if self.settings.flow.shift is not None:
            return float(self.settings.flow.shift)
        _, _, t, h, w = x0.shape
        _, ph, pw = self.flow_patch_size()
        return flow.video_shift_alpha((h // ph) * (w // pw), t)

    def sample_t(self, x0: torch.Tensor) -> torch.Tensor:
        """Training times (B,): logit-normal (``flow.logit_mean``/``logit_std``), shifted by :meth:`shift_alpha`."""
        fs = self.settings.flow
        t = flow.sample_logit_normal(x0.shape[0], device=x0.device, mean=fs.logit_mean, std=fs.logit_std)
        return flow.shift_time(t, self.shift_alpha(x0))

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        """The module's state without the frozen training VAE (``vae.*``): checkpoints hold what trains."""
        sd = super().state_dict(*args, **kwargs)
        return {k: v for k, v in sd.items() if not k.startswith("vae.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a checkpoint's state; the training VAE's own weights fill the ``vae.*`` keys that
        :meth:`state_dict` left out, so a strict resume of a raw-frames run does not miss them."""
        if self.vae is not None:
            state_dict = dict(state_dict)
            state_dict.update({f"vae.{k}": v for k, v in self.vae.state_dict().items()})
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # Subclasses whose network train.sharding.replay_init_ can initialise set this: under FSDP2 they are
    # built on the meta device, sharded, then initialised shard by shard (no full copy on any rank).
    meta_init = False

    def zero_init_modules(self) -> tuple[str, ...]:
        """Modules the network's constructor zeroes after its default init (for replay_init_)."""
        return ()

    def configure_model(self) -> None:
        if self.model is not None:
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        fsdp2 = strategy is not None and type(strategy).__name__ == "ModelParallelStrategy"
        if fsdp2 and self.meta_init:
            self._build_sharded(strategy)
            return
        self.model = self.build_network()
        self.ema_model = make_ema_twin(self.model)
        self.after_build()
        if fsdp2:
            self._fully_shard(strategy)

    def _build_sharded(self, strategy) -> None:
        """Meta build → fully_shard → allocate own shards → the single-process init values → EMA = model."""
        with torch.device("meta"):
            self.model = self.build_network()
            self.ema_model = make_ema_twin(self.model)
        self._fully_shard(strategy)
        device = strategy.root_device
        self.model.to_empty(device=device)
        self.ema_model.to_empty(device=device)
        replay_init_(self.model, device, self.zero_init_modules())
        ema_copy_from(self.ema_model, self.model)
        self.after_build()

    def after_build(self) -> None:
        """Hook: weights-only start, switches such as activation checkpointing or torch.compile."""

    def _fully_shard(self, strategy) -> None:
        """FSDP2: shard every transformer block, then the rest, for both the model and its EMA twin."""
        from torch.distributed.fsdp import fully_shard

        # context parallelism (train.run.build_strategy): the mesh's tensor_parallel dim is the cp group
        names = getattr(strategy.device_mesh, "mesh_dim_names", None) or ()  # tests pass a plain {name: mesh}
        if "tensor_parallel" in names and strategy.device_mesh["tensor_parallel"].size() > 1:
            for net in (self.model, self.ema_model):
                apply_context_parallel(net, strategy.device_mesh, cp_dim="tensor_parallel")
                fully_shard_dp_cp(net, strategy.device_mesh, dp_dim="data_parallel", cp_dim="tensor_parallel")
            return

        mesh = strategy.device_mesh["data_parallel"]
        for net in (self.model, self.ema_model):
            for block in transformer_blocks(net):
                fully_shard(block, mesh=mesh)
            fully_shard(net, mesh=mesh)

    def configure_optimizers(self):
        o = self.settings.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=float(o.lr), betas=o.betas, eps=float(o.eps), weight_decay=float(o.weight_decay))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(int(o.warmup_steps), o.schedule, self.settings.max_steps, float(o.min_lr_ratio)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def guard_nonfinite(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Return None (skip the step on every rank) for a NaN/Inf loss; abort after too many."""
        finite = bool(torch.isfinite(loss).all())
        if self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            return loss
        self.nonfinite_steps += 1
        log.warning("non-finite loss at step %d: step skipped (%d so far)", self.global_step, self.nonfinite_steps)
        if self.nonfinite_steps > self.settings.max_nonfinite_steps:
            raise RuntimeError(f"{self.nonfinite_steps} non-finite losses (limit trainer.max_nonfinite_steps="
                               f"{self.settings.max_nonfinite_steps}): check the learning rate and the data")
        return None

    def is_log_step(self) -> bool:
        """Whether this step's diagnostics reach the loggers (computing them on other steps is waste)."""
        return self.global_step % max(1, self.trainer.log_every_n_steps) == 0

    def on_before_optimizer_step(self, optimizer) -> None:
        # The module clips (one norm computation serves clipping and logging) except under DeepSpeed,
        # whose engine clips through its config.
        clip = float(self.settings.optim.grad_clip or 0.0)
        if self.settings.grad_clip_in_module and clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        elif self.is_log_step():
            norms = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        else:
            return
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm.float(), on_step=True, on_epoch=False)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: checkpoint callbacks run before the module's batch-end
        # hook, so an EMA updated there would be one step behind the weights in every checkpoint.
        decay = ema_decay_at(self.global_step, float(self.settings.optim.ema_decay), bool(self.settings.optim.ema_warmup))
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
        """Weights-only start: load into the model strictly (into its shards when sharded) and make the
        EMA twin equal to it."""
        if is_sharded(self.model):
            load_full_into_shards_(self.model, state_dict)
        else:
            self.model.load_state_dict(state_dict, strict=True)
        ema_copy_from(self.ema_model, self.model)


# The base's former name (it fits the expert's flow matching, not the router's classifier); kept for imports.
FlowMatchingModule = TrainingModule
