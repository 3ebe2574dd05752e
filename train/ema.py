"""Exponential moving average of a model's weights, kept as a frozen fp32 twin module.

The EMA twin is a submodule of the LightningModule, so every strategy treats it like the model: DDP
replicates it, FSDP2 shards it with the same per-block layout, and checkpoints save and reshard it. The
update works on each rank's local piece of every parameter (the whole tensor, a DTensor's local shard,
or DeepSpeed ZeRO-3's ``ds_tensor`` partition).

The twin is *always fp32*, whatever the training precision: with a decay of 0.9999 an update is
1e-4 × (weight − EMA), far below a bf16 ulp of the EMA (2⁻⁸ relative), so a bf16 EMA silently stops
moving. Lightning's ``bf16-true`` and DeepSpeed's bf16 cast the whole LightningModule with
``module.to(bfloat16)``; the twin's class overrides ``_apply`` so that such casts move it between
devices but keep (or make) its floating tensors fp32. The export casts to the export dtype at the end.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

EMA_DTYPE = torch.float32


def _local(p: torch.Tensor) -> torch.Tensor:
    if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3 partition
        return p.ds_tensor
    if hasattr(p, "to_local"):  # FSDP2 DTensor shard
        return p.to_local()
    return p


class FP32Pinned:
    """Mixin for a module whose floating parameters and buffers stay fp32 through ``.to(dtype)`` casts."""

    def _apply(self, fn, recurse=True):  # noqa: D401 - nn.Module's hook
        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype != EMA_DTYPE:
                # Convert from the source tensor (never from the down-cast one) so nothing is rounded.
                return t.to(device=out.device, dtype=EMA_DTYPE)
            return out
        return super()._apply(keep_fp32, recurse)  # type: ignore[misc]


_PINNED: dict[type, type] = {}


def pin_fp32(module: nn.Module) -> nn.Module:
    """Give ``module`` a subclass of its own class with :class:`FP32Pinned`, and cast it to fp32.

    The class swap keeps parameter names, ``isinstance`` and the state-dict layout unchanged.
    """
    cls = type(module)
    if not issubclass(cls, FP32Pinned):
        if cls not in _PINNED:
            _PINNED[cls] = type(f"FP32{cls.__name__}", (FP32Pinned, cls), {"__module__": cls.__module__})
        module.__class__ = _PINNED[cls]
    return module.to(dtype=EMA_DTYPE)


def make_ema_twin(model: nn.Module) -> nn.Module:
    """A frozen fp32 copy of ``model`` to hold the moving average (see the module docstring).

    It stays in train mode like the model: the networks here have no dropout or batch norm, and
    Lightning expects every submodule in train mode during fit.
    """
    twin = copy.deepcopy(model)
    twin.requires_grad_(False)
    return pin_fp32(twin)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """Decay used at ``step``; with warm-up it ramps as (1+step)/(10+step) so early EMA tracks the model."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1−decay)·model, parameter by parameter (local shards only), in the EMA's fp32."""
    ema_params = [_local(p) for p in ema.parameters()]
    model_params = list(model.parameters())
    if len(ema_params) != len(model_params):
        raise RuntimeError("EMA twin and model have different parameter lists")
    params = [_local(p).to(dtype=e.dtype) for p, e in zip(model_params, ema_params)]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


@torch.no_grad()
def ema_copy_from(ema: nn.Module, model: nn.Module) -> None:
    """Make the twin equal to the model (after a weights-only start)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        _local(e).copy_(_local(p))


# The names ddm.assemble's --dtype uses, and the long torch names as aliases.
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                 "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cast_for_export(state_dict: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The fp32 EMA state dict in the export dtype (``checkpoint.export_dtype``: fp32, bf16 or fp16)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"checkpoint.export_dtype={dtype!r}: expected one of {sorted(EXPORT_DTYPES)}")
    target = EXPORT_DTYPES[dtype]
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state_dict.items()}
