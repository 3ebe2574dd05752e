"""FVD: Fréchet distance against closed forms, clip extraction, the I3D loaders, caching, bad inputs."""
from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from ddm.eval.fvd import (ClipSettings, FeatureStats, frechet_distance, frechet_distance_symmetric, fvd, fvd_stats,
                          prepare_clip, real_feature_stats)
from ddm.eval.i3d import InceptionI3d, load_i3d, make_tiny_i3d
from ddm.eval.stats import TINY_LABEL
from ddm.video_io import write_video


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


# --- Fréchet distance --------------------------------------------------------------------------------------

def test_diagonal_gaussians_match_the_closed_form():
    rng = np.random.default_rng(0)
    d = 50
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_symmetric(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-6)


def test_non_commuting_2x2_matches_the_closed_form():
    # For 2x2 M with non-negative eigenvalues, tr √M = sqrt(tr M + 2·sqrt(det M)); M = Σ1Σ2 here.
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_sqrtm_route_agrees_with_symmetric_route_on_random_spd():
    rng = np.random.default_rng(1)
    for d in (3, 17, 64):
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
            frechet_distance_symmetric(mu1, s1, mu2, s2), rel=1e-8)


def test_identical_feature_sets_give_zero():
    feats = np.random.default_rng(2).normal(size=(300, 20))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    scale = np.trace(sigma)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * scale
    assert abs(frechet_distance_symmetric(mu, sigma, mu, sigma)) < 1e-8 * scale


def test_singular_covariance_takes_the_eps_retry(caplog):
    # Two rank-1 covariances in 3-D: scipy's sqrtm of their product is NaN (repeated zero eigenvalues).
    w, v = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, -1.0])
    s1, s2 = np.outer(w, w), 4 * np.outer(v, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        assert not np.all(np.isfinite(scipy.linalg.sqrtm(s1 @ s2)))  # the case really is non-finite
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, 0.0])
    # tr √(Σ1Σ2) = sqrt(4·(w·v)²) = 2·|w·v| = 6, so FD = 1 + 5 + 12 - 12 = 6
    with caplog.at_level(logging.WARNING, logger="ddm.eval.fvd"):
        value = frechet_distance(mu1, s1, mu2, s2)
    assert "retrying" in caplog.text
    assert value == pytest.approx(6.0, abs=1e-4)
    assert frechet_distance_symmetric(mu1, s1, mu2, s2) == pytest.approx(6.0, abs=1e-9)


def test_non_negligible_imaginary_part_raises():
    # Not a covariance (negative eigenvalue): the square root is genuinely complex.
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_fd_shape_and_nan_checks():
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


# --- clip extraction -------------------------------------------------------------------------------------

def test_prepare_clip_strides_scales_and_centre_crops():
    # frame i is uniformly 8·i; left and right quarters of every frame are black, the middle is that value
    f, h, w = 31, 32, 64
    video = np.zeros((f, h, w, 3), np.uint8)
    for i in range(f):
        video[i, :, 16:48] = 8 * i
    clip = prepare_clip(video, ClipSettings(num_frames=16, frame_stride=2, resolution=224))
    assert clip.shape == (3, 16, 224, 224) and clip.dtype == torch.float32
    # short side 32 -> 224 (x7), long side 64 -> 448, centre crop keeps source columns 16..48: the
    # middle part; away from the crop's edges (bilinear reaches one source pixel) it is the exact value
    for t in range(16):
        expected = (8 * 2 * t) / 127.5 - 1.0
        assert torch.allclose(clip[:, t, :, 8:-8], torch.full((3, 224, 208), expected), atol=1e-5)
    assert clip.min() >= -1 and clip.max() <= 1


def test_prepare_clip_rejects_short_videos():
    with pytest.raises(ValueError, match="at least 16 frames"):
        prepare_clip(np.zeros((15, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 31 frames"):
        prepare_clip(np.zeros((30, 8, 8, 3), np.uint8), ClipSettings(frame_stride=2))


# --- I3D loaders ----------------------------------------------------------------------------------------

def test_inception_i3d_matches_the_published_parameter_count_and_key_names():
    model = InceptionI3d(num_classes=400)
    # pytorch-i3d's InceptionI3d (rgb_imagenet.pt) has 12,697,264 parameters
    assert sum(p.numel() for p in model.parameters()) == 12_697_264
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
        "Conv3d_1a_7x7.bn.running_var": (64,),
        "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
        "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
        "Mixed_4f.b2b.bn.weight": (128,),
        "Mixed_5c.b3b.conv3d.weight": (128, 832, 1, 1, 1),
        "logits.conv3d.weight": (400, 1024, 1, 1, 1),
        "logits.conv3d.bias": (400,),
    }
    assert {k: shapes.get(k) for k in expected} == expected


def test_missing_i3d_names_the_file_and_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="i3d_torchscript.pt") as e:
        load_i3d(tmp_path / "nope.pt")
    assert "nope.pt" in str(e.value) and "StyleGAN-V" in str(e.value)


@pytest.fixture(scope="module")
def tiny_i3d(tmp_path_factory):
    return load_i3d(make_tiny_i3d(tmp_path_factory.mktemp("i3d") / "tiny_i3d.pt", seed=0))


def test_state_dict_route_equals_torchscript_route(tmp_path, tiny_i3d):
    state = torch.jit.load(tiny_i3d.path).state_dict()
    torch.save(dict(state), tmp_path / "sd.pt")
    a, b = tiny_i3d, load_i3d(tmp_path / "sd.pt")
    assert (a.route, b.route) == ("torchscript", "state_dict") and a.tiny and b.tiny
    clips = torch.rand(1, 3, 16, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    np.testing.assert_allclose(a.features(clips), b.features(clips), rtol=1e-5, atol=1e-6)
    del state["Mixed_4b.b0.conv3d.weight"]
    torch.save(dict(state), tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="missing keys.*Mixed_4b.b0.conv3d.weight"):
        load_i3d(tmp_path / "broken.pt")


# --- FVD end to end on the tiny TorchScript I3D ------------------------------------------------------------

def _videos(seed: int, n: int, bright: float, size: int = 32, frames: int = 16) -> np.ndarray:
    """Smooth moving blobs; ``bright`` shifts the colour distribution between sets."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n, frames, size, size, 3), np.uint8)
    for i in range(n):
        cy, cx, vy, vx = rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(-1, 1), rng.uniform(-1, 1)
        colour = rng.uniform(0, 1, size=3)
        for t in range(frames):
            blob = np.exp(-((yy - cy - vy * t) ** 2 + (xx - cx - vx * t) ** 2) / 40.0)
            out[i, t] = np.clip(255 * (bright + (1 - bright) * blob[..., None] * colour), 0, 255)
    return out


def test_fvd_is_zero_for_identical_sets_and_positive_for_different_ones(tiny_i3d):
    real, shifted = _videos(0, 9, 0.0), _videos(1, 9, 0.6)  # the second set is brighter
    stats = fvd_stats(real, tiny_i3d, progress=False)
    identical = fvd(list(real), stats, tiny_i3d, progress=False)
    different = fvd(shifted, stats, tiny_i3d, progress=False)
    scale = np.trace(stats.sigma)
    assert scale > 1e-3  # the tiny backbone's features really vary across videos
    assert abs(identical.value) < 1e-6 * scale
    assert different.value > 1.0 * scale
    assert different.stderr is None and different.n == 9 and different.details["n_real"] == 9
    assert different.details["backbone"] == TINY_LABEL and TINY_LABEL in str(different)
    assert different.details["num_frames"] == 16 and different.details["resolution"] == 224


def test_fvd_rejects_bad_sets(tiny_i3d):
    good = _videos(0, 2, 0.0)
    with pytest.raises(ValueError, match="at least 16 frames"):
        fvd(good[:, :15], good, tiny_i3d, progress=False)
    mixed = [good[0], _videos(0, 1, 0.0, size=40)[0]]
    with pytest.raises(ValueError, match="share one frame size"):
        fvd(mixed, good, tiny_i3d, progress=False)
    with pytest.raises(ValueError, match="empty"):
        fvd([], good, tiny_i3d, progress=False)
    with pytest.raises(ValueError, match="at least 2 videos"):
        fvd(good[:1], good, tiny_i3d, progress=False)
    stats = FeatureStats(np.zeros(8), np.eye(8), 2, {**tiny_i3d.details(), **ClipSettings().as_dict()})
    with pytest.raises(ValueError, match="frame_stride"):
        fvd(good, stats, tiny_i3d, ClipSettings(frame_stride=2), progress=False)


def test_real_statistics_are_cached_and_invalidated(tmp_path, tiny_i3d):
    paths = [write_video(tmp_path / f"real_{i}.mp4", v, fps=8) for i, v in enumerate(_videos(5, 2, 0.2))]
    cache = tmp_path / "cache"
    first = real_feature_stats(paths, tiny_i3d, cache, progress=False)
    assert first.n == 2 and len(list(cache.glob("fvd_real_*.npz"))) == 1

    def must_not_decode(path):
        raise AssertionError("the cache should have been used")

    again = real_feature_stats(paths, tiny_i3d, cache, read_video=must_not_decode, progress=False)
    np.testing.assert_array_equal(again.sigma, first.sigma)
    assert again.details == first.details
    # the same statistics as computing them from the decoded frames directly
    from ddm.video_io import read_video
    direct = fvd_stats([read_video(p)[0] for p in paths], tiny_i3d, progress=False)
    np.testing.assert_allclose(first.mu, direct.mu, rtol=1e-12)

    os.utime(paths[0], ns=(1, 1))  # a changed file must not reuse stale statistics
    decoded = []
    real_feature_stats(paths, tiny_i3d, cache, read_video=lambda p: decoded.append(p) or read_video(p)[0],
                       progress=False)
    assert len(decoded) == 2 and len(list(cache.glob("fvd_real_*.npz"))) == 2
    with pytest.raises(FileNotFoundError, match="do not exist"):
        real_feature_stats([tmp_path / "gone.mp4"], tiny_i3d, cache, progress=False)
