"""The committed compute-curve data of docs/bench/demo.md and its plot script (tests/benchmarks/plot_compute_curve.py)."""
from __future__ import annotations

import json

from tests.benchmarks import plot_compute_curve as cc


def test_committed_runs_are_complete_and_plot_one_series_per_width_and_dropout(tmp_path):
    rows = json.loads((cc.DOCS / "compute_curve.json").read_text(encoding="utf-8"))["runs"]
    for r in rows:
        assert {"steps", "width", "ddm_flops", "ddm_colour", "monolith_colour", "command", "session"} <= set(r), r
        assert 0.0 <= r["ddm_colour"] <= 1.0 and 0.0 <= r["monolith_colour"] <= 1.0 and r["ddm_flops"] > 0
    series = cc._series(rows)
    assert set(series) == {(r["width"], cc._dropout(r)) for r in rows}
    assert len(set(series.values())) == len(series)  # every series its own marker
    # Runs that predate the field read as Paris's dropout; the field, when present, wins.
    assert cc._dropout({"width": 64}) == cc.PARIS_DROPOUT and cc._dropout({"text_dropout": 0.1}) == 0.1
    out = cc.plot(rows, tmp_path / "curve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
