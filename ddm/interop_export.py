"""A model folder in diffusers format: ``export_diffusers(folder, out)`` and ``python -m ddm.assemble --format diffusers``.

::

    <model folder>/expert<k>/<stage>/   →  <out>/expert<k>/<stage>/  FluxTransformer2DModel folder (ddm.interop)
    Router/ (or Router/<stage>/)        →  <out>/Router/...           unchanged format (diffusers has no router class)
    vae.pt / a hunyuan(-tiny) VAE spec  →  <out>/vae/                 AutoencoderKLHunyuanVideo folder
                                           (a weight-free pixel VAE stays a spec: diffusers has no such class)
    the index's scheduler               →  <out>/scheduler/           FlowMatchEulerDiscreteScheduler config, shift of
                                                                      the default stage's geometry
    t5/ clip/ null_*.pt                 →  copied
    pool.json                           →  rewritten for the new files (ddm.pool)
    model_index.json                    →  ours, "checkpoint_format": "diffusers", written last

The result loads back with ``DDMPipeline.from_pretrained`` (it reads both formats). The folder is assembled beside
``out`` and swapped in when complete, as ``ddm.assemble`` does.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ddm.files import remove_path, staging_dir, swap_into_place
from ddm.flow import video_shift_alpha
from ddm.interop import (load_checkpoint, read_checkpoint_metadata, save_expert_diffusers, save_scheduler,
                         save_vae_diffusers)
from ddm.models.presets import ExpertConfig
from ddm.pool_manifest import write_pool_manifest
from ddm.model_folder import (MODEL_INDEX, ModelIndex, copy_export, place_folder, read_model_index, scan_model_folder,
                              stage_geometry_from_metadata, write_model_index)
from ddm.pipeline import DDMPipeline

__all__ = ["export_diffusers"]

log = logging.getLogger(__name__)


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return sd if dtype is None else {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _shift_alpha(index: ModelIndex, stage: str, meta: dict, vae: torch.nn.Module) -> float:
    """The schedule's shift for the stage's default geometry (``DDMPipeline.shift_alpha``'s rule)."""
    shift = index.scheduler.get("shift", "video")
    if shift != "video":
        return float(shift)
    geometry = index.stages.get(stage) or stage_geometry_from_metadata(meta, stage)
    if not (geometry.size and geometry.num_frames):
        log.warning("stage %s has no known geometry: the scheduler's shift is left at 1", stage)
        return 1.0
    _, t, h, w = vae.latent_shape(geometry.num_frames, *geometry.size)
    _, ph, pw = ExpertConfig.from_dict(meta["config"]).patch_size
    return video_shift_alpha((h // ph) * (w // pw), t)


def export_diffusers(folder: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
                     overwrite: bool = False) -> Path:
    """Write the model folder ``folder`` (ours or already diffusers) to ``out`` in diffusers format (module
    docstring); ``dtype`` casts experts, router and VAE weights. Returns ``out``."""
    folder, out = Path(folder), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"'{out}' already exists; pass overwrite=True (--overwrite) to replace it")
    index = read_model_index(folder)
    layout = scan_model_folder(folder, index)
    final, out = out, staging_dir(out)
    remove_path(out)
    out.mkdir(parents=True)
    try:
        for k, stages in layout.experts.items():
            for stage, src in stages.items():
                sd, meta = load_checkpoint(src)
                if (meta.get("prediction") or "velocity") != "velocity":
                    # diffusers' Flux pipelines read every transformer output as a velocity
                    raise ValueError(f"expert {k} ({src}) predicts {meta['prediction']!r}, not a velocity: "
                                     "diffusers' Flux pipelines would sample it wrongly; export a velocity pool")
                cfg = ExpertConfig.from_dict(meta["config"])
                save_expert_diffusers(sd, cfg, out / f"expert{k}" / stage, metadata=meta, dtype=dtype)
                log.info("expert %d %s → %s", k, stage, out / f"expert{k}" / stage)
        routers = {}
        for stage, src in layout.routers.items():
            rel = "Router" if stage is None else f"Router/{stage}"
            sd, meta = load_checkpoint(src)
            copy_export(src, out / rel, state_dict=_cast(sd, dtype), metadata=meta)
            routers[stage] = rel
        # the VAE and the schedule's shift as sampling would build them, without loading every expert again
        stage = DDMPipeline._choose_stage(layout, index, None)
        meta = read_checkpoint_metadata(layout.experts[1][stage])
        vae = DDMPipeline._load_vae(folder, index, meta, torch.device("cpu"), None)
        vae_entry = index.vae
        if hasattr(vae, "encoder"):
            save_vae_diffusers(vae, out / "vae", dtype=dtype)
            vae_entry = "vae"
        else:
            log.info("the %s VAE has no diffusers class: model_index.json keeps its spec", type(vae).__name__)
        alpha = _shift_alpha(index, stage, meta, vae)
        del vae
        save_scheduler(out / "scheduler", alpha, int(index.scheduler.get("num_steps", 50)))
        for name in (index.text_encoder, index.text_encoder_2):
            if (folder / name).is_dir():
                place_folder(folder / name, out / name)
        for name in (index.null_text or {}).values():
            if (folder / name).is_file():
                place_folder(folder / name, out / name)
        router_entry = None
        if routers:
            router_entry = routers[None] if None in routers else {str(s): r for s, r in routers.items()}
        new_index = dataclasses.replace(
            index, experts=[f"expert{k}" for k in layout.experts], num_experts=len(layout.experts),
            router=router_entry, vae=vae_entry,
            extra={**index.extra, "checkpoint_format": "diffusers", "transformer_class": "FluxTransformer2DModel",
                   "scheduler_dir": "scheduler", "scheduler_shift": alpha})
        # pool.json of the new files; the slot map, shard records and history come from the source's pool.json
        write_pool_manifest(out, new_index, source=folder, operation={"op": "export-diffusers", "from": str(folder)})
        write_model_index(out, new_index)
    except BaseException:
        remove_path(out)
        raise
    swap_into_place(out, final)
    log.info("diffusers-format model folder written: %s (%s)", final, MODEL_INDEX)
    return final
