"""Context parallelism wired into ``python -m train.expert`` (``model.context_parallel``): the refusals before any
training, the dry run's tokens per rank, and a real 2-process CPU (gloo) FSDP2 run at cp=2 whose loss curve
equals the unsplit run's."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests.fixtures.train import compose_config, start_cli


def column(run: Path, name: str) -> dict[int, float]:
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r[name]) for r in csv.DictReader(f) if r.get(name)}


@pytest.mark.parametrize("overrides, match", [
    # Ulysses needs FSDP2 over the dp x cp mesh; DDP would silently train on sequence slices
    (["strategy=ddp", "trainer.devices=2", "model.context_parallel=2"], r"context_parallel=2 needs strategy=fsdp"),
    (["strategy=auto", "model.context_parallel=2"], r"context_parallel=2 needs strategy=fsdp.*strategy=auto"),
    # the tiny expert has 2 heads: cp=4 cannot split them (the valid sizes are named)
    (["strategy=fsdp", "trainer.devices=4", "model.context_parallel=4"],
     r"context_parallel=4 must divide the 2 attention heads and the world size 4.*valid sizes: \[1, 2\]"),
    # cp must divide the world size
    (["strategy=fsdp", "trainer.devices=3", "model.context_parallel=2"],
     r"context_parallel=2 must divide .* world size 3.*valid sizes: \[1\]"),
])
def test_context_parallel_is_refused_before_any_training(tmp_path, tiny_overrides, overrides, match):
    from train.expert import train_expert

    with pytest.raises(ValueError, match=match):
        train_expert(compose_config("expert", [*tiny_overrides, "expert=1", *overrides]))
    assert not list(tmp_path.glob("runs/**/*.ckpt"))


def test_build_strategy_makes_the_dp_by_cp_mesh_and_refuses_cp_elsewhere(tiny_overrides):
    from train.run import build_strategy

    cfg = compose_config("expert", [*tiny_overrides, "strategy=fsdp", "trainer.devices=4"])
    strategy = build_strategy(cfg, context_parallel=2)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 2)
    plain = build_strategy(cfg)
    assert (plain._data_parallel_size, plain._tensor_parallel_size) == (4, 1)
    with pytest.raises(ValueError, match="must divide the world size 4"):
        build_strategy(cfg, context_parallel=3)
    ddp = compose_config("expert", [*tiny_overrides, "strategy=ddp", "trainer.devices=4"])
    with pytest.raises(ValueError, match="needs strategy=fsdp, not strategy=ddp"):
        build_strategy(ddp, context_parallel=2)


def test_dry_run_prints_tokens_per_rank_and_the_data_parallel_batch(tmp_path, tiny_overrides, capsys):
    from train.expert import train_expert

    assert train_expert(compose_config("expert", [*tiny_overrides, "expert=1", "dry_run=true", "strategy=fsdp",
                                                  "trainer.devices=4", "model.context_parallel=2"])) == 0
    out = capsys.readouterr().out
    # tiny stage 2: latent (12, 3, 16, 16) in 1x2x2 patches = 3*8*8 = 192 image tokens (+ text)
    line = next(li for li in out.splitlines() if "tokens per sample" in li)
    text = int(line.split("+")[1].split()[0])
    assert "192 image" in line
    assert f"context parallel      2 ranks per sample (2 data-parallel groups); tokens per rank {96 + -(-text // 2)}" \
        in out, out
    assert "batch 4 per rank (8 global)" in out  # 4 ranks / cp 2 = 2 data-parallel groups x 4


@pytest.mark.slow
def test_cp2_on_two_processes_trains_the_same_loss_curve_as_one_process(tmp_path, tiny_overrides):
    """FSDP2 at dp=1 x cp=2 (2 gloo processes, each holding half of every sequence) against the unsplit run on
    one process: same data, same seed, same init, so the losses agree up to the float summation order."""
    base = [o for o in tiny_overrides if not o.startswith("paths.root_dir=")]  # one root per run below
    args = [*base, "expert=1", "strategy=fsdp", "recipe.stage2.max_steps=4", "recipe.stage2.lr=3e-3",
            "recipe.stage2.warmup_steps=0", "checkpoint.every_n_steps=2", "trainer.throughput_skip_steps=1"]
    # both runs at once (separate run roots and process groups): the wall time is the slower one's
    procs = {name: start_cli("train.expert", [*args, *extra, f"paths.root_dir={tmp_path / name}"],
                             tmp_path / f"{name}.log")
             for name, extra in (("cp2", ["trainer.devices=2", "model.context_parallel=2"]),
                                 ("cp1", ["trainer.devices=1"]))}
    try:
        for name, proc in procs.items():
            code = proc.wait(timeout=300)
            # (the model's cp input guard, on by default, stops the cp2 run if its 2 ranks read different
            # batches or draw different noise: both must read data-parallel rank 0 of 1)
            assert code == 0, f"{name} exited {code}:\n" + (tmp_path / f"{name}.log").read_text()[-6000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    split, whole = (tmp_path / name / "runs" / "tiny" / "expert1" / "stage2" for name in ("cp2", "cp1"))
    for name in ("train/loss", "train/grad_norm"):
        got, want = column(split, name), column(whole, name)
        assert sorted(got) == sorted(want) == [0, 1, 2, 3], (name, got, want)
        # fp32, only the summation order differs (attention over a head split, the cp gradient reduction):
        # measured agreement ~1e-7 relative. The gradient norm pins the reduction (sum over cp, mean over dp):
        # AdamW's step barely changes with a uniformly scaled gradient, so the loss alone would not.
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-6), (name, step, got, want)
    # throughput counts each sample once: 4 per step at dp=1 (not 4 x 2 ranks under cp=2)
    samples_s, step_s = column(split, "perf/samples_per_s"), column(split, "perf/step_time_s")
    assert samples_s and all(samples_s[k] * step_s[k] == pytest.approx(4.0, rel=1e-3) for k in samples_s), samples_s
    # a sharded (DCP) checkpoint was written over the dp x cp mesh, and the exported EMA weights agree
    assert (split / "checkpoints" / "step-00000004.ckpt" / ".metadata").exists()
    from ddm.export_files import load_export

    got, want = load_export(split / "export")[0], load_export(whole / "export")[0]
    assert got.keys() == want.keys()
    for key in want:  # per tensor, relative to its norm (measured: <= 3e-6; AdamW turns float noise in
        # near-zero gradients into ~1e-6 absolute weight differences, so no elementwise rtol)
        diff = (got[key].float() - want[key].float()).norm() / want[key].float().norm().clamp_min(1e-12)
        assert diff < 1e-4, (key, float(diff))
    loss = column(whole, "train/loss")
    assert loss[3] < 0.9 * loss[0], loss  # the steps did train (the comparison is not vacuous)


def test_the_ranks_of_a_cp_group_read_the_same_batches(test_shards_dir):
    from data.datamodule import ShardDataModule

    def keys(rank: int, cp: int, world: int = 4) -> list[list[str]]:
        dm = ShardDataModule(test_shards_dir, 1, batch_size=2, samples_per_epoch=6, rank=rank, world_size=world,
                             context_parallel=cp)
        return [list(b["key"]) for b in dm.train_dataloader()]

    # world 4 at cp 2: ranks 0, 1 are data-parallel rank 0 of 2; ranks 2, 3 are rank 1
    assert keys(0, 2) == keys(1, 2) == keys(0, 1, world=2)
    assert keys(2, 2) == keys(3, 2) == keys(1, 1, world=2)
    assert keys(0, 2) != keys(2, 2)  # different dp ranks read different batches
    with pytest.raises(ValueError, match="context_parallel=3 must divide the world size 4"):
        keys(0, 3)


# ---- the router (router_model.context_parallel): the same wiring as the expert's ---------------------------


def test_router_context_parallel_is_refused_without_fsdp_and_its_dry_run_prints_tokens_per_rank(
        tmp_path, tiny_overrides, capsys):
    from train.router import train_router

    with pytest.raises(ValueError, match=r"router_model.context_parallel=2 needs strategy=fsdp"):
        train_router(compose_config("router", [*tiny_overrides, "strategy=ddp", "trainer.devices=2",
                                               "router_model.context_parallel=2"]))
    with pytest.raises(ValueError, match=r"router_model.context_parallel=4 must divide the 2 attention heads"):
        train_router(compose_config("router", [*tiny_overrides, "strategy=fsdp", "trainer.devices=4",
                                               "router_model.context_parallel=4"]))
    assert train_router(compose_config("router", [*tiny_overrides, "dry_run=true", "strategy=fsdp",
                                                  "trainer.devices=4", "router_model.context_parallel=2"])) == 0
    out = capsys.readouterr().out
    # tiny stage 2: latent (12, 3, 16, 16) in the router's 1x4x4 patches = 3*4*4 = 48 + CLS = 49 tokens
    assert "tokens per sample 49; context parallel 2 ranks per sample (2 data-parallel groups); " \
           "tokens per rank 25" in out, out


@pytest.mark.slow
def test_router_cp2_on_two_processes_trains_the_same_loss_curve_as_one_process(tmp_path, tiny_overrides):
    """``python -m train.router`` under FSDP2 at dp=1 x cp=2 (2 gloo processes) against one process: the
    router's [CLS, patches] sequence is split, the losses and gradient norms agree to float summation order."""
    base = [o for o in tiny_overrides if not o.startswith("paths.root_dir=")]
    args = [*base, "strategy=fsdp", "recipe.router.max_steps=3", "recipe.router.warmup_steps=0",
            "recipe.router.val_every_n_steps=1000", "checkpoint.every_n_steps=3", "trainer.throughput_skip_steps=1"]
    procs = {name: start_cli("train.router", [*args, *extra, f"paths.root_dir={tmp_path / name}"],
                             tmp_path / f"{name}.log")
             for name, extra in (("cp2", ["trainer.devices=2", "router_model.context_parallel=2"]),
                                 ("cp1", ["trainer.devices=1"]))}
    try:
        for name, proc in procs.items():
            code = proc.wait(timeout=300)
            assert code == 0, f"{name} exited {code}:\n" + (tmp_path / f"{name}.log").read_text()[-6000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    split, whole = (tmp_path / name / "runs" / "tiny" / "router" / "stage2" for name in ("cp2", "cp1"))
    for name in ("train/loss", "train/grad_norm"):
        got, want = column(split, name), column(whole, name)
        assert sorted(got) == sorted(want) == [0, 1, 2], (name, got, want)
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-6), (name, step, got, want)
    assert (split / "export" / "master.safetensors").exists()
