"""Did growing the pool work? Ground-truth accuracy of two folders per family group: ``python -m ddm.eval.grow``.

Reads two ``ddm.evaluate`` records (``metrics.json``) made on the same held-out synthetic prompts and seeds —
the pool before (``--three``) and after (``--four``) an expert joined — and the held-out ``synthetic.csv``
(video i was generated for its row i). It splits the videos into the new family's prompts and the old
families' and reports, per group and ground-truth attribute, each folder's accuracy ± SE and the paired
difference after − before ± SE. The growth worked when the new family's prompts come out right and the old
families' accuracy does not drop by more than its SE (``launch/grow_demo.sh`` runs the whole experiment).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ddm.eval.groundtruth import read_manifest
from ddm.eval.report import paired_difference
from ddm.eval.stats import mean_and_stderr
from ddm.synthetic import FAMILIES

__all__ = ["per_video", "group_results", "report", "main"]

ATTRS = ("gt_family", "gt_background", "gt_colour", "gt_prompt")


def per_video(metrics_path: str | Path) -> dict[str, list[float]]:
    """``{metric: 0/1 per video}`` of the single run in a ``metrics.json`` (one model, one strategy)."""
    record = json.loads(Path(metrics_path).read_text())
    if len(record["runs"]) != 1:
        raise ValueError(f"{metrics_path} holds {len(record['runs'])} runs; evaluate each folder on its own")
    metrics = record["runs"][0]["metrics"]
    missing = [m for m in ATTRS if m not in metrics]
    if missing:
        raise ValueError(f"{metrics_path} lacks {missing}: run ddm.evaluate with --groundtruth and --metrics groundtruth")
    return {m: list(metrics[m]["details"]["per_video"]) for m in ATTRS}


def group_results(before: Mapping[str, Sequence[float]], after: Mapping[str, Sequence[float]],
                  families: Sequence[int], new_family: int) -> dict[str, dict[str, Any]]:
    """Per group (``new``, ``old``) and metric: both folders' mean ± SE and the paired difference."""
    out: dict[str, dict[str, Any]] = {}
    for group, keep in (("new", lambda f: f == new_family), ("old", lambda f: f != new_family)):
        idx = [i for i, f in enumerate(families) if keep(f)]
        if not idx:
            raise ValueError(f"no held-out prompt of the {group} families")
        out[group] = {}
        for m in ATTRS:
            for name, values in (("before", before[m]), ("after", after[m])):
                if len(values) != len(families):
                    raise ValueError(f"{m}: {len(values)} per-video results for {len(families)} prompts ({name}); "
                                     "every attribute must be measured on every video")
            b = [before[m][i] for i in idx]
            a = [after[m][i] for i in idx]
            (mb, sb, n), (ma, sa, _) = mean_and_stderr(b), mean_and_stderr(a)
            out[group][m] = {"before": mb, "before_se": sb, "after": ma, "after_se": sa, "n": n,
                             "paired": paired_difference(a, b)}
    return out


def report(results: Mapping[str, Mapping[str, Any]], new_family: int) -> str:
    """The markdown table and the two verdicts (new family right; old families within their SE)."""
    name = FAMILIES[new_family].name
    lines = [f"| prompts | metric | before (K) | after (K+1) | after − before (paired) | N |", "|---|---|---|---|---|---|"]
    for group, label in (("new", f"new family ({name})"), ("old", "old families")):
        for m, r in results[group].items():
            d = r["paired"]
            se = "n/a" if d["stderr"] is None else f"{d['stderr']:.3f}"  # None: one video; 0.0 prints as 0.000
            lines.append(f"| {label} | {m} | {r['before']:.3f} ± {r['before_se']:.3f} | {r['after']:.3f} ± "
                         f"{r['after_se']:.3f} | {d['mean']:+.3f} ± {se} | {r['n']} |")
    new, old = results["new"]["gt_family"], results["old"]["gt_family"]
    drop = old["before"] - old["after"]
    lines += ["", f"- new family's prompts with the right family: {new['before']:.3f} before, {new['after']:.3f} after.",
              f"- old families' family accuracy changed by {-drop:+.3f} (its SE before: {old['before_se']:.3f}): "
              + ("within its SE." if drop <= old["before_se"] else "a drop larger than its SE.")]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print and write the report."""
    ap = argparse.ArgumentParser(prog="python -m ddm.eval.grow", description=__doc__.split("\n")[0])
    ap.add_argument("--heldout", required=True, type=Path, help="the held-out synthetic folder the prompts came from")
    ap.add_argument("--three", required=True, type=Path, help="metrics.json of the pool before the expert joined")
    ap.add_argument("--four", required=True, type=Path, help="metrics.json of the pool after")
    ap.add_argument("--new-family", required=True, type=int, help="the joining expert's family index")
    ap.add_argument("--out", type=Path, help="write the markdown report here (and a .json beside it)")
    args = ap.parse_args(argv)
    before, after = per_video(args.three), per_video(args.four)
    rows = read_manifest(args.heldout)
    n = len(before["gt_family"])
    families = [int(r["family"]) for r in rows[:n]]
    results = group_results(before, after, families, args.new_family)
    text = report(results, args.new_family)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
