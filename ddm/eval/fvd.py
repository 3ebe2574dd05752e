"""Fréchet Video Distance: I3D features of 16-frame clips, Gaussian fit, Fréchet distance in float64.

Clip convention (DESIGN §5.8, StyleGAN-V's ``i3d_torchscript.pt`` called with ``rescale=False,
resize=False, return_features=True``): from each video take ``num_frames`` frames starting at frame 0,
every ``frame_stride``-th frame; scale the short side to 224 with bilinear interpolation (antialiased
when shrinking), centre-crop 224×224, map [0, 255] to [-1, 1]; feed (N, 3, 16, 224, 224). Videos shorter
than the clip raise ValueError, as do sets whose videos have different frame sizes.

FVD is a distance between the two feature distributions, so it has no per-video standard error: the
result's ``stderr`` is ``None``, its ``n`` is the number of generated videos, and ``details['n_real']``
the number of real ones. FVD is biased by N — compare values only at equal N (and equal backbone).

Real-video statistics are reusable: :func:`real_feature_stats` caches them in an ``.npz`` keyed by a
hash of the file list (path, size, mtime), the backbone file's SHA-256 and the clip settings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ddm.files import atomic_write
from ddm.eval.i3d import I3DBackbone
from ddm.eval.stats import MetricResult
from ddm.eval.videos import count_videos, iter_videos
from ddm.video_io import read_video as _read

__all__ = [
    "ClipSettings",
    "FeatureStats",
    "prepare_clip",
    "i3d_features",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_symmetric",
    "fvd",
    "fvd_stats",
    "real_feature_stats",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipSettings:
    """How a video becomes an I3D clip. The defaults are the FVD standard (16 frames, 224²)."""

    num_frames: int = 16
    frame_stride: int = 1
    resolution: int = 224

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.frame_stride < 1 or self.resolution < 1:
            raise ValueError(f"clip settings must be positive, got {self}")

    @property
    def frames_needed(self) -> int:
        """Frames a video must have: the clip spans frames 0, s, 2s, …, (n-1)·s."""
        return (self.num_frames - 1) * self.frame_stride + 1

    def as_dict(self) -> dict[str, int]:
        return {"num_frames": self.num_frames, "frame_stride": self.frame_stride, "resolution": self.resolution}


@dataclass
class FeatureStats:
    """Mean and covariance (float64) of one set's I3D features, with how they were made."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    details: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` atomically (temp file + rename), so a crash never leaves half a cache."""

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare path
                np.savez(f, mu=self.mu, sigma=self.sigma, n=self.n, details=json.dumps(self.details))

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        """Read statistics written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mu"], z["sigma"], int(z["n"]), json.loads(str(z["details"])))


def prepare_clip(video: np.ndarray, settings: ClipSettings = ClipSettings()) -> torch.Tensor:
    """One uint8 (F, H, W, 3) video → float32 (3, num_frames, R, R) in [-1, 1] (see module docstring)."""
    if video.shape[0] < settings.frames_needed:
        raise ValueError(f"FVD needs videos with at least {settings.frames_needed} frames "
                         f"({settings.num_frames} frames at stride {settings.frame_stride}), got {video.shape[0]}")
    frames = torch.from_numpy(video[: settings.frames_needed : settings.frame_stride])
    x = frames.permute(0, 3, 1, 2).to(torch.float32)  # (T, 3, H, W), 0..255
    h, w = x.shape[-2:]
    r = settings.resolution
    scale = r / min(h, w)
    size = (max(r, round(h * scale)), max(r, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (size[0] - r) // 2, (size[1] - r) // 2
    x = x[:, :, top : top + r, left : left + r]
    x = (x / 127.5 - 1.0).clamp_(-1.0, 1.0)
    return x.permute(1, 0, 2, 3).contiguous()


def i3d_features(videos: Any, backbone: I3DBackbone, settings: ClipSettings = ClipSettings(), *,
                 batch_size: int = 8, progress: bool = True, name: str = "videos") -> np.ndarray:
    """I3D features (N, D) float64, one clip per video; all videos of the set must share a frame size."""
    feats: list[np.ndarray] = []
    batch: list[torch.Tensor] = []
    frame_size: tuple[int, int] | None = None
    for i, video in enumerate(tqdm(iter_videos(videos, name=name), total=count_videos(videos),
                                   desc=f"I3D features ({name})", unit="video", disable=not progress)):
        if frame_size is None:
            frame_size = video.shape[1:3]
        elif video.shape[1:3] != frame_size:
            raise ValueError(f"{name}[{i}] has frames of {video.shape[1]}x{video.shape[2]} but {name}[0] has "
                             f"{frame_size[0]}x{frame_size[1]}: every video of an FVD set must share one frame "
                             "size (resize them to a common size first)")
        batch.append(prepare_clip(video, settings))
        if len(batch) == batch_size:
            feats.append(backbone.features(torch.stack(batch)))
            batch.clear()
    if batch:
        feats.append(backbone.features(torch.stack(batch)))
    return np.concatenate(feats, axis=0)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) with ddof=1, in float64; needs at least two feature rows."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 videos per set, got {f.shape[0]}")
    if not np.all(np.isfinite(f)):
        raise ValueError("features contain NaN or inf (a broken video or backbone)")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _check_gaussians(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"Fréchet distance needs means (D,) and covariances (D, D) of one D; got "
                         f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    for a, what in ((mu1, "mu1"), (mu2, "mu2"), (sigma1, "sigma1"), (sigma2, "sigma2")):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{what} contains NaN or inf")
    return mu1, sigma1, mu2, sigma2


def _sqrtm(m: np.ndarray) -> np.ndarray:
    # scipy warns on singular input; the caller checks the result and retries, so the warning is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(m)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     eps: float = 1e-6, imag_tol: float = 1e-3) -> float:
    """‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2·(Σ1Σ2)^½) in float64, with ``scipy.linalg.sqrtm``.

    When the matrix square root is not finite (singular covariances, e.g. fewer videos than feature
    dims, make sqrtm's Schur recursion divide by zero) it is retried with ``eps·I`` added to both
    covariances, and a warning is logged. A small imaginary part (round-off) is dropped; one larger than
    ``imag_tol`` times the diagonal's scale raises ValueError rather than return a wrong distance.
    """
    mu1, sigma1, mu2, sigma2 = _check_gaussians(mu1, sigma1, mu2, sigma2)
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        log.warning("sqrtm(Σ1·Σ2) is not finite (singular covariance); retrying with %g·I added to both", eps)
        offset = eps * np.eye(sigma1.shape[0])
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.all(np.isfinite(covmean)):
            raise ValueError("sqrtm(Σ1·Σ2) is not finite even after the eps offset; the covariances are broken")
    if np.iscomplexobj(covmean):
        diag = np.diagonal(covmean)
        scale = max(1.0, float(np.abs(diag.real).max()))
        worst = float(np.abs(diag.imag).max())
        if worst > imag_tol * scale:
            raise ValueError(f"sqrtm(Σ1·Σ2) has a non-negligible imaginary part ({worst:.3g} against a diagonal "
                             f"scale of {scale:.3g}); the covariances are not valid (PSD) statistics")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_symmetric(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The same distance via the symmetric form tr((√Σ1·Σ2·√Σ1)^½), from eigendecompositions only.

    tr((Σ1Σ2)^½) = Σ √λ_i(√Σ1·Σ2·√Σ1) since the two matrices are similar (when Σ1 is invertible, and by
    continuity otherwise); the symmetric form has real, non-negative eigenvalues, so no retry is needed.
    An independent route for cross-checking :func:`frechet_distance`.
    """
    mu1, sigma1, mu2, sigma2 = _check_gaussians(mu1, sigma1, mu2, sigma2)
    s1 = _psd_sqrt(sigma1)
    m = s1 @ sigma2 @ s1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fvd_stats(videos: Any, backbone: I3DBackbone, settings: ClipSettings = ClipSettings(), *, batch_size: int = 8,
              progress: bool = True, name: str = "videos") -> FeatureStats:
    """I3D feature statistics of one video set, reusable as the ``real`` argument of :func:`fvd`."""
    feats = i3d_features(videos, backbone, settings, batch_size=batch_size, progress=progress, name=name)
    mu, sigma = feature_stats(feats)
    return FeatureStats(mu, sigma, feats.shape[0], {**backbone.details(), **settings.as_dict()})


def fvd(fake_videos: Any, real: Any, backbone: I3DBackbone, settings: ClipSettings = ClipSettings(), *,
        batch_size: int = 8, progress: bool = True) -> MetricResult:
    """FVD between generated videos and real videos (a video set or their cached :class:`FeatureStats`).

    Videos: see :mod:`ddm.eval.videos` (uint8 (F, H, W, 3) or float (3, F, H, W) in [-1, 1]).
    Returns ``MetricResult("fvd", value, stderr=None, n=#generated, details)``.
    """
    if isinstance(real, FeatureStats):
        real_stats = real
        expected = {**backbone.details(), **settings.as_dict()}
        mismatched = [f"{k}: {real.details.get(k)!r} (real) vs {v!r} (now)"
                      for k, v in expected.items() if real.details.get(k) != v]
        if mismatched:
            raise ValueError("the real statistics were made with another backbone or other clip settings: "
                             + "; ".join(mismatched))
    else:
        real_stats = fvd_stats(real, backbone, settings, batch_size=batch_size, progress=progress, name="real videos")
    fake_stats = fvd_stats(fake_videos, backbone, settings, batch_size=batch_size, progress=progress,
                           name="generated videos")
    value = frechet_distance(fake_stats.mu, fake_stats.sigma, real_stats.mu, real_stats.sigma)
    details = {**backbone.details(), **settings.as_dict(), "n_real": real_stats.n,
               "resize": "short side to resolution (bilinear, antialiased when shrinking) + centre crop",
               "note": "no per-video SE; compare FVD only at equal N and equal backbone"}
    return MetricResult("fvd", value, None, fake_stats.n, details)


class DecodedVideos:
    """Video files decoded one at a time while iterating (a sized iterable, so progress bars know N)."""

    def __init__(self, paths: Sequence[Path], read_video: Callable[[Path], Any]):
        self.paths, self.read_video = paths, read_video

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self):
        return (self.read_video(p) for p in self.paths)


def _cache_key(paths: Sequence[Path], backbone: I3DBackbone, settings: ClipSettings) -> str:
    files = sorted((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    blob = json.dumps({"files": files, "backbone_sha256": backbone.sha256, "settings": settings.as_dict()})
    return hashlib.sha256(blob.encode()).hexdigest()


def real_feature_stats(paths: Iterable[str | Path], backbone: I3DBackbone, cache_dir: str | Path,
                       settings: ClipSettings = ClipSettings(), *, read_video: Callable[[Path], Any] | None = None,
                       batch_size: int = 8, progress: bool = True) -> FeatureStats:
    """Feature statistics of real video files, computed once and cached in ``cache_dir``.

    Files are decoded with :func:`ddm.video_io.read_video` (only the frames the clip needs) unless
    ``read_video(path) -> video`` is given. The cache file ``fvd_real_<hash>.npz`` is keyed by the sorted
    (path, size, mtime) list, the backbone file's SHA-256 and the clip settings, so any change to them
    recomputes instead of reusing stale numbers.
    """
    path_list = [Path(p) for p in paths]
    if not path_list:
        raise ValueError("real_feature_stats needs at least two real video files, got none")
    missing = [str(p) for p in path_list if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} real video file(s) do not exist, e.g. {missing[:3]}")
    key = _cache_key(path_list, backbone, settings)
    cache_file = Path(cache_dir) / f"fvd_real_{key[:20]}.npz"
    if cache_file.is_file():
        stats = FeatureStats.load(cache_file)
        if stats.details.get("cache_key") == key:
            log.info("FVD: reusing real-video statistics (N=%d) from %s", stats.n, cache_file)
            return stats
    if read_video is None:
        def read_video(p: Path) -> np.ndarray:
            return _read(p, max_frames=settings.frames_needed)[0]

    log.info("FVD: computing real-video statistics for %d files -> %s", len(path_list), cache_file)
    stats = fvd_stats(DecodedVideos(path_list, read_video), backbone, settings, batch_size=batch_size,
                      progress=progress, name="real videos")
    stats.details["cache_key"] = key
    stats.save(cache_file)
    return stats
