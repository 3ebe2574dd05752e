"""A contact sheet a person can open: per prompt, the real clip and each run's video, frames side by side.

Layout (one PNG): a header row names the columns (``real``, then each run); every prompt gets its text on
a line of its own, then one block per column holding ``frames`` evenly spaced frames of that video,
scaled up with nearest-neighbour (a 16-px frame stays crisp pixels, not a blur). A missing video
(e.g. no real clip with that caption) is drawn as an empty grey block labelled ``n/a``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ddm.files import atomic_write
from ddm.eval.videos import to_uint8_video

__all__ = ["write_contact_sheet", "contact_sheet_image"]

_PAD, _TEXT_H, _BG, _FG, _EMPTY = 6, 14, (255, 255, 255), (0, 0, 0), (200, 200, 200)


def _pick(video: np.ndarray, frames: int) -> list[np.ndarray]:
    idx = np.linspace(0, len(video) - 1, num=min(frames, len(video))).round().astype(int)
    return [video[i] for i in idx]


def contact_sheet_image(prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], *, frames: int = 3,
                        cell: int | None = None) -> "Any":
    """The sheet as a PIL image. ``columns``: name → one video (or None) per prompt, any ddm.eval.videos form.

    ``cell``: the drawn size of one frame in pixels (default: frames of any size scaled to about 64 px).
    """
    from PIL import Image, ImageDraw, ImageFont

    if not prompts or not columns:
        raise ValueError("a contact sheet needs at least one prompt and one column")
    videos = {name: [None if v is None else to_uint8_video(v, where=f"{name}[{i}]") for i, v in enumerate(col)]
              for name, col in columns.items()}
    for name, col in videos.items():
        if len(col) != len(prompts):
            raise ValueError(f"column {name!r} has {len(col)} videos for {len(prompts)} prompts")
    sizes = [v.shape[1:3] for col in videos.values() for v in col if v is not None]
    if not sizes:
        raise ValueError("a contact sheet needs at least one video")
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    scale = max(1, round((cell or 64) / max(h, w)))
    fh, fw = h * scale, w * scale
    block_w = frames * fw + (frames - 1) * 2
    font = ImageFont.load_default()
    width = _PAD + len(videos) * (block_w + _PAD)
    height = _PAD + _TEXT_H + len(prompts) * (_TEXT_H + fh + _PAD) + _PAD
    sheet = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(videos):
        draw.text((_PAD + c * (block_w + _PAD), _PAD), name, fill=_FG, font=font)
    y = _PAD + _TEXT_H
    for r, prompt in enumerate(prompts):
        draw.text((_PAD, y), prompt, fill=_FG, font=font)
        y += _TEXT_H
        for c, col in enumerate(videos.values()):
            x = _PAD + c * (block_w + _PAD)
            video = col[r]
            if video is None:
                draw.rectangle([x, y, x + block_w - 1, y + fh - 1], fill=_EMPTY)
                draw.text((x + 4, y + 4), "n/a", fill=_FG, font=font)
                continue
            for j, frame in enumerate(_pick(video, frames)):
                img = Image.fromarray(frame).resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST)
                sheet.paste(img, (x + j * (fw + 2), y))
        y += fh + _PAD
    return sheet


def write_contact_sheet(path: str | Path, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], *,
                        frames: int = 3, cell: int | None = None) -> Path:
    """Write :func:`contact_sheet_image` as a PNG at ``path`` (atomically); returns the path."""
    sheet = contact_sheet_image(prompts, columns, frames=frames, cell=cell)
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
