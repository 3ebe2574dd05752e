"""The moving-digits data set (ddm.digits), its ground-truth evaluator (ddm.eval.digits) and the embedder's
shape spectrum that lets clustering find its digits.

Held-out clips use the ``test`` writer blocks (writers neither the models nor the classifier saw), written to
mp4 and decoded. The evaluator must read ≥ 95 % of the digit, direction and speed there; on pure noise and on
shuffled prompts it must score within a few standard errors of chance.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from ddm.digits import SPLITS, load_digits_images, make_digits_dataset, render_digit_clip, split_indices, writer_block
from ddm.eval.digits import DigitsEvaluator, classifier_report, digit_crop, parse_digit_caption
from ddm.eval.groundtruth import (GroundTruthEvaluator, attributes_of, evaluate_videos, families_in, make_evaluator,
                                  read_manifest)
from ddm.video_io import read_video

ALL_DIGITS = tuple(range(10))
N_CLIPS = 200  # SE ≈ 0.014 at 96 %: the digit reading is within a few points of the 95 % bar


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """(rows, decoded clips) of 200 held-out clips over all ten digits, 32 px, 17 frames."""
    out = make_digits_dataset(tmp_path_factory.mktemp("digits_test"), N_CLIPS, seed=5, digits=ALL_DIGITS,
                              split="test", progress=False)
    rows = read_manifest(out)
    return rows, [read_video(out / r["path"])[0] for r in rows]


def _tolerance(chance: float, n: int) -> float:
    """4 binomial standard errors of an accuracy whose expectation is ``chance``."""
    return 4 * math.sqrt(chance * (1 - chance) / n)


def test_writer_splits_are_disjoint_and_cover_the_file():
    images, _ = load_digits_images()
    parts = {name: set(split_indices(name).tolist()) for name in SPLITS}
    assert sum(len(p) for p in parts.values()) == len(images) == 1797
    assert not (parts["train"] & parts["classifier"]) and not (parts["train"] & parts["test"])
    assert not (parts["classifier"] & parts["test"])
    assert {writer_block(i) for i in parts["test"]} == set(SPLITS["test"])


def test_generator_is_deterministic_and_its_manifest_agrees_with_the_captions(tmp_path):
    a = make_digits_dataset(tmp_path / "a", 9, seed=3, progress=False)
    b = make_digits_dataset(tmp_path / "b", 9, seed=3, progress=False)
    rows_a, rows_b = read_manifest(a), read_manifest(b)
    assert rows_a == rows_b
    assert [int(r["digit"]) for r in rows_a] == [0, 1, 4] * 3  # round-robin over the default digits
    for r in rows_a:
        asked = attributes_of(r)  # raises when a column disagrees with the caption
        assert asked.family == f"digit {r['digit']}" and int(r["writer_block"]) in SPLITS["train"]
    np.testing.assert_array_equal(read_video(a / "clip_00004.mp4")[0], read_video(b / "clip_00004.mp4")[0])
    bad = dict(rows_a[0], motion="up" if rows_a[0]["motion"] != "up" else "down")
    with pytest.raises(ValueError, match="disagrees with its caption"):
        attributes_of(bad)


def test_caption_grammar():
    a = parse_digit_caption("the digit 7 moves quickly up")
    assert (a.digit, a.motion, a.speed, a.family) == (7, "up", "quickly", "digit 7")
    assert parse_digit_caption("the digit 0 moves left").speed == "normal"
    with pytest.raises(ValueError, match="not a moving-digits caption"):
        parse_digit_caption("the digit 12 moves left")


def test_crop_undoes_the_wrap_around_position():
    """The same bitmap rendered at two places (one wrapping over the edge) gives nearly the same 8×8 crop."""
    from ddm.digits import DigitClipSpec

    centre = render_digit_clip(DigitClipSpec(3, 3, 0.5, 0.5, "left", "", ""), 32, 1)[0]
    wrapped = render_digit_clip(DigitClipSpec(3, 3, 31 / 32, 1 / 32, "left", "", ""), 32, 1)[0]  # whole pixels away
    a, b = digit_crop(centre), digit_crop(wrapped)
    assert a.max() > 8  # the digit is there, in 0..16 units
    assert np.abs(a - b).mean() < 0.5


def test_classifier_reads_held_out_writers_at_least_95_percent():
    report = classifier_report(32)
    assert report["test_images"] == len(split_indices("test")) and report["train_images"] > 900
    assert report["test_accuracy"] >= 0.95, report


def test_held_out_clips_score_at_least_95_percent(heldout):
    rows, videos = heldout
    ev = make_evaluator(families_in(rows))
    assert isinstance(ev, DigitsEvaluator) and len(ev.digits) == 10
    res = evaluate_videos(ev, videos, [attributes_of(r) for r in rows])
    for attr in ("family", "motion", "speed"):
        assert res.accuracy[attr][2] == N_CLIPS
        assert res.accuracy[attr][0] >= 0.95, "\n".join(res.lines())
    assert {"background", "colour", "shape"} <= set(res.not_measured)


def test_noise_and_shuffled_prompts_score_near_chance(heldout):
    rows, videos = heldout
    ev = make_evaluator(families_in(rows))
    asked = [attributes_of(r) for r in rows]
    rng = np.random.default_rng(0)
    noise = evaluate_videos(ev, [rng.integers(0, 256, v.shape, dtype=np.uint8) for v in videos], asked)
    shuffled = evaluate_videos(ev, videos, [asked[i] for i in rng.permutation(len(asked))])
    for res in (noise, shuffled):
        for attr in ("family", "motion", "speed"):
            acc, _, n = res.accuracy[attr]
            assert acc <= res.chance[attr] + _tolerance(res.chance[attr], n), (attr, "\n".join(res.lines()))


def test_make_evaluator_refuses_two_data_sets_at_once():
    assert isinstance(make_evaluator(["ocean", "desert"]), GroundTruthEvaluator)
    with pytest.raises(ValueError, match="two data sets"):
        make_evaluator(["ocean", "digit 3"])
    with pytest.raises(ValueError, match="not a digits family"):
        DigitsEvaluator(["digit x"])


def test_shape_spectrum_is_shift_invariant_and_lets_kmeans_find_the_digits():
    from data.embed import _spectrum_features, color_motion_features
    from ddm.digits import DigitClipSpec

    rng = np.random.default_rng(1)
    grey = rng.random((2, 32, 32))
    np.testing.assert_allclose(_spectrum_features(grey), _spectrum_features(np.roll(grey, (5, -11), axis=(1, 2))),
                               rtol=1e-10, atol=1e-12)
    # 20 clips of each of three digits from different bitmaps, at random places: does k-means find the digits?
    _, labels = load_digits_images()
    pool = split_indices("train")
    clips, truth = [], []
    for digit in (0, 1, 4):
        for i in rng.choice(pool[labels[pool] == digit], 20, replace=False):
            spec = DigitClipSpec(digit, int(i), float(rng.uniform()), float(rng.uniform()), "left", "", "")
            clips.append(render_digit_clip(spec, 32, 2))
            truth.append(digit)
    purity = {}
    for weight in (0.0, 2.0):
        x = np.stack([color_motion_features(c, 1, weight) for c in clips])
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        purity[weight] = _kmeans_purity(x, np.asarray(truth), k=3)
    assert purity[2.0] >= 0.9, purity
    assert purity[2.0] > purity[0.0] + 0.2, purity  # colour and layout alone do not see the digit


def _kmeans_purity(x: np.ndarray, truth: np.ndarray, k: int) -> float:
    from sklearn.cluster import KMeans

    assign = KMeans(k, n_init=10, random_state=0).fit_predict(x)
    return sum(np.bincount(truth[assign == c]).max() for c in range(k) if (assign == c).any()) / len(truth)
