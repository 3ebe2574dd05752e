"""ddm.eval.stats (mean ± SE, MetricResult) and ddm.eval.videos (the accepted video forms)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ddm.eval.stats import TINY_LABEL, MetricResult, mean_and_stderr
from ddm.eval.videos import count_videos, iter_videos, to_uint8_video


def test_mean_and_stderr_matches_numpy():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=37)
    mean, se, n = mean_and_stderr(x.tolist())
    assert n == 37
    assert mean == pytest.approx(np.mean(x), rel=1e-12)
    assert se == pytest.approx(np.std(x, ddof=1) / np.sqrt(37), rel=1e-12)


def test_mean_and_stderr_two_values_by_hand():
    mean, se, n = mean_and_stderr([1.0, 3.0])
    # std(ddof=1) of {1, 3} is sqrt(2); SE = sqrt(2)/sqrt(2) = 1
    assert (mean, n) == (2.0, 2) and se == pytest.approx(1.0)


def test_single_value_has_nan_stderr():
    mean, se, n = mean_and_stderr(np.array([0.25]))
    assert mean == 0.25 and n == 1 and math.isnan(se)


@pytest.mark.parametrize("bad, msg", [([], "empty"), ([1.0, float("nan")], "non-finite")])
def test_mean_and_stderr_rejects_bad_input(bad, msg):
    with pytest.raises(ValueError, match=msg):
        mean_and_stderr(bad)


def test_metric_result_is_json_ready_and_labels_tiny_backbones():
    r = MetricResult("clip_text_video", 0.2178, float("nan"), 1,
                     {"backbone": TINY_LABEL, "tiny_test_backbone": True, "per_video": [0.2178]})
    d = r.to_dict()
    assert d["stderr"] is None and d["n"] == 1
    json.dumps(d, allow_nan=False)  # raises if any NaN slipped through
    assert r.is_tiny and TINY_LABEL in str(r)
    fvd = MetricResult("fvd", 12.5, None, 64, {"backbone": "I3D"})
    assert "no SE" in str(fvd) and TINY_LABEL not in str(fvd) and not fvd.is_tiny


def test_float_videos_map_to_the_same_uint8_frames():
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, size=(2, 5, 6, 7, 3), dtype=np.uint8)  # (N, F, H, W, 3)
    # the project's pixel convention: (N, 3, F, H, W) float in [-1, 1]
    as_float = torch.from_numpy(u8).permute(0, 4, 1, 2, 3).double() / 127.5 - 1.0
    got = list(iter_videos(as_float))
    assert len(got) == 2
    for a, b in zip(got, u8):
        assert a.dtype == np.uint8 and np.array_equal(a, b)
    assert [v.shape for v in iter_videos(u8)] == [(5, 6, 7, 3)] * 2
    assert len(list(iter_videos(u8[0]))) == 1  # a single (F, H, W, 3) video
    assert count_videos(as_float) == 2 and count_videos(u8[0]) == 1 and count_videos(iter([u8[0]])) is None


def test_float_overshoot_is_clipped_but_other_ranges_are_rejected():
    v = np.full((3, 2, 4, 4), 1.2, dtype=np.float32)
    assert to_uint8_video(v).max() == 255
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        to_uint8_video(np.full((3, 2, 4, 4), 200.0, dtype=np.float32))


@pytest.mark.parametrize("bad, msg", [
    (np.zeros((4, 8, 8), np.uint8), "one video"),
    (np.zeros((4, 8, 8, 4), np.uint8), r"\(F, H, W, 3\)"),
    (np.zeros((4, 3, 8, 8), np.float32), r"\(3, F, H, W\)"),
    (np.zeros((2, 8, 8, 3), np.int64), "dtype"),
    ([], "empty"),
    ("video.mp4", "iterable"),
])
def test_bad_video_inputs_raise(bad, msg):
    with pytest.raises(ValueError, match=msg):
        list(iter_videos(bad))
