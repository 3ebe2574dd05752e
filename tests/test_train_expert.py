"""``python -m train.expert``: real CLI runs in subprocesses on the tiny preset and the checked-in shards."""
from __future__ import annotations

import csv
import os
import math
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from ddm.export_files import build_model_from_export, load_export, read_export_metadata, state_dict_sha256
from ddm.video_io import probe_video
from tests.fixtures.train import compose_config, run_cli, start_cli


def run_dir(root: Path, stage: str = "stage2", role: str = "expert1") -> Path:
    return root / "runs" / "tiny" / role / stage


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], name: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]


def wait_for(path: Path, proc, timeout: float = 240) -> None:
    start = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {path} appeared")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.2)


@pytest.mark.slow
def test_train_exports_and_stage3_starts_from_it(tmp_path, tiny_overrides):
    run_cli("train.expert", [*tiny_overrides, "expert=2", "recipe.stage2.max_steps=6", "checkpoint.every_n_steps=3",
                             "trainer.sample_every_n_steps=6"])
    run2 = run_dir(tmp_path, role="expert2")
    # periodic sample videos from the EMA weights, decodable, at the stage geometry (16 px, 9 frames)
    assert probe_video(run2 / "samples" / "step-00000006_0.mp4")["num_frames"] == 9
    assert (run2 / "samples" / "step-00000006_1.gif").stat().st_size > 0
    export = run2 / "export"
    meta = read_export_metadata(export)
    assert (meta["kind"], meta["expert_id"], meta["stage"], meta["step"]) == ("expert", 2, "stage2", 6)
    assert len(meta["manifest_hash"]) == 64 and meta["config"]["preset"] == "tiny-pixel"
    # the geometry it trained on, read from the shards
    assert (meta["geometry"]["resolution"], meta["geometry"]["num_frames"]) == ([16, 16], 9)
    assert meta["geometry"]["latent_shape"] == [12, 3, 16, 16]
    model = build_model_from_export(export)  # strict load into a fresh model
    assert sum(p.numel() for p in model.parameters()) > 0
    # single-file and sharded copies of the export hold the same tensors
    master, _ = load_export(export / "master.safetensors")
    sharded, _ = load_export(export / "model")
    assert state_dict_sha256(master) == state_dict_sha256(sharded)
    steps = [s for s, _ in column(metrics(run2), "train/loss")]
    assert max(steps) == 5 and len(set(steps)) == len(steps)  # 6 optimizer steps, logged once each
    assert sorted(p.name for p in (run2 / "checkpoints").glob("step-*.ckpt")) == ["step-00000003.ckpt",
                                                                                  "step-00000006.ckpt"]

    # Stage 3 with no checkpoint of its own: weights-only start from stage 2's export, step 0.
    # (the checked-in shards are 16 px; the tiny recipe's stage 3 is 24 px)
    proc = run_cli("train.expert", [*tiny_overrides, "expert=2", "stage=stage3", "recipe.stage3.max_steps=0",
                                    "recipe.stage3.resolution=16"])
    assert "mode=init" in proc.stdout and str(export) in proc.stdout
    stage3, meta3 = load_export(run_dir(tmp_path, "stage3", "expert2") / "export")
    assert meta3["step"] == 0 and meta3["stage"] == "stage3"
    assert state_dict_sha256(stage3) == state_dict_sha256(master)


@pytest.mark.slow
def test_kill_minus_9_then_same_command_resumes(tmp_path, tiny_overrides):
    args = [*tiny_overrides, "expert=1", "recipe.stage2.max_steps=12", "checkpoint.every_n_steps=4"]
    run = run_dir(tmp_path)
    proc = start_cli("train.expert", args, tmp_path / "first.log")
    wait_for(run / "checkpoints" / "step-00000008.ckpt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "checkpoints" / "last.ckpt").resolve().name == "step-00000008.ckpt"

    second = run_cli("train.expert", args)
    assert "mode=resume" in second.stdout and "step-00000008.ckpt" in second.stdout
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 12
    data_state = next(v for k, v in final.items() if "DataModule" in k)
    # The data position continued from the checkpoint's (8 batches, plus Lightning's one-batch prefetch);
    # a restart from 0 would show about 4.
    assert data_state["epoch"] == 0 and data_state["consumed"] >= 12
    meta = read_export_metadata(run / "export")
    assert meta["step"] == 12
    # the stage's training FLOPs (the pool manifest's figure) count all 12 steps, the killed segment's too
    from train import job

    cfg = compose_config("expert", args)
    per_sample = job.expert_budget(job.expert_config(cfg), job.stage_geometry(cfg)).flops_per_sample
    assert meta["train_flops"] == pytest.approx(12 * int(cfg.stage.batch_size) * per_sample, rel=1e-9)


@pytest.mark.slow
def test_expert_on_raw_frames_with_a_weighted_vae_resumes(tmp_path, make_shards, tiny_text_dir):
    """Raw-frame shards encoded during training by a VAE with weights (hunyuan-tiny): the frozen VAE stays
    out of the checkpoint, and the run resumes from it (a strict load that must not miss the vae.* keys)."""
    from train.expert import train_expert

    shards, _ = make_shards({(k, split): [6] for k in (1, 2, 3) for split in ("train", "val")}, raw_frames=True,
                            t5_dim=32, clip_dim=32)
    args = ["experiment=tiny", f"paths.root_dir={tmp_path}", f"data.shards_dir={shards}", "data.raw_frames=true",
            f"text.folder={tiny_text_dir}", "expert=1",
            # the fixture's clips: 5 frames of 4x4 px at 8 fps; a tiny HunyuanVideo VAE compressing 2x in
            # space turns them into 16-channel latents of 2 frames x 2x2 for the 16-channel tiny expert
            "vae=hunyuan_tiny", "+vae.config={spatial_compression: 2}",
            "recipe.stage2.resolution=4", "recipe.stage2.num_frames=5", "recipe.stage2.fps=8",
            "model.preset=tiny", "recipe.stage2.batch_size=4", "checkpoint.every_n_steps=2"]
    run = run_dir(tmp_path)
    assert train_expert(compose_config("expert", [*args, "recipe.stage2.max_steps=2"])) == 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    assert not [k for k in ckpt["state_dict"] if k.startswith("vae.")]  # frozen: not saved
    assert [k for k in ckpt["state_dict"] if k.startswith("model.")]

    assert train_expert(compose_config("expert", [*args, "recipe.stage2.max_steps=4"])) == 0
    assert "mode=resume" in (run / "logs" / "expert.log").read_text()
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 4
    assert not [k for k in final["state_dict"] if k.startswith("vae.")]
    assert read_export_metadata(run / "export")["step"] == 4


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_never_tears_last(tmp_path, tiny_overrides):
    args = [*tiny_overrides, "expert=1", "recipe.stage2.max_steps=8", "checkpoint.every_n_steps=4"]
    run = run_dir(tmp_path)
    crashed = run_cli("train.expert", args, env={"DDM_TEST_CRASH_DURING_CHECKPOINT_AT_STEP": "8"}, check=False)
    assert crashed.returncode == 137
    ckpts = run / "checkpoints"
    assert (ckpts / "step-00000008.ckpt.partial").exists()  # the torn write is there ...
    assert (ckpts / "last.ckpt").resolve().name == "step-00000004.ckpt"  # ... but last still points at step 4
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4

    resumed = run_cli("train.expert", args)
    assert "step-00000004.ckpt" in resumed.stdout
    assert not list(ckpts.glob("*.partial"))
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 8


@pytest.mark.slow
def test_first_frame_condition_is_used(tmp_path, tiny_overrides):
    """With t2v and first-frame samples mixed, the loss on first-frame-conditioned samples falls below the
    loss on text-only ones: the expert reads its cond_in input (the given frame, and what it says about
    the frames after it)."""
    args = [*tiny_overrides, "expert=1", "recipe.stage2.max_steps=250", "recipe.stage2.batch_size=8",
            "recipe.stage2.lr=3e-3", "checkpoint.every_n_steps=1000", "conditioning.t2v=0.5",
            "conditioning.first_frame=0.5", "conditioning.last_frame=0", "conditioning.both_ends=0"]
    run_cli("train.expert", args)
    rows = metrics(run_dir(tmp_path))
    t2v = [v for s, v in column(rows, "train/loss_t2v") if s >= 150]
    first = [v for s, v in column(rows, "train/loss_first_frame") if s >= 150]
    assert len(t2v) > 60 and len(first) > 60
    assert sum(first) / len(first) < 0.9 * sum(t2v) / len(t2v)


@pytest.mark.slow
def test_two_experts_run_concurrently_in_their_own_worlds(tmp_path, tiny_overrides):
    """Two DDP jobs (2 CPU processes each) at once: separate process groups, ports and run dirs."""
    procs = []
    for k in (1, 3):
        args = [*tiny_overrides, f"expert={k}", "strategy=ddp", "trainer.devices=2", "recipe.stage2.max_steps=4",
                "checkpoint.every_n_steps=2"]
        procs.append((k, start_cli("train.expert", args, tmp_path / f"expert{k}.log")))
    for k, proc in procs:
        assert proc.wait(timeout=400) == 0, (tmp_path / f"expert{k}.log").read_text()[-4000:]
    for k, _ in procs:
        run = run_dir(tmp_path, role=f"expert{k}")
        assert read_export_metadata(run / "export")["expert_id"] == k
        log = (tmp_path / f"expert{k}.log").read_text()
        assert f"experts [{k}]" in log  # each job read only its own expert's shards
    assert not (tmp_path / "runs" / "tiny" / "expert2").exists()


def test_compute_matched_monolith_ledger_agrees_with_the_formula(tmp_path, tiny_overrides):
    from torch.utils.flop_counter import FlopCounterMode

    from ddm.models.budget import training_flops_per_sample
    from ddm.models.presets import get_expert_config
    from ddm.models.router import Router, get_router_config

    proc = run_cli("train.expert", [*tiny_overrides, "expert=all", "compute_match=true", "dry_run=true"])
    out = proc.stdout
    cfg = compose_config("expert", [*tiny_overrides, "expert=all"])
    k, b, n = cfg.num_experts, cfg.stage.batch_size, cfg.stage.max_steps
    f = training_flops_per_sample(get_expert_config("tiny-pixel"), 16, 16, 9, cfg.recipe.text_pad_to, spatial_factor=1)
    # Router FLOPs measured independently: forward + backward under torch's FLOP counter, with the input
    # requiring grad so the backward does its full 2x forward (the ledger's 3x-forward convention).
    router = Router(get_router_config("tiny-pixel", num_experts=3))
    x = torch.randn(1, 12, 3, 16, 16, requires_grad=True)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        router(x, torch.rand(1), {}).sum().backward()
    f_router = fc.get_total_flops()
    ddm_total = k * f * b * n + f_router * cfg.router_batch_size * cfg.router_steps
    monolith_batch = math.ceil(ddm_total / (f * n))

    def ledger_value(label: str) -> float:
        m = re.search(rf"^{re.escape(label)}\s.*?([0-9.]+e[+-]\d+)\s*$", out, re.M)
        assert m, f"no '{label}' row in:\n{out}"
        return float(m.group(1))

    assert ledger_value("DDM total") == pytest.approx(ddm_total, rel=1e-3)
    assert re.search(rf"^monolith\s+{monolith_batch}\s+{n}\s", out, re.M), out
    assert ledger_value("monolith") == pytest.approx(f * monolith_batch * n, rel=1e-3)
    assert ledger_value("monolith") >= ledger_value("DDM total") * (1 - 1e-9)


def test_dry_run_of_the_11b_expert_allocates_nothing(tmp_path):
    proc = run_cli("train.expert", [f"paths.root_dir={tmp_path}", "dry_run=true", "strategy=deepspeed_zero3",
                                    "trainer.devices=8", "trainer.num_nodes=8"])
    assert "11,891,390,528" in proc.stdout
    assert "8,448 image" in proc.stdout and "zero3 / 64 ranks" in proc.stdout
    assert not list(tmp_path.glob("runs/**/*.ckpt")) and not list(tmp_path.glob("runs/**/export"))


@pytest.mark.slow
def test_fsdp2_sharded_checkpoint_reshards_and_consolidates(tmp_path, tiny_overrides):
    """FSDP2 on 2 CPU processes writes a sharded (DCP) checkpoint; it resumes on 1 process, and
    `python -m train.export` consolidates it to the same weights the run exported itself."""
    args = [*tiny_overrides, "expert=1", "strategy=fsdp", "checkpoint.every_n_steps=2"]
    run_cli("train.expert", [*args, "trainer.devices=2", "recipe.stage2.max_steps=4"])
    run = run_dir(tmp_path)
    step4 = run / "checkpoints" / "step-00000004.ckpt"
    assert step4.is_dir() and (step4 / ".metadata").exists()  # sharded, not one file
    in_run, _ = load_export(run / "export")
    run_cli("train.export", [str(step4), "--out", str(tmp_path / "consolidated")])
    consolidated, meta = load_export(tmp_path / "consolidated")
    assert meta["step"] == 4 and state_dict_sha256(consolidated) == state_dict_sha256(in_run)

    resumed = run_cli("train.expert", [*args, "trainer.devices=1", "recipe.stage2.max_steps=6"])
    assert "mode=resume" in resumed.stdout and "step-00000004.ckpt" in resumed.stdout
    assert read_export_metadata(run / "export")["step"] == 6


def test_deepspeed_configs_are_built_for_gpus_and_refused_on_cpu(tiny_overrides):
    from train.run import build_strategy, deepspeed_config

    z3 = compose_config("expert", ["strategy=deepspeed_zero3", "trainer.precision=bf16-mixed"])
    conf = deepspeed_config(z3, 5)
    assert conf["zero_optimization"]["stage"] == 3 and conf["bf16"]["enabled"] is True
    assert conf["train_micro_batch_size_per_gpu"] == 5  # the job's resolved batch (tests/test_scale_batch.py)
    assert conf["gradient_clipping"] == z3.optim.grad_clip
    assert deepspeed_config(compose_config("expert", ["strategy=deepspeed_zero2"]), 1)["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="deepspeed needs GPUs.*strategy=fsdp"):
        build_strategy(compose_config("expert", [*tiny_overrides, "strategy=deepspeed_zero2"]))


@pytest.mark.parametrize("overrides, error, match", [
    (["expert=4"], ValueError, r"expert=4 is outside 1\.\.3"),
    (["expert=0"], ValueError, r"outside 1\.\.3"),
    (["expert=one"], ValueError, "integer"),
    (["num_experts=4"], ValueError, "num_experts=4 but .* holds 3 expert shard folders"),
    (["stage=stage3", "recipe.stage3.resolution=16"], FileNotFoundError, "starts from the stage2 export.*init_from"),
    # the recipe must match the geometry the shards were encoded at (16 px, 9 frames, 8 fps)
    (["recipe.stage2.resolution=32"], ValueError, r"recipe\.stage2\.resolution=32 but the shards hold resolution=16"),
    (["recipe.stage2.num_frames=17"], ValueError, r"recipe\.stage2\.num_frames=17 but the shards hold num_frames=9"),
    (["stage=stage3"], ValueError, r"recipe\.stage3\.resolution=24 but the shards hold resolution=16"),
    (["init_from=/does/not/exist"], FileNotFoundError, "init_from=/does/not/exist does not exist"),
    (["strategy=deepspeed_zero3"], ValueError, "needs GPUs"),
])
def test_clear_errors_before_any_training(tmp_path, tiny_overrides, overrides, error, match):
    from train.expert import train_expert

    with pytest.raises(error, match=match):
        train_expert(compose_config("expert", [*tiny_overrides, *overrides]))
    assert not list(tmp_path.glob("runs/**/*.ckpt"))


def test_a_nonexistent_expert_leaves_no_run_folder(tmp_path, tiny_overrides):
    """Hydra creates <run_dir>/hydra before the job starts: a job that fails before training removes it."""
    proc = run_cli("train.expert", [*tiny_overrides, "expert=7"], check=False)
    assert proc.returncode != 0 and "expert=7 is outside 1..3" in proc.stderr
    assert not (tmp_path / "runs" / "tiny").exists()  # nor the experiment folder it left empty


def test_a_damaged_last_checkpoint_falls_back_to_the_newest_readable_one(tmp_path, caplog, monkeypatch):
    """last.ckpt damaged from outside (not torn by our own writer): resume from the previous checkpoint, with a
    warning naming the damaged one; when none can be read, an error rather than a silent fresh start."""
    import logging

    from train.run import plan_start

    monkeypatch.setattr(logging.getLogger("ddm"), "propagate", True)  # an in-process job may have cut it
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for step in (4, 8, 12):  # written as Lightning writes them: torch.save of the checkpoint dict
        torch.save({"global_step": step, "state_dict": {"w": torch.randn(64, 64)}}, ckpts / f"step-{step:08d}.ckpt")
    (ckpts / "last.ckpt").symlink_to("step-00000012.ckpt")
    for name in ("step-00000012.ckpt", "step-00000008.ckpt"):
        data = bytearray((ckpts / name).read_bytes())
        data[-200:] = bytes(200)  # the zip's central directory overwritten
        (ckpts / name).write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="ddm.train"):
        plan = plan_start(tmp_path / "run", resume=True, init_from=None, previous_stage=None, previous_export=None)
    assert plan.mode == "resume" and plan.checkpoint.name == "step-00000004.ckpt"
    assert "step-00000012.ckpt, step-00000008.ckpt cannot be read" in caplog.text
    (ckpts / "step-00000004.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="no readable checkpoint in .*step-00000012.ckpt.*step-00000004.ckpt"):
        plan_start(tmp_path / "run", resume=True, init_from=None, previous_stage=None, previous_export=None)


def test_expert_without_shards_is_a_clear_error(tmp_path, tiny_overrides, test_shards_dir):
    import shutil

    from train.expert import train_expert

    shards = tmp_path / "shards"
    shutil.copytree(test_shards_dir, shards)
    for tar in (shards / "expert_2").glob("train-*.tar"):
        tar.unlink()
    with pytest.raises(ValueError, match="expert 2 has no training shards"):
        train_expert(compose_config("expert", [*tiny_overrides, "expert=2", f"data.shards_dir={shards}"]))


def test_init_from_with_other_shapes_lists_the_first_mismatches(tmp_path, tiny_overrides):
    from ddm.export_files import save_export
    from ddm.models.mmdit import MMDiT
    from ddm.models.presets import get_expert_config
    from train.expert import train_expert

    other = MMDiT(get_expert_config("tiny-pixel", hidden_size=32, axes_dim=(4, 6, 6)))
    save_export(other.state_dict(), tmp_path / "other", {"kind": "expert", "config": other.config.to_dict()})
    with pytest.raises(ValueError, match=r"(?s)does not match the model; first mismatches:\n.*cond_in.weight: model "
                                         r"\(64, \d+\) vs file \(32, \d+\)"):
        train_expert(compose_config("expert", [*tiny_overrides, f"init_from={tmp_path / 'other'}"]))


def _fake_scontrol(folder: Path, log: Path, exit_code: int) -> dict[str, str]:
    folder.mkdir()
    (folder / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n"
                                     + ("echo 'scontrol: error: Job is not requeueable' >&2\n" if exit_code else "")
                                     + f"exit {exit_code}\n")
    (folder / "scontrol").chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}


def _start_and_signal(root: Path, tiny_overrides, sig, env, log: Path) -> int:
    """Start a long expert run under ``root``, send ``sig`` once the loop is live; the exit code."""
    args = [o for o in tiny_overrides if not o.startswith("paths.root_dir=")] + [
        f"paths.root_dir={root}", "expert=1", "recipe.stage2.max_steps=100000", "checkpoint.every_n_steps=2"]
    proc = start_cli("train.expert", args, log, env=env)
    wait_for(run_dir(root) / "checkpoints" / "step-00000002.ckpt", proc)  # the loop (and its handler) is live
    proc.send_signal(sig)
    return proc.wait(timeout=120)


@pytest.mark.slow
def test_usr1_checkpoints_and_exits_zero_only_when_requeued(tmp_path, tiny_overrides):
    """SLURM sends USR1 before the time limit: the job saves a checkpoint at the current step and asks SLURM
    to requeue it (a fake `scontrol` records the call). Exit 0 only when the requeue succeeded; when
    `scontrol requeue` fails the exit is non-zero, so `afterok` dependents stay held."""
    for name, scontrol_rc, expected in (("ok", 0, 0), ("failing", 1, 138)):
        root = tmp_path / name
        env = _fake_scontrol(tmp_path / f"bin-{name}", tmp_path / f"scontrol-{name}.log", scontrol_rc)
        log = tmp_path / f"{name}.log"
        assert _start_and_signal(root, tiny_overrides, signal.SIGUSR1, env, log) == expected, log.read_text()[-3000:]
        text = log.read_text()
        assert "received SIGUSR1" in text and "(SIGUSR1 received)" in text
        ckpt = torch.load(run_dir(root) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert 2 <= ckpt["global_step"] < 100000
        assert not (run_dir(root) / "export").exists()  # stopped early: no export of an unfinished stage
        assert (tmp_path / f"scontrol-{name}.log").read_text().split() == ["requeue", "4242"]
    assert "Job is not requeueable" in (tmp_path / "failing.log").read_text()


@pytest.mark.slow
def test_one_trainer_per_run_dir_sigterm_exits_143_and_metrics_survive_resumes(tmp_path, tiny_overrides):
    """A second trainer on a live run dir is refused naming the holder; SIGTERM checkpoints and exits 143
    (not 0: the stage is unfinished); two resumes later metrics.csv holds every step's row exactly once."""
    args = [*tiny_overrides, "expert=1", "recipe.stage2.max_steps=100000", "checkpoint.every_n_steps=2"]
    run = run_dir(tmp_path)
    proc = start_cli("train.expert", args, tmp_path / "first.log")
    wait_for(run / "checkpoints" / "step-00000002.ckpt", proc)
    second = run_cli("train.expert", args, check=False)
    assert second.returncode != 0
    assert re.search(rf"run dir .* is in use by host \S+, PID {proc.pid} ", second.stderr + second.stdout)
    assert proc.poll() is None  # the first is untouched
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, (tmp_path / "first.log").read_text()[-3000:]
    stopped = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert stopped >= 2 and not (run / "export").exists()

    for extra in (2, 4):  # two resumes, each a few steps further
        run_cli("train.expert", [*args[:-2], f"recipe.stage2.max_steps={stopped + extra}"])
    steps = [s for s, _ in column(metrics(run), "train/loss")]
    assert steps == list(range(stopped + 4))  # every step once, in order
    assert len(list((run / "logs" / "csv").glob("segment-*/metrics.csv"))) == 3
    assert read_export_metadata(run / "export")["step"] == stopped + 4


