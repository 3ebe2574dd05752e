"""Reading a moving foreground's direction and speed from a per-pixel weight map (the ground-truth evaluators).

Both built-in data sets move their foreground by a wrap-around translation, under which the phase of the
first Fourier coefficient of the foreground's marginal along an axis (its *circular centroid*) moves exactly
with it. Unwrapped over frames, its least-squares slope is the velocity; direction = the sign of the dominant
axis, speed = the nearest of the generators' speeds (pixels per frame at 64 px, scaled to the video's size).
"""
from __future__ import annotations

import math

import numpy as np

from ddm.synthetic import SPEEDS

__all__ = ["circular_centroid_track", "direction_of", "read_motion", "SPEED_NAMES", "NATIVE_SIZE"]

SPEED_NAMES = {"slowly": "slowly", "": "normal", "quickly": "quickly"}  # generator speed key -> caption name
NATIVE_SIZE = 64  # ddm.synthetic.SPEEDS are pixels per frame at this size


def circular_centroid_track(weights: np.ndarray, axis: int) -> np.ndarray | None:
    """Per-frame circular centroid (pixels, unwrapped over frames) of (F, H, W) weights along ``axis``.

    None when some frame has no foreground at all (nothing moves, so no direction is right). A weak
    first harmonic (mass spread round the circle, e.g. noise) still gives its phase: a forced choice.
    """
    marg = weights.sum(axis=axis)  # (F, S): sum over the other image axis
    size = marg.shape[1]
    phase = np.exp(2j * np.pi * (np.arange(size) + 0.5) / size)
    first = marg @ phase
    total = marg.sum(axis=1)
    if np.any(total <= 0):
        return None
    return np.unwrap(np.angle(first)) * size / (2 * np.pi)


def direction_of(vx: float, vy: float) -> str:
    """The generator's direction word for a velocity (image coordinates): the dominant axis and its sign."""
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def read_motion(weights: np.ndarray, frame_step: float = 1.0
                ) -> tuple[tuple[float, float] | None, str | None, str | None]:
    """``(velocity (vx, vy) px/frame, direction, speed name)`` of the foreground weights (F, H, W); Nones for
    a single frame or a frame without foreground. ``frame_step``: generator frames per video frame."""
    nf, h, w = weights.shape
    if nf < 2:
        return None, None, None
    tx = circular_centroid_track(weights, axis=1)
    ty = circular_centroid_track(weights, axis=2)
    if tx is None or ty is None:
        return None, None, None
    t = np.arange(nf, dtype=np.float64)
    vx, vy = float(np.polyfit(t, tx, 1)[0]), float(np.polyfit(t, ty, 1)[0])
    motion = direction_of(vx, vy)
    native = max(abs(vx), abs(vy)) * NATIVE_SIZE / (w if motion in ("left", "right") else h) / frame_step
    # nearest generator speed on a log scale (the speeds are roughly geometric)
    names = list(SPEEDS)
    k = int(np.argmin([abs(math.log(max(native, 1e-3) / SPEEDS[s])) for s in names]))
    return (vx, vy), motion, SPEED_NAMES[names[k]]
