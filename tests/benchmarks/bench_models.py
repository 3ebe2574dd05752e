"""Expert benchmark: tiny-preset training speed on this CPU, and the 11B expert's analytic budget.

Run: ``python tests/benchmarks/bench_models.py [--steps 20] [--threads N]``. Prints a Markdown report
(figures recorded in docs/bench/models.md). The 11B figures are closed-form (ddm.models.budget) and build
nothing; the tiny figures time real forward + backward + AdamW steps.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
from tqdm import tqdm

from ddm.models import budget
from ddm.models.mmdit import MMDiT
from ddm.models.presets import get_expert_config

TINY_PRESETS = ("tiny", "tiny-pixel", "tiny-flux")
GIB = 2**30


def bench_tiny(name: str, steps: int, batch: int, latent_shape: tuple[int, int, int], text_len: int) -> dict:
    """Median seconds per training step (forward + backward + AdamW) of a tiny preset; samples/s from it."""
    cfg = get_expert_config(name)
    torch.manual_seed(0)
    model = MMDiT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t_frames, h, w = latent_shape
    x = torch.randn(batch, cfg.latent_channels, t_frames, h, w)
    cond = {"t5": torch.randn(batch, text_len, cfg.context_in_dim), "clip": torch.randn(batch, cfg.vec_in_dim)}
    if cfg.guidance_embed:
        cond["guidance"] = torch.full((batch,), 3.5)
    if cfg.cond_embed:
        cond["i2v"] = torch.zeros(batch, cfg.latent_channels + 1, t_frames, h, w)
    target = torch.randn_like(x)
    times = []
    for step in tqdm(range(steps + 3), desc=f"{name} fwd+bwd", leave=False):
        start = time.perf_counter()
        loss = (model(x, torch.rand(batch), cond) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    n_img = t_frames * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    flops = 3 * budget.forward_flops(cfg, n_img, text_len)["total"] * batch
    return {"preset": name, "params": budget.count_parameters(cfg), "batch": batch,
            "tokens": n_img + text_len, "step_s": median, "samples_per_s": batch / median,
            "gflops_per_s": flops / median / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per tiny preset (after 3 warm-up)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: tiny matmuls gain nothing from more, and contend on shared boxes)")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"# Expert benchmark\n\nmachine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU\n")
    latent_shape, text_len = (5, 16, 16), 16  # 17 frames at 32² through the PixelVAE (spatial factor 2)
    print(f"## Tiny presets: training step (forward + backward + AdamW), batch {args.batch}, latent "
          f"T×H×W = {'×'.join(map(str, latent_shape))}, {text_len} text tokens, median of {args.steps} steps\n")
    print("| preset | params | tokens/sample | s/step | samples/s | achieved GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in TINY_PRESETS:
        r = bench_tiny(name, args.steps, args.batch, latent_shape, text_len)
        print(f"| {r['preset']} | {r['params']:,} | {r['tokens']} | {r['step_s']:.4f} | {r['samples_per_s']:.1f} | "
              f"{r['gflops_per_s']:.2f} |")

    cfg = get_expert_config("opensora-v2-11b")
    params = budget.count_parameters(cfg)
    print(f"\n## {cfg.preset}: {params:,} parameters (analytic, equal to a meta-device build)\n")
    print("| video | image tokens | text tokens | tokens/frame | training TFLOP/sample (3× fwd) | "
          "of which attention |")
    print("|---|---:|---:|---:|---:|---:|")
    for frames in (33, 129):
        for size in (256, 768):
            tokens = budget.tokens_per_sample(cfg, size, size, frames)
            fwd = budget.forward_flops(cfg, tokens["image_tokens"], tokens["text_tokens"])
            print(f"| {size}² × {frames} frames (T={tokens['latent_frames']}) | {tokens['image_tokens']:,} | "
                  f"{tokens['text_tokens']} | {tokens['tokens_per_frame']:,} | {3 * fwd['total'] / 1e12:,.1f} | "
                  f"{fwd['attention'] / fwd['total']:.0%} |")
    print()
    print("Model state per GPU (bf16 weights + bf16 grads + fp32 master + fp32 AdamW moments; "
          "activations excluded), GiB:\n")
    print("| strategy | 8 GPUs | 64 GPUs |")
    print("|---|---:|---:|")
    for strategy in ("ddp", "zero2", "zero3"):
        cells = [budget.memory_per_gpu(params, strategy, n)["total"] / GIB for n in (8, 64)]
        print(f"| {strategy} | {cells[0]:.1f} | {cells[1]:.1f} |")


if __name__ == "__main__":
    main()
