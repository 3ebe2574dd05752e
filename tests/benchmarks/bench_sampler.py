"""Sampler benchmark: what grouped dispatch costs, with K = 3 tiny MM-DiT experts and the tiny router (CPU).

Run: ``python tests/benchmarks/bench_sampler.py [--batch 24] [--repeats 15] [--threads 1]``. Prints a
Markdown report (figures recorded in docs/bench/sampler.md). One "step" is one velocity evaluation (what an
Euler step costs); every configuration is timed once per round, round after round, and the median over the
rounds is reported, so load changes on a shared machine hit all configurations alike. The ratios use the
CPU time of the calling thread (``time.thread_time``; with one torch thread all compute runs there), which
time spent waiting for a core on a loaded machine does not inflate; wall-clock medians are printed too.

The router is the real tiny router; a fixed per-sample offset is added to its logits so that the batch
splits evenly over the experts (top-1: B/3 samples each; top-2: 2B/3 each) — a freshly initialised router
would send every sample to the same expert, the easy case. Compared:

- grouped top-1 step vs one expert on the whole batch (goal ≤ 1.05×; the router's own cost is included, and
  reported separately),
- grouped top-2 step vs two experts on the whole batch (goal ≤ 1.05 × 2),
- grouped top-1 minus the router vs calling the three experts directly on their thirds of the batch (what
  is left is the sampler's own bookkeeping: weights, gathers, scatter-adds),
- grouped top-1 vs naive top-1 (every expert on the whole batch, then mixed; ≈ 1/K expected),
- the same with classifier-free guidance (cond and uncond batched into one call per expert).
"""
from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from ddm.sampling_spec import Routing
from ddm.models.mmdit import MMDiT
from ddm.models.presets import get_expert_config
from ddm.models.router import Router, get_router_config
from ddm.sampler import routed_velocity, routing_weights

NUM_EXPERTS = 3


def build(batch: int, latent: tuple[int, int, int], text_len: int, seed: int = 0):
    """Three tiny experts, the tiny router with a balancing logit offset, and a batch (x, t, cond, null)."""
    torch.manual_seed(seed)
    cfg = get_expert_config("tiny")
    experts = [MMDiT(cfg).eval() for _ in range(NUM_EXPERTS)]
    router = Router(get_router_config("tiny", num_experts=NUM_EXPERTS)).eval()
    offset = 50.0 * torch.nn.functional.one_hot(torch.arange(batch) % NUM_EXPERTS, NUM_EXPERTS)
    second = 25.0 * torch.nn.functional.one_hot((torch.arange(batch) + 1) % NUM_EXPERTS, NUM_EXPERTS)

    def balanced_router(x, t, cond):
        return router(x, t, cond) + offset + second  # top-1: sample i → expert i mod 3; top-2: also i+1 mod 3

    x = torch.randn(batch, cfg.latent_channels, *latent)
    t = torch.full((batch,), 0.5)
    cond = {"t5": torch.randn(batch, text_len, cfg.context_in_dim), "clip": torch.randn(batch, cfg.vec_in_dim)}
    null = {"t5": torch.zeros(1, text_len, cfg.context_in_dim), "clip": torch.zeros(1, cfg.vec_in_dim)}
    return experts, router, balanced_router, x, t, cond, null


def naive(x, t, cond, experts, router, strategy: str, k: int = 2):
    """Every expert on the whole batch, mixed with the routing weights (the baseline grouped dispatch avoids)."""
    w = routing_weights(router(x, t, cond), strategy, len(experts), k=k)
    return sum(w[:, j].view(-1, 1, 1, 1, 1) * expert(x, t, cond) for j, expert in enumerate(experts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (after 2 warm-up rounds)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: tiny matmuls gain nothing from more; shared boxes contend)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    latent, text_len, batch = (3, 16, 16), 16, args.batch
    experts, router, routed, x, t, cond, null = build(batch, latent, text_len)
    both = {key: torch.cat([value, null[key].expand_as(value)]) for key, value in cond.items()}
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])
    thirds = [torch.arange(j, batch, NUM_EXPERTS) for j in range(NUM_EXPERTS)]  # the top-1 groups

    cases: dict[str, Callable[[], object]] = {
        "router": lambda: router(x, t, cond),
        "one expert": lambda: experts[0](x, t, cond),
        "two experts": lambda: (experts[0](x, t, cond), experts[1](x, t, cond)),
        "3 experts on B/3 each, direct": lambda: [
            experts[j](x[rows], t[rows], {key: v[rows] for key, v in cond.items()}) for j, rows in enumerate(thirds)],
        "grouped top-1": lambda: routed_velocity(x, t, cond, experts, routed, Routing("top1")),
        "grouped top-2": lambda: routed_velocity(x, t, cond, experts, routed, Routing("topk", k=2)),
        "naive top-1": lambda: naive(x, t, cond, experts, routed, "top1"),
        "one expert, CFG batch": lambda: experts[0](x2, t2, both),
        "grouped top-1, CFG": lambda: routed_velocity(x, t, cond, experts, routed, Routing("top1"), cfg_scale=7.5, uncond=null),
    }
    if args.threads != 1:
        print("note: with more than one thread the CPU-time ratios miss the other threads' work")
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    wall: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for round_ in tqdm(range(args.repeats + 2), desc="rounds"):
            for name, fn in cases.items():
                start_cpu, start_wall = time.thread_time(), time.perf_counter()
                fn()
                if round_ >= 2:
                    cpu[name].append(time.thread_time() - start_cpu)
                    wall[name].append(time.perf_counter() - start_wall)
    med = {name: sorted(v)[len(v) // 2] for name, v in cpu.items()}
    med_wall = {name: sorted(v)[len(v) // 2] for name, v in wall.items()}

    print(f"# Sampler benchmark\n\nmachine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU\n")
    print(f"K = {NUM_EXPERTS} tiny experts (`tiny` preset), tiny router; batch {batch}, latent C×T×H×W = "
          f"16×{'×'.join(map(str, latent))}, {text_len} text tokens; median of {args.repeats} rounds, no_grad.\n")
    print("| configuration | median CPU ms / step | median wall ms / step |")
    print("|---|---:|---:|")
    for name in cases:
        print(f"| {name} | {1000 * med[name]:.1f} | {1000 * med_wall[name]:.1f} |")
    r1 = med["grouped top-1"] / med["one expert"]
    r1_no_router = (med["grouped top-1"] - med["router"]) / med["one expert"]
    r2 = med["grouped top-2"] / med["two experts"]
    rn = med["grouped top-1"] / med["naive top-1"]
    rc = med["grouped top-1, CFG"] / med["one expert, CFG batch"]
    print("\n| ratio (CPU time) | measured | goal |")
    print("|---|---:|---:|")
    print(f"| grouped top-1 / one expert | {r1:.3f} | ≤ 1.05 |")
    print(f"| (grouped top-1 − router) / one expert | {r1_no_router:.3f} | ≤ 1.05 |")
    print(f"| (grouped top-1 − router) / 3 experts on B/3 each, direct | "
          f"{(med['grouped top-1'] - med['router']) / med['3 experts on B/3 each, direct']:.3f} | ≈ 1 |")
    print(f"| grouped top-2 / one expert | {med['grouped top-2'] / med['one expert']:.3f} | ≤ 2.10 |")
    print(f"| grouped top-2 / two experts | {r2:.3f} | ≤ 1.05 |")
    print(f"| grouped top-1 / naive top-1 | {rn:.3f} | ≈ 1/{NUM_EXPERTS} = {1 / NUM_EXPERTS:.3f} |")
    print(f"| grouped top-1 with CFG / one expert on the CFG batch | {rc:.3f} | ≤ 1.05 |")
    print(f"\nrouter / one expert: {med['router'] / med['one expert']:.3f}")


if __name__ == "__main__":
    main()
