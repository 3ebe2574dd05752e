"""Motion score: Farneback flow magnitude on textures translated by a known number of pixels per frame."""
from __future__ import annotations

import numpy as np
import pytest

from ddm.eval.motion import FARNEBACK_PARAMS, motion_score, video_motion


def _periodic_texture(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth random texture that tiles seamlessly (low-pass filtered noise in the Fourier domain)."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    tex = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(h, w))) * np.exp(-(fx**2 + fy**2) / (2 * 0.08**2))))
    return (tex - tex.min()) / (tex.max() - tex.min())


def _translating_video(dx: int, dy: int, frames: int = 6, h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """The whole frame is the periodic texture shifted by (dx, dy)·t with wrap-around, so every pixel
    truly moves by exactly (dx, dy) px/frame: the analytic motion is sqrt(dx² + dy²)."""
    tex = _periodic_texture(h, w, seed)
    gray = np.stack([np.roll(tex, (dy * t, dx * t), axis=(0, 1)) for t in range(frames)])
    rgb = np.stack([gray, 0.5 * gray + 0.25, 1.0 - gray], axis=-1)  # colour, so the gray conversion runs
    return (255 * rgb).round().astype(np.uint8)


@pytest.mark.parametrize("dx, dy", [(2, 1), (1, 0), (3, -2)])
def test_translation_speed_is_recovered(dx, dy):
    truth = np.hypot(dx, dy)
    video = _translating_video(dx, dy)
    # away from the borders, where content enters and leaves, the flow is the true shift
    assert video_motion(video, margin=16) == pytest.approx(truth, rel=0.02)
    assert video_motion(video) == pytest.approx(truth, rel=0.10)


def test_static_video_has_no_motion():
    assert video_motion(_translating_video(0, 0)) < 0.01


def test_stride_reports_pixels_per_frame():
    video = _translating_video(1, 1, frames=9)
    r = motion_score([video], frame_stride=2, margin=16, progress=False)
    assert r.value == pytest.approx(np.sqrt(2), rel=0.03)  # 2√2 px per 2 frames, reported per frame
    assert r.details["frame_stride"] == 2 and r.details["unit"] == "px/frame"


def test_resolution_scales_the_motion_and_is_recorded():
    video = _translating_video(2, 0, h=96, w=128)
    r = motion_score([video], resolution=48, margin=8, progress=False)  # half size: 1 px/frame
    assert r.value == pytest.approx(1.0, rel=0.05)
    assert r.details["resolution"] == [[48, 64]] and r.details["resolution_setting"] == 48


def test_set_mean_and_stderr_over_videos():
    videos = [_translating_video(dx, 0, seed=dx) for dx in (1, 2, 3, 4)]
    per_video = [video_motion(v, margin=16) for v in videos]
    r = motion_score(videos, margin=16, progress=False)
    assert r.n == 4 and r.stderr is not None
    assert r.value == pytest.approx(np.mean(per_video), rel=1e-12)
    assert r.stderr == pytest.approx(np.std(per_video, ddof=1) / 2, rel=1e-12)
    assert np.allclose(per_video, [1, 2, 3, 4], rtol=0.02)
    assert r.details["flow_params"] == FARNEBACK_PARAMS and not r.is_tiny


def test_motion_bad_inputs():
    with pytest.raises(ValueError, match="more than frame_stride"):
        motion_score([np.zeros((1, 16, 16, 3), np.uint8)], progress=False)
    with pytest.raises(ValueError, match="empty"):
        motion_score([], progress=False)
    with pytest.raises(ValueError, match="torchvision"):
        motion_score([np.zeros((2, 16, 16, 3), np.uint8)], method="raft", progress=False)
    with pytest.raises(ValueError, match="margin"):
        motion_score([np.zeros((2, 16, 16, 3), np.uint8)], margin=8, progress=False)
