"""Scale benchmark (issue 11): FSDP2 on 2 CPU processes against one process, at the 11B expert's width.

Run: ``python tests/benchmarks/bench_scale.py [--depth 2 --single 3] [--step-depth 1 --step-single 1]``.
Prints a Markdown report (figures recorded in docs/bench/scale.md):

1. **Build**: peak RSS of one process building the "wide" expert (hidden 3072, 24 heads, 2 double + 3 single
   blocks, ≥ 1B parameters) and its fp32 EMA, against each rank of FSDP2 × 2 building it on ``meta``,
   sharding and initialising its shards (``ExpertModule``'s own path).
2. **Training step** (fp32 AdamW + EMA update; a shallower model by default so that one process fits this
   machine's RAM): median step time of FSDP2 × 2 over one process, and each process's peak RSS against the
   dry run's closed form (``ddm.models.budget.training_memory``) plus the process's RSS before the build.

Every measurement runs in fresh spawned processes so that peak RSS (the kernel's high-water mark) is its own.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddm.models.budget import count_parameters, training_memory
from ddm.models.mmdit import MMDiT
from ddm.models.presets import ExpertConfig, get_expert_config

GIB = 2**30
LATENT = (2, 8, 8)  # (T, H, W): 2·4·4 = 32 image tokens
TEXT = 8


def rss_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def batch(cfg: ExpertConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.latent_channels, *LATENT, generator=g)
    cond = {"t5": torch.randn(1, TEXT, cfg.context_in_dim, generator=g), "clip": torch.randn(1, cfg.vec_in_dim, generator=g),
            "i2v": torch.randn(1, cfg.latent_channels + 1, *LATENT, generator=g)}
    return x, torch.rand(1, generator=g), cond


def train_steps(model, ema, steps: int) -> list[float]:
    from train.ema import ema_update

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for step in range(steps):
        x, t, cond = batch(CFG[0], step)
        start = time.perf_counter()
        loss = (model(x, t, cond) - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, 0.999)
        times.append(time.perf_counter() - start)
    return times


CFG: list[ExpertConfig] = []


def _single(out: str, cfg_dict: dict, steps: int) -> None:
    from train.ema import make_ema_twin

    torch.set_num_threads(1)
    CFG.append(ExpertConfig.from_dict(cfg_dict))
    base = rss_now()
    torch.manual_seed(0)
    model = MMDiT(CFG[0])
    ema = make_ema_twin(model)
    result = {"base": base, "build": rss_peak()}
    if steps:
        result["times"] = train_steps(model, ema, steps)
    result["peak"] = rss_peak()
    torch.save(result, Path(out) / "single.pt")


def _rank(rank: int, world: int, port: int, out: str, cfg_dict: dict, steps: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from tests.test_scale_fsdp import expert_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    CFG.append(ExpertConfig.from_dict(cfg_dict))
    base = rss_now()
    module = expert_module(CFG[0])
    strategy = types.SimpleNamespace(device_mesh={"data_parallel": init_device_mesh("cpu", (world,))},
                                     root_device=torch.device("cpu"))
    torch.manual_seed(0)
    module._build_sharded(strategy)
    result = {"base": base, "build": rss_peak()}
    if steps:
        result["times"] = train_steps(module.model, module.ema_model, steps)
    result["peak"] = rss_peak()
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def measure(cfg: ExpertConfig, steps: int) -> tuple[dict, list[dict]]:
    from tests.test_scale_fsdp import free_port

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        proc = ctx.Process(target=_single, args=(tmp, cfg.to_dict(), steps))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"single-process run failed ({proc.exitcode})")
        single = torch.load(Path(tmp) / "single.pt")
        mp.start_processes(_rank, args=(2, free_port(), tmp, cfg.to_dict(), steps), nprocs=2, join=True,
                           start_method="spawn")
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(2)]
    return single, ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--single", type=int, default=3)
    parser.add_argument("--step-depth", type=int, default=1)
    parser.add_argument("--step-single", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    wide = dict(hidden_size=3072, num_heads=24, axes_dim=(16, 56, 56))
    build_cfg = get_expert_config("opensora-v2-11b", **wide, depth=args.depth, depth_single_blocks=args.single)
    step_cfg = get_expert_config("opensora-v2-11b", **wide, depth=args.step_depth, depth_single_blocks=args.step_single)
    print(f"# bench_scale — {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}\n")

    single, ranks = measure(build_cfg, steps=0)
    n = count_parameters(build_cfg)
    print(f"## Build: wide expert ({n / 1e9:.2f} B parameters, {args.depth} double + {args.single} single blocks, "
          "hidden 3072) + fp32 EMA\n")
    print("| process | RSS before build (GiB) | peak RSS after build (GiB) | peak / single |")
    print("|---|---|---|---|")
    print(f"| one process | {single['base'] / GIB:.2f} | {single['build'] / GIB:.2f} | 1.00 |")
    for r, res in enumerate(ranks):
        print(f"| FSDP2 rank {r} of 2 | {res['base'] / GIB:.2f} | {res['build'] / GIB:.2f} | "
              f"{res['build'] / single['build']:.2f} |")

    single, ranks = measure(step_cfg, steps=args.steps)
    n = count_parameters(step_cfg)
    image_tokens = (LATENT[0]) * (LATENT[1] // 2) * (LATENT[2] // 2)
    kw = dict(batch_size=1, image_tokens=image_tokens, text_tokens=TEXT, precision="32-true",
              activation_checkpointing=False)
    pred_single = training_memory(step_cfg, strategy="ddp", world_size=1, **kw)["total"]
    pred_rank = training_memory(step_cfg, strategy="fsdp", world_size=2, **kw)["total"]
    t_single = statistics.median(single["times"][1:])
    t_fsdp = max(statistics.median(r["times"][1:]) for r in ranks)
    print(f"\n## Training step: {n / 1e9:.2f} B parameters ({args.step_depth} double + {args.step_single} single "
          f"blocks), fp32 AdamW + EMA, batch 1 ({image_tokens} image + {TEXT} text tokens), median of steps 2..{args.steps}\n")
    print("| process | step (s) | peak RSS (GiB) | RSS before build (GiB) | dry-run prediction (GiB) | "
          "predicted + before / measured |")
    print("|---|---|---|---|---|---|")
    print(f"| one process | {t_single:.2f} | {single['peak'] / GIB:.2f} | {single['base'] / GIB:.2f} | "
          f"{pred_single / GIB:.2f} | {(pred_single + single['base']) / single['peak']:.2f} |")
    for r, res in enumerate(ranks):
        print(f"| FSDP2 rank {r} of 2 | {statistics.median(res['times'][1:]):.2f} | {res['peak'] / GIB:.2f} | "
              f"{res['base'] / GIB:.2f} | {pred_rank / GIB:.2f} | {(pred_rank + res['base']) / res['peak']:.2f} |")
    print(f"\nstep time FSDP2 × 2 / one process: {t_fsdp / t_single:.2f}")


if __name__ == "__main__":
    main()
