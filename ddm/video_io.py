"""Video and image file I/O through PyAV: probe, read frames, write mp4 and gif.

Frames are always ``uint8`` RGB arrays shaped ``(F, H, W, 3)``. Still images (png, jpg, webp, bmp) are
read through PyAV too, as a single frame with ``fps == 0.0`` (they have no time axis).

Writers are atomic (:func:`ddm.files.atomic_path`): they encode into a temporary file beside the target,
fsync it and rename it into place, so a crash never leaves a half-written video under the final name.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from ddm.files import atomic_path

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


def is_image_path(path: str | Path) -> bool:
    """True when ``path`` has a still-image extension (read as one frame)."""
    return Path(path).suffix.lower() in IMAGE_EXTS


@contextmanager
def _open_video_stream(path: str | Path) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    """Open ``path`` and yield (container, first video stream); ValueError when either is impossible."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"video file not found: '{p}'")
    if p.stat().st_size == 0:
        raise ValueError(f"'{p}' is an empty (zero-byte) file")
    try:
        container = av.open(str(p))
    except av.FFmpegError as e:
        raise ValueError(f"'{p}' cannot be opened as a video or image: {e}") from e
    try:
        if not container.streams.video:
            raise ValueError(f"'{p}' has no video stream (truncated or not a video file?)")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threads: decoding is the cost of probing and reading
        yield container, stream
    finally:
        container.close()


def _stream_fps(stream: av.video.stream.VideoStream, image: bool) -> float:
    if image:
        return 0.0
    # guessed_rate follows ffmpeg's av_guess_frame_rate (sane for gif's centisecond delays and VFR webm).
    rate = stream.guessed_rate or stream.average_rate or stream.base_rate
    if not rate or rate <= 0:
        raise ValueError("the video stream declares no frame rate")
    return float(rate)


def _decode_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                   path: Path) -> Iterator[av.VideoFrame]:
    """Yield decoded frames; a corrupt packet mid-stream ends the stream (the frames before it count)."""
    try:
        yield from container.decode(stream)
    except av.FFmpegError as e:
        # Truncated files typically fail after some good frames: keep those, and say so.
        log.warning("'%s': decoding stopped early (%s); using the frames decoded so far", path, e)


def probe_video(path: str | Path, *, exact: bool = True) -> dict:
    """Return ``{num_frames, fps, height, width, duration}`` for a video or image file.

    ``exact=True`` decodes every frame to count the *decodable* frames (container headers are 0 or
    wrong for webm/gif and for truncated files). ``exact=False`` counts demuxed packets and decodes
    only the first frame: much cheaper on long clips, and correct for intact files.
    Raises ValueError for undecodable, empty or zero-frame input, FileNotFoundError when missing.
    """
    p = Path(path)
    image = is_image_path(p)
    with _open_video_stream(p) as (container, stream):
        fps = _stream_fps(stream, image)
        first = None
        num_frames = 0
        if exact or image:
            for frame in _decode_frames(container, stream, p):
                first = first if first is not None else frame
                num_frames += 1
        else:
            try:
                for packet in container.demux(stream):
                    num_frames += 1 if packet.size else 0
                    if first is None:  # the final empty packet flushes the decoder, so this always resolves
                        first = next(iter(packet.decode()), None)
            except av.FFmpegError as e:
                raise ValueError(f"'{p}' cannot be demuxed: {e}") from e
        if first is None or num_frames == 0:
            raise ValueError(f"'{p}' contains no decodable frames")
        height, width = first.height, first.width
    duration = num_frames / fps if fps > 0 else 0.0
    return {"num_frames": num_frames, "fps": fps, "height": height, "width": width, "duration": duration}


def read_video(path: str | Path, frame_indices: Sequence[int] | None = None,
               max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode a video (or an image, as one frame) to ``(frames uint8 (F, H, W, 3) RGB, fps)``.

    ``frame_indices`` picks frames by 0-based index (any order, repeats allowed); ``max_frames`` keeps
    the first n frames. Decoding stops as soon as the needed frames are in hand.
    """
    p = Path(path)
    if frame_indices is not None and max_frames is not None:
        raise ValueError("pass either frame_indices or max_frames, not both")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    wanted = None if frame_indices is None else [int(i) for i in frame_indices]
    if wanted is not None:
        if not wanted:
            raise ValueError("frame_indices is empty")
        if min(wanted) < 0:
            raise ValueError(f"frame_indices must be >= 0, got {min(wanted)}")
    last_needed = max(wanted) if wanted is not None else (max_frames - 1 if max_frames is not None else None)
    wanted_set = set(wanted) if wanted is not None else None

    image = is_image_path(p)
    kept: dict[int, np.ndarray] = {}
    with _open_video_stream(p) as (container, stream):
        fps = _stream_fps(stream, image)
        n_decoded = 0
        for i, frame in enumerate(_decode_frames(container, stream, p)):
            n_decoded = i + 1
            if wanted_set is None or i in wanted_set:
                kept[i] = frame.to_ndarray(format="rgb24")
            if last_needed is not None and i >= last_needed:
                break
    if n_decoded == 0:
        raise ValueError(f"'{p}' contains no decodable frames")
    if wanted is not None and last_needed >= n_decoded:
        raise ValueError(f"frame index {last_needed} out of range: '{p}' has {n_decoded} decodable frames")
    order = wanted if wanted is not None else sorted(kept)
    shapes = {kept[i].shape for i in order}
    if len(shapes) != 1:
        raise ValueError(f"'{p}' changes frame size mid-stream ({sorted(shapes)}); cannot stack frames")
    return np.stack([kept[i] for i in order]), fps


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be (F, H, W, 3) with F >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    return np.ascontiguousarray(frames)


# The one temp-file + rename helper of the project (fsync, usual permissions, a unique temp name per write).
# ``atomic_output`` is its old name here, kept for callers that still import it from this module.
atomic_output = atomic_path


def _rate(fps: float) -> Fraction:
    if not fps or fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return Fraction(fps).limit_denominator(1001)


def write_video(path: str | Path, frames: np.ndarray, fps: float, *, crf: int = 18) -> Path:
    """Write ``frames`` (F, H, W, 3) uint8 RGB to an mp4 at ``fps``; returns the path.

    H.264 (libx264) when this PyAV build has it, else MPEG-4 part 2. Even sizes use yuv420p (plays
    everywhere); odd sizes, which 4:2:0 cannot hold, use yuv444p so the size survives the round trip.
    """
    frames = _check_frames(frames)
    _, height, width, _ = frames.shape
    rate = _rate(fps)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    odd = height % 2 or width % 2
    pix_fmt = "yuv444p" if (odd and codec == "libx264") else "yuv420p"
    # One encoder thread and x264's C code paths: frame/slice threading made the output depend on timing, and
    # with its assembly kernels the same frames still encoded to different bytes in about half the runs under
    # load (24 and 32 px: tests/test_video_io.py failed 6 of 12 runs beside three busy loops, test_digits.py once
    # in CI), 0 of 16 with asm=0. The same frames must give the same bytes (data.synthetic's seed promise, cached
    # domain backbones); the cost is ~2.5x the encoding time (93 vs 38 ms for 33 frames at 64 px).
    if codec == "libx264":
        options = {"crf": str(crf), "threads": "1", "x264-params": "asm=0"}
    else:
        options = {"qscale": "2", "threads": "1"}
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream(codec, rate=rate, options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return Path(path)


def _palette_frames(frames: np.ndarray, rate: Fraction) -> list[av.VideoFrame]:
    """Quantise all frames to one shared 256-colour palette (ffmpeg palettegen + paletteuse)."""
    _, height, width, _ = frames.shape
    time_base = 1 / rate
    graph = av.filter.Graph()
    source = graph.add_buffer(width=width, height=height, format="rgb24", time_base=time_base)
    split = graph.add("split")
    palettegen = graph.add("palettegen", "stats_mode=full")
    paletteuse = graph.add("paletteuse", "dither=bayer")
    sink = graph.add("buffersink")
    source.link_to(split)
    split.link_to(palettegen, 0, 0)
    split.link_to(paletteuse, 1, 0)
    palettegen.link_to(paletteuse, 0, 1)
    paletteuse.link_to(sink)
    graph.configure()
    for i, frame in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
        vf.pts, vf.time_base = i, time_base
        graph.push(vf)
    graph.push(None)  # palettegen emits its palette only at end of stream
    out = []
    while True:
        try:
            out.append(graph.pull())
        except (av.BlockingIOError, av.EOFError):
            return out


def write_gif(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """Write ``frames`` (F, H, W, 3) uint8 RGB to an animated gif with one shared palette; returns the path.

    Gif delays are whole centiseconds, so the stored rate is the nearest representable one.
    """
    frames = _check_frames(frames)
    _, height, width, _ = frames.shape
    rate = _rate(fps)
    quantised = _palette_frames(frames, rate)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format="gif") as container:
            stream = container.add_stream("gif", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "pal8"
            for frame in quantised:
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return Path(path)


def resize_center_crop(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 ``(F, H, W, 3)`` so it covers ``size`` = (h, w) (short side first), then centre-crop."""
    h, w = size
    src_h, src_w = frames.shape[1:3]
    scale = max(h / src_h, w / src_w)
    new_h, new_w = max(h, round(src_h * scale)), max(w, round(src_w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    top, left = (new_h - h) // 2, (new_w - w) // 2
    out = np.empty((len(frames), h, w, 3), dtype=np.uint8)
    for i, f in enumerate(frames):
        resized = f if (new_h, new_w) == (src_h, src_w) else cv2.resize(f, (new_w, new_h), interpolation=interp)
        out[i] = resized[top:top + h, left:left + w]
    return out
