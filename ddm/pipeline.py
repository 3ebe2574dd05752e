"""The Paris model folder (DESIGN §5.6) and :class:`DDMPipeline`, which samples videos from it.

What :meth:`DDMPipeline.save_pretrained` and ``python -m ddm.assemble`` write::

    model_index.json            the schema below
    expert1/ … expertK/         stage2/, stage3/: each a master.safetensors and a sharded model/ folder
    Router/                     one router export (it is resolution-agnostic), or Router/<stage>/ per stage
    vae.pt                      HunyuanVideo VAE; tiny folders name a VAE spec in the index instead
    t5/  clip/                  text encoders (third-party files the user places)
    null_t5.pt  null_clip.pt    CFG null conditioning (encodings of "")

:meth:`DDMPipeline.from_pretrained` reads it tolerantly, because the Paris 2.0 schema is not public:
expert folders ``expert1``, ``expert_1``, ``Expert-1``, ``experts/1``, ``experts/expert1``; stage folders
``stage2``, ``stage_2``, ``s2``, ``256px`` / ``256`` (matched to the index's stage resolutions), any other
name by the ``stage`` in its checkpoint metadata, or a flat expert folder holding the checkpoint itself;
``Router/`` or ``router/``. Missing optional index fields are filled from the exports' metadata and
unknown fields are kept (and written back). Checkpoints may also be diffusers folders and the layout Paris 1.0
publishes (0-based ``expert_0/``, ``router/config.json`` + ``pytorch_model.safetensors``, a ``vae/`` folder):
``ddm.interop`` reads them; ``ddm.interop_export`` writes a folder in diffusers format.

Heterogeneous pools: experts may differ in size (preset, width, depth, patch) and in prediction target (the
export metadata's ``prediction``: ``velocity`` when absent, ``epsilon`` or ``x0``); a non-velocity expert is
wrapped in :class:`ddm.models.velocity.VelocityModel`, so the sampler mixes velocities as always.

``model_index.json`` (Paris 1.0's field names, plus ours)::

    _class_name "DDMPipeline", _ddm_version, num_experts, expert_architecture, router_architecture,
    vae ("vae.pt" or a ddm.models.vae.build_vae spec such as {"type": "pixel", "spatial_factor": 1}),
    text_encoder "t5", text_encoder_2 "clip", tokenizer "t5", tokenizer_2 "clip",
    experts ["expert1", ...], stages {name: {resolution, num_frames, fps, latent_channels, spatial_factor}},
    default_stage, router ("Router" or {stage: "Router/<stage>"}), null_text {"t5": ..., "clip": ...},
    text_pad_to, scheduler {"type": "rectified-flow-euler", "shift": "video" | number, "num_steps", "cfg_scale"}
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ddm.assets import require_path
from ddm.files import atomic_save_torch
from ddm.export_metadata import ExportMetadata
from ddm.flow import video_shift_alpha
from ddm.interop import build_checkpoint_model, load_vae_diffusers, read_checkpoint_metadata
from ddm.model_folder import (ARCHITECTURES, MODEL_INDEX, ROUTER_DIR, VAE_FILE, FolderLayout, ModelIndex,
                              StageGeometry, canonical_stage, copy_export, place_folder, read_model_index, router_for_stage,
                              scan_model_folder, stage_geometry_from_metadata, stage_order, write_model_index)
from ddm.models.text import NULL_CLIP_FILE, NULL_T5_FILE, TextEncoders, load_null_tensors, pad_tokens
from ddm.models.vae import PixelVAE, build_vae, load_vae
from ddm.models.velocity import VelocityModel, as_velocity_model, unwrap_velocity_model
from ddm.sampler import ExpertPlacement, RoutingTrace, sample
from ddm.sampling_spec import Routing, SamplingSpec
from ddm.video_io import read_video, resize_center_crop

__all__ = ["MODEL_INDEX", "StageGeometry", "ModelIndex", "read_model_index", "write_model_index", "FolderLayout",
           "scan_model_folder", "stage_geometry_from_metadata", "copy_export",
           "place_folder", "GenerationResult", "DDMPipeline"]

log = logging.getLogger(__name__)

# --- the pipeline -----------------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    """What :meth:`DDMPipeline.generate` returns.

    ``videos`` uint8 (N, F, H, W, 3); ``latents`` float32 (N, C, T, h, w) on the CPU (the sampler's output,
    conditioning frames written back); ``traces`` one :class:`RoutingTrace` over all N samples (weights
    (steps, N, K)) when asked for; ``seeds`` the per-sample seeds used; ``fps`` the stage's frame rate;
    ``settings`` the resolved sampling settings (stage, size, steps, cfg, shift, strategy, ...).
    """

    videos: np.ndarray
    latents: torch.Tensor
    traces: RoutingTrace | None
    seeds: list[int]
    prompts: list[str]
    fps: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)




def _resolve_devices(device: torch.device, placement: str, devices: Sequence[str | torch.device] | None
                     ) -> list[torch.device]:
    if devices:
        return [torch.device(d) for d in devices]
    if placement == "spread" and device.type == "cuda":
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


class DDMPipeline:
    """K experts, a router, a VAE and the text encoders of one stage, ready to sample (see ``generate``)."""

    def __init__(self, experts: Sequence[torch.nn.Module], router: torch.nn.Module | None, vae: torch.nn.Module,
                 text: TextEncoders | None, null_text: tuple[torch.Tensor, torch.Tensor] | None, index: ModelIndex,
                 stage: str, *, geometry: StageGeometry | None = None,
                 prior_correction: Sequence[float] | None = None, device: str | torch.device = "cpu",
                 placement: str = "same", devices: Sequence[str | torch.device] | None = None,
                 layout: FolderLayout | None = None, expert_metadata: Sequence[Mapping[str, Any]] | None = None,
                 router_metadata: Mapping[str, Any] | None = None,
                 text_dirs: tuple[Path, Path] | None = None) -> None:
        if not experts:
            raise ValueError("a DDMPipeline needs at least one expert")
        if router is None and len(experts) > 1:
            raise ValueError(f"{len(experts)} experts need a router to be mixed (a routerless folder must hold "
                             "exactly one expert, the monolith)")
        self.experts = list(experts)
        self.router = router
        self.vae = vae
        self.text = text
        self.null_text = null_text
        self.index = index
        self.stage = stage
        self.geometry = geometry or index.stages.get(stage) or StageGeometry()
        self.prior_correction = list(prior_correction) if prior_correction is not None else None
        self.device = torch.device(device)
        self.placement = ExpertPlacement(self.experts, placement, _resolve_devices(self.device, placement, devices))
        self.layout = layout
        self.expert_metadata = [dict(m) for m in expert_metadata] if expert_metadata else [{} for _ in experts]
        self.router_metadata = dict(router_metadata or {})
        self.text_dirs = text_dirs
        self._check_compatible()

    @property
    def num_experts(self) -> int:
        """K (1 for a monolith folder)."""
        return len(self.experts)

    @property
    def fps(self) -> float | None:
        return self.geometry.fps

    def _check_compatible(self) -> None:
        configs = [e.config for e in self.experts]
        for name in ("latent_channels", "context_in_dim", "vec_in_dim"):
            values = [getattr(c, name) for c in configs]
            if len(set(values)) > 1:
                raise ValueError(f"the experts disagree on {name}: {values}")
        cfg = configs[0]
        if self.vae.latent_channels != cfg.latent_channels:
            raise ValueError(f"the VAE gives {self.vae.latent_channels} latent channels but the experts take "
                             f"{cfg.latent_channels}")
        if self.router is not None:
            predicted = self.router.cfg.num_experts
            if predicted != self.num_experts:
                raise ValueError(f"the router predicts {predicted} experts but {self.num_experts} experts are loaded")
            if self.router.cfg.latent_channels != cfg.latent_channels:
                raise ValueError(f"the router reads {self.router.cfg.latent_channels} latent channels but the "
                                 f"experts take {cfg.latent_channels}")
        if self.text is not None and (self.text.t5_dim, self.text.clip_dim) != (cfg.context_in_dim, cfg.vec_in_dim):
            raise ValueError(f"the text encoders give T5 width {self.text.t5_dim} and CLIP width {self.text.clip_dim}"
                             f" but the experts take {cfg.context_in_dim} and {cfg.vec_in_dim}")

    # --- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path, stage: str | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, placement: str = "same", load_text: bool = True,
                        devices: Sequence[str | torch.device] | None = None,
                        vae_tiling: bool | Mapping[str, Any] | None = None) -> DDMPipeline:
        """Load one stage of a model folder (module docstring: layout and tolerated variants).

        Args:
            stage: ``stage2``/``stage3`` (variants like ``s3`` accepted); default: the index's
                ``default_stage``, else the highest stage every expert has.
            device, dtype: where and in which dtype the experts and router compute (default dtype: as stored);
                the VAE runs in ``dtype`` or float32; the text encoders in their default (fp32 on CPU).
            placement: ``same`` | ``spread`` | ``offload`` (:class:`ddm.sampler.ExpertPlacement`); ``devices``
                for ``spread`` defaults to every CUDA device.
            load_text: load ``t5/`` and ``clip/`` (needed by :meth:`generate`); the null tensors are made
                from them when the folder lacks ``null_t5.pt``/``null_clip.pt``.
            vae_tiling: tile a HunyuanVideo VAE (True, or ``enable_tiling`` kwargs); default: on when the
                stage's frames are larger than one 256-pixel tile (768² needs it), as the index spec says otherwise.
        """
        root = Path(folder).expanduser()
        index = read_model_index(root)
        layout = scan_model_folder(root, index)
        stage = cls._choose_stage(layout, index, stage)
        device = torch.device(device)
        build_device = "cpu" if placement != "same" else device  # ExpertPlacement moves the others
        experts, metas = [], []
        for k, stages in tqdm(layout.experts.items(), desc="loading experts", disable=len(layout.experts) < 2):
            meta = read_checkpoint_metadata(stages[stage])
            if meta.get("kind") not in (None, "expert"):
                raise ValueError(f"'{stages[stage]}' holds a {meta.get('kind')!r} export, not an expert")
            log.info("expert %d: %s (%s)", k, stages[stage], meta.get("stage", stage))
            # an epsilon / x0 expert of a heterogeneous pool is converted to a velocity at every call
            experts.append(as_velocity_model(build_checkpoint_model(stages[stage], device=str(build_device),
                                                                    dtype=dtype), meta.get("prediction")))
            metas.append(meta)
        router, router_meta = cls._load_router(layout, stage, len(experts), str(device), dtype)
        geometry = index.stages.get(stage) or stage_geometry_from_metadata(metas[0], stage)
        vae = cls._load_vae(root, index, metas[0], device, dtype)
        if hasattr(vae, "enable_tiling"):
            if vae_tiling is None:
                vae_tiling = vae.tiling is not None or max(geometry.size or (0,)) > 256
            if vae_tiling:
                vae.enable_tiling(**(dict(vae_tiling) if isinstance(vae_tiling, Mapping) else {}))
            else:
                vae.disable_tiling()
        if geometry.spatial_factor is None:
            geometry.spatial_factor = vae.spatial_factor
        text, text_dirs, null = None, None, None
        if load_text:
            text_dirs = (root / index.text_encoder, root / index.text_encoder_2)
            text = TextEncoders.from_folder(*text_dirs, device=device)
            null = load_null_tensors(root, text)
        elif (root / NULL_T5_FILE).exists() and (root / NULL_CLIP_FILE).exists():
            null = load_null_tensors(root)
        return cls(experts, router, vae, text, null, index, stage, geometry=geometry,
                   prior_correction=router_meta.get("prior_correction"), device=device, placement=placement,
                   devices=devices, layout=layout, expert_metadata=metas, router_metadata=router_meta,
                   text_dirs=text_dirs)

    @staticmethod
    def _choose_stage(layout: FolderLayout, index: ModelIndex, stage: str | None) -> str:
        available = layout.stages
        if stage is None:
            if index.default_stage in available:
                return index.default_stage
            if not available:
                found = {k: sorted(s) for k, s in layout.experts.items()}
                raise ValueError(f"'{layout.root}': no stage is held by every expert (found {found})")
            return available[-1]
        wanted = stage if stage in available else (canonical_stage(stage, index.stages) or stage)
        for k, stages in layout.experts.items():
            if wanted not in stages:
                raise FileNotFoundError(f"expert {k} has no {wanted} checkpoint in '{layout.root}' (it has: "
                                        f"{', '.join(sorted(stages, key=stage_order)) or 'none'})")
        return wanted

    @staticmethod
    def _load_router(layout: FolderLayout, stage: str, num_experts: int, device: str, dtype: torch.dtype | None
                     ) -> tuple[torch.nn.Module | None, dict[str, Any]]:
        routers = layout.routers
        if not routers:
            if num_experts > 1:
                raise FileNotFoundError(f"'{layout.root}' holds {num_experts} experts but no Router/ folder: "
                                        "the router mixes them (only a one-expert monolith folder needs none)")
            return None, {}
        path, other = router_for_stage(routers, stage)
        if other is not None:
            log.info("no %s router: using the %s router (routers are resolution-agnostic)", stage, other)
        meta = read_checkpoint_metadata(path)
        if meta.get("kind") != "router":
            raise ValueError(f"'{path}' holds a {meta.get('kind')!r} export, not a router")
        predicted = int(meta.get("num_experts") or (meta.get("config") or {}).get("num_experts") or 0)
        if predicted != num_experts:
            raise ValueError(f"the router predicts {predicted} experts but {num_experts} experts are loaded "
                             f"(router '{path}')")
        log.info("router: %s", path)
        meta["_path"] = str(path)
        return build_checkpoint_model(path, device=device, dtype=dtype), meta

    @staticmethod
    def _load_vae(root: Path, index: ModelIndex, expert_meta: Mapping[str, Any], device: torch.device,
                  dtype: torch.dtype | None) -> torch.nn.Module:
        vae_dtype = dtype or torch.float32
        spec = index.vae
        if spec is None:  # a foreign index: vae.pt if present, else a weight-free spec from training
            trained = ExportMetadata.from_dict(expert_meta).vae or {}
            spec = dict(trained) if trained.get("type") in ("pixel", "hunyuan-tiny") and \
                not (root / VAE_FILE).exists() else VAE_FILE
            if spec == VAE_FILE and not (root / VAE_FILE).exists() and (root / "vae").is_dir():
                spec = "vae"  # a diffusers-style vae/ folder (Paris 1.0's layout)
        if isinstance(spec, str) and (root / spec).is_dir():  # a diffusers AutoencoderKLHunyuanVideo folder
            log.info("VAE: %s (diffusers format)", root / spec)
            return load_vae_diffusers(root / spec, device=device, dtype=vae_dtype)
        if isinstance(spec, str):
            log.info("VAE: %s", root / spec)
            return load_vae(require_path(root / spec, "vae"), device=device, dtype=vae_dtype)
        if not isinstance(spec, Mapping):
            raise ValueError(f"{MODEL_INDEX}: 'vae' must be a file name or a VAE spec, got {spec!r}")
        spec = dict(spec)
        if spec.get("path"):
            spec["path"] = str(require_path(root / spec["path"], "vae"))  # relative to the folder (or absolute)
        if spec.get("type") != "pixel":
            spec.update(device=str(device), dtype=str(vae_dtype).removeprefix("torch."))
        log.info("VAE: %s", spec)
        return build_vae(spec)

    # --- saving -----------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, single_file: bool = True, sharded: bool = True) -> Path:
        """Write this pipeline as a model folder: every stage of the folder it was loaded from (the loaded
        stage from memory, the others copied), the router(s), the VAE (spec or ``vae.pt``), the text encoders
        (copied) and the null tensors; ``model_index.json`` last. Returns the folder."""
        out = Path(folder)
        if self.layout is not None and out.resolve() == self.layout.root.resolve():
            raise ValueError(f"save_pretrained into the folder the pipeline was loaded from ('{out}') would "
                             "overwrite checkpoints it still reads; choose another folder")
        out.mkdir(parents=True, exist_ok=True)
        forms = dict(single_file=single_file, sharded=sharded)
        names = [f"expert{k}" for k in range(1, self.num_experts + 1)]
        for k, (name, expert) in enumerate(zip(names, self.experts), start=1):
            stages = self.layout.experts[k] if self.layout else {self.stage: None}
            for stage, src in stages.items():
                if stage == self.stage:
                    net = unwrap_velocity_model(expert)  # the trained network; its metadata keeps the target
                    copy_export(src, out / name / stage, state_dict=net.state_dict(),
                                metadata=self.expert_metadata[k - 1] or _expert_metadata(expert), **forms)
                else:
                    copy_export(src, out / name / stage, **forms)
        router_index = self._save_routers(out, forms)
        stages = {self.stage: self.geometry}
        for stage, src in (self.layout.experts[1].items() if self.layout else ()):
            if stage not in stages:
                stages[stage] = self.index.stages.get(stage) or \
                    stage_geometry_from_metadata(read_checkpoint_metadata(src), stage)
        index = dataclasses.replace(
            self.index, num_experts=self.num_experts, experts=names, router=router_index,
            vae=self._save_vae(out), stages=dict(sorted(stages.items(), key=lambda kv: stage_order(kv[0]))),
            default_stage=self.index.default_stage or self.stage,
            expert_architecture=self.index.expert_architecture or ARCHITECTURES.get(self.experts[0].config.layout),
            text_encoder="t5", text_encoder_2="clip", tokenizer="t5", tokenizer_2="clip")
        text_dirs = self.text_dirs
        if text_dirs is None and self.layout is not None:  # loaded with load_text=False: copy them all the same
            text_dirs = (self.layout.root / self.index.text_encoder, self.layout.root / self.index.text_encoder_2)
        if text_dirs is not None and all(d.is_dir() for d in text_dirs):
            place_folder(text_dirs[0], out / "t5")
            place_folder(text_dirs[1], out / "clip")
        if self.null_text is not None:
            atomic_save_torch(self.null_text[0], out / NULL_T5_FILE)
            atomic_save_torch(self.null_text[1], out / NULL_CLIP_FILE)
        write_model_index(out, index)
        log.info("saved the %d-expert pipeline to %s", self.num_experts, out)
        return out

    def _save_routers(self, out: Path, forms: dict[str, bool]) -> str | dict[str, str] | None:
        if self.router is None:
            return None
        routers = self.layout.routers if self.layout else {None: None}
        loaded = self.router_metadata.get("_path")
        written: dict[str, str] = {}
        for stage, src in routers.items():
            rel = ROUTER_DIR if stage is None else f"{ROUTER_DIR}/{stage}"
            if src is None or str(src) == loaded:
                meta = {k: v for k, v in self.router_metadata.items() if k != "_path"} or \
                    {"kind": "router", "config": self.router.cfg.to_dict(), "num_experts": self.num_experts}
                copy_export(src, out / rel, state_dict=self.router.state_dict(), metadata=meta, **forms)
            else:
                copy_export(src, out / rel, **forms)
            written[str(stage)] = rel
        return ROUTER_DIR if None in routers else written

    def _save_vae(self, out: Path) -> str | dict[str, Any]:
        if isinstance(self.vae, PixelVAE):
            return {"type": "pixel", "spatial_factor": self.vae.spatial_factor,
                    "temporal_factor": self.vae.temporal_factor}
        spec = self.index.vae
        if isinstance(spec, Mapping) and not spec.get("path"):
            return dict(spec)  # e.g. a seeded hunyuan-tiny: rebuilt from the spec
        src = self.layout.root / (spec["path"] if isinstance(spec, Mapping) else spec or VAE_FILE) \
            if self.layout else None
        if src is not None and not src.exists() and spec is None and (self.layout.root / "vae").is_dir():
            src = self.layout.root / "vae"  # read from a diffusers-style vae/ folder (Paris 1.0's layout)
        if src is not None and src.is_dir():  # a diffusers AutoencoderKLHunyuanVideo folder: copied as it is
            place_folder(src, out / src.name)
            return src.name
        if src is not None and src.is_file():
            place_folder(src, out / VAE_FILE)
        else:
            atomic_save_torch({k: v.cpu() for k, v in self.vae.state_dict().items()}, out / VAE_FILE)
        return {**spec, "path": VAE_FILE} if isinstance(spec, Mapping) else VAE_FILE

    # --- sampling ---------------------------------------------------------------------------------------------
    def shift_alpha(self, latent_shape: Sequence[int], shift: float | str | None = None) -> float:
        """The schedule's shift for a latent (C, T, h, w): a number, or ``"video"`` (Open-Sora's
        :func:`ddm.flow.video_shift_alpha` over the experts' tokens per frame); default: the index's."""
        shift = self.index.scheduler.get("shift", "video") if shift is None else shift
        if shift != "video":
            return float(shift)
        _, t, h, w = latent_shape
        _, ph, pw = self.experts[0].config.patch_size
        return video_shift_alpha((h // ph) * (w // pw), t)

    def _video_size(self, num_frames: int | None, height: int | None, width: int | None) -> tuple[int, int, int]:
        size = self.geometry.size
        height = height or (size[0] if size else None)
        width = width or (size[1] if size else None)
        num_frames = num_frames or self.geometry.num_frames
        if not (num_frames and height and width):
            raise ValueError(f"stage {self.stage!r} has no known geometry in {MODEL_INDEX}: pass num_frames, "
                             "height and width")
        return int(num_frames), int(height), int(width)

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"t5": (B, L, D), "clip": (B, D)}`` on the pipeline's device. T5 states (true length) are
        zero-padded to the index's ``text_pad_to``, else to the encoder's max length: a fixed L, so a
        sample does not depend on the prompts it is batched with."""
        if self.text is None:
            raise ValueError("this pipeline was loaded with load_text=False: it cannot encode prompts")
        t5, clip = self.text.encode(list(prompts))
        t5, _ = pad_tokens(t5, self.index.text_pad_to or self.text.t5_max_length)
        return {"t5": t5.to(self.device), "clip": clip.to(self.device)}

    def encode_images(self, images: Sequence[np.ndarray | str | Path | None], latent_shape: Sequence[int],
                      size: tuple[int, int], fit: str | None = None) -> dict[str, torch.Tensor] | None:
        """The sampler's ``i2v`` dict for a batch: each image fitted to ``size`` (:func:`fit_image`: ``fit``
        ``crop`` | ``resize`` | None), encoded alone as a 1-frame video into the first latent frame, mask True
        there. None when no image is given."""
        if all(image is None for image in images):
            return None
        if not self.experts[0].config.cond_embed:
            raise ValueError(f"the {self.experts[0].config.preset} experts have no image conditioning (cond_embed "
                             "is false): they cannot do image-to-video")

        c, t, h, w = latent_shape
        latent = torch.zeros(len(images), c, t, h, w, device=self.device)
        mask = torch.zeros(len(images), t, dtype=torch.bool)
        for i, image in enumerate(images):
            if image is None:
                continue
            name = f"'{image}'" if isinstance(image, (str, Path)) else f"image {i + 1} of the batch"
            frame = fit_image(_read_image(image), size, fit, name)[None]  # (1, H, W, 3)
            pixels = torch.from_numpy(frame).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0  # (1, 3, 1, H, W)
            latent[i, :, :1] = self.vae.encode(pixels.to(self.device)).to(latent)
            mask[i, 0] = True
        return {"latent": latent, "mask": mask}

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], spec: SamplingSpec | None = None, *, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, seeds: Sequence[int] | int | None = None,
                 images: Sequence[np.ndarray | str | Path | None] | None = None, batch_size: int = 4,
                 trace: bool = False, progress: bool = True, oracle_ids: Sequence[int] | int | None = None,
                 image_fit: str | None = None) -> GenerationResult:
        """Text-to-video (and image-to-video) with the routed sampler.

        Args:
            prompts: one caption per sample.
            spec: :class:`ddm.sampling_spec.SamplingSpec`; its routing left None is top-2; its ``num_steps``,
                ``cfg_scale`` and ``shift`` left None take the index's scheduler (50, 7.5, ``"video"``); the
                folder's prior correction is added unless the routing sets one. Routing is ignored by a
                one-expert folder. Placement is the pipeline's (``from_pretrained(placement=...)``).
            num_frames, height, width: default: the stage's (num_frames must be 4k+1).
            oracle_ids: the oracle routing's expert id (1..K), one per prompt or one for all.
            seeds: one per prompt, or an int s for s, s+1, …; None draws them (returned in the result).
                A sample depends only on its prompt, image and seed, not on its batch mates.
            images: per prompt an RGB uint8 (H, W, 3) array, an image path, or None (t2v); the image becomes
                the first frame, kept exactly (up to the VAE round trip).
            image_fit: how an image of another aspect ratio than the video is fitted: ``crop`` (scale to
                cover, centre-crop) or ``resize`` (stretch); None refuses such an image (same-aspect images
                are scaled either way).
            batch_size: samples per sampler call. trace: also return the routing trace.
        """
        spec = spec if spec is not None else SamplingSpec()
        if spec.placement is not None and spec.placement != self.placement.policy:
            raise ValueError(f"this pipeline places its experts by {self.placement.policy!r}; load it with "
                             f"DDMPipeline.from_pretrained(..., placement={spec.placement!r}) to sample that way")
        routing = (spec.routing or Routing("topk", k=2)).with_prior(self.prior_correction)  # default: top-2
        if isinstance(prompts, str):
            raise ValueError("generate() takes a list of prompts, not a single string")
        prompts = list(prompts)
        n = len(prompts)
        if n == 0:
            raise ValueError("generate() needs at least one prompt")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        seeds = _per_sample_seeds(seeds, n)
        images = [None] * n if images is None else list(images)
        if len(images) != n:
            raise ValueError(f"{len(images)} images for {n} prompts (give one per prompt, None for text-only)")
        if image_fit not in IMAGE_FITS:
            raise ValueError(f"image_fit must be one of {IMAGE_FITS}, got {image_fit!r}")
        oracle = [oracle_ids] * n if oracle_ids is None or isinstance(oracle_ids, int) else list(oracle_ids)
        if len(oracle) != n:
            raise ValueError(f"{len(oracle)} oracle_ids for {n} prompts")
        num_frames, height, width = self._video_size(num_frames, height, width)
        latent_shape = self.vae.latent_shape(num_frames, height, width)
        # every image read and fitted before the first sample is drawn: a bad one fails fast
        images = [None if im is None else fit_image(_read_image(im), (height, width), image_fit,
                                                    f"'{im}'" if isinstance(im, (str, Path)) else f"image {i + 1}")
                  for i, im in enumerate(images)]
        scheduler = self.index.scheduler
        num_steps = int(spec.num_steps if spec.num_steps is not None else scheduler.get("num_steps", 50))
        cfg_scale = float(spec.cfg_scale if spec.cfg_scale is not None else scheduler.get("cfg_scale", 7.5))
        alpha = self.shift_alpha(latent_shape, spec.shift)
        resolved = SamplingSpec(routing, num_steps, cfg_scale, spec.shift, self.placement.policy)
        uncond = None
        if cfg_scale != 1.0:
            if self.null_text is None:
                raise FileNotFoundError(f"classifier-free guidance (cfg_scale={cfg_scale}) needs {NULL_T5_FILE} and "
                                        f"{NULL_CLIP_FILE}: load the text encoders or use cfg_scale=1")
            uncond = {"t5": self.null_text[0], "clip": self.null_text[1]}
        log.info("generating %d video(s) of %d x %dx%d (stage %s, %d experts, %s, %d steps, cfg %.3g, shift %.3g)",
                 n, num_frames, height, width, self.stage, self.num_experts, routing.label, num_steps, cfg_scale, alpha)

        videos, latents, traces = [], [], []
        bar = tqdm(total=n, desc="generating", unit="video", disable=not progress)
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            cond = self.encode_prompts(prompts[rows])
            i2v = self.encode_images(images[rows], latent_shape, (height, width), image_fit)
            ids = None if oracle[start] is None else oracle[rows]
            out = sample(self.experts, self.router, (len(prompts[rows]), *latent_shape), cond, resolved,
                         shift_alpha=alpha, uncond=uncond, oracle_ids=ids, seeds=seeds[rows], i2v=i2v, trace=trace,
                         progress=progress, placement=self.placement)
            latent, batch_trace = out if trace else (out, None)
            videos.append(self.decode(latent))
            latents.append(latent.float().cpu())
            if batch_trace is not None:
                traces.append(batch_trace)
            bar.update(len(prompts[rows]))
        bar.close()
        merged = None
        if traces:
            merged = RoutingTrace(routing.strategy, traces[0].t, torch.cat([tr.weights for tr in traces], dim=1))
        settings = {"stage": self.stage, "num_experts": self.num_experts, "num_frames": num_frames, "height": height,
                    "width": width, "num_steps": num_steps, "cfg_scale": cfg_scale, "shift_alpha": alpha,
                    "strategy": routing.strategy, "k": routing.k, "threshold": routing.threshold}
        return GenerationResult(np.concatenate(videos), torch.cat(latents), merged, seeds, prompts, self.fps,
                                settings)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """VAE-decode latents (B, C, T, h, w) to uint8 videos (B, F, H, W, 3), clamped to [-1, 1] first.
        One video at a time: decoder activations, not latents, bound the memory at 768²."""
        videos = []
        for row in latent:
            video = self.vae.decode(row[None].to(self.device)).float().clamp(-1.0, 1.0)
            pixels = ((video + 1.0) * 127.5).round().to(torch.uint8)
            videos.append(pixels.permute(0, 2, 3, 4, 1).cpu().numpy())
        return np.concatenate(videos)


def _expert_metadata(expert: torch.nn.Module) -> dict[str, Any]:
    """The export metadata of an expert built in memory (not loaded from a folder)."""
    meta = {"kind": "expert", "config": unwrap_velocity_model(expert).config.to_dict()}
    if isinstance(expert, VelocityModel):
        meta["prediction"] = expert.prediction
    return meta


def _per_sample_seeds(seeds: Sequence[int] | int | None, n: int) -> list[int]:
    if seeds is None:
        return torch.randint(0, 2**31 - 1, (n,)).tolist()
    if isinstance(seeds, (int, np.integer)):
        return [int(seeds) + i for i in range(n)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts (give one per prompt, or one int)")
    return seeds


IMAGE_FITS = (None, "crop", "resize")
ASPECT_TOLERANCE = 0.01  # relative: 1% (rounding of odd sizes) counts as the same aspect ratio


def fit_image(image: np.ndarray, size: tuple[int, int], fit: str | None, name: str = "the image") -> np.ndarray:
    """An RGB uint8 (H, W, 3) image fitted to ``size`` = (h, w). Of the same aspect ratio (within 1%) it is
    scaled (short side, centre-crop of the rounding); otherwise ``fit`` decides: ``crop`` scales it to cover
    and centre-crops, ``resize`` stretches it, None raises a ValueError naming both sizes (nothing is cut off
    or distorted without being asked for)."""
    if fit not in IMAGE_FITS:
        raise ValueError(f"image fit must be one of {IMAGE_FITS}, got {fit!r}")
    h, w = size
    src_h, src_w = image.shape[:2]
    if (src_h, src_w) == (h, w):
        return image
    same_aspect = abs((src_w / src_h) / (w / h) - 1.0) <= ASPECT_TOLERANCE
    if fit == "resize":
        import cv2

        return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if src_h * src_w > h * w else cv2.INTER_CUBIC)
    if fit is None and not same_aspect:
        raise ValueError(f"{name} is {src_w}x{src_h} (aspect {src_w / src_h:.3g}) but the video is {w}x{h} "
                         f"(aspect {w / h:.3g}): choose how to fit it, image_fit='crop' (scale to cover, then "
                         f"centre-crop) or 'resize' (stretch to {w}x{h}); CLI: --image-fit crop|resize")
    return resize_center_crop(image[None], size)[0]


def _read_image(image: np.ndarray | str | Path) -> np.ndarray:
    """An RGB uint8 (H, W, 3) array from an array or an image/video path (its first frame)."""
    if isinstance(image, (str, Path)):
        image = read_video(image, max_frames=1)[0][0]
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"an i2v image must be an RGB uint8 (H, W, 3) array, got {image.dtype} {image.shape}")
    return image
