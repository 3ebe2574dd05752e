"""ddm.video_io: real PyAV round trips (mp4, gif, webm, images), frame selection and clear errors."""
from __future__ import annotations

import hashlib
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from ddm.files import atomic_path
from ddm.video_io import atomic_output, probe_video, read_video, write_gif, write_video


def moving_square(num_frames: int, height: int, width: int) -> np.ndarray:
    """Flat background with a bright square moving right: smooth enough for lossy codecs."""
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[:] = (40, 90, 160)
    for f in range(num_frames):
        x = 2 + 2 * f
        frames[f, 8:20, x:x + 12] = (240, 200, 30)
    return frames


def write_webm(path: Path, frames: np.ndarray, fps: int) -> None:
    """Independent writer (VP9 in Matroska), whose header carries no frame count."""
    with av.open(str(path), "w", format="webm") as c:
        s = c.add_stream("libvpx-vp9", rate=fps)
        s.height, s.width, s.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.mark.parametrize("height,width", [(32, 48), (33, 47)])
def test_mp4_round_trip(tmp_path, height, width):
    frames = moving_square(9, height, width)
    path = write_video(tmp_path / "a.mp4", frames, fps=8)
    info = probe_video(path)
    assert info == {"num_frames": 9, "fps": 8.0, "height": height, "width": width, "duration": 9 / 8}
    back, fps = read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8 and fps == 8.0
    assert np.abs(back.astype(int) - frames).mean() < 3.0  # lossy but close
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_gif_round_trip_uses_one_palette(tmp_path):
    frames = moving_square(6, 32, 40)
    path = write_gif(tmp_path / "a.gif", frames, fps=10)
    info = probe_video(path)
    assert (info["num_frames"], info["height"], info["width"]) == (6, 32, 40)
    assert info["fps"] == pytest.approx(10.0)
    back, _ = read_video(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).max() <= 2  # two colours fit any palette exactly


def test_webm_frame_count_by_decoding(tmp_path):
    frames = moving_square(7, 32, 32)
    write_webm(tmp_path / "a.webm", frames, fps=12)
    with av.open(str(tmp_path / "a.webm")) as c:
        assert c.streams.video[0].frames == 0  # why probing must count frames itself
    for exact in (True, False):
        info = probe_video(tmp_path / "a.webm", exact=exact)
        assert (info["num_frames"], info["fps"], info["height"]) == (7, 12.0, 32)


@pytest.mark.parametrize("ext", ["png", "bmp", "webp", "jpg"])
def test_images_read_as_one_frame(tmp_path, ext):
    rng = np.random.default_rng(0)
    img = np.repeat(np.repeat(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), 8, 0), 8, 1)  # blocky: jpg-friendly
    path = tmp_path / f"a.{ext}"
    assert cv2.imwrite(str(path), img[..., ::-1])
    info = probe_video(path)
    assert info == {"num_frames": 1, "fps": 0.0, "height": 32, "width": 40, "duration": 0.0}
    back, fps = read_video(path, frame_indices=[0, 0])
    assert back.shape == (2, 32, 40, 3) and fps == 0.0
    err = np.abs(back[0].astype(int) - img)
    assert (err.max() == 0) if ext != "jpg" else (err.mean() < 8)  # OpenCV writes webp losslessly here


def test_frame_selection(tmp_path):
    frames = moving_square(10, 32, 48)
    path = write_video(tmp_path / "a.mp4", frames, fps=8)
    full, _ = read_video(path)
    picked, _ = read_video(path, frame_indices=[7, 0, 3, 3])
    np.testing.assert_array_equal(picked, full[[7, 0, 3, 3]])
    first, _ = read_video(path, max_frames=4)
    np.testing.assert_array_equal(first, full[:4])
    with pytest.raises(ValueError, match="out of range"):
        read_video(path, frame_indices=[10])
    with pytest.raises(ValueError, match="either"):
        read_video(path, frame_indices=[0], max_frames=2)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        probe_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="zero-byte"):
        probe_video(tmp_path / "empty.mp4")
    (tmp_path / "text.mp4").write_text("not a video at all\n" * 10)
    with pytest.raises(ValueError, match="cannot be opened"):
        probe_video(tmp_path / "text.mp4")
    good = write_video(tmp_path / "good.mp4", moving_square(9, 32, 32), fps=8).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(good[: len(good) // 2])  # moov atom is at the end: gone
    with pytest.raises(ValueError):
        probe_video(tmp_path / "cut.mp4")
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32), fps=8)
    with pytest.raises(ValueError, match="fps"):
        write_gif(tmp_path / "x.gif", np.zeros((2, 8, 8, 3), np.uint8), fps=0)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_video(tmp_path / "a.mp4", moving_square(5, 32, 32), fps=8)
    before = path.read_bytes()

    class CrashOnThirdFrame:  # the real PyAV, except that building the third frame fails mid-encode
        calls = 0

        def __getattr__(self, name):
            return getattr(av, name)

        class VideoFrame:
            @staticmethod
            def from_ndarray(*args, **kwargs):
                CrashOnThirdFrame.calls += 1
                if CrashOnThirdFrame.calls == 3:
                    raise RuntimeError("disk full")
                return av.VideoFrame.from_ndarray(*args, **kwargs)

    monkeypatch.setattr("ddm.video_io.av", CrashOnThirdFrame())
    with pytest.raises(RuntimeError, match="disk full"):
        write_video(path, moving_square(5, 32, 32)[:, ::-1].copy(), fps=8)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]  # no temporary file left


def test_fractional_fps_survives(tmp_path):
    path = write_video(tmp_path / "ntsc.mp4", moving_square(6, 32, 32), fps=30000 / 1001)
    assert Fraction(probe_video(path)["fps"]).limit_denominator(1001) == Fraction(30000, 1001)


def test_writers_use_the_one_atomic_write_helper_with_a_fresh_temp_file_per_write(tmp_path):
    # ddm.video_io's atomic output is ddm.checkpoint's (fsync, usual permissions, unique temp name), so a
    # second write of the same file while one is in progress never takes over the first one's temp file.
    assert atomic_output is atomic_path
    target = tmp_path / "a.gif"
    with atomic_output(target) as first:
        first.write_bytes(b"partial")
        write_gif(target, moving_square(3, 32, 32), fps=10)
        assert first.read_bytes() == b"partial"  # before: both writes shared '.a.tmp-<pid>.gif'
        assert read_video(target)[0].shape == (3, 32, 32, 3)
    assert target.read_bytes() == b"partial"  # the write that finished last wins, whole
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_the_same_frames_always_encode_to_the_same_bytes(tmp_path):
    # libx264 threads by default, which made 2 of 16 clips differ between identical runs (under load).
    rng = np.random.default_rng(0)
    for clip in range(6):
        frames = rng.integers(0, 255, (9, 24, 24, 3), dtype=np.uint8)
        digests = {hashlib.sha256(write_video(tmp_path / f"{clip}_{rep}.mp4", frames, 8).read_bytes()).hexdigest()
                   for rep in range(3)}
        assert len(digests) == 1, f"clip {clip}: {len(digests)} different encodings of the same frames"
