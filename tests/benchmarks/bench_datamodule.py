"""DataModule benchmark: shard loading speed against in-memory iteration and a tiny expert's training step.

Run: ``python tests/benchmarks/bench_datamodule.py [--samples 4096] [--batch 8] [--workers 0 2]``. Prints a
Markdown report (figures recorded in docs/bench/data.md). Three rates, in samples/s:

* the ShardDataModule over latent shards shaped like the tiny recipe's stage 2 (PixelVAE latents
  (12, 3, 16, 16) float16, T5 (L, 32) float16 with L in 8..24, CLIP (32,)), 64 samples per shard, K = 3;
* the same tensors iterated from memory (random picks + the DataModule's own collate): the ceiling;
* a tiny expert's consumption: MMDiT ``tiny-pixel`` forward + backward + AdamW at the same batch.

The goal is a loader at least 3x faster than the step it feeds.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data.datamodule import ShardDataModule, collate
from ddm.shards import encode_sample, shard_relpath, write_index, write_shard

LATENT = (12, 3, 16, 16)
TEXT_DIM = 32


def write_bench_shards(root: Path, samples: int, per_shard: int = 64, experts: int = 3) -> list[dict]:
    """Random latent shards under ``root``; returns the decoded samples (for the in-memory baseline)."""
    rng = np.random.default_rng(0)
    memory, rows = [], []
    per_expert = samples // experts
    for expert in range(1, experts + 1):
        for index, start in enumerate(range(0, per_expert, per_shard)):
            rel = shard_relpath(expert, "train", index)
            encoded = []
            for position in range(min(per_shard, per_expert - start)):
                key = f"e{expert}_{start + position:06d}"
                latent = rng.standard_normal(LATENT).astype(np.float16)
                t5 = rng.standard_normal((int(rng.integers(8, 25)), TEXT_DIM)).astype(np.float16)
                clip = rng.standard_normal(TEXT_DIM).astype(np.float32)
                meta = {"key": key, "expert": expert, "split": "train", "caption": f"clip {key}", "fps": 8.0,
                        "num_frames": 9, "height": 16, "width": 16, "source": "bench"}
                encoded.append(encode_sample(key, latent=latent, t5=t5, clip=clip, meta=meta))
                memory.append({"key": key, "latent": latent, "t5": t5, "clip": clip, "caption": meta["caption"],
                               "expert": expert})
                rows.append({"key": key, "expert": expert, "split": "train", "shard": rel, "position": position})
            write_shard(root / rel, encoded)
    write_index(root, rows)
    return memory


def loader_rate(root: Path, samples: int, batch: int, workers: int) -> float:
    """Samples/s of one full epoch of the DataModule (including worker start-up)."""
    dm = ShardDataModule(root, "all", batch_size=batch, num_workers=workers, samples_per_epoch=samples,
                         rank=0, world_size=1)
    start = time.perf_counter()
    n = sum(len(b["key"]) for b in dm.train_dataloader())
    return n / (time.perf_counter() - start)


def memory_rate(memory: list[dict], samples: int, batch: int) -> float:
    """Samples/s of random picks from preloaded samples, collated exactly as the DataModule does."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(samples // batch):
        collate([memory[i] for i in rng.integers(len(memory), size=batch)], "latent", None)
    return (samples // batch * batch) / (time.perf_counter() - start)


def step_rate(batch: int, steps: int, text_len: int = 16) -> float:
    """Samples/s a tiny-pixel expert consumes: median forward + backward + AdamW step."""
    from ddm.models.mmdit import MMDiT
    from ddm.models.presets import get_expert_config

    cfg = get_expert_config("tiny-pixel")
    torch.manual_seed(0)
    model = MMDiT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, *LATENT)
    cond = {"t5": torch.randn(batch, text_len, cfg.context_in_dim), "clip": torch.randn(batch, cfg.vec_in_dim)}
    if cfg.cond_embed:
        cond["i2v"] = torch.zeros(batch, LATENT[0] + 1, *LATENT[1:])
    times = []
    for step in range(steps + 3):
        start = time.perf_counter()
        loss = (model(x, torch.rand(batch), cond) - torch.randn_like(x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 3:
            times.append(time.perf_counter() - start)
    return batch / sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4096, help="samples per measured epoch (and written to shards)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to time")
    ap.add_argument("--steps", type=int, default=20, help="timed expert steps (after 3 warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the expert step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "shards"
        memory = write_bench_shards(root, args.samples)
        size_mb = sum(p.stat().st_size for p in root.rglob("*.tar")) / 2**20
        loaders = {w: loader_rate(root, args.samples, args.batch, w) for w in args.workers}
    mem = memory_rate(memory, args.samples, args.batch)
    step = step_rate(args.batch, args.steps)
    print(f"## DataModule throughput ({platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"torch thread(s) for the step, batch {args.batch}, {args.samples} samples in {size_mb:.1f} MiB of shards)\n")
    print("| source | samples/s | x the tiny-pixel step |")
    print("|---|---:|---:|")
    for w, rate in loaders.items():
        print(f"| ShardDataModule, num_workers={w} | {rate:,.0f} | {rate / step:.1f} |")
    print(f"| same tensors from memory (+ collate) | {mem:,.0f} | {mem / step:.1f} |")
    print(f"| tiny-pixel expert step (fwd+bwd+AdamW) | {step:,.0f} | 1.0 |")


if __name__ == "__main__":
    main()
