"""The Paris model folder on disk (DESIGN §5.6): ``model_index.json`` (:class:`ModelIndex`, each stage's
:class:`StageGeometry`), the tolerant discovery of expert / stage / router folders (:func:`scan_model_folder`), a
stage's geometry from an export's metadata, and the helpers that copy exports and third-party folders into a
folder. :mod:`ddm.pipeline` samples from such a folder; :mod:`ddm.assemble` and :mod:`ddm.pool` write and check them.
The folder layout and the index schema are described in :mod:`ddm.pipeline`'s docstring and docs/model_folder.md.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddm.export_files import INDEX_FILE, MASTER_FILE, SHARD_DIR, save_export
from ddm.files import atomic_write
from ddm.export_metadata import ExportMetadata, StageSpec
from ddm.interop import is_checkpoint_dir, load_checkpoint, read_checkpoint_metadata
from ddm.models.text import NULL_CLIP_FILE, NULL_T5_FILE

__all__ = ["MODEL_INDEX", "StageGeometry", "ModelIndex", "read_model_index", "write_model_index", "FolderLayout",
           "scan_model_folder", "stage_geometry_from_metadata", "copy_export", "place_folder", "ddm_version",
           "is_export_dir", "stage_order", "canonical_stage"]

log = logging.getLogger(__name__)


MODEL_INDEX = "model_index.json"
CLASS_NAME = "DDMPipeline"
ROUTER_DIR = "Router"
VAE_FILE = "vae.pt"
DEFAULT_SCHEDULER = {"type": "rectified-flow-euler", "shift": "video", "num_steps": 50, "cfg_scale": 7.5}
ARCHITECTURES = {"opensora": "opensora-v2-mmdit", "flux": "flux-mmdit"}  # expert config layout → index name


def ddm_version() -> str:
    """The installed ``ddm`` version (written to ``_ddm_version``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ddm")
    except PackageNotFoundError:
        return "unknown"


# --- model_index.json ------------------------------------------------------------------------------------------
@dataclass
class StageGeometry:
    """Pixel geometry of one training stage; any field may be unknown (None) in a foreign index."""

    resolution: int | tuple[int, int] | None = None  # an int for square frames, else (height, width)
    num_frames: int | None = None
    fps: float | None = None
    latent_channels: int | None = None
    spatial_factor: int | None = None

    @property
    def size(self) -> tuple[int, int] | None:
        """(height, width), or None when the resolution is unknown."""
        if self.resolution is None:
            return None
        if isinstance(self.resolution, int):
            return self.resolution, self.resolution
        return int(self.resolution[0]), int(self.resolution[1])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StageGeometry:
        """Read the known keys (others are ignored); a [h, w] resolution becomes a tuple."""
        res = d.get("resolution")
        if isinstance(res, (list, tuple)):
            res = (int(res[0]), int(res[1])) if len(res) == 2 else None
        elif res is not None:
            res = int(res)
        as_int = {key: int(d[key]) if d.get(key) is not None else None
                  for key in ("num_frames", "latent_channels", "spatial_factor")}
        return cls(res, fps=float(d["fps"]) if d.get("fps") is not None else None, **as_int)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(self.resolution, tuple):
            d["resolution"] = list(self.resolution)
        return d


# index fields naming a component, and the forms we read (others, e.g. diffusers' [library, class], are skipped)
_COMPONENT_FIELDS = {"vae": (str, dict), "router": (str, dict), "text_encoder": str, "text_encoder_2": str,
                     "tokenizer": str, "tokenizer_2": str}


@dataclass
class ModelIndex:
    """``model_index.json`` as data; :meth:`from_dict` is tolerant, unknown fields land in ``extra``."""

    num_experts: int | None = None
    experts: list[str] | None = None
    expert_architecture: str | None = None
    router_architecture: str | None = "dit-router"
    router: str | dict[str, str] | None = None
    vae: str | dict[str, Any] | None = None
    text_encoder: str = "t5"
    text_encoder_2: str = "clip"
    tokenizer: str = "t5"
    tokenizer_2: str = "clip"
    stages: dict[str, StageGeometry] = field(default_factory=dict)
    default_stage: str | None = None
    null_text: dict[str, str] = field(default_factory=lambda: {"t5": NULL_T5_FILE, "clip": NULL_CLIP_FILE})
    text_pad_to: int | None = None
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCHEDULER))
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = MODEL_INDEX) -> ModelIndex:
        """Build from parsed JSON. Component fields that are not a name (diffusers-style ``[lib, class]``
        pairs) fall back to our defaults; wrong types of the fields we rely on raise a ValueError."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"stages", "scheduler", "extra"}
        reserved = known | {"stages", "scheduler", "_class_name", "_ddm_version"}
        index = cls(extra={k: v for k, v in d.items() if k not in reserved})
        for name in known:
            value = d.get(name)
            if value is None:
                continue
            if name in _COMPONENT_FIELDS and not isinstance(value, _COMPONENT_FIELDS[name]):
                continue  # diffusers-style ["transformers", "T5EncoderModel"]: keep our default location
            if name in ("num_experts", "text_pad_to") and not isinstance(value, int):
                raise ValueError(f"{source}: '{name}' must be an integer, got {value!r}")
            if name == "experts" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ValueError(f"{source}: 'experts' must be a list of folder names, got {value!r}")
            setattr(index, name, value)
        stages = d.get("stages") or {}
        if not isinstance(stages, Mapping):
            raise ValueError(f"{source}: 'stages' must map stage names to geometry, got {stages!r}")
        index.stages = {str(k): StageGeometry.from_dict(v or {}) for k, v in stages.items()}
        index.scheduler = {**DEFAULT_SCHEDULER, **(d.get("scheduler") or {})}
        return index

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, ``_class_name`` and ``_ddm_version`` first, unknown fields preserved."""
        d: dict[str, Any] = {"_class_name": CLASS_NAME, "_ddm_version": ddm_version()}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            d[f.name] = {k: g.to_dict() for k, g in value.items()} if f.name == "stages" else value
        return {**d, **{k: v for k, v in self.extra.items() if k not in d}}


def read_model_index(folder: str | Path) -> ModelIndex:
    """Parse ``folder/model_index.json``; a FileNotFoundError says the folder is not a model folder."""
    folder = Path(folder)
    path = folder / MODEL_INDEX
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: '{folder}'")
    if not path.is_file():
        raise FileNotFoundError(f"'{folder}' is not a DDM model folder: it has no {MODEL_INDEX} (write one with "
                                "python -m ddm.assemble or DDMPipeline.save_pretrained)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    if data.get("_class_name", CLASS_NAME) != CLASS_NAME:
        log.warning("%s names _class_name %r, not %r: reading it anyway", path, data["_class_name"], CLASS_NAME)
    return ModelIndex.from_dict(data, str(path))


def write_model_index(folder: str | Path, index: ModelIndex) -> Path:
    """Write ``folder/model_index.json`` atomically (it is the commit point of a folder write)."""
    text = json.dumps(index.to_dict(), indent=2) + "\n"
    return atomic_write(Path(folder) / MODEL_INDEX, lambda tmp: tmp.write_text(text))


# --- the folder layout ------------------------------------------------------------------------------------------
_EXPERT_NAME = re.compile(r"^experts?[\s_\-]?(\d+)$", re.IGNORECASE)
_EXPERT_IN_EXPERTS = re.compile(r"^(?:experts?[\s_\-]?)?(\d+)$", re.IGNORECASE)
_STAGE_NAME = re.compile(r"^(?:stage|s)[\s_\-]?(\d+)$", re.IGNORECASE)
_RESOLUTION_NAME = re.compile(r"^(\d+)(?:x(\d+))?(?:px|p)?$", re.IGNORECASE)


def is_export_dir(path: Path) -> bool:
    """True when ``path`` holds a checkpoint: ``master.safetensors``, a sharded ``model/`` index, or a diffusers /
    Hugging Face folder (``config.json`` + ``diffusion_pytorch_model*.safetensors`` or ``*model.safetensors``)."""
    return (path / MASTER_FILE).is_file() or (path / SHARD_DIR / INDEX_FILE).is_file() or \
        (path / INDEX_FILE).is_file() or is_checkpoint_dir(path)


def stage_order(name: str) -> tuple[int, str]:
    """Sort key for stage names: the number in the name (stage2 < stage3), then the name."""
    digits = re.findall(r"\d+", name)
    return (int(digits[-1]) if digits else -1, name)


def router_for_stage(routers: Mapping[str | None, Path], stage: str) -> tuple[Path, str | None]:
    """The router a folder uses at ``stage``: its own, else the stage-less one, else the latest stage's (routers
    are resolution-agnostic). Returns the path and the stage it was trained at when that is another stage."""
    if stage in routers:
        return routers[stage], None
    if None in routers:
        return routers[None], None
    other = sorted((s for s in routers if s is not None), key=stage_order)[-1]
    return routers[other], other


def canonical_stage(name: str, stages: Mapping[str, StageGeometry] | None = None) -> str | None:
    """``stage2`` for ``stage2``/``stage_2``/``S2``; the stage whose resolution is ``256px``/``256``/``256x256``
    (from ``stages``); None when the name says nothing."""
    if m := _STAGE_NAME.match(name):
        return f"stage{int(m.group(1))}"
    if (m := _RESOLUTION_NAME.match(name)) and stages:
        h = int(m.group(1))
        size = (h, int(m.group(2) or h))
        matches = [s for s, g in stages.items() if g.size == size]
        if len(matches) == 1:
            return matches[0]
    return None


@dataclass
class FolderLayout:
    """Where the checkpoints of a model folder are: ``experts[k][stage]`` (k = 1..K) and ``routers[stage]``
    (key None for a stage-independent ``Router/``)."""

    root: Path
    experts: dict[int, dict[str, Path]]
    routers: dict[str | None, Path]

    @property
    def stages(self) -> list[str]:
        """Stages every expert has, in stage order."""
        common = set.intersection(*(set(s) for s in self.experts.values())) if self.experts else set()
        return sorted(common, key=stage_order)


def _stage_of_export(path: Path, stages: Mapping[str, StageGeometry], fallback: str | None) -> str:
    name = canonical_stage(path.name, stages)
    if name is None:
        name = read_checkpoint_metadata(path).get("stage") or fallback
    if not name:
        raise ValueError(f"cannot tell which stage '{path}' holds: its name is not like stage2/s2/256px and its "
                         "metadata has no 'stage'")
    return str(name)


def _stage_dirs(folder: Path, stages: Mapping[str, StageGeometry], default_stage: str | None,
                what: str) -> dict[str, Path]:
    """Stage → checkpoint folder for an expert (or router) folder; a flat folder is its own one stage."""
    if is_export_dir(folder):
        return {_stage_of_export(folder, stages, default_stage or "default"): folder}
    found: dict[str, Path] = {}
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and is_export_dir(p)):
        stage = _stage_of_export(child, stages, None)
        if stage in found:
            raise ValueError(f"{what}: both '{found[stage]}' and '{child}' hold {stage}")
        found[stage] = child
    return found


def _discover_experts(root: Path) -> dict[int, Path]:
    found: dict[int, list[Path]] = {}
    children = [p for p in root.iterdir() if p.is_dir()]
    for child in children:
        if m := _EXPERT_NAME.match(child.name):
            found.setdefault(int(m.group(1)), []).append(child)
        elif child.name.lower() == "experts":
            for sub in (p for p in child.iterdir() if p.is_dir()):
                if m := _EXPERT_IN_EXPERTS.match(sub.name):
                    found.setdefault(int(m.group(1)), []).append(sub)
    clashes = {k: v for k, v in found.items() if len(v) > 1}
    if clashes:
        k, paths = next(iter(clashes.items()))
        raise ValueError(f"'{root}' holds expert {k} twice: {', '.join(str(p) for p in sorted(paths))}")
    return {k: v[0] for k, v in sorted(found.items())}


def scan_model_folder(folder: str | Path, index: ModelIndex) -> FolderLayout:
    """Find every expert and router checkpoint of a model folder (see the module docstring for the variants).

    Raises FileNotFoundError for an expert the index names but the folder lacks, and ValueError when the
    expert ids found are not 1..K or disagree with the index's ``num_experts``.
    """
    root = Path(folder)
    if index.experts is not None:
        expert_dirs = {}
        for k, name in enumerate(index.experts, start=1):
            path = root / name
            if not path.is_dir():
                raise FileNotFoundError(f"{MODEL_INDEX} names expert {k} '{name}', but '{path}' does not exist")
            expert_dirs[k] = path
    else:
        expert_dirs = _discover_experts(root)
    if not expert_dirs:
        raise FileNotFoundError(f"'{root}' holds no expert folders (expected expert1/ … expertK/ or Paris 1.0's "
                                f"expert_0/ … expert_{{K-1}}/); {_found(root)}")
    ids = sorted(expert_dirs)
    if ids and ids[0] == 0 and index.experts is None:  # Paris 1.0 numbers its folders from 0: expert_0 is expert 1
        expert_dirs = {k + 1: p for k, p in expert_dirs.items()}
        ids = sorted(expert_dirs)
        log.info("'%s': expert folders are numbered from 0 (%s): read as experts 1..%d", root,
                 ", ".join(p.name for p in expert_dirs.values()), len(ids))
    if ids != list(range(1, len(ids) + 1)):
        missing = sorted(set(range(1, max(ids) + 1)) - set(ids))
        raise ValueError(f"'{root}': expert ids must be consecutive (1..K, or 0..K-1 for Paris 1.0 folders), found "
                         f"{', '.join(p.name for p in expert_dirs.values())} (missing expert {missing}); "
                         f"{_found(root)}")
    if index.num_experts is not None and index.num_experts != len(ids):
        raise ValueError(f"{MODEL_INDEX} says num_experts={index.num_experts} but '{root}' holds {len(ids)} "
                         f"expert folder(s): {', '.join(p.name for p in expert_dirs.values())}")
    experts = {}
    for k, path in expert_dirs.items():
        experts[k] = _stage_dirs(path, index.stages, index.default_stage, f"expert {k}")
        if not experts[k]:
            raise FileNotFoundError(f"expert {k} folder '{path}' holds no checkpoint (master.safetensors, "
                                    f"{SHARD_DIR}/{INDEX_FILE}, or diffusers' config.json + "
                                    f"diffusion_pytorch_model*.safetensors), directly or in a stage folder; "
                                    f"{_found(path)}")
    return FolderLayout(root, experts, _find_routers(root, index))


def _found(root: Path) -> str:
    """What a folder holds, for error messages: its entries, each folder marked with a trailing slash."""
    entries = sorted(f"{p.name}/" if p.is_dir() else p.name for p in root.iterdir()) if root.is_dir() else []
    return f"found: {', '.join(entries) or 'nothing'}"


def _find_routers(root: Path, index: ModelIndex) -> dict[str | None, Path]:
    if isinstance(index.router, Mapping):
        routers: dict[str | None, Path] = {}
        for stage, name in index.router.items():
            if not (root / name).is_dir():
                raise FileNotFoundError(f"{MODEL_INDEX} names router '{name}' for {stage}, but '{root / name}' "
                                        "does not exist")
            routers[str(stage)] = root / name
        return routers
    if isinstance(index.router, str):
        folder = root / index.router
        if not folder.is_dir():
            raise FileNotFoundError(f"{MODEL_INDEX} names router '{index.router}', but '{folder}' does not exist")
    else:
        folder = next((p for p in sorted(root.iterdir()) if p.is_dir() and p.name.lower() == "router"), None)
        if folder is None:
            return {}
    if is_export_dir(folder):
        return {None: folder}
    return dict(_stage_dirs(folder, index.stages, None, "the router"))


# --- copying checkpoints and third-party folders ------------------------------------------------------------------
def copy_export(src: str | Path, dst: str | Path, *, single_file: bool = True, sharded: bool = True,
                state_dict: Mapping[str, torch.Tensor] | None = None,
                metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the checkpoint at ``src`` (or the given ``state_dict``/``metadata``) to ``dst`` in the requested
    forms, keeping its metadata and shard size, and remove a form of an earlier write that was not requested
    (so ``dst`` never holds two different weights)."""
    if state_dict is None or metadata is None:
        state_dict, metadata = load_checkpoint(src)
    dst = Path(dst)
    save_export(state_dict, dst, metadata, single_file=single_file, sharded=sharded,
                max_shard_bytes=int(metadata.get("max_shard_bytes") or 2 * 1024**3))
    if not single_file:
        (dst / MASTER_FILE).unlink(missing_ok=True)
    if not sharded and (dst / SHARD_DIR).exists():
        shutil.rmtree(dst / SHARD_DIR)
    return dst


def place_folder(src: str | Path, dst: str | Path, mode: str = "copy") -> Path:
    """Put a file or folder ``src`` at ``dst`` by ``copy`` (through a temporary name, then renamed) or
    ``link`` (a symlink to the absolute source). An existing ``dst`` is replaced."""
    src, dst = Path(src).resolve(), Path(dst)
    if mode not in ("copy", "link"):
        raise ValueError(f"mode must be 'copy' or 'link', got {mode!r}")
    if dst.resolve() == src:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    elif tmp.exists():
        shutil.rmtree(tmp)
    if mode == "link":
        tmp.symlink_to(src, target_is_directory=src.is_dir())
    elif src.is_dir():
        shutil.copytree(src, tmp, symlinks=False)
    else:
        shutil.copy2(src, tmp)
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    tmp.replace(dst)
    return dst

def stage_geometry_from_metadata(meta: Mapping[str, Any], stage: str) -> StageGeometry:
    """A stage's geometry from an export's metadata: ``geometry`` (what the job read from its shards and
    trained on) when recorded, else its :class:`ddm.export_metadata.StageSpec`."""
    legacy = "stage_spec" not in meta  # its train_config's recipe holds every stage: read the one asked for
    typed = ExportMetadata.from_dict({**meta, "stage": stage} if legacy else meta)
    spec = typed.stage_spec if legacy or typed.stage in (None, stage) else StageSpec()
    geometry = StageGeometry.from_dict({"resolution": spec.resolution, "num_frames": spec.num_frames, "fps": spec.fps})
    trained = meta.get("geometry")
    if isinstance(trained, Mapping) and trained.get("height") and trained.get("width"):
        h, w = int(trained["height"]), int(trained["width"])
        geometry.resolution = h if h == w else (h, w)
        geometry.num_frames = int(trained["num_frames"])
        geometry.fps = float(trained["fps"]) if trained.get("fps") is not None else geometry.fps
    if geometry.spatial_factor is None and typed.stage_spec.vae_spatial_factor is not None:
        geometry.spatial_factor = int(typed.stage_spec.vae_spatial_factor)
    if geometry.latent_channels is None and isinstance(meta.get("config"), Mapping):
        geometry.latent_channels = meta["config"].get("latent_channels")
    return geometry
