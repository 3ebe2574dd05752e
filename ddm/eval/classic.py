"""The classic video metrics of an evaluation (FVD, CLIP score, aesthetic, motion): the networks they load — real
I3D / CLIP / aesthetic weights from local paths, or random-init tiny ones for tests (every number then labelled
tiny-random) —, a CLIP wrapper that embeds each video once, the real videos FVD compares with, and the scoring of
one run's video files."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ddm.files import atomic_write
from ddm.eval.report import METRICS
from ddm.eval.stats import TINY_LABEL, MetricResult
from ddm.eval.i3d import load_i3d, make_tiny_i3d
from ddm.video_io import probe_video, read_video
from ddm.eval.motion import motion_score

__all__ = ["Backbones", "build_tiny_backbones", "load_backbones", "SharedImageEmbeddings", "real_video_paths",
           "compute_metrics", "VIDEO_EXTS"]

log = logging.getLogger("ddm.evaluate")

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif")


@dataclass
class Backbones:
    """The loaded metric networks (None where the metric is not computed)."""

    i3d: Any = None  # ddm.eval.i3d.I3DBackbone
    clip: Any = None  # ddm.eval.clip_score.ClipEmbedder
    aesthetic: Any = None  # ddm.eval.aesthetic.AestheticHead


def build_tiny_backbones(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Build the random-init test backbones once in ``folder``: ``i3d_tiny.pt``, ``clip/``, ``aesthetic_tiny.pth``.

    ``tiny_backbones.json`` is written last, so a killed build is redone rather than half reused.
    """
    from ddm.eval.aesthetic import make_tiny_aesthetic_head
    from ddm.models.text import make_tiny_clip

    folder = Path(folder)
    paths = {"i3d": folder / "i3d_tiny.pt", "clip": folder / "clip", "aesthetic": folder / "aesthetic_tiny.pth"}
    marker = folder / "tiny_backbones.json"
    if marker.is_file() and all(p.exists() for p in paths.values()):
        log.info("tiny backbones: reusing %s", folder)
        return paths
    log.info("tiny backbones: building random-init I3D, CLIP and aesthetic head in %s (%s)", folder, TINY_LABEL)
    make_tiny_i3d(paths["i3d"], seed=seed)
    make_tiny_clip(paths["clip"], seed=seed)
    clip_config = json.loads((paths["clip"] / "config.json").read_text())
    make_tiny_aesthetic_head(paths["aesthetic"], in_dim=int(clip_config["projection_dim"]), seed=seed)
    atomic_write(marker, lambda tmp: tmp.write_text(json.dumps({"label": TINY_LABEL, "seed": seed})))
    return paths


def load_backbones(metrics: Sequence[str], *, i3d: str | Path | None, clip: str | Path | None,
                   aesthetic: str | Path | None, device: str = "cpu") -> Backbones:
    """Load what ``metrics`` need; a missing path raises FileNotFoundError saying where to get the file."""
    def need(path: Any, flag: str, metric: str) -> Any:
        if path is None:
            raise ValueError(f"the {metric} metric needs {flag} PATH (or --tiny-backbones DIR for a test run, or "
                             f"leave {metric} out of --metrics)")
        return path

    out = Backbones()
    if "fvd" in metrics:
        out.i3d = load_i3d(need(i3d, "--i3d", "fvd"), device=device)
    if "clip" in metrics or "aesthetic" in metrics:
        from ddm.eval.clip_score import ClipEmbedder

        out.clip = ClipEmbedder.from_folder(need(clip, "--clip", "clip/aesthetic"), device=device)
    if "aesthetic" in metrics:
        from ddm.eval.aesthetic import load_aesthetic_head

        out.aesthetic = load_aesthetic_head(need(aesthetic, "--aesthetic", "aesthetic"), device=device)
    return out


class SharedImageEmbeddings:
    """A :class:`~ddm.eval.clip_score.ClipEmbedder` that embeds each video's frames once.

    CLIP score and the aesthetic score read the same frames through the same CLIP, and CLIP's image tower is
    the dominant cost of an evaluation (docs/bench/eval.md), so the second metric reuses the first one's
    embeddings, keyed by a hash of the frames. Use one per run, so the cache lives as long as the run's metrics.
    """

    def __init__(self, embedder: Any):
        self._embedder = embedder
        self._cache: dict[str, torch.Tensor] = {}
        self.frames_embedded = 0  # frames that really went through CLIP

    def __getattr__(self, name: str) -> Any:
        return getattr(self._embedder, name)

    def image_embeddings(self, frames: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        """As ``ClipEmbedder.image_embeddings``, computed once per distinct frame array."""
        frames = np.ascontiguousarray(frames)
        key = hashlib.sha1(frames.tobytes()).hexdigest() + str(frames.shape)
        if key not in self._cache:
            self._cache[key] = self._embedder.image_embeddings(frames, batch_size)
            self.frames_embedded += len(frames)
        return self._cache[key]


def real_video_paths(source: str | Path, min_frames: int) -> tuple[list[Path], int]:
    """Real videos for FVD from a folder (searched recursively) or a prep ``manifest.parquet``.

    Returns ``(paths with at least min_frames frames, number skipped for being shorter)``.
    """
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"--real-videos '{src}' does not exist")
    if src.is_dir():
        candidates = sorted(p for p in src.rglob("*") if p.suffix.lower() in VIDEO_EXTS and p.is_file())
        frames = [probe_video(p, exact=False)["num_frames"] for p in candidates]
    elif src.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = [r for r in pq.read_table(src).to_pylist() if r.get("kind", "video") == "video"]
        candidates = [Path(r["path"]) if Path(r["path"]).is_absolute() else src.parent / r["path"] for r in rows]
        frames = [int(r["num_frames"]) for r in rows]
    else:
        raise ValueError(f"--real-videos must be a folder of videos or a manifest.parquet, got '{src}'")
    kept = [p for p, n in zip(candidates, frames) if n >= min_frames]
    if len(kept) < 2:
        raise ValueError(f"FVD needs at least 2 real videos with >= {min_frames} frames; '{src}' has {len(kept)} "
                         f"(of {len(candidates)})")
    return kept, len(candidates) - len(kept)


def _decoded(paths: Sequence[Path]):
    from ddm.eval.fvd import DecodedVideos  # the sized, lazily decoding iterable FVD uses for real videos

    return DecodedVideos(list(paths), lambda p: read_video(p)[0])


def compute_metrics(paths: Sequence[Path], captions: Sequence[str], metrics: Sequence[str], backbones: Backbones, *,
                    real_stats: Any = None, frame_stride: int = 1, motion_resolution: int | None = None,
                    batch_size: int = 8, progress: bool = True, name: str = "run") -> dict[str, MetricResult]:
    """The requested metrics of one run's video files; FVD only when ``real_stats`` is given.

    Errors from the metric modules (too few frames, mixed sizes, ...) are re-raised naming the run.
    """
    from ddm.eval.aesthetic import aesthetic_score
    from ddm.eval.clip_score import clip_score
    from ddm.eval.fvd import fvd

    out: dict[str, MetricResult] = {}
    shared = SharedImageEmbeddings(backbones.clip) if backbones.clip is not None else None
    jobs = {
        "fvd": lambda: fvd(_decoded(paths), real_stats, backbones.i3d, batch_size=batch_size, progress=progress),
        "clip": lambda: clip_score(_decoded(paths), captions, shared, frame_stride=frame_stride, progress=progress),
        "aesthetic": lambda: aesthetic_score(_decoded(paths), shared, backbones.aesthetic, frame_stride=frame_stride,
                                             progress=progress),
        "motion": lambda: motion_score(_decoded(paths), resolution=motion_resolution, progress=progress),
    }
    for key in metrics:
        if key == "fvd" and real_stats is None or key not in jobs:  # the synthetic metrics: _SyntheticMetrics
            continue
        log.info("%s: computing %s over %d videos", name, METRICS[key].label, len(paths))
        try:
            out[key] = jobs[key]()
        except ValueError as e:
            raise ValueError(f"{name}: {METRICS[key].label}: {e}") from e
    return out
