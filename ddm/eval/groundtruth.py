"""A ground-truth evaluator for the built-in synthetic data (``data/synthetic.py``): no learned weights.

The generator draws every clip from a small closed vocabulary — a scene family with one of three
background colours and a fixed texture, one or two shapes of named colours, a direction and a speed —
and its caption says all of it. So for a generated video and the prompt it was asked for, each
attribute can be checked by deterministic image analysis:

* **background / family** — the palette entry whose background model fits the pixels best. A
  background is ``texture(x, y) · rgb`` with the texture a brightness multiplier in a known range per
  family (e.g. 0.82–1.18 for stripes), i.e. a segment in RGB space; every pixel's distance to each
  candidate segment is measured, and the candidate with the smallest trimmed mean distance wins
  (trimmed because up to a fifth of the pixels are foreground). All pixels are used rather than only
  the border: at 16 px the border is a quarter of the image and shapes wrap across it.
* **foreground colour** — pixels far from the fitted background segment are foreground; each votes,
  weighted by its distance, for the shape colour that best explains it as a mix of its background and
  that colour (anti-aliased edge pixels are such mixes; so are the 2×2 block means of a decoded 4:2:0
  video, which vote too). The asked number of colours with the most votes must equal the asked set.
* **motion direction and speed** — the foreground weight map's circular centroid per axis (the phase
  of its first Fourier coefficient: exact under the generator's wrap-around translation), unwrapped
  over frames; the least-squares slope is the velocity. Direction = sign of the dominant axis; speed =
  the nearest of the generator's speeds (pixels per frame at 64 px, scaled to the video's size).
* **shape** — not measured: at the tiny sizes the shapes are 3–5 px across, where a circle and a
  square differ by a pixel or two of anti-aliasing; every shape result is ``None`` ("not resolvable").

Every measurement is a forced choice among the vocabulary of the families in play (``families=``), so
a video that shows nothing (noise) scores near chance, never near zero or one. ``chance`` is the
accuracy of a uniform random guess over that vocabulary, per prompt, averaged.

API: :func:`attributes_of` (what a caption / manifest row asks for), :class:`GroundTruthEvaluator`
(``score_video`` → ``{attribute: True | False | None}``), :func:`aggregate` (accuracy ± SE per
attribute, prompt accuracy, chance levels) and :func:`evaluate_videos` for a whole set.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
from dataclasses import dataclass, field
from math import comb
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ddm.digits import FAMILY_PREFIX
from ddm.eval.digits import DigitAttributes, DigitsEvaluator, is_digit_caption, parse_digit_caption
from ddm.eval.motion_track import SPEED_NAMES, read_motion
from ddm.synthetic import FAMILIES, MOTIONS, SHAPE_COLOURS, SPEEDS, TEXTURE_WORDS
from ddm.video_io import read_video
from ddm.eval.videos import to_uint8_video

__all__ = ["Attributes", "attributes_of", "read_manifest", "families_in", "make_evaluator", "GroundTruthEvaluator",
           "GroundTruthResult",
           "aggregate", "evaluate_videos", "ATTRIBUTES", "MEASURED", "EVALUATOR_LABEL"]

ATTRIBUTES = ("family", "background", "colour", "motion", "speed", "shape")
MEASURED = ("family", "background", "colour", "motion", "speed")  # what the evaluator claims to measure
EVALUATOR_LABEL = "ground truth (synthetic generator, image analysis)"

# Brightness-multiplier range of each texture (ddm.synthetic._texture), with a margin for decoding.
_TEXTURE_RANGE = {"solid": (1.0, 1.0), "gradient": (0.75, 1.25), "stripes": (0.82, 1.18),
                  "checker": (0.8, 1.2), "diagonal": (0.82, 1.18), "dots": (1.0, 1.3)}
_RANGE_MARGIN = 0.04
_MIN_FOREGROUND = 0.01  # fraction of pixels; one shape covers 3-6 % of a frame


@dataclass(frozen=True)
class Attributes:
    """What one caption asks for. ``motion``/``speed`` are None for a still ("on a ... background")."""

    family: str
    background: str
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    motion: str | None
    speed: str | None  # "slowly" | "normal" | "quickly"
    text: str = ""


_BACKGROUND_FAMILY = {bg: fam.name for fam in FAMILIES for bg, _ in fam.backgrounds}
_COLOUR_NAMES = [name for name, _ in SHAPE_COLOURS]
_SHAPE_NAMES = sorted({s for fam in FAMILIES for s in fam.shapes})
_TEXTURE_BY_WORD = {w: k for k, w in TEXTURE_WORDS.items()}
_THING = re.compile(r"^an? (\w+) (\w+)$")


def _parse_caption(text: str) -> Attributes:
    """Parse a generator caption (``ddm.synthetic._draw_spec``'s grammar); ValueError if it is not one."""
    t = text.strip().rstrip(".")
    m = re.match(r"^(?P<things>.+?) (?:(?:moves|move)(?: (?P<adv>slowly|quickly))? (?P<dir>\w+) across|on) "
                 r"(?P<bg>an? .+) background$", t)
    if not m:
        raise ValueError(f"not a synthetic-generator caption: {text!r}")
    bg_words = m.group("bg").split(" ", 1)[1]
    for word in sorted(_TEXTURE_BY_WORD, key=len, reverse=True):  # "diagonally striped" before "striped"
        if bg_words.endswith(" " + word):
            bg_name = bg_words[: -len(word) - 1]
            break
    else:
        raise ValueError(f"caption names no known texture: {text!r}")
    if bg_name not in _BACKGROUND_FAMILY:
        raise ValueError(f"caption names an unknown background '{bg_name}': {text!r}")
    shapes, colours = [], []
    for thing in m.group("things").split(" and "):
        tm = _THING.match(thing)
        if not tm or tm.group(1) not in _COLOUR_NAMES or tm.group(2) not in _SHAPE_NAMES:
            raise ValueError(f"caption has an unknown shape phrase '{thing}': {text!r}")
        colours.append(tm.group(1))
        shapes.append(tm.group(2))
    direction = m.group("dir")
    if direction is not None and direction not in MOTIONS:
        raise ValueError(f"caption has an unknown direction '{direction}': {text!r}")
    speed = None if direction is None else SPEED_NAMES[m.group("adv") or ""]
    return Attributes(_BACKGROUND_FAMILY[bg_name], bg_name, tuple(shapes), tuple(colours), direction, speed,
                      text.strip())


def attributes_of(row: Mapping[str, Any] | str) -> Attributes | DigitAttributes:
    """The attributes a prompt asks for, from a ``synthetic.csv`` row (or the caption text itself): the shapes
    generator's grammar, or the moving digits' ("the digit 3 moves left": :mod:`ddm.eval.digits`).

    The caption is the source of truth (it is what the model was prompted with); when the row also has
    the generator's columns (``background``, ``colour``, ``motion``) they must agree, else ValueError —
    a manifest whose captions and ground truth disagree would make every score meaningless.
    """
    if isinstance(row, str):
        return parse_digit_caption(row) if is_digit_caption(row) else _parse_caption(row)
    if "text" not in row:
        raise ValueError(f"a synthetic.csv row needs a 'text' column, got columns {sorted(row)}")
    if is_digit_caption(str(row["text"])):
        digit = parse_digit_caption(str(row["text"]))
        checks: dict[str, str] = {"digit": str(digit.digit), "motion": digit.motion, "speed": digit.speed}
        for col, want in checks.items():
            if col in row and row[col] is not None and str(row[col]) != want:
                raise ValueError(f"row {row.get('path', '?')}: column {col}={row[col]!r} disagrees with its "
                                 f"caption ({want!r}): {row['text']!r}")
        return digit
    attrs = _parse_caption(str(row["text"]))
    checks = {"background": attrs.background, "colour": " ".join(attrs.colours),
              "shape": " ".join(attrs.shapes), "motion": attrs.motion or ""}
    for col, want in checks.items():
        if col in row and row[col] is not None and str(row[col]) != want:
            raise ValueError(f"row {row.get('path', '?')}: column {col}={row[col]!r} disagrees with its "
                             f"caption ({want!r}): {row['text']!r}")
    return attrs


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """The rows of a generator's ``synthetic.csv`` (``path`` may be the csv or its folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / "synthetic.csv"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: write one with `python -m data.synthetic --out DIR` "
                                "(the ground-truth evaluator needs the generator's synthetic.csv)")
    with p.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "text" not in rows[0]:
        raise ValueError(f"{p}: not a synthetic.csv (needs a header with 'text' and at least one row)")
    return rows


def families_in(rows: Iterable[Mapping[str, Any] | Attributes | DigitAttributes]) -> list[str]:
    """Names of the families the rows' captions use, in the generator's order (the digits: by digit)."""
    used = {(r if isinstance(r, (Attributes, DigitAttributes)) else attributes_of(r)).family for r in rows}
    digits = sorted(n for n in used if n.startswith(FAMILY_PREFIX))
    return [f.name for f in FAMILIES if f.name in used] + digits


def make_evaluator(families: Sequence[str], *, frame_step: float = 1.0) -> GroundTruthEvaluator | DigitsEvaluator:
    """The evaluator of the data set ``families`` belong to: the shapes' or the moving digits'."""
    digit = [n.startswith(FAMILY_PREFIX) for n in families]
    if any(digit) and not all(digit):
        raise ValueError(f"families of two data sets in one evaluation: {list(families)}")
    if any(digit):
        return DigitsEvaluator(families, frame_step=frame_step)
    return GroundTruthEvaluator(families, frame_step=frame_step)


# ----------------------------------------------------------------------------------------------- geometry
def _segment_distance(pix: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each pixel (..., 3) to the RGB segment a→b, and the nearest point on it."""
    ab = b - a
    denom = float(ab @ ab)
    t = np.zeros(pix.shape[:-1], np.float32) if denom == 0 else np.clip((pix - a) @ ab / denom, 0.0, 1.0)
    nearest = a + t[..., None] * ab
    return np.linalg.norm(pix - nearest, axis=-1), nearest


@dataclass
class VideoMeasurement:
    """What the image analysis read from one video (``None`` where it could not decide)."""

    family: str
    background: str
    colours: tuple[str, ...]
    velocity: tuple[float, float] | None  # (vx, vy) pixels per frame, image coordinates
    motion: str | None
    speed: str | None
    foreground_fraction: float


class GroundTruthEvaluator:
    """Measures the generator's attributes in decoded videos of any size ≥ 8 px (see the module doc).

    ``families``: names of the scene families in play (the data set's; default all). Every decision is
    a forced choice among their backgrounds, and chance levels are computed over them.
    ``frame_step``: generator frames between consecutive video frames (1 when sampled at the data's fps).
    """

    def __init__(self, families: Sequence[str] | None = None, *, frame_step: float = 1.0,
                 foreground_threshold: float = 30.0):
        known = {f.name: f for f in FAMILIES}
        names = list(families) if families is not None else list(known)
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ValueError(f"unknown families {unknown} (known: {sorted(known)})" if unknown
                             else "families must not be empty")
        self.families = tuple(dict.fromkeys(names))
        self.frame_step = float(frame_step)
        self.foreground_threshold = float(foreground_threshold)
        self._candidates = []  # (family, background name, lo rgb, hi rgb)
        for name in self.families:
            fam = known[name]
            lo, hi = _TEXTURE_RANGE[fam.texture]
            for bg, rgb in fam.backgrounds:
                c = np.asarray(rgb, np.float32)
                self._candidates.append((name, bg, np.minimum(c * (lo - _RANGE_MARGIN), 255),
                                         np.minimum(c * (hi + _RANGE_MARGIN), 255)))
        self._colours = np.asarray([rgb for _, rgb in SHAPE_COLOURS], np.float32)

    # ------------------------------------------------------------------------------------- measuring
    def measure(self, frames: Any, n_colours: int = 1) -> VideoMeasurement:
        """Read background, the ``n_colours`` most supported foreground colours and the motion."""
        video = to_uint8_video(frames).astype(np.float32)  # (F, H, W, 3)
        nf, h, w, _ = video.shape
        if min(h, w) < 8:
            raise ValueError(f"the ground-truth evaluator needs frames of at least 8x8 px, got {h}x{w}")
        pix = video.reshape(-1, 3)
        keep = max(1, int(0.75 * len(pix)))  # trimmed mean: the foreground is at most ~a fifth
        best, best_cost, best_dist, best_near = None, math.inf, None, None
        for cand in self._candidates:
            dist, near = _segment_distance(pix, cand[2], cand[3])
            cost = float(np.partition(dist, keep - 1)[:keep].mean())
            if cost < best_cost:
                best, best_cost, best_dist, best_near = cand, cost, dist, near
        assert best is not None and best_dist is not None and best_near is not None
        weight = self._foreground(best_dist)
        fg = weight > 0
        colours = self._vote_colours(video, best_near, weight, n_colours)
        velocity, motion, speed = read_motion(weight.reshape(nf, h, w), self.frame_step)
        return VideoMeasurement(best[0], best[1], colours, velocity, motion, speed, float(fg.mean()))

    def _votes(self, pix: np.ndarray, bg: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Distance-weighted votes per shape colour: each pixel ``bg + α (colour − bg)`` votes for the
        colour whose line through its background explains it with the smallest residual."""
        votes = np.zeros(len(self._colours))
        if len(pix):
            d = self._colours[None, :, :] - bg[:, None, :]  # (P, C, 3)
            r = (pix - bg)[:, None, :]
            alpha = np.clip((r * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-6), 0.0, 1.0)
            np.add.at(votes, np.linalg.norm(r - alpha[..., None] * d, axis=-1).argmin(axis=1), weight)
        return votes

    def _vote_colours(self, video: np.ndarray, near: np.ndarray, weight: np.ndarray, n: int) -> tuple[str, ...]:
        """The ``n`` shape colours with the most votes, from full-resolution and 2×2-pooled pixels.

        An anti-aliased edge pixel of a lossless frame mixes shape and background in one proportion in all
        channels, so full-resolution pixels are exact mixes. A decoded 4:2:0 video (H.264 at even sizes)
        keeps luma per pixel but chroma per 2×2 block, so there only the 2×2 block means are such mixes.
        Both vote, each normalised to a total of one: real clips read 100 % either way, and a 16-px mp4
        reads 96 % of its colours right (94 % from full-resolution votes alone).
        """
        nf, h, w, _ = video.shape
        fg = weight > 0
        full = self._votes(video.reshape(-1, 3)[fg], near[fg], weight[fg])
        hh, ww = h // 2 * 2, w // 2 * 2

        def pool(a: np.ndarray) -> np.ndarray:
            a = a.reshape(nf, h, w, 3)[:, :hh, :ww]
            return a.reshape(nf, hh // 2, 2, ww // 2, 2, 3).mean(axis=(2, 4)).reshape(-1, 3)

        pv, pb = pool(video), pool(near)
        pw = self._foreground(np.linalg.norm(pv - pb, axis=-1))
        pooled = self._votes(pv[pw > 0], pb[pw > 0], pw[pw > 0])
        votes = full / max(full.sum(), 1e-9) + pooled / max(pooled.sum(), 1e-9)
        order = np.argsort(-votes, kind="stable")[:n]
        return tuple(sorted(_COLOUR_NAMES[i] for i in order))

    def _foreground(self, dist: np.ndarray) -> np.ndarray:
        """Foreground weights: the distance beyond the threshold from the background model.

        A small, low-contrast shape that a codec smeared may clear the threshold nowhere; then it steps
        down until at least _MIN_FOREGROUND of the pixels stand out (a forced choice: the most salient
        thing is the shape).
        """
        for tau in (self.foreground_threshold, 0.66 * self.foreground_threshold, 0.4 * self.foreground_threshold):
            weight = np.maximum(dist - tau, 0.0)
            if (weight > 0).mean() >= _MIN_FOREGROUND:
                break
        return weight

    def score_video(self, frames: Any, asked: Attributes) -> dict[str, bool | None]:
        """``{attribute: correct?}`` for one video against what its prompt asked.

        ``None`` means not measured: ``shape`` always (not resolvable at these sizes), ``motion`` and
        ``speed`` for a still prompt or a single-frame video.
        """
        video = to_uint8_video(frames)
        m = self.measure(video, n_colours=len(asked.colours))
        moving = asked.motion is not None and len(video) >= 2  # no foreground to track: counted wrong
        return {
            "family": m.family == asked.family,
            "background": m.background == asked.background,
            "colour": m.colours == tuple(sorted(asked.colours)),
            "motion": (m.motion == asked.motion) if moving else None,
            "speed": (m.speed == asked.speed) if moving else None,
            "shape": None,
        }

    def chance(self, asked: Attributes) -> dict[str, float | None]:
        """Accuracy of a uniform random guess over this evaluator's vocabulary, per attribute."""
        n_bg = len(self._candidates)
        moving = asked.motion is not None
        return {"family": 1 / len(self.families), "background": 1 / n_bg,
                "colour": 1 / comb(len(_COLOUR_NAMES), len(asked.colours)),
                "motion": 1 / len(MOTIONS) if moving else None, "speed": 1 / len(SPEEDS) if moving else None,
                "shape": None}


# ------------------------------------------------------------------------------------------ aggregation
@dataclass
class GroundTruthResult:
    """Per-attribute accuracy ± SE over N videos, the prompt accuracy, and chance levels.

    ``per_video`` keeps every video's ``{attribute: bool | None}`` (for paired comparisons).
    """

    accuracy: dict[str, tuple[float, float, int]]  # attribute -> (mean, SE, N); absent when never measured
    prompt_accuracy: tuple[float, float, int]
    chance: dict[str, float]
    per_video: list[dict[str, bool | None]] = field(default_factory=list)
    not_measured: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        def triple(t: tuple[float, float, int]) -> dict[str, Any]:
            return {"value": t[0], "stderr": None if not math.isfinite(t[1]) else t[1], "n": t[2]}

        return {"evaluator": EVALUATOR_LABEL,
                "accuracy": {k: triple(v) for k, v in self.accuracy.items()},
                "prompt_accuracy": triple(self.prompt_accuracy), "chance": dict(self.chance),
                "not_measured": list(self.not_measured)}

    def lines(self) -> list[str]:
        """Human-readable lines: one per attribute plus the prompt accuracy."""
        out = []
        for k, (v, se, n) in self.accuracy.items():
            out.append(f"{k:>16}: {v:.3f} ± {se:.3f} (N={n}, chance {self.chance[k]:.3f})")
        v, se, n = self.prompt_accuracy
        out.append(f"{'prompt accuracy':>16}: {v:.3f} ± {se:.3f} (N={n}, chance {self.chance['prompt']:.3f})")
        if self.not_measured:
            out.append(f"not measured (not resolvable at this size, or not in this data set): {', '.join(self.not_measured)}")
        return out


def _mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    x = np.asarray(values, np.float64)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), 0
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"), n


def aggregate(scores: Sequence[Mapping[str, bool | None]],
              chances: Sequence[Mapping[str, float | None]]) -> GroundTruthResult:
    """Accuracy ± SE (SE = std(ddof=1)/√N of the 0/1 outcomes) per attribute, over the videos where it
    was measured; prompt accuracy = every measured attribute of a video right; chance per attribute =
    the mean of the per-prompt chance levels (prompt chance assumes independent guesses)."""
    if not scores or len(scores) != len(chances):
        raise ValueError(f"need one chance record per score, got {len(scores)} scores, {len(chances)} chances")
    acc, chance = {}, {}
    for attr in ATTRIBUTES:
        vals = [float(s[attr]) for s in scores if s.get(attr) is not None]
        if vals:
            acc[attr] = _mean_se(vals)
            chance[attr] = float(np.mean([c[attr] for s, c in zip(scores, chances) if s.get(attr) is not None]))
    prompt = [float(all(v for v in s.values() if v is not None)) for s in scores]
    prompt_chance = [math.prod(c[a] for a, v in s.items() if v is not None) for s, c in zip(scores, chances)]
    chance["prompt"] = float(np.mean(prompt_chance))
    missing = tuple(a for a in ATTRIBUTES if a not in acc)
    return GroundTruthResult(acc, _mean_se(prompt), chance, [dict(s) for s in scores], missing)


def evaluate_videos(evaluator: GroundTruthEvaluator | DigitsEvaluator, videos: Iterable[Any],
                    asked: Sequence[Attributes | DigitAttributes]) -> GroundTruthResult:
    """Score each video against its prompt's attributes (same order) and aggregate."""
    scores, chances = [], []
    for i, video in enumerate(videos):
        if i >= len(asked):
            raise ValueError(f"more videos than prompts ({len(asked)})")
        scores.append(evaluator.score_video(video, asked[i]))
        chances.append(evaluator.chance(asked[i]))
    if len(scores) != len(asked):
        raise ValueError(f"{len(asked)} prompts but {len(scores)} videos")
    return aggregate(scores, chances)


def main(argv: Sequence[str] | None = None) -> GroundTruthResult:
    """CLI: score a ``ddm.generate`` output folder (its ``samples.json`` names each mp4's prompt)."""
    ap = argparse.ArgumentParser(description="Ground-truth accuracy of generated videos of the synthetic data")
    ap.add_argument("samples", type=Path, help="a ddm.generate --out folder (with samples.json)")
    ap.add_argument("--manifest", type=Path, default=None,
                    help="the training data's synthetic.csv (or its folder): its families are the vocabulary; "
                         "default: the families the prompts name")
    ap.add_argument("--frame-step", type=float, default=1.0, help="generator frames per video frame")
    args = ap.parse_args(argv)

    index = args.samples / "samples.json"
    if not index.is_file():
        raise SystemExit(f"{index} not found: pass a folder written by `python -m ddm.generate --out DIR`")
    samples = json.loads(index.read_text())["samples"]
    asked = [attributes_of(s["prompt"]) for s in samples]
    families = families_in(read_manifest(args.manifest)) if args.manifest else families_in(asked)
    ev = make_evaluator(families, frame_step=args.frame_step)
    res = evaluate_videos(ev, (read_video(args.samples / s["mp4"])[0] for s in samples), asked)
    print(f"{EVALUATOR_LABEL}; families {', '.join(families)}")
    print("\n".join(res.lines()))
    return res


if __name__ == "__main__":
    main()
