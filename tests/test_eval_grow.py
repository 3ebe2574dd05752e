"""``ddm.eval.grow``: per-family-group accuracy of a pool before and after an expert joined, from known inputs."""
from __future__ import annotations

import json
import math

import pytest

from ddm.eval.grow import ATTRS, group_results, main, report


def _metrics(path, values):
    runs = [{"name": "m/top1", "metrics": {m: {"details": {"per_video": v}} for m, v in values.items()}}]
    path.write_text(json.dumps({"format": "ddm-eval-v1", "runs": runs}))
    return path


def test_groups_means_ses_and_paired_differences_from_known_inputs(tmp_path):
    families = [0, 1, 2, 3] * 3  # family 3 is the new one: videos 3, 7, 11
    before = {m: [1, 1, 0, 0] * 3 for m in ATTRS}  # old families 2/3 right, new family never
    after = {m: [1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0] for m in ATTRS}
    res = group_results(before, after, families, new_family=3)
    new, old = res["new"]["gt_family"], res["old"]["gt_family"]
    assert (new["before"], new["after"], new["n"]) == (0.0, pytest.approx(2 / 3), 3)
    assert new["after_se"] == pytest.approx(math.sqrt((2 / 3) * (1 / 3) * 3 / 2) / math.sqrt(3))  # std(ddof=1)/sqrt(n)
    assert old["before"] == pytest.approx(6 / 9) and old["after"] == pytest.approx(7 / 9) and old["n"] == 9
    diffs = [a - b for a, b, f in zip(after["gt_family"], before["gt_family"], families) if f != 3]
    assert old["paired"]["mean"] == pytest.approx(sum(diffs) / 9)
    text = report(res, 3)
    assert "new family (dusk)" in text and "within its SE" in text
    worse = group_results(before, {m: [0, 0, 0, 1] * 3 for m in ATTRS}, families, 3)
    assert "a drop larger than its SE" in report(worse, 3)
    with pytest.raises(ValueError, match="per-video results for 12 prompts"):
        group_results(before, {m: [1] * 11 for m in ATTRS}, families, 3)


def test_cli_reads_metrics_and_the_heldout_manifest(tmp_path):
    heldout = tmp_path / "heldout"
    heldout.mkdir()
    rows = ["path,text,family"] + [f"clip_{i}.mp4,a caption,{i % 4}" for i in range(8)]
    (heldout / "synthetic.csv").write_text("\n".join(rows) + "\n")
    three = _metrics(tmp_path / "three.json", {m: [1, 1, 1, 0] * 2 for m in ATTRS})
    four = _metrics(tmp_path / "four.json", {m: [1, 1, 1, 1] * 2 for m in ATTRS})
    assert main(["--heldout", str(heldout), "--three", str(three), "--four", str(four), "--new-family", "3",
                 "--out", str(tmp_path / "r.md")]) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["new"]["gt_family"]["before"] == 0.0 and saved["new"]["gt_family"]["after"] == 1.0
    assert saved["old"]["gt_prompt"]["paired"]["mean"] == 0.0
    # the old families' videos did not change: a paired difference of 0 with an SE of 0, not "nan"
    assert "| old families | gt_family | 1.000 ± 0.000 | 1.000 ± 0.000 | +0.000 ± 0.000 | 6 |" in \
        (tmp_path / "r.md").read_text()
