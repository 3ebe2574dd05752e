"""Turn training state into an export: EMA weights in safetensors with the config in the metadata.

* :func:`gather_full_state_dict` — a full, unsharded CPU state dict of a (possibly sharded) module, on
  every strategy (plain/DDP, FSDP2 DTensors, DeepSpeed ZeRO-3 partitions).
* :func:`export_checkpoint` / ``python -m train.export CKPT [--out DIR]`` — export any checkpoint
  written by a training job: a Lightning ``.ckpt`` file, an FSDP2 distributed (DCP) checkpoint folder,
  or a DeepSpeed checkpoint folder (consolidated first).
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddm.export_files import save_export
from train.ema import cast_for_export

log = logging.getLogger("ddm.train")


def gather_full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict of ``module``. Collective under sharded strategies: call on every rank."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_tensor") for p in params):  # DeepSpeed ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if any(hasattr(p, "full_tensor") for p in params):  # FSDP2 DTensors
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"no '{prefix}*' tensors in the checkpoint (found e.g. {sorted(sd)[:5]})")
    return out


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint as one dict (``state_dict``, ``hyper_parameters``, ``global_step``, ...),
    consolidating FSDP2 (DCP) and DeepSpeed folders on the CPU first."""
    path = Path(path).resolve()
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if (path / ".metadata").exists():  # torch.distributed.checkpoint folder (ModelParallelStrategy)
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "consolidated.pt"
            dcp_to_torch_save(path, out)
            ckpt = torch.load(out, map_location="cpu", weights_only=False)
        if "state_dict" not in ckpt and "model" in ckpt:
            ckpt["state_dict"] = ckpt.pop("model")
        # Lightning keeps the non-tensor state (step, hyper-parameters, loops) beside the shards.
        if (path / "meta.pt").exists():
            ckpt.update(torch.load(path / "meta.pt", map_location="cpu", weights_only=False))
        return ckpt
    if (path / "latest").exists() or any(path.glob("*/mp_rank_00_model_states.pt")):  # DeepSpeed
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        meta = next(path.glob("**/mp_rank_00_model_states.pt"))
        ckpt = torch.load(meta, map_location="cpu", weights_only=False)
        sd = get_fp32_state_dict_from_zero_checkpoint(str(path))
        ckpt["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in sd.items()}
        return ckpt
    raise ValueError(f"{path} is neither a Lightning .ckpt file, a DCP folder nor a DeepSpeed folder")


def export_checkpoint(ckpt_path: Path, out_dir: Path, weights: str = "ema",
                      extra_metadata: dict[str, Any] | None = None) -> Path:
    """Export the EMA (or raw) weights of a training checkpoint to ``out_dir``."""
    ckpt = load_training_checkpoint(ckpt_path)
    prefix = {"ema": "ema_model.", "model": "model."}[weights]
    hp = ckpt.get("hyper_parameters", {})
    meta = dict(hp.get("export_metadata", {}))
    sd = cast_for_export(_strip(ckpt["state_dict"], prefix), meta.get("export_dtype", "fp32"))
    meta.update({"step": int(ckpt.get("global_step", 0)), "weights": weights, "source_checkpoint": str(ckpt_path)})
    meta.update(extra_metadata or {})
    save_export(sd, out_dir, meta, max_shard_bytes=int(meta.get("max_shard_bytes", 5 * 1024**3)))
    log.info("exported %s weights of %s → %s", weights, ckpt_path, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a training checkpoint (EMA weights) to safetensors.")
    parser.add_argument("checkpoint", type=Path, help="a .ckpt file, an FSDP2/DCP folder or a DeepSpeed folder "
                                                      "(or a run dir: its checkpoints/last.ckpt)")
    parser.add_argument("--out", type=Path, default=None, help="export folder (default: <run dir>/export)")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    ckpt = args.checkpoint
    if (ckpt / "checkpoints" / "last.ckpt").exists():
        ckpt = (ckpt / "checkpoints" / "last.ckpt").resolve()
    out = args.out or ckpt.parent.parent / "export"
    export_checkpoint(ckpt, out, args.weights)
    print(f"export written to {out}")


if __name__ == "__main__":
    main()
