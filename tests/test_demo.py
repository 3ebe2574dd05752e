"""The README's first command, in its short profile: the whole pipeline end to end, then a rerun that
reuses everything already trained."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess

import pytest

from ddm.eval.groundtruth import attributes_of, read_manifest
from ddm.video_io import probe_video


@pytest.mark.slow
def test_short_demo_runs_end_to_end_and_a_rerun_reuses_the_work(tmp_path, repo_root):
    env = {**os.environ, "DDM_DEMO_DIR": str(tmp_path / "demo"), "DDM_DEMO_PROFILE": "short"}
    first = subprocess.run(["bash", str(repo_root / "launch" / "demo.sh")], capture_output=True, text=True,
                           env=env, timeout=1200)
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-5000:]
    demo = tmp_path / "demo"

    # the results table, with DDM strategies and the monolith baseline
    table = [line for line in first.stdout.splitlines() if line.startswith("| ddm") or line.startswith("| monolith")]
    assert [re.split(r"\s*\|\s*", row)[2] for row in table] == ["top1", "top2", "full", "single"]
    metrics = json.loads((demo / "eval" / "metrics.json").read_text())
    assert {run["name"] for run in metrics["runs"]} >= {"ddm/top1", "ddm/top2", "ddm/full", "monolith"}
    for plot in ("relative_improvement", "router_weights", "expert_usage"):
        assert (demo / "eval" / "plots" / f"{plot}.png").stat().st_size > 1000

    # videos: t2v samples and an i2v sample at the stage-3 default size (24 px, 9 frames)
    t2v = sorted((demo / "samples" / "t2v").glob("*.mp4"))
    i2v = sorted((demo / "samples" / "i2v").glob("*.mp4"))
    assert len(t2v) == 4 and len(i2v) == 1
    info = probe_video(t2v[0])
    assert (info["num_frames"], info["height"], info["width"]) == (9, 24, 24)
    for role in ("expert1", "expert2", "expert3", "monolith"):
        for stage in ("stage2", "stage3"):
            assert (demo / "runs" / "tiny" / role / stage / "export" / "master.safetensors").exists()
    assert (demo / "runs" / "tiny" / "router" / "stage2" / "export" / "master.safetensors").exists()
    assert "compute ledger" in first.stdout
    assert first.stdout.count("trained in") == 9  # 3 experts x 2 stages, the router, the monolith x 2 stages

    # rerun: nothing is trained or sampled again; the table is rebuilt from the same videos
    written = {p: p.stat().st_mtime_ns for p in [*t2v, *i2v]}
    second = subprocess.run(["bash", str(repo_root / "launch" / "demo.sh")], capture_output=True, text=True,
                            env=env, timeout=1200)
    assert second.returncode == 0, second.stdout[-5000:] + second.stderr[-5000:]
    assert second.stdout.count("done before") == 10 and "trained in" not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in written} == written
    def values(record):
        return {run["name"]: {m: v["value"] for m, v in run["metrics"].items()} for run in record["runs"]}

    assert values(json.loads((demo / "eval" / "metrics.json").read_text())) == values(metrics)

    # a single-expert probe on the finished demo (launch/probe_expert.sh): expert 2 retrained with an override,
    # sampled alone on the held-out prompts of its own family and scored by the ground truth
    probe_env = {**env, "DDM_PROBE_EXPERT": "2", "DDM_PROBE_STEPS": "2", "DDM_PROBE_MAX_PROMPTS": "3"}
    probe = subprocess.run(["bash", str(repo_root / "launch" / "probe_expert.sh"), "quick", "recipe.stage2.max_steps=3",
                            "recipe.stage2.lr=1e-2"], capture_output=True, text=True, env=probe_env, timeout=600)
    assert probe.returncode == 0, probe.stdout[-5000:] + probe.stderr[-5000:]
    out = demo / "probes" / "quick"
    assert "[probe] trained in" in probe.stdout and "colour:" in probe.stdout
    family = re.search(r"expert 2: family (\w+)", probe.stdout).group(1)
    prompts = (out / "prompts.txt").read_text().splitlines()
    assert 1 <= len(prompts) <= 3
    assert {attributes_of(p).family for p in prompts} == {family}
    heldout = {r["text"] for r in read_manifest(demo / "heldout_n6")}
    assert set(prompts) <= heldout  # held-out captions, not training ones
    assert re.search(rf"colour: [0-9.]+ ± [0-9.]+ \(N={len(prompts)},", probe.stdout)
    resolved = (out / "train" / "tiny" / "expert2" / "stage2" / "resolved_config.yaml").read_text()
    assert "max_steps: 3" in resolved and "lr: 0.01" in resolved
    # the model folder holds the probe's expert in slot 2, the demo's own in the other slots
    assert (out / "runs" / "expert2" / "stage2").resolve() == (out / "train" / "tiny" / "expert2" / "stage2").resolve()
    assert (out / "runs" / "expert1" / "stage2").resolve() == (demo / "runs" / "tiny" / "expert1" / "stage2").resolve()


@pytest.mark.slow
def test_a_failed_step_stops_the_demo_there_with_its_log_tail(tmp_path, repo_root):
    """A prepare that fails (here: an input folder with no clips, marked complete) stops the demo at step 2 with
    the failing command's log tail; nothing is trained on missing shards."""
    demo = tmp_path / "demo"
    (demo / "raw").mkdir(parents=True)
    (demo / "raw" / ".complete").touch()
    env = {**os.environ, "DDM_DEMO_DIR": str(demo), "DDM_DEMO_PROFILE": "short"}
    run = subprocess.run(["bash", str(repo_root / "launch" / "demo.sh")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode != 0, run.stdout
    assert "prepare_stage2 FAILED" in run.stderr, run.stderr[-3000:]
    assert (demo / "logs" / "prepare_stage2.log").read_text().strip().splitlines()[-1] in run.stderr
    assert "3-4/7" not in run.stdout and not (demo / "runs").exists()


def test_the_probe_script_needs_a_finished_demo(tmp_path, repo_root):
    """launch/probe_expert.sh without a name, or on a folder where the demo has not run, says what is missing."""
    env = {**os.environ, "DDM_DEMO_DIR": str(tmp_path)}
    script = str(repo_root / "launch" / "probe_expert.sh")
    usage = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=300)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    missing = subprocess.run(["bash", script, "p"], capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2 and "assignments.parquet is missing" in missing.stderr, missing.stderr
    typo = subprocess.run(["bash", script, "p"], capture_output=True, text=True,
                          env={**env, "DDM_PROBE_PROMPTS": "held-out"}, timeout=300)
    assert typo.returncode == 2 and "DDM_PROBE_PROMPTS must be heldout or train" in typo.stderr, typo.stderr
    assert not (tmp_path / "probes").exists()

    # a name already trained with other overrides is refused before anything runs
    for path in ("prep/assignments.parquet", "runs/tiny/router/stage2/export/master.safetensors",
                 "heldout_n6/synthetic.csv", "probes/p/overrides.txt"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("expert=1 recipe.stage2.lr=1e-2\n" if path.endswith(".txt") else "")
    other = subprocess.run(["bash", script, "p", "recipe.stage2.lr=3e-2"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert other.returncode == 2 and "was trained as 'expert=1 recipe.stage2.lr=1e-2'" in other.stderr, other.stderr
    assert not (tmp_path / "probes" / "p" / "train").exists()


# What each profile promises (launch/demo.sh's header and docs/bench/demo.md): expert stage-2 steps, expert width,
# router steps. None: the tiny recipe's own value.
PROFILES = {"full": (None, 64, None), "long": (1800, 128, 1200), "xl": (3600, 128, None), "short": (8, 64, 10)}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_each_profile_gives_its_jobs_overrides_that_compose_to_what_it_promises(tmp_path, repo_root, profile):
    """``DDM_DEMO_PRINT_JOBS=1`` prints the Hydra overrides of the expert and router jobs; composed with the real
    configs they must give the profile's steps and width (the long and xl profiles are never run by the suite,
    so a typo in their override lists would otherwise show only after minutes of a user's run)."""
    import torch

    from tests.fixtures.train import compose_config
    from train import job

    env = {**os.environ, "DDM_DEMO_DIR": str(tmp_path / "demo"), "DDM_DEMO_PROFILE": profile,
           "DDM_DEMO_PRINT_JOBS": "1"}
    for inherited in ("DDM_DEMO_PRECISION", "DDM_DEMO_OVERRIDES", "DDM_DEMO_ROUTER"):  # the profile's own choices
        env.pop(inherited, None)
    out = subprocess.run(["bash", str(repo_root / "launch" / "demo.sh")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = {line.split(":", 1)[0]: shlex.split(line.split(":", 1)[1]) for line in out.stdout.splitlines()}
    assert set(jobs) == {"expert", "router"} and not list((tmp_path / "demo").iterdir())  # stopped before work

    steps, width, router_steps = PROFILES[profile]
    tiny = compose_config("expert", ["experiment=tiny", "expert=1", "stage=stage2"])
    expert = compose_config("expert", [*jobs["expert"], "expert=1", "stage=stage2"])
    assert expert.stage.max_steps == (steps or tiny.stage.max_steps)
    assert job.expert_config(expert).hidden_size == width
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert expert.trainer.precision == ("bf16-mixed" if width == 128 and native_bf16 else "32-true")
    tiny_router = compose_config("router", ["experiment=tiny", "stage=stage2"])
    router = compose_config("router", [*jobs["router"], "stage=stage2"])
    assert router.max_steps == (router_steps or tiny_router.max_steps)
    assert not any("model.overrides" in arg or "precision" in arg for arg in jobs["router"])  # its own model
