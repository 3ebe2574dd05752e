"""The counterfactual direction check (ddm/eval/direction_response.py): the caption rewrite, the paired
statistics against a float64 computation by hand, its validity on real generator clips and on noise, and the
CLI on a tiny model folder."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ddm.eval.direction_response import (DIRECTIONS, direction_response, main, measure_velocities,
                                         with_direction)
from ddm.synthetic import FAMILIES, _draw_spec, render_clip
from tests.fixtures.pipeline import build_model_folder

CAPTION = "a red circle moves slowly left across a navy gradient background"


def test_the_direction_word_is_replaced_and_stills_are_refused():
    assert with_direction(CAPTION, "down") == "a red circle moves slowly down across a navy gradient background"
    two = "a white ring and a black cross move quickly up across an olive checkered background"
    assert with_direction(two, "right") == two.replace(" up ", " right ")
    with pytest.raises(ValueError, match="not a moving synthetic caption"):
        with_direction("a red circle on a navy gradient background", "left")
    with pytest.raises(ValueError, match="unknown direction"):
        with_direction(CAPTION, "sideways")


def test_paired_statistics_match_a_float64_computation_by_hand():
    rng = np.random.default_rng(0)
    n = 7
    vel = {d: rng.normal(size=(n, 2)) for d in DIRECTIONS}
    vel["up"][2] = np.nan  # an untracked video counts as velocity 0 and as wrong
    res = direction_response(vel)

    def mean_se(xs):
        m = sum(xs) / len(xs)
        var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
        return m, (var / len(xs)) ** 0.5

    v = {d: [[0.0 if np.isnan(c) else float(c) for c in row] for row in vel[d]] for d in DIRECTIONS}
    assert res.n == n and res.untracked == 1
    assert res.right_minus_left_x == pytest.approx(mean_se([v["right"][i][0] - v["left"][i][0] for i in range(n)]))
    assert res.down_minus_up_y == pytest.approx(mean_se([v["down"][i][1] - v["up"][i][1] for i in range(n)]))
    along = [(-v["left"][i][0] + v["right"][i][0] - v["up"][i][1] + v["down"][i][1]) / 4 for i in range(n)]
    assert res.along_asked == pytest.approx(mean_se(along))
    hits = []
    for d in DIRECTIONS:
        for i, (vx, vy) in enumerate(v[d]):
            read = ("right" if vx > 0 else "left") if abs(vx) >= abs(vy) else ("down" if vy > 0 else "up")
            hits.append(float(read == d and not (d == "up" and i == 2)))
    assert res.accuracy == pytest.approx(mean_se(hits))
    with pytest.raises(ValueError, match="every direction"):
        direction_response({d: vel[d] for d in DIRECTIONS[:3]})


def _real_clip_velocities(n: int, size: int = 16) -> dict[str, np.ndarray]:
    """Generator clips of n captions, each rendered in the four directions (same shapes and start)."""
    out = {d: [] for d in DIRECTIONS}
    specs = [_draw_spec(np.random.default_rng([4321, i]), i % 3, still=False) for i in range(n)]
    for d in DIRECTIONS:
        clips = [render_clip(dataclasses.replace(s, motion=d, caption=with_direction(s.caption, d)), size, 9, 2.0)
                 for s in specs]
        out[d] = measure_velocities(clips, [f.name for f in FAMILIES[:3]])
    return out


def test_real_clips_respond_fully_and_noise_not_at_all():
    res = direction_response(_real_clip_velocities(24))
    # real clips move 0.19-0.63 px/frame at 16 px: the paired differences are about twice that
    assert res.right_minus_left_x[0] > 0.3 and res.down_minus_up_y[0] > 0.3
    assert res.right_minus_left_x[0] > 5 * res.right_minus_left_x[1]
    assert res.accuracy[0] >= 0.95 and res.untracked == 0

    rng = np.random.default_rng(1)
    noise = {d: measure_velocities([rng.integers(0, 256, (9, 16, 16, 3), dtype=np.uint8) for _ in range(24)],
                                   ["ocean", "desert", "forest"]) for d in DIRECTIONS}
    res = direction_response(noise)
    for mean, se in (res.right_minus_left_x, res.down_minus_up_y, res.along_asked):
        assert abs(mean) <= 3.5 * se + 1e-9
    assert res.accuracy[0] < 0.5


def test_the_cli_samples_every_caption_in_four_directions_with_the_same_seeds(tmp_path, tiny_text_dir):
    folder = tmp_path / "mono"
    build_model_folder(folder, tiny_text_dir, num_experts=1, router=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([CAPTION, "an orange ring on a moss green checkered background",
                                  "a yellow square moves up across a steel blue gradient background",
                                  "a cyan diamond moves quickly right across a sand striped background"]) + "\n")
    res = main(["--model", str(folder), "--prompts", str(prompts), "--num-prompts", "2", "--seed", "7",
                "--batch-size", "2", "--out", str(tmp_path / "out")])
    record = json.loads((tmp_path / "out" / "direction_response.json").read_text())
    assert res.n == 2 and record["n"] == 2 and record["skipped"] == 1
    assert record["prompts"] == [CAPTION, "a yellow square moves up across a steel blue gradient background"]
    assert record["seeds"] == [7, 8]
    assert {d: np.asarray(v).shape for d, v in record["velocities"].items()} == {d: (2, 2) for d in DIRECTIONS}
    assert record["right_minus_left_x"] == list(res.right_minus_left_x)
    # a folder of random weights: no caption gets a consistent answer, but every number is finite
    assert all(np.isfinite(v) for v in (*res.right_minus_left_x, *res.down_minus_up_y, *res.along_asked))
    with pytest.raises(SystemExit, match="no moving synthetic captions"):
        stills = tmp_path / "stills.txt"
        stills.write_text("an orange ring on a moss green checkered background\n")
        main(["--model", str(folder), "--prompts", str(stills)])
