"""The SLURM launch layer: launch/submit.sh, the job scripts under launch/slurm/, the cluster-settings
example and the Hydra submitit launcher config.

SLURM is replaced by fake ``sbatch`` and ``srun`` executables (written here, put first on PATH) that log
their arguments and environment and print job ids the way the real ones do. The scripts under test run
unchanged: submit.sh talks to the fake sbatch, and the job scripts are then run exactly as a node would
run them (the environment sbatch received + the ``--export`` pairs + the SLURM_* variables of the
allocation), so the test follows a setting from the cluster file all the way to the srun command line.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "launch" / "submit.sh"
SLURM_DIR = REPO / "launch" / "slurm"
EXAMPLE_ENV = REPO / "launch" / "cluster.env.example"

FAKE_SBATCH = '''#!{python}
"""Fake sbatch: log the call, print a job id ('--parsable': "id;cluster", else "Submitted batch job id")."""
import json, os, sys
from pathlib import Path
log = Path(os.environ["FAKE_SLURM_LOG"])
calls = [l for l in log.read_text().splitlines() if '"sbatch"' in l] if log.exists() else []
n = len(calls) + 1
if os.environ.get("FAKE_SBATCH_FAIL_AT") == str(n):
    print("sbatch: error: Batch job submission failed: Invalid account or account/partition combination",
          file=sys.stderr)
    sys.exit(1)
job_id = str(1000 + n)
script = Path(sys.argv[-1])
record = {{"tool": "sbatch", "argv": sys.argv[1:], "id": job_id,
          "env": {{k: v for k, v in os.environ.items() if k.startswith(("DDM_", "ROUTER_", "USER", "HOME"))}},
          "script": script.read_text() if script.is_file() else None}}
with log.open("a") as f:
    f.write(json.dumps(record) + "\\n")
print(job_id + ";testcluster" if "--parsable" in sys.argv else "Submitted batch job " + job_id)
'''

FAKE_SRUN = '''#!{python}
"""Fake srun: log the command line and the environment the task would get."""
import json, os, sys
from pathlib import Path
with Path(os.environ["FAKE_SLURM_LOG"]).open("a") as f:
    f.write(json.dumps({{"tool": "srun", "argv": sys.argv[1:],
                        "env": {{k: v for k, v in os.environ.items() if k.startswith(("DDM_", "SLURM_"))}}}}) + "\\n")
'''


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def slurm(tmp_path: Path) -> "FakeSlurm":
    return FakeSlurm(tmp_path)


class FakeSlurm:
    """A fake SLURM on PATH plus a cluster-settings file with a distinctive value for every setting."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.bin = tmp_path / "fakebin"
        self.bin.mkdir()
        for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN)):
            path = self.bin / name
            path.write_text(text.format(python=sys.executable))
            path.chmod(0o755)
        self.log = tmp_path / "slurm_log.jsonl"
        (tmp_path / "prep" / "shards" / "stage2").mkdir(parents=True)
        (tmp_path / "prep" / "shards" / "stage3").mkdir(parents=True)
        self.cluster_env = tmp_path / "cluster.env"
        self.cluster_env.write_text(
            "DDM_DATA_DIR=prep\n"  # relative on purpose: submit.sh must make it absolute
            "DDM_RUNS_DIR=$HOME/runs\n"
            "DDM_WEIGHTS_DIR=/shared/weights\n"
            "DDM_EXPERIMENT_NAME=exp1\n"
            "DDM_EXPERIMENT=tiny\n"
            "DDM_NUM_EXPERTS=3\n"
            'DDM_EXPERT_OVERRIDES="strategy=fsdp checkpoint.every_n_steps=500"\n'
            "ROUTER_AFTER_EXPERTS=0\n"
            'DDM_EVAL_ARGS="--prompts /shared/prompts.txt --num-videos 64"\n'
            "DDM_ENV_SETUP='export DDM_TEST_ENV_READY=job$SLURM_JOB_ID'\n"  # single quotes: expands on the node
            "DDM_SLURM_PARTITION=testpart\n"
            "DDM_SLURM_ACCOUNT=proj42\n"
            "DDM_SLURM_QOS=high\n"
            "DDM_SLURM_CONSTRAINT=\n"  # empty = not passed
            "DDM_SLURM_GPUS_PER_NODE=4\n"
            "DDM_SLURM_GPU_TYPE=h100\n"
            "DDM_SLURM_GPU_FLAG=gres\n"
            "DDM_SLURM_CPUS_PER_TASK=6\n"
            "DDM_SLURM_MEM_GB=256\n"
            "DDM_SLURM_NODES_PER_EXPERT=2\n"
            "DDM_SLURM_NODES_ROUTER=1\n"
            "DDM_SLURM_GPUS_ROUTER=2\n"
            "DDM_SLURM_TIME_STAGE2=0-12:00:00\n"
            "DDM_SLURM_TIME_STAGE3=1-06:00:00\n"
            "DDM_SLURM_TIME_MONOLITH_STAGE3=2-00:00:00\n"
            "DDM_SLURM_TIME_ROUTER=03:00:00\n"
            "DDM_SLURM_TIME_EVAL=01:30:00\n"
            "DDM_SLURM_SIGNAL_SECONDS=240\n"
            'DDM_SLURM_EXTRA_ARGS="--exclusive --mail-type=FAIL"\n'
        )
        self.home = tmp_path / "home"
        self.home.mkdir()

    def env(self, with_sbatch: bool = True, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DDM_", "ROUTER_", "SLURM_"))}
        path = [str(self.bin)] if with_sbatch else []
        # the venv's python must be found as `python` by the job scripts
        env["PATH"] = os.pathsep.join(path + [str(Path(sys.executable).parent), "/usr/bin", "/bin"])
        env.update(HOME=str(self.home), USER="tester", FAKE_SLURM_LOG=str(self.log),
                   DDM_CLUSTER_ENV=str(self.cluster_env))
        env.update(extra)
        return env

    def submit(self, *args: str, with_sbatch: bool = True, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SUBMIT), *args], cwd=self.root, env=self.env(with_sbatch, **extra),
                              capture_output=True, text=True, timeout=60)

    def records(self, tool: str) -> list[dict]:
        if not self.log.exists():
            return []
        rows = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [r for r in rows if r["tool"] == tool]

    def jobs(self) -> dict[str, dict]:
        """sbatch calls by job name, each with its parsed --flags."""
        jobs = {}
        for rec in self.records("sbatch"):
            flags = parse_flags(rec["argv"][:-1])
            jobs[flags["job-name"]] = {**rec, "flags": flags}
        return jobs

    def run_job(self, job: dict, **slurm_env: str) -> subprocess.CompletedProcess:
        """Run a submitted job script as a compute node would: the environment sbatch received, plus the
        --export pairs, plus the allocation's SLURM_* variables; srun is the fake."""
        env = self.env()
        env.update(job["env"])
        exports = job["flags"]["export"].split(",")
        assert exports[0] == "ALL"
        env.update(pair.split("=", 1) for pair in exports[1:])
        env.update(slurm_env)
        self.log.write_text("")  # only this job's srun calls
        return subprocess.run(["bash", job["argv"][-1]], cwd=self.root, env=env, capture_output=True, text=True,
                              timeout=60)


def parse_flags(argv: list[str]) -> dict[str, str]:
    """'--key=value' / '--key' flags → dict (each flag once: a repeat would be ambiguous, so it fails)."""
    flags: dict[str, str] = {}
    for arg in argv:
        assert arg.startswith("--"), f"unexpected sbatch argument {arg!r}"
        key, _, value = arg[2:].partition("=")
        assert key not in flags, f"--{key} given twice"
        flags[key] = value
    return flags


def hydra_overrides(tokens: list[str]) -> dict[str, object]:
    """Parse override tokens with Hydra's own parser: what the training job will actually receive."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(tokens)
    return {o.key_or_group: o.value() for o in parsed}


def job_env(**values: str) -> dict[str, str]:
    """The DDM_* settings a job script needs, for running one directly."""
    base = dict(DDM_REPO=str(REPO), DDM_EXPERIMENT_NAME="exp1", DDM_NUM_EXPERTS="3", DDM_RUNS_DIR="/r/runs",
                DDM_DATA_DIR="/r/prep", DDM_STAGE="stage3")
    base.update(values)
    return base


# ------------------------------------------------------------------------------------------ submit.sh DAG
def test_submit_builds_the_dependency_dag(slurm: FakeSlurm) -> None:
    res = slurm.submit()
    assert res.returncode == 0, res.stderr
    jobs = slurm.jobs()
    assert set(jobs) == {f"ddm-exp1-{j}" for j in ("experts-stage2", "experts-stage3", "monolith-stage2",
                                                    "monolith-stage3", "router-stage3", "evaluate")}
    e2, e3 = jobs["ddm-exp1-experts-stage2"], jobs["ddm-exp1-experts-stage3"]
    m2, m3 = jobs["ddm-exp1-monolith-stage2"], jobs["ddm-exp1-monolith-stage3"]
    router, evaluate = jobs["ddm-exp1-router-stage3"], jobs["ddm-exp1-evaluate"]

    # expert arrays: task id = expert id 1..K; stage-3 task k waits for stage-2 task k only (aftercorr)
    assert e2["flags"]["array"] == e3["flags"]["array"] == "1-3"
    assert "dependency" not in e2["flags"]
    assert e3["flags"]["dependency"] == f"aftercorr:{e2['id']}"
    # the monolith is one plain job per stage, chained with afterok
    assert "array" not in m2["flags"] and "array" not in m3["flags"]
    assert "dependency" not in m2["flags"]
    assert m3["flags"]["dependency"] == f"afterok:{m2['id']}"
    # the router needs only shards: it starts at once
    assert "dependency" not in router["flags"]
    # evaluation waits for the stage-3 experts, the monolith and the router, all of them
    kind, _, ids = evaluate["flags"]["dependency"].partition(":")
    assert kind == "afterok"
    assert sorted(ids.split(":")) == sorted([e3["id"], m3["id"], router["id"]])
    for job in jobs.values():
        assert job["flags"]["parsable"] == ""
        if "dependency" in job["flags"]:
            assert job["flags"]["kill-on-invalid-dep"] == "yes"  # a failed parent must not leave it pending forever
        assert job["id"] in res.stdout  # the table lists every id

    # which script, which stage, which expert
    for job, script, stage, expert in ((e2, "expert", "stage2", ""), (e3, "expert", "stage3", ""),
                                       (m2, "expert", "stage2", "all"), (m3, "expert", "stage3", "all")):
        assert job["argv"][-1] == str(SLURM_DIR / f"{script}.sbatch")
        assert job["flags"]["export"] == f"ALL,DDM_STAGE={stage},DDM_EXPERT={expert}"
    assert router["argv"][-1] == str(SLURM_DIR / "router.sbatch")
    assert router["flags"]["export"] == "ALL,DDM_STAGE=stage3"
    assert evaluate["argv"][-1] == str(SLURM_DIR / "evaluate.sbatch")


def test_router_after_experts_chains_it_and_the_environment_beats_the_file(slurm: FakeSlurm) -> None:
    res = slurm.submit(ROUTER_AFTER_EXPERTS="1")  # the file says 0
    assert res.returncode == 0, res.stderr
    jobs = slurm.jobs()
    experts3 = jobs["ddm-exp1-experts-stage3"]["id"]
    assert jobs["ddm-exp1-router-stage3"]["flags"]["dependency"] == f"afterok:{experts3}"


def test_cluster_settings_reach_every_sbatch_call(slurm: FakeSlurm) -> None:
    res = slurm.submit()
    assert res.returncode == 0, res.stderr
    jobs = slurm.jobs()
    runs = slurm.home / "runs"
    log_dir = runs / "exp1" / "slurm_logs"
    assert log_dir.is_dir()  # SLURM does not create the --output folder itself
    for job in jobs.values():
        f = job["flags"]
        assert (f["partition"], f["account"], f["qos"]) == ("testpart", "proj42", "high")
        assert (f["cpus-per-task"], f["mem"], f["mail-type"], f["exclusive"]) == ("6", "256G", "FAIL", "")
        assert "gpus-per-node" not in f  # DDM_SLURM_GPU_FLAG=gres
        # what the job scripts will read, with relative paths made absolute against the submit directory
        env = job["env"]
        assert env["DDM_DATA_DIR"] == str(slurm.root / "prep")
        assert env["DDM_RUNS_DIR"] == str(runs)
        assert env["DDM_ENV_SETUP"] == "export DDM_TEST_ENV_READY=job$SLURM_JOB_ID"
        assert env["DDM_REPO"] == str(REPO)
        assert Path(f["output"]).parent == log_dir

    expected = {  # job: (nodes, tasks per node, gres, time)
        "experts-stage2": ("2", "4", "gpu:h100:4", "0-12:00:00"),
        "experts-stage3": ("2", "4", "gpu:h100:4", "1-06:00:00"),
        "monolith-stage2": ("6", "4", "gpu:h100:4", "0-12:00:00"),  # K × nodes per expert, expert time
        "monolith-stage3": ("6", "4", "gpu:h100:4", "2-00:00:00"),  # its own time limit
        "router-stage3": ("1", "2", "gpu:h100:2", "03:00:00"),
        "evaluate": ("1", "1", "gpu:h100:1", "01:30:00"),
    }
    for name, (nodes, tasks, gres, time) in expected.items():
        f = jobs[f"ddm-exp1-{name}"]["flags"]
        assert (f["nodes"], f["ntasks-per-node"], f["gres"], f["time"]) == (nodes, tasks, gres, time), name
        if name == "evaluate":
            assert "signal" not in f
        else:
            assert f["signal"] == "USR1@240"
    assert jobs["ddm-exp1-experts-stage2"]["flags"]["output"].endswith("/expert%a-stage2-%A.out")  # one log per expert


def test_stage_selection_expert_subset_and_skips(slurm: FakeSlurm) -> None:
    res = slurm.submit("--stages", "stage3", "--experts", "2,3", "--no-monolith", "--no-eval")
    assert res.returncode == 0, res.stderr
    jobs = slurm.jobs()
    assert set(jobs) == {"ddm-exp1-experts-stage3", "ddm-exp1-router-stage3"}
    experts = jobs["ddm-exp1-experts-stage3"]["flags"]
    assert experts["array"] == "2,3"
    assert "dependency" not in experts  # stage 3 alone starts from the stage-2 exports already on disk

    slurm.log.unlink()
    res = slurm.submit("--stages", "stage2", "--no-router", DDM_SLURM_GPU_FLAG="gpus-per-node",
                       DDM_SLURM_ARRAY_LIMIT="2")
    assert res.returncode == 0, res.stderr
    jobs = slurm.jobs()
    assert set(jobs) == {"ddm-exp1-experts-stage2", "ddm-exp1-monolith-stage2", "ddm-exp1-evaluate"}
    experts = jobs["ddm-exp1-experts-stage2"]["flags"]
    assert experts["array"] == "1-3%2"
    assert experts["gpus-per-node"] == "h100:4" and "gres" not in experts
    ids = jobs["ddm-exp1-evaluate"]["flags"]["dependency"].removeprefix("afterok:").split(":")
    assert sorted(ids) == sorted([jobs["ddm-exp1-experts-stage2"]["id"], jobs["ddm-exp1-monolith-stage2"]["id"]])


def test_dry_run_needs_no_sbatch_and_submits_nothing(slurm: FakeSlurm) -> None:
    res = slurm.submit("--dry-run", with_sbatch=False)
    assert res.returncode == 0, res.stderr
    assert slurm.records("sbatch") == []
    lines = [l for l in res.stdout.splitlines() if l.startswith("sbatch ")]
    assert len(lines) == 6
    stage3 = next(shlex.split(l) for l in lines if "--job-name=ddm-exp1-experts-stage3" in l)
    assert "--dependency=aftercorr:{experts-stage2}" in stage3
    assert not (slurm.home / "runs").exists()  # a dry run writes nothing


# ------------------------------------------------------------------------- from submit.sh to the srun line
def test_submitted_jobs_run_the_right_commands(slurm: FakeSlurm) -> None:
    assert slurm.submit().returncode == 0
    jobs = slurm.jobs()
    runs, prep = slurm.home / "runs", slurm.root / "prep"
    shared = {"experiment": "tiny", "experiment_name": "exp1", "num_experts": 3, "paths.runs_dir": str(runs),
              "paths.data_dir": str(prep), "paths.weights_dir": "/shared/weights"}

    # expert array task 2 of stage 3 on 2 nodes × 4 GPUs
    res = slurm.run_job(jobs["ddm-exp1-experts-stage3"], SLURM_JOB_ID="1103", SLURM_ARRAY_JOB_ID="1002",
                        SLURM_ARRAY_TASK_ID="2", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="4")
    assert res.returncode == 0, res.stderr
    (srun,) = slurm.records("srun")
    argv = srun["argv"]
    assert argv[:5] == ["--kill-on-bad-exit=1", "python", "-m", "train.expert", "expert=2"]
    assert argv[5] == "stage=stage3"
    assert argv[-2:] == ["strategy=fsdp", "checkpoint.every_n_steps=500"]  # the user's overrides come last
    assert hydra_overrides(argv[4:]) == {"expert": 2, "stage": "stage3", **shared, "trainer.num_nodes": 2,
                                         "trainer.devices": 4, "strategy": "fsdp",
                                         "checkpoint.every_n_steps": 500}
    assert srun["env"]["DDM_TEST_ENV_READY"] == "job1103"  # DDM_ENV_SETUP ran on the node, before srun
    assert f"{runs}/exp1/expert2/stage3" in res.stdout  # the log says where the run goes

    # the monolith: expert=all, compute-matched, 6 nodes (SLURM's "4(x6)" tasks-per-node form)
    res = slurm.run_job(jobs["ddm-exp1-monolith-stage3"], SLURM_JOB_ID="1104", SLURM_JOB_NUM_NODES="6",
                        SLURM_NTASKS_PER_NODE="4(x6)")
    assert res.returncode == 0, res.stderr
    (srun,) = slurm.records("srun")
    assert srun["argv"][1:4] == ["python", "-m", "train.expert"]
    got = hydra_overrides(srun["argv"][4:])
    assert (got["expert"], got["stage"], got["compute_match"]) == ("all", "stage3", True)
    assert (got["trainer.num_nodes"], got["trainer.devices"]) == (6, 4)

    # the router
    res = slurm.run_job(jobs["ddm-exp1-router-stage3"], SLURM_JOB_ID="1105", SLURM_JOB_NUM_NODES="1",
                        SLURM_NTASKS_PER_NODE="2")
    assert res.returncode == 0, res.stderr
    (srun,) = slurm.records("srun")
    assert srun["argv"][1:4] == ["python", "-m", "train.router"]
    assert hydra_overrides(srun["argv"][4:]) == {"stage": "stage3", **shared, "trainer.num_nodes": 1,
                                                 "trainer.devices": 2}

    # export, then evaluate the exported folder
    res = slurm.run_job(jobs["ddm-exp1-evaluate"], SLURM_JOB_ID="1106", SLURM_JOB_NUM_NODES="1",
                        SLURM_NTASKS_PER_NODE="1")
    assert res.returncode == 0, res.stderr
    export, evaluate = slurm.records("srun")
    model = f"{runs}/exp1/paris"
    assert export["argv"] == ["--kill-on-bad-exit=1", "--ntasks=1", "python", "-m", "ddm.assemble",
                              "--runs", f"{runs}/exp1", "--out", model]
    assert evaluate["argv"] == ["--kill-on-bad-exit=1", "--ntasks=1", "python", "-m", "ddm.evaluate",
                                "--model", model, "--prompts", "/shared/prompts.txt", "--num-videos", "64",
                                "--out", f"{runs}/exp1/eval"]


def test_expert_sbatch_run_directly_with_array_task_2(slurm: FakeSlurm) -> None:
    env = slurm.env(**job_env(DDM_RUNS_DIR="/data/my runs, v2"), SLURM_JOB_ID="77", SLURM_ARRAY_TASK_ID="2",
                    SLURM_NNODES="1", SLURM_NTASKS="4")
    res = subprocess.run(["bash", str(SLURM_DIR / "expert.sbatch")], env=env, cwd=slurm.root,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    (srun,) = slurm.records("srun")
    line = " ".join(srun["argv"])
    assert "python -m train.expert expert=2 stage=stage3 " in line
    got = hydra_overrides(srun["argv"][4:])
    # a path with a space and a comma stays one value (not two tokens, not a sweep)
    assert got["paths.runs_dir"] == "/data/my runs, v2"
    assert (got["trainer.num_nodes"], got["trainer.devices"]) == (1, 4)  # from SLURM_NTASKS / SLURM_NNODES
    assert "experiment" not in got  # no preset named: the config's defaults stand


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "no expert id"),
        ({"SLURM_ARRAY_TASK_ID": "4"}, "beyond K=3"),
        ({"SLURM_ARRAY_TASK_ID": "0"}, "no expert id"),
        ({"SLURM_ARRAY_TASK_ID": "1", "DDM_EXPERT": "all"}, "not an array"),
        ({"DDM_EXPERT": "2"}, "may only be 'all'"),
        ({"SLURM_ARRAY_TASK_ID": "1", "DDM_STAGE": ""}, "DDM_STAGE"),
        ({"SLURM_ARRAY_TASK_ID": "1", "DDM_DATA_DIR": ""}, "DDM_DATA_DIR"),
        ({"SLURM_ARRAY_TASK_ID": "1", "DDM_RUNS_DIR": "/it's"}, "quote"),
    ],
)
def test_expert_sbatch_refuses_bad_settings(slurm: FakeSlurm, env: dict, message: str) -> None:
    res = subprocess.run(["bash", str(SLURM_DIR / "expert.sbatch")], env=slurm.env(**job_env(**env)),
                         cwd=slurm.root, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert message in res.stderr
    assert slurm.records("srun") == []  # nothing was launched


# ------------------------------------------------------------------------------------- submit.sh failures
def test_submit_fails_clearly(slurm: FakeSlurm) -> None:
    res = slurm.submit(with_sbatch=False)
    assert res.returncode != 0 and "sbatch not found" in res.stderr

    res = slurm.submit(FAKE_SBATCH_FAIL_AT="3")  # the third submission is refused
    assert res.returncode != 0
    assert "sbatch failed for experts-stage3" in res.stderr
    assert "scancel 1001 1002" in res.stderr  # what was already submitted, and how to undo it
    assert len(slurm.records("sbatch")) == 2

    res = slurm.submit(DDM_CLUSTER_ENV=str(slurm.root / "missing.env"))
    assert res.returncode != 0 and "cluster.env.example" in res.stderr

    for args, extra, message in (
        (["--stages", "stage2,stage4"], {}, "unknown stage 'stage4'"),
        (["--experts", "4"], {}, "outside 1..3"),
        (["--bogus"], {}, "unknown argument '--bogus'"),
        ([], {"DDM_NUM_EXPERTS": "three"}, "DDM_NUM_EXPERTS must be a positive integer"),
        ([], {"ROUTER_AFTER_EXPERTS": "yes"}, "ROUTER_AFTER_EXPERTS must be 0 or 1"),
        ([], {"DDM_SLURM_GPU_FLAG": "gpu"}, "DDM_SLURM_GPU_FLAG"),
        ([], {"DDM_DATA_DIR": str(slurm.root / "nowhere")}, "does not exist"),
        ([], {"DDM_EXPERIMENT_NAME": "my exp"}, "one plain word"),
    ):
        slurm.log.unlink(missing_ok=True)
        res = slurm.submit(*args, **extra)
        assert res.returncode != 0, args
        assert message in res.stderr, (args, res.stderr)
        assert slurm.records("sbatch") == []  # validation happens before anything is submitted


# -------------------------------------------------------------------------------- the scripts themselves
def shell_files() -> list[Path]:
    files = sorted(p for p in (REPO / "launch").rglob("*") if p.suffix in {".sh", ".sbatch"})
    return files + [EXAMPLE_ENV]


def test_every_launch_script_parses() -> None:
    files = shell_files()
    assert {SUBMIT, SLURM_DIR / "common.sh", SLURM_DIR / "expert.sbatch", SLURM_DIR / "router.sbatch",
            SLURM_DIR / "evaluate.sbatch"} <= set(files)
    for path in files:
        res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert res.returncode == 0, f"{path}: {res.stderr}"


def sbatch_directives(path: Path) -> list[str]:
    """#SBATCH lines SLURM reads: those before the first command (later ones are silently ignored)."""
    directives = []
    for line in path.read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            directives.append(line.split()[1])
    return directives


def test_job_scripts_hold_requeue_directives_and_no_cluster_specifics() -> None:
    for name in ("expert", "router"):
        directives = sbatch_directives(SLURM_DIR / f"{name}.sbatch")
        assert {"--requeue", "--open-mode=append"} <= set(directives)
        assert any(d.startswith("--signal=USR1@") for d in directives)
    assert "--open-mode=append" in sbatch_directives(SLURM_DIR / "evaluate.sbatch")
    for path in SLURM_DIR.iterdir():
        text = "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#"))  # code only
        for specific in ("--partition", "--account", "--qos", "--gres", "--gpus", "--time", "--nodes", "--mem"):
            assert specific not in text, f"{path.name} hard-codes {specific}"
        assert "scontrol requeue" not in text  # one owner of requeue: the training job


def test_example_settings_are_valid_and_complete(slurm: FakeSlurm) -> None:
    # the example file itself submits (dry run; its data folder replaced by one that exists)
    res = slurm.submit("--dry-run", DDM_CLUSTER_ENV=str(EXAMPLE_ENV), DDM_DATA_DIR=str(slurm.root / "prep"))
    assert res.returncode == 0, res.stderr
    assert "--partition=gpu" in res.stdout and "--array=1-3" in res.stdout

    # every setting the launch layer reads is documented in the example
    import re

    example = set(re.findall(r"^([A-Z_]+)=", EXAMPLE_ENV.read_text(), flags=re.M))
    internal = {"DDM_REPO", "DDM_CLUSTER_ENV", "DDM_STAGE", "DDM_EXPERT", "DDM_OVERRIDES", "DDM_NODES",
                "DDM_TASKS_PER_NODE"}
    sources = [SUBMIT, *SLURM_DIR.iterdir(), REPO / "conf" / "hydra" / "launcher" / "slurm.yaml"]
    used = set()
    for path in sources:
        used |= set(re.findall(r"\b((?:DDM_|ROUTER_AFTER_)[A-Z0-9_]*[A-Z0-9])\b", path.read_text()))
    used -= internal
    used = {u for u in used if not u.endswith("_STAGE")}  # DDM_SLURM_TIME_${stage^^} is built, not named
    assert used <= example, f"not in cluster.env.example: {sorted(used - example)}"


def test_print_env_exports_set_values_and_unsets_empty_ones(slurm: FakeSlurm) -> None:
    res = slurm.submit("--print-env")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "export DDM_SLURM_PARTITION=testpart" in lines
    assert f"export DDM_DATA_DIR={slurm.root / 'prep'}" in lines
    assert "unset DDM_SLURM_CONSTRAINT" in lines  # so ${oc.env:DDM_SLURM_CONSTRAINT,null} takes its default
    probe = subprocess.run(["bash", "-c", 'DDM_SLURM_CONSTRAINT=stale; eval "$1"; '
                            'printf "%s\\n" "$DDM_ENV_SETUP" "${DDM_SLURM_CONSTRAINT-unset}"', "_", res.stdout],
                           capture_output=True, text=True)
    assert probe.stdout.splitlines() == ["export DDM_TEST_ENV_READY=job$SLURM_JOB_ID", "unset"]


# --------------------------------------------------------------------------- Hydra submitit launcher
def _sweep_task(cfg) -> None:  # module level: the launcher pickles the task function into each job
    return None


def test_submitit_launcher_config_becomes_one_job_array(slurm: FakeSlurm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compose conf/hydra/launcher/slurm.yaml with Hydra, instantiate the real SlurmLauncher and let it
    submit a 3-point sweep to the fake sbatch: one array of 3 jobs carrying the cluster settings."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import get_class, instantiate

    settings = {"DDM_SLURM_PARTITION": "testpart", "DDM_SLURM_ACCOUNT": "proj42", "DDM_SLURM_GPUS_PER_NODE": "4",
                "DDM_SLURM_NODES_PER_EXPERT": "2", "DDM_SLURM_CPUS_PER_TASK": "6", "DDM_SLURM_MEM_GB": "256",
                "DDM_SLURM_TIMEOUT_MIN": "90", "DDM_SLURM_SIGNAL_SECONDS": "240", "DDM_SLURM_MAX_REQUEUES": "7",
                "DDM_ENV_SETUP": "export DDM_TEST_ENV_READY=yes"}
    for key in [k for k in os.environ if k.startswith("DDM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PATH", str(slurm.bin) + os.pathsep + os.environ["PATH"])  # fake sbatch/srun
    monkeypatch.setenv("FAKE_SLURM_LOG", str(slurm.log))

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        defaults = compose(config_name=None, overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        defaults = (defaults.hydra.launcher.partition, defaults.hydra.launcher.account)  # resolved now: lazy
        for key, value in settings.items():
            monkeypatch.setenv(key, value)
        cfg = compose(config_name=None, overrides=["hydra/launcher=slurm", "hydra.sweep.dir=sweep"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()

    # unset variables fall back to defaults that compose; set ones come through, typed
    assert defaults == ("gpu", None)
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg.partition == "testpart" and launcher_cfg.account == "proj42"
    assert launcher_cfg.gpus_per_node == 4 and launcher_cfg.tasks_per_node == 4  # one task per GPU
    assert launcher_cfg.max_num_timeout == 7  # submitit resubmits: it owns requeue in this mode
    launcher_class = get_class(launcher_cfg._target_)
    assert launcher_class.__name__ == "SlurmLauncher"

    launcher = instantiate(launcher_cfg)
    assert isinstance(launcher, launcher_class)
    launcher.setup(hydra_context=None, task_function=_sweep_task, config=cfg)
    # The jobs never run here, so their results are not awaited.
    monkeypatch.setattr(submitit.SlurmJob, "results", lambda self: [None])
    launcher.launch([["expert=1"], ["expert=2"], ["expert=3"]], initial_job_idx=0)

    (call,) = slurm.records("sbatch")  # one submission for the whole sweep: a job array
    script = call["script"]
    directives = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in script.splitlines()
                  if line.startswith("#SBATCH --") and "=" in line}
    assert directives["#SBATCH --array"].startswith("0-2")
    assert directives["#SBATCH --partition"] == "testpart"
    assert directives["#SBATCH --account"] == "proj42"
    assert directives["#SBATCH --nodes"] == "2"
    assert directives["#SBATCH --gpus-per-node"] == "4"
    assert directives["#SBATCH --ntasks-per-node"] == "4"
    assert directives["#SBATCH --cpus-per-task"] == "6"
    assert directives["#SBATCH --mem"] == "256GB"
    assert directives["#SBATCH --time"] == "90"
    assert directives["#SBATCH --signal"] == "USR2@240"
    assert "#SBATCH --requeue" in script.splitlines()
    assert script.index("export DDM_TEST_ENV_READY=yes") < script.index("\nsrun ")  # setup runs before srun
