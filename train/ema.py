"""Exponential moving average of a model's weights, kept as a frozen twin module.

The EMA twin is a submodule of the LightningModule, so every strategy treats it like the model: DDP
replicates it, FSDP2 / ZeRO-3 shard it with the same layout, and checkpoints save and reshard it. The
update works on each rank's local piece of every parameter (the whole tensor, a DTensor's local shard,
or DeepSpeed ZeRO-3's ``ds_tensor`` partition), which the twin shares with the model.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def _local(p: torch.Tensor) -> torch.Tensor:
    if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3 partition
        return p.ds_tensor
    if hasattr(p, "to_local"):  # FSDP2 DTensor shard
        return p.to_local()
    return p


def make_ema_twin(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` to hold the moving average (same dtype as the model).

    It stays in train mode like the model: the networks here have no dropout or batch norm, and
    Lightning expects every submodule in train mode during fit.
    """
    twin = copy.deepcopy(model)
    twin.requires_grad_(False)
    return twin


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """Decay used at ``step``; with warm-up it ramps as (1+step)/(10+step) so early EMA tracks the model."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1−decay)·model, parameter by parameter (local shards only)."""
    ema_params = [_local(p) for p in ema.parameters()]
    params = [_local(p).to(dtype=e.dtype) for p, e in zip(model.parameters(), ema_params)]
    if len(ema_params) != len(list(model.parameters())):
        raise RuntimeError("EMA twin and model have different parameter lists")
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


@torch.no_grad()
def ema_copy_from(ema: nn.Module, model: nn.Module) -> None:
    """Make the twin equal to the model (after a weights-only start)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        _local(e).copy_(_local(p))
