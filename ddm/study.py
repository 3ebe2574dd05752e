"""``python -m ddm.study``: the DDM study — DDM vs a compute-matched monolith over seeds, text-blind vs text-aware routing.

Per seed s (each in ``<out>/seed<s>/``, every step skipped when its output exists, so a rerun resumes):

1. clips of seed s (``--data shapes``: ``data.synthetic``; ``--data digits``: ``data.digits``, moving handwritten
   digits 0, 1 and 4 from the training writers) → ``data.prepare`` into K = 3 clusters (clustering seed s);
2. in two lanes (one per core): experts 1..K, the text-blind router (Paris: x_t and t only) and the
   text-aware router (pooled CLIP, ``use_text=true``); the monolith, its FLOPs matched to the K experts +
   one router (the ledger is printed from its log);
3. three model folders (``ddm-blind``, ``ddm-text``, ``monolith``) and a held-out generator set of seed
   10 000 + s (for the digits: bitmaps of the held-out test writers) whose captions are the prompts;
4. ``ddm.evaluate`` with the synthetic ground truth: DDM top-1, top-2 and full for both routers, the oracle
   (each prompt's true cluster) and the monolith, on the same prompts and noise;
5. ``ddm.eval.routing``: each router's accuracy against the true cluster per t on held-out shards.

Then :func:`aggregate` over seeds: for every arm and metric the mean ± SE over seeds, and the paired
difference arm − monolith (per seed, then over seeds) with a 95 % t interval; ``study.json``, ``study.md`` and
``relative_improvement.png`` (bars: mean paired difference relative to the monolith's mean, error bars: its
SE). The oracle arm samples each prompt with the expert its family's training clips went to (no router).
Sizes: ``--quick`` (a pipeline check for the test suite, minutes), the default (the demo's recipe at
stage 2, under an hour on the 2-core machine for 3 seeds) and ``--size long`` (3× the training steps). The ground truth is :mod:`ddm.eval.groundtruth`'s
evaluator of the data set; for the digits the family *is* the digit (read by a classifier trained on held-out
writers, :mod:`ddm.eval.digits`), and the study also reports that classifier's accuracy on the test writers.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from ddm.files import atomic_write
from ddm.eval.groundtruth import attributes_of, families_in, make_evaluator, read_manifest
from ddm.eval.digits import classifier_report

log = logging.getLogger("ddm.study")

K = 3
# pinned (not the recipe's default router, which reads T5 since 2026-12-04): the arms docs/study.md measured
ROUTERS = {"blind": ["use_text=false", "use_t5=false"], "text": ["use_text=true", "use_t5=false"]}
STRATEGIES = ("top1", "top2", "full")
MONOLITH = "monolith"
DATASETS: dict[str, dict[str, Any]] = {
    # generator CLI, its arguments for the training clips and for the held-out set, data.prepare overrides, and
    # the ground-truth metrics the study tabulates (those the data set has)
    "shapes": {"module": "data.synthetic", "gen": ["--size", 32, "--num-frames", 17, "--shape-scale", 2],
               "train": [], "heldout": [], "prepare": [],
               "metrics": ("gt_prompt", "gt_family", "gt_background", "gt_colour", "gt_direction")},
    # digits: the shape spectrum lets the cheap embedder see the digit (data/embed.py)
    "digits": {"module": "data.digits", "gen": ["--size", 32, "--num-frames", 17, "--digits", "0,1,4"],
               "train": ["--split", "train"], "heldout": ["--split", "test"],
               "prepare": ["embedder.spectrum_weight=2.0"],
               "metrics": ("gt_prompt", "gt_family", "gt_direction", "gt_speed")},
}
SIZES: dict[str, dict[str, Any]] = {
    # val_fraction: the held-out shards the routing accuracy is measured on (never trained on)
    "quick": {"clips": 45, "expert_steps": 8, "router_steps": 10, "eval_videos": 6, "gen_steps": 4, "fine": 6,
              "val_fraction": 0.3},
    "default": {"clips": 150, "expert_steps": 400, "router_steps": 400, "eval_videos": 60, "gen_steps": 30,
                "fine": 24, "val_fraction": 0.1},
    # the demo's "long" schedule: 3x the steps (about three times the default's training time)
    "long": {"clips": 150, "expert_steps": 1200, "router_steps": 1200, "eval_videos": 60, "gen_steps": 30,
             "fine": 24, "val_fraction": 0.1},
}
SEED_OFFSET_HELDOUT = 10_000


ORACLE = "ddm-blind/oracle"  # the true cluster's expert (no router): ddm.evaluate's oracle strategy


def arms() -> list[str]:
    """Every arm's run name in the evaluation record (``<router>/<strategy>``, the oracle, the monolith)."""
    return [f"ddm-{r}/{s}" for r in ROUTERS for s in STRATEGIES] + [ORACLE, MONOLITH]


def cluster_of_family(train_csv: Path, assignments: Path) -> tuple[dict[str, int], float]:
    """The expert most of each family's training clips went to (a held-out prompt's true cluster), and the
    cluster purity: the share of clips in their cluster's majority family."""
    by_family, by_cluster = _family_cluster_counts(train_csv, assignments)
    clips = sum(sum(c.values()) for c in by_cluster.values())
    purity = sum(c.most_common(1)[0][1] for c in by_cluster.values()) / clips
    return {f: c.most_common(1)[0][0] for f, c in by_family.items()}, purity


def family_of_cluster(train_csv: Path, assignments: Path) -> dict[int, str]:
    """Each cluster's majority family (its name, e.g. ``"ocean"`` or ``"digit 4"``)."""
    _, by_cluster = _family_cluster_counts(train_csv, assignments)
    return {k: c.most_common(1)[0][0] for k, c in by_cluster.items()}


def _family_cluster_counts(train_csv: Path, assignments: Path):
    import csv
    from collections import Counter, defaultdict

    import pyarrow.parquet as pq

    with train_csv.open(newline="", encoding="utf-8") as fh:
        family = {Path(r["path"]).stem: attributes_of(r).family for r in csv.DictReader(fh)}
    table = pq.read_table(assignments, columns=["key", "expert"]).to_pydict()
    missing = [k for k in table["key"] if k not in family]
    if missing:
        raise ValueError(f"{len(missing)} clustered keys are not clips of {train_csv} (e.g. {missing[:3]})")
    by_family: dict[str, Counter] = defaultdict(Counter)
    by_cluster: dict[int, Counter] = defaultdict(Counter)  # cluster -> family name counts
    for key, expert in zip(table["key"], table["expert"]):
        by_family[family[key]][int(expert)] += 1
        by_cluster[int(expert)][family[key]] += 1
    return by_family, by_cluster


def settled_agreement(root: Path, n: int) -> dict[str, float]:
    """Per routed DDM run of a seed: the share of its videos whose measured family (the ground truth's image
    analysis) is the majority family of the cluster the router settled on (the arg-max weight at the last
    Euler step). Low values mean the sample ignores the expert the router ended on."""
    from ddm.eval.generation import RunFolder

    cluster_family = family_of_cluster(root / "raw" / "synthetic.csv", root / "prep" / "assignments.parquet")
    evaluator = make_evaluator(families_in(read_manifest(root / "heldout")))
    out = {}
    for arm in arms():
        if arm in (MONOLITH, ORACLE):
            continue
        folder = RunFolder(root / "eval" / "videos" / arm.split("/")[0] / arm.split("/")[1], {})
        trace = folder.routing_trace(n)
        settled = (trace.weights[-1].argmax(-1) + 1).tolist()  # slot j holds expert id j + 1 (ddm.assemble)
        hits = [evaluator.measure(np.load(folder.array_path(i))).family == cluster_family[k]
                for i, k in enumerate(settled)]
        out[arm] = float(np.mean(hits))
    return out


# --- aggregation (pure; tested on known inputs) ------------------------------------------------------------------
def mean_se(values: Sequence[float]) -> dict[str, Any]:
    """Mean and standard error (std with ddof=1 over √n; None for one value) of per-seed values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"need finite per-seed values, got {list(values)}")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else None
    return {"mean": float(x.mean()), "se": se, "n": int(x.size)}


def interval95(values: Sequence[float]) -> dict[str, Any]:
    """:func:`mean_se` plus the two-sided 95 % Student-t interval over seeds (None below two seeds)."""
    out = mean_se(values)
    if out["se"] is None:
        return {**out, "lo": None, "hi": None}
    half = float(stats.t.ppf(0.975, out["n"] - 1)) * out["se"]
    return {**out, "lo": out["mean"] - half, "hi": out["mean"] + half}


def aggregate(per_seed: Mapping[int, Mapping[str, Mapping[str, float]]], baseline: str = MONOLITH) -> dict[str, Any]:
    """``per_seed[seed][arm][metric]`` → ``{"arms": {arm: {metric: mean_se}}, "paired": {arm: {metric:
    interval95 of arm − baseline}}}``; every seed must hold every arm and metric (a missing one is an error)."""
    seeds = sorted(per_seed)
    if not seeds:
        raise ValueError("no seeds to aggregate")
    arm_names = list(per_seed[seeds[0]])
    metrics = list(per_seed[seeds[0]][arm_names[0]])
    for s in seeds:
        for arm in arm_names:
            missing = [m for m in metrics if m not in per_seed[s].get(arm, {})]
            if missing:
                raise ValueError(f"seed {s}: arm {arm!r} lacks {missing}")
    out: dict[str, Any] = {"seeds": seeds, "baseline": baseline, "arms": {}, "paired": {}}
    for arm in arm_names:
        out["arms"][arm] = {m: mean_se([per_seed[s][arm][m] for s in seeds]) for m in metrics}
        if arm != baseline:
            out["paired"][arm] = {m: interval95([per_seed[s][arm][m] - per_seed[s][baseline][m] for s in seeds])
                                  for m in metrics}
    return out


def _fmt(r: Mapping[str, Any]) -> str:
    return f"{r['mean']:.3f}" + (f" ± {r['se']:.3f}" if r.get("se") is not None else "")


def study_table(agg: Mapping[str, Any]) -> str:
    """Markdown: every arm's mean ± SE per metric, then the paired differences with their 95 % intervals."""
    metrics = list(next(iter(agg["arms"].values())))
    lines = ["| arm | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines += [f"| {arm} | " + " | ".join(_fmt(r[m]) for m in metrics) + " |" for arm, r in agg["arms"].items()]
    lines += ["", f"Paired difference arm − {agg['baseline']} over {len(agg['seeds'])} seeds (mean ± SE [95 % t interval]):",
              "", "| arm | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for arm, r in agg["paired"].items():
        cells = [_fmt(r[m]) + (f" [{r[m]['lo']:+.3f}, {r[m]['hi']:+.3f}]" if r[m]["lo"] is not None else "")
                 for m in metrics]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_relative_improvement(agg: Mapping[str, Any], path: Path) -> Path:
    """Bars of the mean paired difference relative to the baseline's mean (Paris's figure), SE error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(next(iter(agg["arms"].values())))
    arm_names = list(agg["paired"])
    base = agg["arms"][agg["baseline"]]
    width = 0.8 / len(arm_names)
    fig, ax = plt.subplots(figsize=(1.6 * len(metrics) + 2, 4))
    for i, arm in enumerate(arm_names):
        rel = [agg["paired"][arm][m]["mean"] / abs(base[m]["mean"]) if base[m]["mean"] else 0.0 for m in metrics]
        err = [(agg["paired"][arm][m]["se"] or 0.0) / abs(base[m]["mean"]) if base[m]["mean"] else 0.0
               for m in metrics]
        ax.bar(np.arange(len(metrics)) + i * width, np.multiply(rel, 100), width, yerr=np.multiply(err, 100),
               label=arm, capsize=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, metrics)
    ax.set_ylabel(f"relative improvement over {agg['baseline']} (%)")
    ax.set_title(f"DDM vs the compute-matched monolith, {len(agg['seeds'])} seeds (error bars: SE)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_routing_accuracy(routing: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Each router's accuracy against the true cluster per t (mean ± SE over seeds) and the prior (chance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in routing.items():
        t = [row["t"] for row in r["per_t"]]
        mean = np.array([row["mean"] for row in r["per_t"]])
        se = np.array([row["se"] or 0.0 for row in r["per_t"]])
        ax.errorbar(t, mean, yerr=se, marker="o", capsize=3, label=f"{name} router")
    chance = next(iter(routing.values()))["chance"]["mean"]
    ax.axhline(chance, color="grey", linestyle="--", label="prior (largest cluster)")
    ax.set(xlabel="t (1 = noise)", ylabel="top-1 accuracy vs the true cluster", ylim=(0, 1.05),
           title="routing accuracy per t (held-out shards; SE over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- one seed: the pipeline as separate processes ----------------------------------------------------------------
class Runner:
    """Runs the pipeline's CLIs for one seed folder: each in its own process, output in ``logs/<name>.log``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "DDM_ROOT": str(root), "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def start(self, name: str, module: str, args: Sequence[str]) -> subprocess.Popen:
        log.info("[study] %s: python -m %s (log %s)", name, module, self.logs / f"{name}.log")
        return self.launch(module, [str(a) for a in args], self.env, self.logs / f"{name}.log")

    @staticmethod
    def launch(module: str, args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        """``python -m module args`` in its own process, stdout and stderr to ``log_path`` (the test suite swaps
        in a process forked from a warm interpreter: same command line, a fraction of the start-up)."""
        with open(log_path, "w") as fh:
            return subprocess.Popen([sys.executable, "-m", module, *args], stdout=fh, stderr=subprocess.STDOUT,
                                    env=env)

    def wait(self, name: str, proc: subprocess.Popen) -> None:
        if proc.wait() != 0:
            tail = (self.logs / f"{name}.log").read_text().splitlines()[-30:]
            raise RuntimeError(f"{name} failed (exit {proc.returncode}); last lines of {self.logs / name}.log:\n"
                               + "\n".join(tail))

    def run(self, name: str, module: str, args: Sequence[str], done: Path | None = None) -> None:
        if done is not None and done.exists():
            return
        self.wait(name, self.start(name, module, args))

    def lanes(self, *lanes: Sequence[tuple[str, str, list[str], Path]]) -> None:
        """Run each lane's jobs in order, the lanes side by side (one per core); skip jobs whose output exists."""
        import threading

        errors: list[BaseException] = []

        def go(jobs):
            try:
                for name, module, args, done in jobs:
                    self.run(name, module, args, done)
            except BaseException as e:  # noqa: BLE001 - reported after both lanes end
                errors.append(e)

        threads = [threading.Thread(target=go, args=(lane,)) for lane in lanes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


def run_seed(out: Path, seed: int, size: Mapping[str, Any], data: str = "shapes") -> dict[str, Any]:
    """The whole pipeline for one seed of data set ``data``; returns ``{"arms": {arm: {metric: value}},
    "routing": ..., "ledger", ...}``."""
    root = out / f"seed{seed}"
    result_path = root / "seed_result.json"
    spec = DATASETS[data]
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result.get("data", "shapes") != data:
            raise ValueError(f"{root} holds a study of the {result.get('data', 'shapes')} data set, not {data}: "
                             f"use another --out")
        if result.get("size", dict(size)) != dict(size):
            raise ValueError(f"{root} was run at another size ({result['size']}): use another --out")
        if "settled_agreement" not in result:  # a seed run before this diagnostic existed: computed from its files
            result["settled_agreement"] = settled_agreement(root, int(size["eval_videos"]))
            atomic_write(result_path, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
        return result
    r = Runner(root)
    t0 = time.time()
    gen = spec["gen"]
    r.run("synthetic", spec["module"], ["--out", root / "raw", "--num-videos", size["clips"], "--seed", seed, *gen,
                                        *spec["train"]], root / "raw" / "synthetic.csv")
    r.run("prepare", "data.prepare", [f"input={root / 'raw'}", "recipe=tiny", "vae=pixel", "text=tiny", *spec["prepare"],
                                      f"num_experts={K}", f"cluster.fine_clusters={size['fine']}",
                                      f"cluster.seed={seed}", "encode.stage=stage2",
                                      f"encode.val_fraction={size['val_fraction']}", "progress=false"])
    runs = root / "runs"
    common = ["experiment=tiny", "stage=stage2", f"seed={seed}", f"recipe.stage2.max_steps={size['expert_steps']}",
              f"recipe.router.max_steps={size['router_steps']}",
              f"recipe.router.val_every_n_steps={size['router_steps']}"]

    # One experiment ("study"): the experts, the monolith and the text-blind router under runs/ddm-blind/, the
    # text-aware router in runs/ddm-text/ beside links to the same experts (one experiment name, so each
    # folder's exports agree for ddm.assemble).
    def job(name, module, folder, role, extra):
        run_dir = runs / folder / role / "stage2"
        return (name, module, [*common, "experiment_name=study", f"run_dir={run_dir}", *extra],
                run_dir / "export" / "master.safetensors")

    ddm_lane = [job(f"expert{k}", "train.expert", "ddm-blind", f"expert{k}", [f"expert={k}"]) for k in range(1, K + 1)]
    ddm_lane += [job("router-blind", "train.router", "ddm-blind", "router", ROUTERS["blind"])]
    mono_lane = [job("monolith", "train.expert", "ddm-blind", "monolith", ["expert=all", "compute_match=true"]),
                 job("router-text", "train.router", "ddm-text", "router", ROUTERS["text"])]
    r.lanes(ddm_lane, mono_lane)
    for k in range(1, K + 1):  # the text-aware DDM shares the experts: its runs dir links them
        link = runs / "ddm-text" / f"expert{k}"
        if not link.exists():
            link.symlink_to(runs / "ddm-blind" / f"expert{k}", target_is_directory=True)
    models = root / "models"
    sampling = ["--stages", "stage2", "--num-steps", size["gen_steps"], "--cfg-scale", 3]
    for name in ROUTERS:
        r.run(f"export-{name}", "ddm.assemble", ["--runs", runs / f"ddm-{name}", "--out", models / f"ddm-{name}",
                                               *sampling], models / f"ddm-{name}" / "model_index.json")
    r.run("export-monolith", "ddm.assemble", ["--runs", runs / "ddm-blind", "--monolith", "--out", models / MONOLITH,
                                            *sampling], models / MONOLITH / "model_index.json")
    n = size["eval_videos"]
    heldout = root / "heldout"
    r.run("heldout", spec["module"], ["--out", heldout, "--num-videos", n, "--seed", SEED_OFFSET_HELDOUT + seed, *gen,
                                      *spec["heldout"]], heldout / "synthetic.csv")
    # the oracle arm: each held-out prompt sampled by the expert its family's training clips went to
    family_cluster, purity = cluster_of_family(root / "raw" / "synthetic.csv", root / "prep" / "assignments.parquet")

    oracle = [family_cluster[attributes_of(row).family] for row in read_manifest(heldout)]
    atomic_write(root / "oracle_ids.json", lambda tmp: tmp.write_text(json.dumps(oracle)))
    evaluate = ["--groundtruth", heldout, "--num-videos", n, "--stage", "stage2", "--batch-size", 25, "--no-progress",
                "--metrics", "groundtruth", "--contact-sheet-rows", 0, "--out", root / "eval",
                "--oracle-ids", root / "oracle_ids.json"]
    strategies = ",".join(STRATEGIES)
    blind = f"ddm-blind={models / 'ddm-blind'}:{strategies},oracle"
    a = r.start("evaluate-blind", "ddm.evaluate", [*evaluate, "--model", blind, "--baseline", "ddm-blind/top1"])
    r.run("evaluate-text", "ddm.evaluate", [*evaluate, "--model", f"ddm-text={models / 'ddm-text'}:{strategies}",
                                            "--model", f"{MONOLITH}={models / MONOLITH}", "--baseline", MONOLITH])
    r.wait("evaluate-blind", a)
    r.run("evaluate", "ddm.evaluate", [*evaluate, "--model", blind,
                                       "--model", f"ddm-text={models / 'ddm-text'}:{strategies}",
                                       "--model", f"{MONOLITH}={models / MONOLITH}", "--baseline", MONOLITH])
    r.run("routing", "ddm.eval.routing", [models / "ddm-blind", models / "ddm-text", "--shards",
                                          root / "prep" / "shards" / "stage2", "--out", root / "routing.json"])
    record = json.loads((root / "eval" / "metrics.json").read_text())
    arms_found = {run["name"]: {m: run["metrics"][m]["value"] for m in spec["metrics"]} for run in record["runs"]}
    routing = json.loads((root / "routing.json").read_text())
    result = {"seed": seed, "data": data, "size": dict(size), "arms": {a: arms_found[a] for a in arms()},
              "routing": {name: routing[str(models / f"ddm-{name}")] for name in ROUTERS},
              "ledger": _ledger(r.logs / "monolith.log"), "cluster_purity": purity,
              "settled_agreement": settled_agreement(root, n), "seconds": time.time() - t0}
    atomic_write(result_path, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    return result


def _ledger(path: Path) -> str | None:
    lines = path.read_text().splitlines() if path.is_file() else []
    start = next((i for i, line in enumerate(lines) if "compute ledger" in line), None)
    return None if start is None else "\n".join(lines[start:start + 8])


def write_outputs(out: Path, results: Sequence[Mapping[str, Any]], size_name: str, data: str = "shapes"
                  ) -> dict[str, Any]:
    """Aggregate the seeds' results and write ``study.json``, ``study.md`` and the figure."""
    agg = aggregate({r["seed"]: r["arms"] for r in results})
    agg["data"] = data
    routing = {name: {"per_t": [mean_se([r["routing"][name]["per_t"][i]["accuracy"] for r in results])
                                | {"t": results[0]["routing"][name]["per_t"][i]["t"]}
                                for i in range(len(results[0]["routing"][name]["per_t"]))],
                      "chance": mean_se([r["routing"][name]["chance"] for r in results])}
               for name in ROUTERS}
    agg["routing"] = routing
    agg["size"] = size_name
    agg["ledger_seed0"] = results[0].get("ledger")
    agg["cluster_purity"] = mean_se([r["cluster_purity"] for r in results])
    agg["settled_agreement"] = {arm: mean_se([r["settled_agreement"][arm] for r in results])
                                for arm in results[0]["settled_agreement"]}
    if data == "digits":  # the ground truth's digit reader, measured on the held-out test writers

        agg["digit_classifier"] = classifier_report(32)
    atomic_write(out / "study.json", lambda tmp: tmp.write_text(json.dumps(agg, indent=2)))
    plot_relative_improvement(agg, out / "relative_improvement.png")
    plot_routing_accuracy(routing, out / "routing_accuracy.png")
    lines = [f"# DDM study: {data} data set ({size_name}, {len(results)} seeds)", ""]
    if data == "digits":
        c = agg["digit_classifier"]
        lines += [f"The family of a clip is its digit. Digit classifier of the ground truth: {c['test_accuracy']:.3f} "
                  f"on {c['test_images']} bitmaps of the held-out test writers (trained on {c['train_images']} "
                  f"of other writers; {c['split']}).", ""]
    lines += [study_table(agg),
             "Routing accuracy against the true cluster per t (mean ± SE over seeds):", "",
             "| router | " + " | ".join(f"t={row['t']:g}" for row in routing["blind"]["per_t"]) + " | chance |",
             "|---" * (len(routing["blind"]["per_t"]) + 2) + "|"]
    for name, rr in routing.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row) for row in rr["per_t"]) + f" | {_fmt(rr['chance'])} |")
    lines += ["", f"Cluster purity (share of training clips in their cluster's majority family): "
                  f"{_fmt(agg['cluster_purity'])}.", "",
              "How often the sample's measured family is the family of the cluster the router settled on (the "
              "last step's arg-max), mean ± SE over seeds:", "", "| arm | agreement |", "|---|---|"]
    lines += [f"| {arm} | {_fmt(v)} |" for arm, v in agg["settled_agreement"].items()]
    if agg["ledger_seed0"]:
        lines += ["", "Compute ledger (seed 0):", "", "```", agg["ledger_seed0"], "```"]
    atomic_write(out / "study.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return agg


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run (or resume) every seed, then aggregate."""
    ap = argparse.ArgumentParser(prog="python -m ddm.study", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("study_out"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the test-suite size (a pipeline check, not a result); "
                                                         "same as --size quick")
    ap.add_argument("--size", choices=sorted(SIZES), default="default",
                    help="default (the demo's recipe at stage 2), long (3x the training steps) or quick")
    ap.add_argument("--data", choices=sorted(DATASETS), default="shapes",
                    help="shapes (data.synthetic) or digits (moving handwritten digits, data.digits)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    size_name = "quick" if args.quick else args.size
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in range(args.seeds):
        log.info("[study] seed %d of %d → %s", seed + 1, args.seeds, args.out / f"seed{seed}")
        results.append(run_seed(args.out, seed, SIZES[size_name], args.data))
    write_outputs(args.out, results, size_name, args.data)
    print((args.out / "study.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
