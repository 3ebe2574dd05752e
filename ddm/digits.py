"""Moving handwritten digits: a second built-in data set made from real handwriting.

The pictures are the UCI handwritten digits that scikit-learn ships inside its package (1,797 8×8 images,
values 0..16, from the UCI set's 13 test-set writers; nothing is downloaded). Each clip shows one digit,
enlarged to ``DIGIT_FRACTION`` of the frame, white on a dark canvas, moving in one of four directions at one
of three speeds with wrap-around (as the shapes of :mod:`ddm.synthetic`). Its caption says what is seen:
"the digit 3 moves slowly left".

**Writer splits.** The public copy carries no writer ids, but its rows come in writer order (1,797 rows,
13 writers, ~138 rows each), so contiguous thirteenths of the file stand in for writers ("writer blocks").
The blocks are split three ways, never mixed: ``train`` (blocks 0–2: the clips the models train on),
``classifier`` (blocks 3–9: what the ground truth's digit classifier learns from) and ``test`` (blocks 10–12:
held-out clips, and the classifier's test set). So the evaluator reads digits by writers the models never
saw, and its accuracy is measured on writers it never saw either.

Output folder (a valid ingest manifest, the same layout as :mod:`ddm.synthetic`): ``clip_00000.mp4`` +
``.txt`` per clip and ``synthetic.csv`` with ``path, text, family, kind, digit, motion, speed, writer_block,
image``. ``family`` is the digit: the data set's scene family *is* the digit here.

Deterministic: clip i depends only on (seed, i). CLI: ``python -m data.digits --out DIR --num-videos N``.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from tqdm import tqdm

from ddm.synthetic import MOTIONS, SPEEDS, write_caption, write_manifest
from ddm.video_io import write_video

log = logging.getLogger(__name__)

NUM_WRITER_BLOCKS = 13
SPLITS = {"train": range(0, 3), "classifier": range(3, 10), "test": range(10, 13)}
DIGIT_FRACTION = 0.5      # the digit's side as a fraction of the frame (8 px of bitmap → 16 px at 32 px)
CANVAS_LEVEL = 12         # the dark canvas (0..255)
INK_LEVEL = 255           # a full (16/16) bitmap cell
FAMILY_PREFIX = "digit "  # family name of digit d: "digit d"


def family_name(digit: int) -> str:
    """The family (cluster-defining attribute) name of ``digit``: ``"digit 3"``."""
    return f"{FAMILY_PREFIX}{int(digit)}"


@lru_cache(maxsize=1)
def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8×8 bitmaps (float32, 0..16) and their digits, in file (≈ writer) order.

    From scikit-learn's bundled copy (``sklearn.datasets.load_digits``, read from the package, no network)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # a dependency of the project; only missing in a hand-made environment
        raise ImportError("the moving-digits data set needs scikit-learn (pip install scikit-learn): its UCI "
                          "handwritten digits ship inside that package") from e
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def writer_block(index: int, total: int = 1797) -> int:
    """The writer block (0..12) of image ``index``: its thirteenth of the file."""
    return min(NUM_WRITER_BLOCKS - 1, index * NUM_WRITER_BLOCKS // total)


def split_indices(split: str, digits: Sequence[int] | None = None) -> np.ndarray:
    """Indices of the images of ``split`` (``train`` | ``classifier`` | ``test``), optionally only ``digits``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLITS)}")
    images, labels = load_digits_images()
    blocks = np.array([writer_block(i, len(images)) for i in range(len(images))])
    keep = np.isin(blocks, list(SPLITS[split]))
    if digits is not None:
        keep &= np.isin(labels, list(digits))
    return np.flatnonzero(keep)


@dataclass(frozen=True)
class DigitClipSpec:
    """Everything random about one clip, drawn from (seed, index)."""

    digit: int
    image: int      # row of the bitmap in the digits file
    x0: float       # start of the digit's centre, fraction of the frame
    y0: float
    motion: str
    speed: str
    caption: str


def caption_of(digit: int, motion: str, speed: str) -> str:
    """The caption grammar: ``the digit 3 moves [slowly |quickly ]left``."""
    adverb = f" {speed}" if speed else ""
    return f"the digit {digit} moves{adverb} {motion}"


def _draw_spec(rng: np.random.Generator, digit: int, pool: np.ndarray) -> DigitClipSpec:
    image = int(pool[rng.integers(len(pool))])
    motion = list(MOTIONS)[rng.integers(len(MOTIONS))]
    speed = list(SPEEDS)[rng.integers(len(SPEEDS))]
    return DigitClipSpec(digit, image, float(rng.uniform(0, 1)), float(rng.uniform(0, 1)), motion, speed,
                         caption_of(digit, motion, speed))


def digit_sprite(image: int, size: int) -> np.ndarray:
    """Bitmap ``image`` enlarged (bilinear) to the digit's side at frame ``size``, as ink in [0, 1]."""
    side = max(4, round(size * DIGIT_FRACTION))
    bitmap = load_digits_images()[0][image] / 16.0
    return np.clip(cv2.resize(bitmap, (side, side), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def render_digit_clip(spec: DigitClipSpec, size: int, num_frames: int) -> np.ndarray:
    """Render ``spec`` to ``(num_frames, size, size, 3)`` uint8 frames; the digit wraps around the edges.

    Sub-pixel motion is exact: the sprite is pasted at an integer offset on a canvas and shifted by the
    fractional remainder with a bilinear warp (wrapping)."""
    sprite = digit_sprite(spec.image, size)
    side = sprite.shape[0]
    base = np.zeros((size, size), np.float32)
    base[:side, :side] = sprite  # the sprite's centre sits at (side/2, side/2)
    ux, uy = MOTIONS[spec.motion]
    step = SPEEDS[spec.speed] * size / 64
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for f in range(num_frames):
        cx, cy = spec.x0 * size + ux * step * f, spec.y0 * size + uy * step * f
        shift = np.float32([[1, 0, cx - side / 2], [0, 1, cy - side / 2]])
        ink = cv2.warpAffine(base, shift, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
        grey = CANVAS_LEVEL + (INK_LEVEL - CANVAS_LEVEL) * np.clip(ink, 0.0, 1.0)
        frames[f] = np.round(grey)[..., None].astype(np.uint8)
    return frames


def make_digits_dataset(out_dir: str | Path, num_videos: int, seed: int = 0, size: int = 32, num_frames: int = 17,
                        fps: float = 8, digits: Sequence[int] = (0, 1, 4), split: str = "train",
                        progress: bool = True) -> Path:
    """Write ``num_videos`` clips of ``digits`` (round-robin, so every digit has the same count) drawn from the
    bitmaps of writer split ``split``, their captions and ``synthetic.csv``. Returns ``out_dir``."""
    digits = [int(d) for d in digits]
    if not digits or len(set(digits)) != len(digits) or not all(0 <= d <= 9 for d in digits):
        raise ValueError(f"digits must be distinct values in 0..9, got {digits}")
    if num_videos < 1 or size < 8 or num_frames < 1 or fps <= 0:
        raise ValueError(f"invalid num_videos={num_videos}, size={size}, num_frames={num_frames} or fps={fps}")
    pools = {d: split_indices(split, [d]) for d in digits}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info("writing %d moving-digit clips (digits %s, %s writers, %dx%d, %d frames) to %s",
             num_videos, digits, split, size, size, num_frames, out)
    rows = []
    for i in tqdm(range(num_videos), desc="digits", disable=not progress):
        rng = np.random.default_rng([seed, 2, i])  # stream 2: never the shapes generator's streams
        digit = digits[i % len(digits)]
        spec = _draw_spec(rng, digit, pools[digit])
        name = f"clip_{i:05d}.mp4"
        write_video(out / name, render_digit_clip(spec, size, num_frames), fps)
        write_caption((out / name).with_suffix(".txt"), spec.caption)
        rows.append({"path": name, "text": spec.caption, "family": digit, "kind": "video", "digit": digit,
                     "motion": spec.motion, "speed": spec.speed or "normal",
                     "writer_block": writer_block(spec.image), "image": spec.image})
    write_manifest(out, rows)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m data.digits --out DIR --num-videos N [--digits 0,1,4] [--split train|test]``."""
    ap = argparse.ArgumentParser(description="write moving handwritten-digit clips with captions")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num-videos", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--num-frames", type=int, default=17)
    ap.add_argument("--fps", type=float, default=8)
    ap.add_argument("--digits", default="0,1,4", help="comma-separated digits, one family each")
    ap.add_argument("--split", default="train", choices=sorted(SPLITS),
                    help="writer blocks the bitmaps come from: train (model data), test (held-out evaluation)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = make_digits_dataset(args.out, args.num_videos, seed=args.seed, size=args.size, num_frames=args.num_frames,
                              fps=args.fps, digits=[int(d) for d in args.digits.split(",")], split=args.split)
    print(f"wrote {args.num_videos} moving-digit clips to {out}")


if __name__ == "__main__":
    main()
