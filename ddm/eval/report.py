"""The Paris-style comparison: relative improvement over the baseline, ``report.md`` and the PNG plots.

Everything here reads the evaluation record that :mod:`ddm.evaluate` writes to ``metrics.json`` (format
``ddm-eval-v1``), so every number in the report and in the plots comes from that file::

    {"format": "ddm-eval-v1", "baseline": RUN, "settings": {...}, "notes": [str, ...],
     "runs": [{"name": "ddm/top2", "model": "ddm", "strategy": "top2", "folder", "num_experts",
               "videos": {"n", "reused", "generated", "frames", "height", "width"},
               "metrics": {"fvd" | "clip" | "aesthetic" | "motion": MetricResult.to_dict()},
               "routing": None | {"strategy", "t", "mean_weights" (steps, K), "samples_per_expert" (steps, K)}}],
     "comparison": {RUN: {METRIC: {"relative_improvement", "paired_difference"}}}}

Relative improvement (Paris 2.0's bar chart): positive means better than the baseline. For FVD lower is
better, so it is ``(baseline - value) / |baseline|``; for the others ``(value - baseline) / |baseline|``.
Motion counts more motion as better, as Paris 2.0 reports it (0.712 vs 0.555 px/frame).

Each plot is saved with a ``plots/<name>.json`` beside its PNG holding the numbers read back from the drawn
matplotlib artists (bar heights, line data), so a test can check the picture against ``metrics.json``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ddm.files import atomic_write
from ddm.eval.stats import TINY_LABEL, mean_and_stderr

__all__ = ["METRICS", "CLASSIC_METRICS", "MetricInfo", "EVAL_FORMAT", "relative_improvement", "paired_difference",
           "compare_runs", "render_markdown", "plot_relative_improvement", "plot_router_weights", "plot_expert_usage",
           "write_report"]

EVAL_FORMAT = "ddm-eval-v1"


@dataclass(frozen=True)
class MetricInfo:
    """How a metric is shown and compared."""

    label: str
    lower_is_better: bool
    digits: int


# Keyed by the names ``--metrics`` takes; order = column order of the table.
METRICS: dict[str, MetricInfo] = {
    "fvd": MetricInfo("FVD", lower_is_better=True, digits=2),
    "clip": MetricInfo("CLIP text-video", lower_is_better=False, digits=4),
    "aesthetic": MetricInfo("aesthetic (LAION)", lower_is_better=False, digits=4),
    "motion": MetricInfo("motion (px/frame)", lower_is_better=False, digits=3),
    # the synthetic data's own metrics (ddm.eval.reference): ground-truth accuracies and the domain FVD
    "gt_prompt": MetricInfo("prompt accuracy (GT)", lower_is_better=False, digits=3),
    "gt_family": MetricInfo("family (GT)", lower_is_better=False, digits=3),
    "gt_background": MetricInfo("background (GT)", lower_is_better=False, digits=3),
    "gt_colour": MetricInfo("colour (GT)", lower_is_better=False, digits=3),
    "gt_direction": MetricInfo("direction (GT)", lower_is_better=False, digits=3),
    "gt_speed": MetricInfo("speed (GT)", lower_is_better=False, digits=3),
    "domain_fvd": MetricInfo("domain FVD", lower_is_better=True, digits=2),
}
CLASSIC_METRICS = ("fvd", "clip", "aesthetic", "motion")  # --metrics default without a synthetic reference
NO_SE_METRICS = ("fvd", "domain_fvd")  # distances between distributions: no per-video SE


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def relative_improvement(value: float | None, baseline: float | None, *, lower_is_better: bool) -> float | None:
    """Improvement of ``value`` over ``baseline`` as a fraction of ``|baseline|``; positive = better.

    None when either number is missing or not finite, or the baseline is 0 (no scale to compare against).
    """
    if not (_finite(value) and _finite(baseline)) or baseline == 0:
        return None
    gain = (baseline - value) if lower_is_better else (value - baseline)
    return float(gain / abs(baseline))


def paired_difference(values: Sequence[float] | None, baseline: Sequence[float] | None) -> dict[str, Any] | None:
    """Mean ± SE of the per-video differences ``values[i] - baseline[i]`` (same prompt and seed per i).

    Because both models saw the same prompts and noise, this SE is usually far smaller than either
    model's own SE and is the honest test of a gap. None when the per-video lists are absent or unequal.
    """
    if not values or not baseline or len(values) != len(baseline):
        return None
    mean, se, n = mean_and_stderr(np.subtract(values, baseline))
    return {"mean": mean, "stderr": se if math.isfinite(se) else None, "n": n}


def compare_runs(runs: Sequence[dict[str, Any]], baseline: str) -> dict[str, dict[str, dict[str, Any]]]:
    """``{run: {metric: {"relative_improvement", "paired_difference"}}}`` for every run but the baseline."""
    by_name = {r["name"]: r for r in runs}
    if baseline not in by_name:
        raise ValueError(f"baseline run {baseline!r} is not among the runs {sorted(by_name)}")
    base = by_name[baseline]["metrics"]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        if run["name"] == baseline:
            continue
        row = {}
        for key, result in run["metrics"].items():
            if key not in base:
                continue
            ref = base[key]
            row[key] = {
                "relative_improvement": relative_improvement(result["value"], ref["value"],
                                                             lower_is_better=METRICS[key].lower_is_better),
                "paired_difference": paired_difference(result["details"].get("per_video"),
                                                       ref["details"].get("per_video")),
            }
        out[run["name"]] = row
    return out


# --- markdown --------------------------------------------------------------------------------------------------

def _fmt_value(key: str, result: dict[str, Any] | None) -> str:
    if result is None:
        return "skipped"
    digits = METRICS[key].digits
    value = f"{result['value']:.{digits}f}"
    if key == "domain_fvd" and result["details"].get("floor") is not None:
        return f"{value} (floor {result['details']['floor']:.{digits}f})"
    if key in NO_SE_METRICS:
        return value  # a distance between distributions: no SE exists
    if result["stderr"] is None:
        return f"{value} ± n/a"  # one video: the spread is unknown (NaN in MetricResult)
    return f"{value} ± {result['stderr']:.{digits}f}"


def _fmt_percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def _backbone_names(metrics: dict[str, Any]) -> dict[str, str]:
    """The backbone each metric used (from the first run that computed it)."""
    names: dict[str, str] = {}
    for run in metrics["runs"]:
        for key, result in run["metrics"].items():
            names.setdefault(key, str(result["details"].get("backbone", "?")))
    return names


def _is_tiny(metrics: dict[str, Any]) -> bool:
    return any(r["details"].get("tiny_test_backbone") for run in metrics["runs"] for r in run["metrics"].values())


def _stages(metrics: dict[str, Any]) -> str:
    """The stage asked for, or the stages the folders' defaults resolved to (per run's ``resolved`` settings)."""
    if metrics["settings"].get("stage") is not None:
        return str(metrics["settings"]["stage"])
    found = sorted({str(r.get("resolved", {}).get("stage")) for r in metrics["runs"] if r.get("resolved")})
    return ", ".join(found) + " (folder default)" if found else "folder default"


def _used(metrics: dict[str, Any], setting: str, resolved_key: str) -> str:
    """A generation setting as asked, else the values the runs actually used (their ``resolved`` records)."""
    if metrics["settings"].get(setting) is not None:
        return str(metrics["settings"][setting])
    found = sorted({str(r.get("resolved", {}).get(resolved_key)) for r in metrics["runs"]
                    if r.get("resolved", {}).get(resolved_key) is not None})
    return ", ".join(found) + " (folder default)" if found else "folder default"


def _groundtruth_lines(metrics: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """Chance levels, the evaluator's label and the domain FVD's floor, under the table."""
    lines: list[str] = []
    gt_keys = [k for k in keys if k.startswith("gt_")]
    first = {k: r["metrics"][k] for r in metrics["runs"] for k in gt_keys if k in r["metrics"]}
    if first:
        some = next(iter(first.values()))["details"]
        chance = ", ".join(f"{METRICS[k].label.replace(' (GT)', '')} {first[k]['details']['chance']:.3g}"
                           for k in gt_keys if k in first)
        lines += [f"(GT) = {some['backbone']}: deterministic image analysis of each video against what its prompt "
                  f"asked (ddm/eval/groundtruth.py; families {', '.join(some.get('families', []))}). Chance (a "
                  f"uniform guess): {chance}. Prompt accuracy = every measured attribute right."
                  + (f" Not measured at this resolution: {', '.join(some['not_measured'])}."
                     if some.get("not_measured") else ""), ""]
    domain = [r["metrics"]["domain_fvd"] for r in metrics["runs"] if "domain_fvd" in r["metrics"]]
    if domain and domain[0]["details"].get("floor") is not None:
        d = domain[0]["details"]
        lines += [f"Domain FVD: Fréchet distance in the penultimate features of the **domain backbone** (a small "
                  f"video CNN trained on real generator clips of its own seed; ddm/eval/domain.py) between each "
                  f"run's N videos and N real held-out clips. floor = the same distance between two disjoint real "
                  f"sets of N = {d.get('n_floor', '?')}: what a perfect generator scores at this N.", ""]
    return lines


def render_markdown(metrics: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """The report: the Paris-style table (value ± SE, N), the setup, the improvement table, notes, plots."""
    s, baseline = metrics["settings"], metrics["baseline"]
    keys = [k for k in METRICS if k in s["metrics"]]
    lines = [f"# DDM evaluation: {', '.join(r['name'] for r in metrics['runs'])} (baseline: {baseline})", ""]
    if _is_tiny(metrics):
        lines += [f"> **{TINY_LABEL}**: some metrics were computed with random-init stand-in backbones. "
                  "These numbers only show that the pipeline runs; they say nothing about video quality.", ""]
    arrows = {k: ("↓" if METRICS[k].lower_is_better else "↑") for k in keys}
    lines += ["| model | routing | experts | N | " + " | ".join(f"{METRICS[k].label} {arrows[k]}" for k in keys) + " |",
              "|---|---|---:|---:|" + "---:|" * len(keys)]
    for run in metrics["runs"]:
        label = run["model"] + (" (baseline)" if run["name"] == baseline else "")
        cells = [_fmt_value(k, run["metrics"].get(k)) for k in keys]
        lines.append(f"| {label} | {run['strategy']} | {run['num_experts']} | {run['videos']['n']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "FVD has no standard error (a distance between two distributions): compare it only at equal N "
              "and equal backbone. The others are mean ± SE over videos.", ""]
    lines += _groundtruth_lines(metrics, keys)

    sizes = sorted({(r["videos"]["frames"], r["videos"]["height"], r["videos"]["width"]) for r in metrics["runs"]})
    backbones = _backbone_names(metrics)
    lines += ["## Setup", "", "| setting | value |", "|---|---|",
              f"| videos per run (N) | {s['num_videos']} |",
              f"| prompts | {s['prompt_source']} ({s['num_prompts']} distinct) |",
              f"| seeds | {s['seed']} … {s['seed'] + s['num_videos'] - 1} (video i: seed + i, same for every run) |",
              "| resolution | " + ", ".join(f"{h}×{w}" for _, h, w in sizes) + " |",
              "| frames | " + ", ".join(str(f) for f, _, _ in sizes) + " |",
              f"| sampling steps | {_used(metrics, 'steps', 'num_steps')} |",
              f"| CFG scale | {_used(metrics, 'cfg', 'cfg_scale')} |",
              f"| stage | {_stages(metrics)} |"]
    gt_keys = [k for k in keys if k.startswith("gt_")]
    for k in keys:
        if k in gt_keys[1:]:
            continue  # one row for the ground-truth metrics: one evaluator makes them all
        label = "ground-truth metrics (GT)" if k in gt_keys else METRICS[k].label
        lines.append(f"| {label} backbone | {backbones.get(k, 'skipped')} |")
    lines.append("")

    comparison = metrics["comparison"]
    if comparison:
        lines += [f"## Relative improvement over {baseline}", "",
                  "Positive = better than the baseline. FVD: lower is better, so the improvement is "
                  "(baseline − value) / baseline; the others: (value − baseline) / baseline. The paired "
                  "difference is the mean ± SE over videos of value − baseline on the same prompt and seed.", "",
                  "| run | " + " | ".join(METRICS[k].label for k in keys) + " |", "|---|" + "---:|" * len(keys)]
        for name, row in comparison.items():
            cells = []
            for k in keys:
                c = row.get(k)
                if c is None:
                    cells.append("skipped")
                    continue
                cell = _fmt_percent(c["relative_improvement"])
                pd = c["paired_difference"]
                if pd is not None and pd["stderr"] is not None:
                    cell += f" (Δ {pd['mean']:+.{METRICS[k].digits}f} ± {pd['stderr']:.{METRICS[k].digits}f})"
                cells.append(cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += ["## Generation", "", "| run | folder | videos | reused | generated |", "|---|---|---:|---:|---:|"]
    for run in metrics["runs"]:
        v = run["videos"]
        lines.append(f"| {run['name']} | `{run['folder']}` | {v['n']} | {v['reused']} | {v['generated']} |")
    reused = sum(r["videos"]["reused"] for r in metrics["runs"])
    lines += ["", f"Reused {reused} already generated video(s); generated "
              f"{sum(r['videos']['generated'] for r in metrics['runs'])}.", ""]
    if metrics["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in metrics["notes"]] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}](plots/{Path(p).name})" for p in plots] + [""]
    return "\n".join(lines)


# --- plots -----------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, drawn: dict[str, Any]) -> dict[str, Any]:
    """Save the PNG and, beside it, the numbers that were drawn (atomically, so a crash leaves no half file)."""
    plt = _pyplot()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(drawn, indent=1)))
    return drawn


def plot_relative_improvement(metrics: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Grouped bars: relative improvement (%) over the baseline per metric, one bar per run.

    Returns (and saves beside the PNG) ``{"metrics": [...], "runs": {run: [percent | None per metric]}}``,
    read back from the drawn bars. A metric missing for a run is drawn as no bar (None).
    """
    plt = _pyplot()
    comparison = metrics["comparison"]
    keys = [k for k in METRICS if any(k in row for row in comparison.values())]
    runs = list(comparison)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(keys) * max(1, len(runs)) ** 0.5), 4))
    width = 0.8 / max(1, len(runs))
    drawn: dict[str, Any] = {"baseline": metrics["baseline"], "metrics": keys, "unit": "percent", "runs": {}}
    for i, name in enumerate(runs):
        heights = [(comparison[name].get(k) or {}).get("relative_improvement") for k in keys]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(keys))]
        kept = [(x, 100 * h) for x, h in zip(xs, heights) if h is not None]
        bars = ax.bar([x for x, _ in kept], [h for _, h in kept], width, label=name)
        got = iter(float(b.get_height()) for b in bars)
        drawn["runs"][name] = [next(got) if h is not None else None for h in heights]
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(keys)), [METRICS[k].label + (" (lower=better)" if METRICS[k].lower_is_better else "")
                                     for k in keys], fontsize=8)
    ax.set_ylabel(f"improvement over {metrics['baseline']} (%)")
    title = "relative improvement over the baseline (positive = better)"
    ax.set_title(title + (f"\n{TINY_LABEL}" if _is_tiny(metrics) else ""), fontsize=9)
    if runs:
        ax.legend(fontsize=8)
    return _save(fig, Path(path), drawn)


def _routed_runs(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in metrics["runs"] if r.get("routing") and r["num_experts"] > 1]


def _plot_routing(metrics: dict[str, Any], path: Path, field: str, ylabel: str, title: str, use_t: bool
                  ) -> dict[str, Any]:
    plt = _pyplot()
    runs = _routed_runs(metrics)
    if not runs:
        raise ValueError("no run has routing traces (only DDM runs with more than one expert do)")
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), squeeze=False)
    drawn: dict[str, Any] = {"field": field, "x": "t" if use_t else "step", "runs": {}}
    for ax, run in zip(axes[0], runs):
        routing = run["routing"]
        values = np.asarray(routing[field], dtype=np.float64)  # (steps, K)
        x = routing["t"] if use_t else list(range(values.shape[0]))
        lines = [ax.plot(x, values[:, j], marker=".", label=f"expert {j + 1}")[0] for j in range(values.shape[1])]
        drawn["runs"][run["name"]] = {"x": [float(v) for v in lines[0].get_xdata()],
                                      "experts": [[float(v) for v in ln.get_ydata()] for ln in lines]}
        if use_t:
            ax.invert_xaxis()  # sampling runs from t = 1 (noise) to t = 0 (data)
            ax.set_ylim(-0.03, 1.03)
        else:
            ax.set_ylim(-0.03 * run["videos"]["n"], 1.03 * run["videos"]["n"])  # 0 .. all N samples
        ax.set(xlabel="t (1 = noise)" if use_t else "sampling step", ylabel=ylabel,
               title=f"{run['name']}: {title}")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    if _is_tiny(metrics):
        fig.suptitle(TINY_LABEL, fontsize=8)
    return _save(fig, path, drawn)


def plot_router_weights(metrics: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Mean router weight per expert vs t, one panel per routed run (from ``routing.mean_weights``)."""
    return _plot_routing(metrics, Path(path), "mean_weights", "mean weight", "router weight vs t", use_t=True)


def plot_expert_usage(metrics: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Samples each expert served at each step, one panel per routed run (``routing.samples_per_expert``)."""
    return _plot_routing(metrics, Path(path), "samples_per_expert", "samples served", "expert usage per step",
                         use_t=False)


def write_report(metrics_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Read ``metrics.json`` and write ``report.md`` and ``plots/*.png`` (+ ``plots/*.json``) into ``out_dir``.

    ``out_dir`` defaults to the folder of ``metrics_path``. Returns ``{name: path}`` of what was written.
    """
    metrics_path = Path(metrics_path)
    metrics = json.loads(metrics_path.read_text())
    if metrics.get("format") != EVAL_FORMAT:
        raise ValueError(f"'{metrics_path}' is not a {EVAL_FORMAT} evaluation record")
    out = Path(out_dir) if out_dir is not None else metrics_path.parent
    plots_dir = out / "plots"
    written: dict[str, Path] = {}
    if metrics["comparison"]:
        written["relative_improvement"] = plots_dir / "relative_improvement.png"
        plot_relative_improvement(metrics, written["relative_improvement"])
    if _routed_runs(metrics):
        written["router_weights"] = plots_dir / "router_weights.png"
        plot_router_weights(metrics, written["router_weights"])
        written["expert_usage"] = plots_dir / "expert_usage.png"
        plot_expert_usage(metrics, written["expert_usage"])
    else:
        metrics["notes"] = [*metrics["notes"], "No routing plots: no evaluated run mixes more than one expert."]
    text = render_markdown(metrics, [str(p) for p in written.values()])
    written["report"] = atomic_write(out / "report.md", lambda tmp: tmp.write_text(text))
    return written
