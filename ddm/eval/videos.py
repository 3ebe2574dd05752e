"""The video inputs every metric accepts, turned into one stream of uint8 (F, H, W, 3) arrays.

Accepted forms (a "video set"):

* a uint8 array (numpy or torch) shaped ``(F, H, W, 3)`` (one video) or ``(N, F, H, W, 3)``;
* a floating array (numpy or torch) shaped ``(3, F, H, W)`` or ``(N, 3, F, H, W)`` with values in
  [-1, 1] — the project's pixel convention (``docs/architecture.md``). Values are clipped to [-1, 1]
  and quantised to uint8 exactly like an mp4 writer would; anything beyond ±1.5 is rejected as a
  range mistake (e.g. [0, 255] floats), since clipping it would silently ruin the metric;
* any iterable (list, generator) of single videos in either form, so large sets can be streamed
  from disk one video at a time.

Metrics consume :func:`iter_videos` lazily; nothing here holds a whole set in memory.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import torch

__all__ = ["iter_videos", "to_uint8_video", "count_videos"]

_FLOAT_RANGE_LIMIT = 1.5  # beyond this a float video is not in [-1, 1] up to decoder overshoot


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def to_uint8_video(video: Any, *, where: str = "video") -> np.ndarray:
    """One video as a contiguous uint8 (F, H, W, 3) array; see the module docstring for the forms."""
    arr = _as_numpy(video)
    if arr.dtype == np.uint8:
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"{where}: a uint8 video must be (F, H, W, 3), got shape {arr.shape}")
        out = arr
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.ndim != 4 or arr.shape[0] != 3:
            raise ValueError(f"{where}: a float video must be (3, F, H, W) in [-1, 1], got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: the video contains NaN or inf values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -_FLOAT_RANGE_LIMIT or hi > _FLOAT_RANGE_LIMIT:
            raise ValueError(f"{where}: float videos must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}] "
                             "(pass uint8 arrays for [0, 255] data)")
        scaled = np.rint((np.clip(arr, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
        out = np.moveaxis(scaled, 0, -1)  # (3, F, H, W) -> (F, H, W, 3)
    else:
        raise ValueError(f"{where}: videos must be uint8 or floating point, got dtype {arr.dtype}")
    if min(out.shape[:3]) == 0:
        raise ValueError(f"{where}: empty video of shape {out.shape}")
    return np.ascontiguousarray(out)


def _is_batched(arr: Any) -> bool:
    """True for a single array that holds a batch of videos (5-D), False for one video (4-D)."""
    return isinstance(arr, (np.ndarray, torch.Tensor)) and arr.ndim == 5


def count_videos(videos: Any) -> int | None:
    """The number of videos in a set when it is known without consuming it (None for generators)."""
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        return int(videos.shape[0]) if videos.ndim == 5 else 1
    try:
        return len(videos)
    except TypeError:
        return None


def iter_videos(videos: Any, *, name: str = "videos") -> Iterator[np.ndarray]:
    """Yield each video of a set as uint8 (F, H, W, 3); raise ValueError if the set is empty."""
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim not in (4, 5):
            raise ValueError(f"{name}: expected one video (4-D) or a batch (5-D), got shape {tuple(videos.shape)}")
        items: Iterable[Any] = videos if _is_batched(videos) else [videos]
    elif isinstance(videos, (str, bytes)) or not isinstance(videos, Iterable):
        raise ValueError(f"{name}: expected an array or an iterable of videos, got {type(videos).__name__}")
    else:
        items = videos
    n = 0
    for i, v in enumerate(items):
        yield to_uint8_video(v, where=f"{name}[{i}]")
        n += 1
    if n == 0:
        raise ValueError(f"{name}: the video set is empty")
