"""A tiny synthetic video data set with real files, real captions and discoverable cluster structure.

Each clip shows one or two shapes moving across a textured background. Clips come from ``families``
scene families that differ clearly in background palette, background texture and shape set (e.g.
"ocean": blue gradients with circles and squares; "desert": sand stripes with triangles and diamonds),
so k-means on even a cheap colour embedding recovers the families. Captions say what is seen:
"a red circle moves left across a dark blue background".

Output folder: ``clip_00000.mp4`` + ``clip_00000.txt`` per clip, ``img_00000.png`` + ``.txt`` per
still image, and ``synthetic.csv`` (``path,text`` — a valid ingest manifest — plus the ground truth:
``family``, ``kind``, ``shape``, ``colour``, ``motion``, ``background``).

Deterministic: clip i depends only on (seed, i), so the same seed gives the same captions and frames.
CLI: ``python -m data.synthetic --out DIR --num-videos N`` (the data side's entry point; this module is below the
evaluators that need its vocabulary).
"""
from __future__ import annotations

import argparse
import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ddm.video_io import atomic_output, write_video

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """One scene family: what its backgrounds look like and which shapes appear in it."""

    name: str
    backgrounds: tuple[tuple[str, tuple[int, int, int]], ...]  # (caption name, RGB)
    texture: str  # solid | gradient | stripes | checker | diagonal | dots
    shapes: tuple[str, ...]


FAMILIES: tuple[Family, ...] = (
    Family("ocean", (("dark blue", (20, 35, 110)), ("navy", (12, 22, 70)), ("steel blue", (40, 70, 140))),
           "gradient", ("circle", "square")),
    Family("desert", (("sand", (210, 180, 110)), ("ochre", (200, 140, 50)), ("beige", (225, 205, 160))),
           "stripes", ("triangle", "diamond")),
    Family("forest", (("dark green", (25, 90, 35)), ("olive", (95, 110, 30)), ("moss green", (60, 130, 60))),
           "checker", ("ring", "cross")),
    Family("dusk", (("purple", (90, 40, 120)), ("violet", (130, 70, 170)), ("plum", (110, 50, 90))),
           "diagonal", ("circle", "triangle")),
    Family("concrete", (("grey", (120, 120, 120)), ("dark grey", (70, 70, 75)), ("silver", (170, 170, 175))),
           "dots", ("square", "cross")),
    Family("ember", (("dark red", (120, 20, 20)), ("crimson", (160, 25, 45)), ("maroon", (90, 15, 25))),
           "solid", ("diamond", "ring")),
)

TEXTURE_WORDS = {"solid": "plain", "gradient": "gradient", "stripes": "striped", "checker": "checkered",
                 "diagonal": "diagonally striped", "dots": "dotted"}

SHAPE_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (230, 40, 40)), ("yellow", (245, 225, 40)), ("white", (250, 250, 250)),
    ("black", (15, 15, 15)), ("orange", (250, 140, 20)), ("cyan", (40, 220, 230)), ("magenta", (230, 50, 210)),
)

# direction name -> unit (dx, dy) in image coordinates (y grows downward)
MOTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS: dict[str, float] = {"slowly": 0.75, "": 1.5, "quickly": 2.5}  # pixels per frame at size 64


def _texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) brightness multiplier around 1 that gives each family its look."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    period = rng.uniform(0.18, 0.26)
    if kind == "gradient":
        return 0.75 + 0.5 * y
    if kind == "stripes":
        return 1.0 + 0.18 * np.sign(np.sin(2 * np.pi * y / period))
    if kind == "checker":
        return 1.0 + 0.2 * np.sign(np.sin(2 * np.pi * x / period) * np.sin(2 * np.pi * y / period))
    if kind == "diagonal":
        return 1.0 + 0.18 * np.sign(np.sin(2 * np.pi * (x + y) / period))
    if kind == "dots":
        d = np.hypot((x % period) - period / 2, (y % period) - period / 2)
        return 1.0 + 0.3 * (d < period / 4)
    if kind == "solid":
        return np.ones((size, size), np.float32)
    raise ValueError(f"unknown texture '{kind}'")


def _shape_alpha(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` with radius ``r`` at offsets (dx, dy) from its centre."""
    if shape == "circle":
        d = np.hypot(dx, dy) - r
    elif shape == "ring":
        d = np.abs(np.hypot(dx, dy) - 0.75 * r) - 0.3 * r
    elif shape == "square":
        d = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    elif shape == "diamond":
        d = (np.abs(dx) + np.abs(dy)) / np.sqrt(2) - 0.8 * r
    elif shape == "cross":
        d = np.minimum(np.maximum(np.abs(dx) - r, np.abs(dy) - 0.3 * r),
                       np.maximum(np.abs(dy) - r, np.abs(dx) - 0.3 * r))
    elif shape == "triangle":  # pointing up (image y grows downward); max over the three edge half-planes
        d = np.maximum(np.abs(dx) * np.sqrt(3.0) / 2 - dy / 2, dy) - 0.5 * r
    else:
        raise ValueError(f"unknown shape '{shape}'")
    return np.clip(0.5 - d, 0.0, 1.0)


@dataclass(frozen=True)
class ClipSpec:
    """Everything random about one clip, drawn from (seed, index)."""

    family: int
    background: str
    background_rgb: tuple[int, int, int]
    texture_seed: int
    shapes: tuple[tuple[str, str, tuple[int, int, int], float, float, float], ...]  # shape, colour, rgb, x0, y0, r
    motion: str
    speed: str
    caption: str


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _draw_spec(rng: np.random.Generator, family: int, still: bool) -> ClipSpec:
    fam = FAMILIES[family]
    bg_name, bg_rgb = fam.backgrounds[rng.integers(len(fam.backgrounds))]
    n_shapes = 1 + int(rng.random() < 0.3)
    colour_ids = rng.choice(len(SHAPE_COLOURS), size=n_shapes, replace=False)
    shapes = []
    for c in colour_ids:
        shape = fam.shapes[rng.integers(len(fam.shapes))]
        name, rgb = SHAPE_COLOURS[c]
        shapes.append((shape, name, rgb, float(rng.uniform(0.15, 0.85)), float(rng.uniform(0.15, 0.85)),
                       float(rng.uniform(0.09, 0.14))))
    motion = list(MOTIONS)[rng.integers(len(MOTIONS))]
    speed = list(SPEEDS)[rng.integers(len(SPEEDS))]
    things = " and ".join(_with_article(f"{colour} {shape}") for shape, colour, *_ in shapes)
    verb = "moves" if n_shapes == 1 else "move"
    background = _with_article(f"{bg_name} {TEXTURE_WORDS[fam.texture]} background")
    if still:
        caption = f"{things} on {background}"
    else:
        adverb = f" {speed}" if speed else ""
        caption = f"{things} {verb}{adverb} {motion} across {background}"
    return ClipSpec(family, bg_name, bg_rgb, int(rng.integers(2**31)), tuple(shapes), motion, speed, caption)


def render_clip(spec: ClipSpec, size: int, num_frames: int, shape_scale: float = 1.0) -> np.ndarray:
    """Render ``spec`` to ``(num_frames, size, size, 3)`` uint8 frames (shapes wrap around the edges).

    ``shape_scale`` multiplies every shape's radius (drawn as 9-14 % of the frame): the laptop demo trains
    at 16 px, where a scale-1 shape is 3-4 px across, too few pixels for a tiny model to learn its colour in
    minutes. The random draws do not depend on it, so captions stay the same for a seed."""
    if shape_scale <= 0:
        raise ValueError(f"shape_scale must be > 0, got {shape_scale}")
    texture = _texture(FAMILIES[spec.family].texture, size, np.random.default_rng(spec.texture_seed))
    background = np.clip(texture[..., None] * np.asarray(spec.background_rgb, np.float32), 0, 255)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    ux, uy = MOTIONS[spec.motion]
    step = SPEEDS[spec.speed] * size / 64
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for f in range(num_frames):
        img = background.copy()
        for shape, _, rgb, x0, y0, r in spec.shapes:
            cx, cy = x0 * size + ux * step * f, y0 * size + uy * step * f
            dx = (x - cx + size / 2) % size - size / 2  # wrap: the shape re-enters on the other side
            dy = (y - cy + size / 2) % size - size / 2
            alpha = _shape_alpha(shape, dx, dy, r * size * shape_scale)[..., None]
            img = img * (1 - alpha) + alpha * np.asarray(rgb, np.float32)
        frames[f] = np.round(img).astype(np.uint8)
    return frames


def write_caption(path: Path, caption: str) -> None:
    """A clip's sidecar caption file (what ingest reads beside the video)."""
    with atomic_output(path) as tmp:
        tmp.write_text(caption + "\n", encoding="utf-8")


def write_manifest(out: Path, rows: list[dict]) -> Path:
    """``out/synthetic.csv``: one row per item (``path``, ``text`` — a valid ingest manifest — plus the
    generator's ground-truth columns), written atomically."""
    with atomic_output(out / "synthetic.csv") as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out / "synthetic.csv"


def make_synthetic_dataset(out_dir: str | Path, num_videos: int, seed: int = 0, size: int = 64,
                           num_frames: int = 33, fps: float = 8, num_images: int = 0,
                           families: int = 3, progress: bool = True, shape_scale: float = 1.0,
                           first_family: int = 0) -> Path:
    """Write ``num_videos`` mp4 clips (+ ``num_images`` png stills), captions and ``synthetic.csv``.

    Items go round-robin over the families, so every family has (almost) the same number of clips.
    ``shape_scale`` multiplies the shapes' radii (see :func:`render_clip`). ``first_family`` shifts the
    families used to ``first_family .. first_family + families - 1`` (new data for a grown pool). Returns ``out_dir``.
    """
    if not 1 <= families <= len(FAMILIES) - first_family or first_family < 0:
        raise ValueError(f"families must be in 1..{len(FAMILIES) - first_family} with first_family={first_family}, "
                         f"got {families}")
    if num_videos < 0 or num_images < 0 or num_videos + num_images == 0:
        raise ValueError(f"need at least one video or image (num_videos={num_videos}, num_images={num_images})")
    if size < 8 or num_frames < 1 or fps <= 0:
        raise ValueError(f"invalid size={size}, num_frames={num_frames} or fps={fps}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    items = [("video", i) for i in range(num_videos)] + [("image", i) for i in range(num_images)]
    log.info("writing %d synthetic clips and %d images (%d families, %dx%d, %d frames) to %s",
             num_videos, num_images, families, size, size, num_frames, out)
    for kind, i in tqdm(items, desc="synthetic", disable=not progress):
        stream = 0 if kind == "video" else 1  # images draw from their own streams: adding some keeps the clips
        rng = np.random.default_rng([seed, stream, i])
        spec = _draw_spec(rng, first_family + i % families, still=kind == "image")
        if kind == "video":
            name = f"clip_{i:05d}.mp4"
            write_video(out / name, render_clip(spec, size, num_frames, shape_scale), fps)
        else:
            name = f"img_{i:05d}.png"
            frame = render_clip(spec, size, 1, shape_scale)[0]
            with atomic_output(out / name) as tmp:
                if not cv2.imwrite(str(tmp), frame[..., ::-1]):  # OpenCV wants BGR
                    raise OSError(f"could not write {out / name}")
        write_caption((out / name).with_suffix(".txt"), spec.caption)
        shapes = " ".join(s[0] for s in spec.shapes)
        colours = " ".join(s[1] for s in spec.shapes)
        rows.append({"path": name, "text": spec.caption, "family": spec.family, "kind": kind, "shape": shapes,
                     "colour": colours, "motion": "" if kind == "image" else spec.motion,
                     "background": spec.background})
    write_manifest(out, rows)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m data.synthetic --out DIR --num-videos N``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num-videos", type=int, default=150)
    ap.add_argument("--num-images", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--num-frames", type=int, default=33)
    ap.add_argument("--fps", type=float, default=8)
    ap.add_argument("--families", type=int, default=3)
    ap.add_argument("--first-family", type=int, default=0,
                    help="use families FIRST..FIRST+FAMILIES-1 (e.g. a new family for a grown pool)")
    ap.add_argument("--shape-scale", type=float, default=1.0,
                    help="multiply the shapes' radii (1: 9-14%% of the frame)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = make_synthetic_dataset(args.out, args.num_videos, seed=args.seed, size=args.size,
                                 num_frames=args.num_frames, fps=args.fps, num_images=args.num_images,
                                 families=args.families, shape_scale=args.shape_scale,
                                 first_family=args.first_family)
    print(f"wrote {args.num_videos} clips + {args.num_images} images to {out}")


if __name__ == "__main__":
    main()
