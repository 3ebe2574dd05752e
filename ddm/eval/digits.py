"""The ground-truth evaluator of the moving-digits data set (:mod:`ddm.digits`).

A prompt "the digit 3 moves slowly left" asks for a digit (the clip's family), a direction and a speed. For a
generated video:

* **digit** — each frame is re-centred on its ink's circular centroid (the digit wraps around the edges),
  the digit-sized window around it is area-resized to the 8×8 grid of the original bitmaps, and a digit
  classifier scores it; the scores are summed over frames and the best of the digits in play wins (a forced
  choice, so noise scores near chance). The classifier is a support-vector machine (scikit-learn's ``SVC``)
  trained on frames rendered from the ``classifier`` writer blocks — writers that neither the models nor the
  held-out clips use — through the same re-centring, so it reads crops the way it will see them; its accuracy
  on the ``test`` writer blocks is :func:`classifier_report`'s ``test_accuracy``.
* **motion direction and speed** — the ink's circular-centroid track (:mod:`ddm.eval.motion_track`), as for
  the shapes data set.

Background, colour and shape are not attributes of this data set (always ``None``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import cv2
import numpy as np

from ddm.digits import (CANVAS_LEVEL, DIGIT_FRACTION, FAMILY_PREFIX, INK_LEVEL, DigitClipSpec, family_name,
                        load_digits_images, render_digit_clip, split_indices)
from ddm.eval.motion_track import SPEED_NAMES, circular_centroid_track, read_motion
from ddm.synthetic import MOTIONS, SPEEDS
from ddm.eval.videos import to_uint8_video

__all__ = ["DigitAttributes", "parse_digit_caption", "is_digit_caption", "digit_crop", "classifier_report",
           "DigitsEvaluator", "DigitMeasurement"]

_CAPTION = re.compile(r"^the digit (?P<digit>[0-9]) moves(?: (?P<adv>slowly|quickly))? (?P<dir>left|right|up|down)$")
_INK_THRESHOLD = 40.0  # grey levels above the frame's median that count as ink (for the centroid)
_TRAIN_RENDERS = 10    # rendered placements per classifier-training bitmap


@dataclass(frozen=True)
class DigitAttributes:
    """What a digits caption asks for."""

    family: str   # "digit 3"
    digit: int
    motion: str
    speed: str    # "slowly" | "normal" | "quickly"
    text: str = ""


def is_digit_caption(text: str) -> bool:
    """Whether ``text`` is in the digits generator's grammar (``the digit ...``)."""
    return text.strip().startswith("the digit ")


def parse_digit_caption(text: str) -> DigitAttributes:
    """Parse ``the digit 3 moves slowly left``; ValueError when it is not one."""
    m = _CAPTION.match(text.strip().rstrip("."))
    if not m:
        raise ValueError(f"not a moving-digits caption: {text!r}")
    digit = int(m.group("digit"))
    return DigitAttributes(family_name(digit), digit, m.group("dir"), SPEED_NAMES[m.group("adv") or ""],
                           text.strip())


def digit_crop(frame: np.ndarray) -> np.ndarray:
    """One frame (H, W) grey or (H, W, 3) → the digit re-centred and area-resized to 8×8, values 0..16 like
    the original bitmaps (canvas = the frame's median grey level)."""
    grey = frame.astype(np.float32).mean(-1) if frame.ndim == 3 else frame.astype(np.float32)
    h, w = grey.shape
    canvas = float(np.median(grey))
    ink = np.maximum(grey - canvas - _INK_THRESHOLD, 0.0)
    if ink.sum() <= 0:
        ink = np.maximum(grey - canvas, 0.0) + 1e-6  # nothing bright: centre on whatever stands out
    cy = circular_centroid_track(ink[None], axis=2)[0]  # the same centroid the motion reading tracks
    cx = circular_centroid_track(ink[None], axis=1)[0]
    centred = np.roll(grey, (int(round(h / 2 - cy)), int(round(w / 2 - cx))), axis=(0, 1))
    side_h, side_w = max(4, round(h * DIGIT_FRACTION)), max(4, round(w * DIGIT_FRACTION))
    top, left = (h - side_h) // 2, (w - side_w) // 2
    window = centred[top:top + side_h, left:left + side_w]
    small = cv2.resize(window, (8, 8), interpolation=cv2.INTER_AREA)
    return np.clip((small - canvas) / max(INK_LEVEL - canvas, 1.0) * 16.0, 0.0, 16.0)


def _rendered_crops(indices: np.ndarray, size: int, renders: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops (N, 64) of bitmaps ``indices`` rendered as one frame at ``renders`` random placements each."""
    rng = np.random.default_rng(seed)
    labels = load_digits_images()[1]
    x, y = [], []
    for i in indices:
        for _ in range(renders):
            spec = DigitClipSpec(int(labels[i]), int(i), float(rng.uniform()), float(rng.uniform()), "left", "", "")
            x.append(digit_crop(render_digit_clip(spec, size, 1)[0]).ravel())
            y.append(int(labels[i]))
    return np.asarray(x), np.asarray(y)


@lru_cache(maxsize=4)
def _classifier(size: int):
    """The SVC for frames of ``size`` px, trained on the ``classifier`` writer blocks (deterministic)."""
    from sklearn.svm import SVC

    x, y = _rendered_crops(split_indices("classifier"), size, _TRAIN_RENDERS, seed=size)
    return SVC(gamma=0.002, C=10.0, decision_function_shape="ovr").fit(x, y)


def classifier_report(size: int = 32) -> dict[str, Any]:
    """The digit classifier's accuracy on the held-out ``test`` writer blocks (one rendered frame per bitmap
    at ``size`` px, through the same re-centring), with the numbers of training and test bitmaps."""
    test = split_indices("test")
    x, y = _rendered_crops(test, size, 1, seed=10_000 + size)
    acc = float((_classifier(size).predict(x) == y).mean())
    return {"test_accuracy": acc, "test_images": int(len(test)),
            "train_images": int(len(split_indices("classifier"))), "size": size,
            "split": "writer blocks: classifier 3-9, test 10-12 (ddm.digits.SPLITS)"}


@dataclass
class DigitMeasurement:
    """What the analysis read from one video."""

    family: str
    digit: int
    velocity: tuple[float, float] | None
    motion: str | None
    speed: str | None
    foreground_fraction: float


class DigitsEvaluator:
    """Measures digit, direction and speed in decoded videos of the moving-digits data set.

    ``families``: the digits in play (``"digit d"`` names); the digit is a forced choice among them.
    """

    def __init__(self, families: Sequence[str], *, frame_step: float = 1.0):
        digits = []
        for name in families:
            if not name.startswith(FAMILY_PREFIX) or not name[len(FAMILY_PREFIX):].isdigit():
                raise ValueError(f"not a digits family: {name!r} (expected 'digit 0' .. 'digit 9')")
            digits.append(int(name[len(FAMILY_PREFIX):]))
        if not digits:
            raise ValueError("families must not be empty")
        self.digits = tuple(dict.fromkeys(digits))
        self.families = tuple(family_name(d) for d in self.digits)
        self.frame_step = float(frame_step)

    def measure(self, frames: Any) -> DigitMeasurement:
        """Read the digit (forced choice among the digits in play) and the motion of one video."""
        video = to_uint8_video(frames)
        nf, h, w, _ = video.shape
        if min(h, w) < 8:
            raise ValueError(f"the digits evaluator needs frames of at least 8x8 px, got {h}x{w}")
        classifier = _classifier(int(w))
        crops = np.stack([digit_crop(f).ravel() for f in video])
        scores = classifier.decision_function(crops).reshape(nf, -1).sum(0)  # (10,) ovr scores over frames
        column = {int(c): j for j, c in enumerate(classifier.classes_)}
        digit = max(self.digits, key=lambda d: scores[column[d]])
        grey = video.astype(np.float32).mean(-1)
        ink = np.maximum(grey - np.median(grey, axis=(1, 2), keepdims=True) - _INK_THRESHOLD, 0.0)
        velocity, motion, speed = read_motion(ink, self.frame_step)
        return DigitMeasurement(family_name(digit), digit, velocity, motion, speed, float((ink > 0).mean()))

    def score_video(self, frames: Any, asked: DigitAttributes) -> dict[str, bool | None]:
        """``{attribute: correct?}``: family (= the digit), motion and speed; the shapes data set's background,
        colour and shape are ``None`` (not attributes of this data set)."""
        video = to_uint8_video(frames)
        m = self.measure(video)
        moving = len(video) >= 2  # a single frame shows no motion; a video without ink counts as wrong
        return {"family": m.family == asked.family, "background": None, "colour": None,
                "motion": m.motion == asked.motion if moving else None,
                "speed": m.speed == asked.speed if moving else None, "shape": None}

    def chance(self, asked: DigitAttributes) -> dict[str, float | None]:
        """Accuracy of a uniform random guess, per attribute."""
        return {"family": 1 / len(self.digits), "background": None, "colour": None, "motion": 1 / len(MOTIONS),
                "speed": 1 / len(SPEEDS), "shape": None}
