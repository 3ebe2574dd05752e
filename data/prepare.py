"""``python -m data.prepare``: run the data steps ingest → embed → cluster → encode (Hydra, ``conf/prepare.yaml``).

``mode=extend input=NEW`` instead adds new clips to a prepared pool as expert K+1 without touching it
(:mod:`data.extend`).

Any subset of ``steps`` runs, always in pipeline order; each step is idempotent (a rerun with the same
inputs and config does no work) and encode resumes after a crash. Everything goes to ``paths.data_dir``::

    manifest.parquet rejected.parquet embeddings.parquet centroids.safetensors assignments.parquet
    shards/<encode.stage>/expert_<k>/<split>-NNNNNN.tar + shards.parquet + encode_rejected.parquet
    logs/prepare/ (Hydra's log and resolved config)

Configuration mistakes are reported before any heavy work: a missing or empty ``input``, more experts
than samples, an embedder / VAE / text-encoder folder that does not exist (with where to get it).
One writer per prep folder: a run holds ``<data_dir>/.lock`` (:mod:`ddm.lock`) from its first write to
its end.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import pyarrow.parquet as pq
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from data.audit import audit
from data.cluster import cluster
from data.embed import check_embedder_spec, embed
from data.encode import encode
from data.extend import extend
from data.ingest import ingest
from data.step import StepResult
from ddm.assets import require_path
from ddm.flow import latent_frames
from ddm.lock import DirLock
from ddm.models.text import make_tiny_text_encoders

log = logging.getLogger("data.prepare")

STEPS = ("ingest", "embed", "cluster", "encode")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def selected_steps(cfg: DictConfig) -> list[str]:
    """The requested steps in pipeline order (``steps``; ``stages`` is its deprecated old name); ValueError for
    unknown names or an empty list."""
    steps = cfg.get("steps")
    if cfg.get("stages") is not None:  # the old name, for one release
        log.warning("[prepare] 'stages' is deprecated: say steps=[...] (a training stage is stage2/stage3)")
        steps = cfg.stages
    steps = list(steps or [])
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise ValueError(f"steps must be a non-empty subset of {list(STEPS)}, got {steps}")
    return [s for s in STEPS if s in steps]


def check_input(input_path: Any) -> Path:
    """The ingest input as a Path; FileNotFoundError / ValueError when it is unset, missing or empty."""
    if input_path in (None, "", "???"):
        raise ValueError("set input=<folder of clips with .txt captions | CSV/parquet with path,text columns>")
    path = Path(str(input_path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"input '{path}' does not exist")
    if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
        raise ValueError(f"input folder '{path}' is empty: nothing to prepare")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"input manifest '{path}' is empty: nothing to prepare")
    return path


def text_dirs(text: Mapping[str, Any]) -> dict[str, str]:
    """``{"t5_dir", "clip_dir"}``; with ``create_tiny`` absent tiny encoders are built (logged), otherwise a
    missing folder raises FileNotFoundError naming where the real files come from."""
    t5_dir, clip_dir = Path(text["t5_dir"]), Path(text["clip_dir"])
    if text.get("create_tiny") and not (t5_dir.is_dir() and clip_dir.is_dir()):
        folder = Path(text["folder"])
        if (t5_dir, clip_dir) != (folder / "t5", folder / "clip"):
            raise ValueError("text.create_tiny builds <folder>/t5 and <folder>/clip: set t5_dir and clip_dir to those")
        log.info("[text] building tiny random-initialised T5 + CLIP encoders in %s (text=tiny: for tests and "
                 "demos, not for real training)", folder)
        make_tiny_text_encoders(folder)
    require_path(t5_dir, "t5")
    require_path(clip_dir, "clip")
    return {"t5_dir": str(t5_dir), "clip_dir": str(clip_dir)}


def preflight(cfg: DictConfig, steps: Sequence[str]) -> None:
    """Cheap checks of everything the selected steps will need (before any step runs)."""
    if "ingest" in steps:
        check_input(None if OmegaConf.is_missing(cfg, "input") else cfg.input)
    if cfg.num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {cfg.num_experts}")
    if "embed" in steps:
        check_embedder_spec(_plain(cfg.embedder))
    if "encode" in steps:
        latent_frames(int(cfg.encode.num_frames))
        if not cfg.encode.raw_frames and cfg.vae.get("path"):
            require_path(cfg.vae.path, "vae")
        text_dirs(_plain(cfg.text))


def check_enough_samples(manifest_path: Path, num_experts: int) -> None:
    """ValueError when the manifest has fewer usable samples than experts (before embedding anything)."""
    n = pq.ParquetFile(manifest_path).metadata.num_rows
    if n == 0:
        raise ValueError(f"'{manifest_path}' lists no usable samples (see rejected.parquet beside it)")
    if num_experts > n:
        raise ValueError(f"num_experts={num_experts} is more than the {n} usable samples in '{manifest_path}'")


def prepare(cfg: DictConfig) -> dict[str, StepResult]:
    """Run the configured steps; returns each step's result by name.

    The prep folder is locked for the whole run (:class:`ddm.lock.DirLock`): a second ``data.prepare`` on
    it is refused with :class:`ddm.lock.DirLockedError` naming the holder's host and PID, instead of the
    two deleting each other's temporary tars.
    """
    prep = Path(cfg.paths.data_dir)
    if str(cfg.get("mode", "prepare")) == "extend":
        return {"extend": _extend(cfg, prep)}
    if str(cfg.get("mode", "prepare")) != "prepare":
        raise ValueError(f"mode must be 'prepare' or 'extend', got {cfg.mode!r}")
    steps = selected_steps(cfg)
    preflight(cfg, steps)
    with DirLock(prep, "prep dir"):
        return _run_steps(cfg, steps, prep)


def _extend(cfg: DictConfig, prep: Path) -> StepResult:
    """``mode=extend``: the new clips of ``input`` become expert K+1 in a new folder (:mod:`data.extend`)."""
    preflight(cfg, ["ingest", "embed", "encode"])
    with DirLock(prep, "prep dir"):
        record = extend(cfg, embedder=_plain(cfg.embedder), text=text_dirs(_plain(cfg.text)),
                        vae=None if cfg.encode.raw_frames else _plain(cfg.vae), progress=bool(cfg.progress))
    return StepResult("extend", record["new_clips"], record["encoded"], record["new_clips"] - record["to_new_expert"],
                       outputs=[record["shards"][str(cfg.encode.stage)]], info=record)


def _run_steps(cfg: DictConfig, steps: Sequence[str], prep: Path) -> dict[str, StepResult]:
    manifest, embeddings, assignments = prep / "manifest.parquet", prep / "embeddings.parquet", prep / "assignments.parquet"
    log.info("[prepare] steps %s → %s", steps, prep.resolve())
    results: dict[str, StepResult] = {}
    common = {"progress": bool(cfg.progress)}
    if "ingest" in steps:
        results["ingest"] = ingest(cfg.input, prep, min_frames=cfg.ingest.min_frames, min_size=cfg.ingest.min_size,
                                   max_aspect=cfg.ingest.max_aspect, workers=cfg.ingest.workers, **common)
    if "embed" in steps or "cluster" in steps:
        check_enough_samples(manifest, cfg.num_experts)
    if "embed" in steps:
        results["embed"] = embed(manifest, prep, embedder=_plain(cfg.embedder), frames=cfg.embed.frames,
                                 batch_size=cfg.embed.batch_size, device=cfg.device, **common)
    if "cluster" in steps:
        results["cluster"] = cluster(embeddings, prep, num_experts=cfg.num_experts, fine_clusters=cfg.cluster.fine_clusters,
                                     subsample=cfg.cluster.subsample, balanced=cfg.cluster.balanced,
                                     seed=cfg.cluster.seed, device=cfg.device, **common)
    if "encode" in steps:
        e = cfg.encode
        results["encode"] = encode(manifest, assignments, prep, stage=e.stage, resolution=_plain(e.resolution),
                                   num_frames=e.num_frames, fps=e.fps, vae=None if e.raw_frames else _plain(cfg.vae),
                                   text=text_dirs(_plain(cfg.text)), val_fraction=e.val_fraction,
                                   samples_per_shard=e.samples_per_shard, image_mode=e.image_mode,
                                   batch_size=e.batch_size, device=cfg.device, **common)
        if cfg.audit:
            report = audit(prep, e.stage)
            log.info(report.summary())
            if not report.ok:
                raise RuntimeError(f"the audit of {prep}/shards/{e.stage} found mismatches (listed above)")
    for result in results.values():
        log.info(result.summary_line())
    return results


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The ``conf/prepare.yaml`` config with command-line style overrides, for notebooks, scripts and tests."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("prepare", overrides=list(overrides))


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: ``python -m data.prepare input=... [overrides]``."""
    prepare(cfg)


if __name__ == "__main__":
    main()
