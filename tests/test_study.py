"""``ddm.study``: the aggregation on known inputs, and the whole quick study end to end (slow)."""
from __future__ import annotations

import json
import math

import pytest
from scipy import stats

from ddm.study import MONOLITH, aggregate, arms, interval95, main, mean_se, study_table


def test_mean_se_and_the_t_interval_are_the_textbook_ones():
    r = mean_se([0.2, 0.4, 0.6])
    assert r["mean"] == pytest.approx(0.4) and r["n"] == 3
    assert r["se"] == pytest.approx(0.2 / math.sqrt(3))  # std(ddof=1) = 0.2
    ci = interval95([0.2, 0.4, 0.6])
    half = 4.302652729911275 * 0.2 / math.sqrt(3)  # t(0.975, 2)
    assert ci["lo"] == pytest.approx(0.4 - half) and ci["hi"] == pytest.approx(0.4 + half)
    assert stats.t.ppf(0.975, 2) == pytest.approx(4.302652729911275)
    one = interval95([0.5])
    assert one["se"] is None and one["lo"] is None
    with pytest.raises(ValueError, match="finite"):
        mean_se([0.1, float("nan")])


def test_aggregate_pairs_each_arm_with_the_monolith_per_seed():
    per_seed = {
        0: {"ddm/top1": {"acc": 0.9}, MONOLITH: {"acc": 0.6}},
        1: {"ddm/top1": {"acc": 0.7}, MONOLITH: {"acc": 0.6}},
        2: {"ddm/top1": {"acc": 0.8}, MONOLITH: {"acc": 0.3}},
    }
    agg = aggregate(per_seed)
    assert agg["arms"]["ddm/top1"]["acc"]["mean"] == pytest.approx(0.8)
    assert agg["arms"][MONOLITH]["acc"]["mean"] == pytest.approx(0.5)
    diff = agg["paired"]["ddm/top1"]["acc"]
    d = [0.3, 0.1, 0.5]  # per-seed differences
    assert diff["mean"] == pytest.approx(0.3)
    assert diff["se"] == pytest.approx(0.2 / math.sqrt(3))
    assert diff["lo"] == pytest.approx(0.3 - stats.t.ppf(0.975, 2) * 0.2 / math.sqrt(3))
    assert MONOLITH not in agg["paired"] and agg["seeds"] == [0, 1, 2]
    assert sum(d) / 3 == pytest.approx(diff["mean"])
    table = study_table(agg)
    assert "| ddm/top1 | 0.800 ± 0.058 |" in table and "[-0.197, +0.797]" in table
    with pytest.raises(ValueError, match="seed 1: arm 'ddm/top1' lacks"):
        aggregate({0: per_seed[0], 1: {"ddm/top1": {}, MONOLITH: {"acc": 0.1}}})


@pytest.mark.slow
def test_quick_study_runs_every_arm_over_two_seeds(tmp_path, capsys, monkeypatch):
    from ddm.study import Runner
    from tests.fixtures import forked_cli

    # each job is still its own `python -m` process, forked from a warm interpreter (tests/fixtures/forked_cli.py)
    monkeypatch.setattr(Runner, "launch", staticmethod(forked_cli.start_logged))
    assert main(["--quick", "--seeds", "2", "--out", str(tmp_path)]) == 0
    agg = json.loads((tmp_path / "study.json").read_text())
    assert sorted(agg["arms"]) == sorted(arms()) and agg["seeds"] == [0, 1]
    for arm in arms():
        if arm != MONOLITH:
            assert set(agg["paired"][arm]) == {"gt_prompt", "gt_family", "gt_background", "gt_colour", "gt_direction"}
    for router in ("blind", "text"):
        per_t = agg["routing"][router]["per_t"]
        assert len(per_t) >= 5 and all(0.0 <= row["mean"] <= 1.0 for row in per_t)
    assert (tmp_path / "relative_improvement.png").stat().st_size > 0
    assert (tmp_path / "routing_accuracy.png").stat().st_size > 0
    assert "compute ledger" in (tmp_path / "study.md").read_text()
    # resumable: a rerun reuses every seed's result and rewrites the same aggregate
    before = (tmp_path / "study.json").read_text()
    assert main(["--quick", "--seeds", "2", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "study.json").read_text())["arms"] == json.loads(before)["arms"]


def test_clusters_are_matched_to_families_by_name_for_both_data_sets(tmp_path):
    """The oracle's cluster of each family and the purity, from a generator manifest and the clustering's
    assignments: family names from the captions ("ocean", "digit 4"), so the shapes and the digits share it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ddm.digits import make_digits_dataset
    from ddm.study import cluster_of_family, family_of_cluster

    raw = make_digits_dataset(tmp_path / "raw", 6, digits=(0, 4), progress=False)  # digits 0,4,0,4,0,4
    experts = [2, 1, 2, 1, 1, 1]  # one "0" clip strays into cluster 1
    pq.write_table(pa.table({"key": [f"clip_{i:05d}" for i in range(6)], "expert": experts}),
                   tmp_path / "assignments.parquet")
    cluster, purity = cluster_of_family(raw / "synthetic.csv", tmp_path / "assignments.parquet")
    assert cluster == {"digit 0": 2, "digit 4": 1}
    assert purity == pytest.approx(5 / 6)
    assert family_of_cluster(raw / "synthetic.csv", tmp_path / "assignments.parquet") == {2: "digit 0", 1: "digit 4"}
