"""Motion score: mean dense optical-flow magnitude between consecutive frames, in pixels per frame.

Per video: convert frames to grayscale (OpenCV's RGB→gray weights), optionally resize so the short side
is ``resolution`` px, compute OpenCV Farneback flow from frame i to frame i+``frame_stride`` with the
parameters in :data:`FARNEBACK_PARAMS` (OpenCV's tutorial values), take the per-pixel magnitude ‖(u, v)‖,
average it over the frame (leaving out ``margin`` px at each border, where content enters and leaves
and flow is unreliable) and over all frame pairs, and divide by ``frame_stride`` to get px/frame.
The set's value is mean ± SE over videos (DESIGN §5.8).

The number depends on the resolution it is measured at (a 2× larger frame has 2× larger motion), so
``details`` records it; compare models only at equal resolution and stride. RAFT is not offered: it
would need torchvision, which this project does not depend on.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from ddm.eval.stats import MetricResult, mean_and_stderr
from ddm.eval.videos import count_videos, iter_videos

__all__ = ["FARNEBACK_PARAMS", "video_motion", "motion_score"]

# pyramid scale, levels, window, iterations, polynomial neighbourhood and its Gaussian sigma, flags
FARNEBACK_PARAMS: dict[str, Any] = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3,
                                    "poly_n": 5, "poly_sigma": 1.2, "flags": 0}
METHODS = ("farneback",)


def _measured_size(h: int, w: int, resolution: int | None) -> tuple[int, int]:
    """(height, width) the flow is measured at: native, or short side scaled to ``resolution``."""
    if resolution is None:
        return h, w
    scale = resolution / min(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _gray(frame: np.ndarray, resolution: int | None) -> np.ndarray:
    g = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    h, w = _measured_size(*g.shape, resolution)
    if (h, w) != g.shape:
        shrink = h < g.shape[0]
        g = cv2.resize(g, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return g


def video_motion(video: np.ndarray, *, frame_stride: int = 1, resolution: int | None = None,
                 margin: int = 0) -> float:
    """Mean Farneback flow magnitude (px/frame) of one uint8 (F, H, W, 3) video."""
    if video.shape[0] <= frame_stride:
        raise ValueError(f"motion needs more than frame_stride={frame_stride} frames, got {video.shape[0]}")
    frames = [_gray(f, resolution) for f in video]
    h, w = frames[0].shape
    if 2 * margin >= min(h, w):
        raise ValueError(f"margin {margin} px leaves nothing of a {h}x{w} frame")
    inner = (slice(margin, h - margin), slice(margin, w - margin))
    magnitudes = []
    for a, b in zip(frames[:-frame_stride], frames[frame_stride:]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, **FARNEBACK_PARAMS)
        magnitudes.append(float(np.hypot(flow[..., 0], flow[..., 1])[inner].mean()))
    return float(np.mean(magnitudes)) / frame_stride


def motion_score(videos: Any, *, frame_stride: int = 1, resolution: int | None = None, margin: int = 0,
                 method: str = "farneback", progress: bool = True) -> MetricResult:
    """Mean ± SE over videos of :func:`video_motion`; ``resolution=None`` measures at the native size."""
    if method not in METHODS:
        raise ValueError(f"unknown optical-flow method {method!r}; available: {METHODS} (RAFT would need "
                         "torchvision, which is not a dependency of this project)")
    if frame_stride < 1 or margin < 0 or (resolution is not None and resolution < 1):
        raise ValueError(f"need frame_stride >= 1, margin >= 0, resolution >= 1 or None; got "
                         f"{frame_stride}, {margin}, {resolution}")
    per_video: list[float] = []
    sizes: set[tuple[int, int]] = set()
    for video in tqdm(iter_videos(videos), total=count_videos(videos), desc="motion (Farneback)", unit="video",
                      disable=not progress):
        per_video.append(video_motion(video, frame_stride=frame_stride, resolution=resolution, margin=margin))
        sizes.add(_measured_size(video.shape[1], video.shape[2], resolution))
    mean, se, n = mean_and_stderr(per_video)
    details = {"backbone": "OpenCV Farneback", "tiny_test_backbone": False, "method": method,
               "flow_params": dict(FARNEBACK_PARAMS), "frame_stride": frame_stride,
               "resolution": sorted(list(s) for s in sizes), "resolution_setting": resolution,
               "margin": margin, "unit": "px/frame", "per_video": per_video}
    return MetricResult("motion", mean, se, n, details)
