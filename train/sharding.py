"""FSDP2 "build on meta, shard, then initialise" (the torchtitan pattern) for the expert and its EMA.

Each rank builds the network on the ``meta`` device (no memory), applies ``fully_shard`` per block and
at the root, allocates only its own shards (``to_empty``) and then fills them:

* :func:`replay_init_` — the same values a single-process build would have drawn with the same seed:
  it replays the constructor's random draws in construction order (every ``nn.Linear`` is rebuilt at
  full size, one at a time, on the target device, which draws exactly what the constructor drew) and keeps
  this rank's rows. ``norm``-style scales are ones; the caller names modules the constructor zeroes
  afterwards (``zero_modules``), like MMDiT's ``cond_in``. A parameter nothing initialised is an error, never
  uninitialised memory. Peak extra memory: the largest single weight.
* :func:`load_full_into_shards_` — a weights-only start (``init_from``): each parameter of a full state
  dict is sliced to this rank's rows and copied in, one tensor at a time.

FSDP2 shards dim 0 in ``torch.chunk`` order (rank r holds chunk r, possibly empty), which
:func:`local_rows` reproduces.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ddm.models.layers import RMSNorm
from ddm.export_files import _read_index, _resolve_export


def is_sharded(net: nn.Module) -> bool:
    """Whether ``net``'s parameters are FSDP2 DTensors."""
    return any(hasattr(p, "device_mesh") for p in net.parameters())


def local_rows(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``full`` for the (possibly DTensor) ``param`` it belongs to."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor import Shard

    placements = tuple(param.placements)
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"only FSDP2's Shard(0) over one mesh dimension is supported, got {placements}")
    mesh = param.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    chunks = torch.chunk(full, world, dim=0)
    local = chunks[rank] if rank < len(chunks) else full[:0]
    expected = tuple(param.to_local().shape)
    if tuple(local.shape) != expected:
        raise RuntimeError(f"shard of {tuple(full.shape)} on rank {rank}/{world}: {tuple(local.shape)} != {expected}")
    return local


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


@torch.no_grad()
def zero_modules_(net: nn.Module, names: tuple[str, ...]) -> None:
    """Zero every parameter of the named submodules (this rank's shard of a sharded one)."""
    for name in names:
        for p in net.get_submodule(name).parameters():
            _local(p).zero_()


@torch.no_grad()
def replay_init_(net: nn.Module, device: torch.device | str, zero_modules: tuple[str, ...] = ()) -> None:
    """Initialise a materialised (possibly sharded) ``net`` exactly as its constructor would have.

    Call with the RNG in the state the single-process build would have started from (the same seed).
    """
    done: set[int] = set()
    for module in net.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            full = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                             device=device, dtype=w.dtype)  # draws what the constructor drew
            _local(w).copy_(local_rows(full.weight, w))
            done.add(id(w))
            if module.bias is not None:
                _local(module.bias).copy_(local_rows(full.bias, module.bias))
                done.add(id(module.bias))
        elif isinstance(module, RMSNorm):
            _local(module.scale).fill_(1.0)
            done.add(id(module.scale))
    zero_modules_(net, zero_modules)
    missing = [n for n, p in net.named_parameters() if id(p) not in done]
    if missing:
        raise RuntimeError(f"replay_init_ does not know how to initialise {missing[:5]} ({type(net).__name__}); "
                           "add their rule to train.sharding.replay_init_")
    for name, buf in net.named_buffers():
        raise RuntimeError(f"replay_init_: buffer {name} would be left uninitialised")


@torch.no_grad()
def load_full_into_shards_(net: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy a full state dict into ``net``'s local shards (strict: same names and shapes)."""
    params = dict(net.named_parameters())
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    shapes = [f"{k}: model {tuple(p.shape)} vs file {tuple(state_dict[k].shape)}" for k, p in params.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(p.shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"weights-only start does not match the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shapes {shapes[:5]}")
    for name, p in params.items():
        _local(p).copy_(local_rows(state_dict[name].to(device=_local(p).device), p))


class LazyExport(Mapping):
    """An export's tensors read one at a time on access (safetensors, memory-mapped): a weights-only start
    under FSDP2 then never holds more than one full tensor per rank. Accepts what ``ddm.export_files.load_export``
    accepts (an export folder, a ``.safetensors`` file, a sharded ``model/`` folder or its index)."""

    def __init__(self, path) -> None:
        kind, file = _resolve_export(path)
        if kind == "file":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                self._files = {k: file for k in f.keys()}
        else:
            self._files = {k: file.parent / v for k, v in sorted(_read_index(file)["weight_map"].items())}

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self._files:
            raise KeyError(key)
        with safe_open(str(self._files[key]), framework="pt") as f:
            if key not in f.keys():
                raise ValueError(f"{self._files[key]} does not hold {key}, which its index lists there")
            return f.get_tensor(key)

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)
