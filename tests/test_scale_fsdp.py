"""FSDP2 "meta build → shard → initialise" of the expert and its fp32 EMA (issue 11), on 2 gloo CPU processes.

* The sharded build, run through ``ExpertModule.configure_model``'s own path, holds exactly the weights a
  single-process build draws with the same seed (not only the same distribution), and the EMA equals them.
* A weights-only start (``init_from``) lands in the shards, and the sharded model's outputs equal the
  single-process model's with the same weights (fp32, ≤ 1e-5 relative).
* A real FSDP2 training run resumes at world size 2 and at world size 1 and its loss curve continues.
* (slow, RAM permitting) the "wide" expert — full 11B width 3072 / 24 heads, reduced depth, ≥ 1B
  parameters: each rank's peak RSS stays below 0.75 × a single process building the model + EMA.
"""
from __future__ import annotations

import csv
import os
import resource
import socket
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddm.models.mmdit import MMDiT
from ddm.models.presets import ExpertConfig, get_expert_config
from tests.fixtures.train import run_cli

TINY = dict(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=3)  # 3 single blocks: uneven shards too
WIDE = dict(hidden_size=3072, num_heads=24, axes_dim=(16, 56, 56), depth=2, depth_single_blocks=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expert_module(cfg: ExpertConfig):
    from train.expert_module import ExpertModule

    train = {"optim": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "warmup_steps": 0,
                       "schedule": "constant", "min_lr_ratio": 0.1, "grad_clip": 1.0, "ema_decay": 0.999,
                       "ema_warmup": False},
             "max_steps": 1, "max_nonfinite_steps": 1, "grad_clip_in_module": True, "flow": {}, "conditioning": {}}
    return ExpertModule(cfg.to_dict(), train, torch.zeros(1, cfg.context_in_dim), torch.zeros(cfg.vec_in_dim), {})


def inputs(cfg: ExpertConfig, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.latent_channels, 2, 8, 8, generator=g)
    cond = {"t5": torch.randn(2, 8, cfg.context_in_dim, generator=g), "clip": torch.randn(2, cfg.vec_in_dim, generator=g)}
    if cfg.cond_embed:
        cond["i2v"] = torch.randn(2, cfg.latent_channels + 1, 2, 8, 8, generator=g)
    return x, torch.rand(2, generator=g), cond


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _build(cfg: ExpertConfig, world: int, init_from: str | None):
    """ExpertModule.configure_model's FSDP2 path (meta → fully_shard → replay init [→ init_from])."""
    from torch.distributed.device_mesh import init_device_mesh

    module = expert_module(cfg)
    if init_from:
        module._init_state_dict = torch.load(init_from, weights_only=True)
    # Lightning's ModelParallelStrategy hands configure_model its mesh and device; nothing else is used.
    strategy = types.SimpleNamespace(device_mesh={"data_parallel": init_device_mesh("cpu", (world,))},
                                     root_device=torch.device("cpu"))
    torch.manual_seed(0)
    module._build_sharded(strategy)
    return module


def _sharded_worker(rank: int, world: int, port: int, out: str, cfg_dict: dict, init_from: str | None,
                    gather: bool) -> None:
    """One rank: the sharded build (and, with ``init_from``, a second one started from those weights)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = ExpertConfig.from_dict(cfg_dict)
    result = {"rank": rank}
    for tag, source in (("scratch", None), ("init", init_from)):
        if tag == "init" and not source:
            continue
        module = _build(cfg, world, source)
        result[f"{tag}_rss"] = peak_rss_bytes()
        result[f"{tag}_local_params"] = sum(p.to_local().numel() for p in module.model.parameters())
        if gather:
            model = {k: v.full_tensor() for k, v in module.model.state_dict().items()}
            ema = {k: v.full_tensor() for k, v in module.ema_model.state_dict().items()}
            if rank == 0:
                result[f"{tag}_model"], result[f"{tag}_ema"] = model, ema
        with torch.no_grad():
            result[f"{tag}_out"] = module.model(*inputs(cfg))
        del module
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_sharded(tmp_path: Path, cfg: ExpertConfig, world: int = 2, init_from: Path | None = None,
                gather: bool = True) -> list[dict]:
    mp.start_processes(_sharded_worker, args=(world, free_port(), str(tmp_path), cfg.to_dict(),
                                              str(init_from) if init_from else None, gather),
                       nprocs=world, join=True, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
def test_sharded_build_draws_the_single_process_weights_and_loads_init_from(tmp_path):
    cfg = get_expert_config("tiny", **TINY)
    torch.manual_seed(0)
    reference = MMDiT(cfg)  # the single-process build, same seed
    ref_sd = reference.state_dict()
    torch.manual_seed(5)  # other weights for the weights-only start (cond_in non-zero too)
    weights = {k: torch.randn_like(v) * 0.05 for k, v in ref_sd.items()}
    torch.save(weights, tmp_path / "init.pt")
    ranks = run_sharded(tmp_path, cfg, init_from=tmp_path / "init.pt")

    got, ema = ranks[0]["scratch_model"], ranks[0]["scratch_ema"]
    assert set(got) == set(ref_sd)
    for key, value in ref_sd.items():
        assert torch.equal(got[key], value), key  # same values, not only the same distribution
        assert ema[key].dtype == torch.float32 and torch.equal(ema[key], value.float()), key
    total = sum(p.numel() for p in reference.parameters())
    local = [r["scratch_local_params"] for r in ranks]
    assert sum(local) == total and max(local) < 0.6 * total  # each rank holds about half

    reference.load_state_dict(weights)
    with torch.no_grad():
        expected = reference(*inputs(cfg))
    for r in ranks:
        assert rel_err(r["init_out"], expected) <= 1e-5
    for key, value in weights.items():
        assert torch.equal(ranks[0]["init_model"][key], value) and torch.equal(ranks[0]["init_ema"][key], value)


def losses(run: Path) -> dict[int, float]:
    with open(run / "logs" / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.slow
def test_fsdp2_run_resumes_at_world_2_and_1_and_the_loss_curve_continues(tmp_path, tiny_overrides):
    args = [*tiny_overrides, "expert=1", "strategy=fsdp", "checkpoint.every_n_steps=4", "recipe.stage2.lr=3e-3",
            "recipe.stage2.warmup_steps=0", "recipe.stage2.batch_size=8"]
    run = tmp_path / "runs" / "tiny" / "expert1" / "stage2"
    run_cli("train.expert", [*args, "trainer.devices=2", "recipe.stage2.max_steps=12"])
    first = losses(run)  # metrics.csv is the merged history of every segment so far (train.metrics_log)
    again = run_cli("train.expert", [*args, "trainer.devices=2", "recipe.stage2.max_steps=16"])
    assert "mode=resume" in again.stdout and "step-00000012.ckpt" in again.stdout
    after2 = losses(run)
    single = run_cli("train.expert", [*args, "trainer.devices=1", "recipe.stage2.max_steps=20"])
    assert "mode=resume" in single.stdout and "step-00000016.ckpt" in single.stdout
    assert sorted(first) == list(range(12))
    assert sorted(after2) == list(range(16))
    after1 = losses(run)
    assert sorted(after1) == list(range(20))
    # the merged history keeps the earlier segments' rows unchanged; each segment adds only its own steps
    assert all(after1[s] == first[s] for s in range(12)) and all(after1[s] == after2[s] for s in range(12, 16))
    after2 = {s: after2[s] for s in range(12, 16)}
    after1 = {s: after1[s] for s in range(16, 20)}

    def mean(d: dict[int, float]) -> float:
        return sum(d.values()) / len(d)

    start = mean({s: first[s] for s in range(3)})
    before = mean({s: first[s] for s in range(8, 12)})
    # training had made progress, and neither resume falls back towards the initial loss
    assert before < 0.8 * start, (start, before)
    for after in (mean(after2), mean(after1)):
        assert after < before + 0.5 * (start - before), (start, before, mean(after2), mean(after1))

    # stage 3 starts weights-only from that export under FSDP2 x 2: the rows land in the shards
    proc = run_cli("train.expert", [*args, "trainer.devices=2", "stage=stage3", "recipe.stage3.max_steps=0",
                                       "recipe.stage3.resolution=16"])
    assert "mode=init" in proc.stdout
    from ddm.export_files import load_export, state_dict_sha256

    stage3, _ = load_export(run.parent / "stage3" / "export")
    assert state_dict_sha256(stage3) == state_dict_sha256(load_export(run / "export")[0])


def test_lazy_export_reads_what_load_export_reads(tmp_path):
    from ddm.export_files import load_export, save_export
    from train.sharding import LazyExport

    sd = MMDiT(get_expert_config("tiny")).state_dict()
    save_export(sd, tmp_path / "e", {"kind": "expert"}, max_shard_bytes=20_000)
    for path in (tmp_path / "e", tmp_path / "e" / "model", tmp_path / "e" / "master.safetensors"):
        lazy, (full, _) = LazyExport(path), load_export(path)
        assert sorted(lazy) == sorted(full) and len(lazy) == len(full)
        assert all(torch.equal(lazy[k], v) for k, v in full.items())
    with pytest.raises(FileNotFoundError, match="export not found"):
        LazyExport(tmp_path / "nothing")


def available_ram_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _single_build_worker(out: str, cfg_dict: dict) -> None:
    """The single-process reference: its peak RSS after building the model + EMA, then its outputs (the same
    process, so the test does not build a third 1B model of its own)."""
    from train.ema import make_ema_twin

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ExpertConfig.from_dict(cfg_dict)
    model = MMDiT(cfg)
    make_ema_twin(model)
    build_rss = peak_rss_bytes()
    with torch.no_grad():
        out_tensor = model(*inputs(cfg))
    torch.save({"build_rss": build_rss, "out": out_tensor}, Path(out) / "single.pt")


@pytest.mark.slow
def test_wide_expert_shards_without_a_full_copy_per_rank(tmp_path):
    """≥ 1B parameters at the 11B width: needs ~9 GB for the single-process reference + ~5 GB per rank."""
    cfg = get_expert_config("opensora-v2-11b", **WIDE)
    from ddm.models.budget import count_parameters

    params = count_parameters(cfg)
    assert params >= 1_000_000_000
    need = 1.4 * 8 * params  # the single build (model + EMA, fp32), then the two ranks (half each), one at a time
    if available_ram_bytes() < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB free RAM, {available_ram_bytes() / 2**30:.0f} GiB available")
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_single_build_worker, args=(str(tmp_path), cfg.to_dict()))
    proc.start()
    proc.join()
    assert proc.exitcode == 0
    single = torch.load(tmp_path / "single.pt")
    ranks = run_sharded(tmp_path, cfg, gather=False)
    for r in ranks:
        assert r["scratch_rss"] < 0.75 * single["build_rss"], (r["scratch_rss"] / 2**30, single["build_rss"] / 2**30)
    expected = single["out"]  # the single-process model, same seed (outputs computed after its RSS was read)
    for r in ranks:
        assert rel_err(r["scratch_out"], expected) <= 1e-5
