"""Shard reading benchmark: ``ddm.shards.iter_shard`` + ``decode_sample`` against the ``tarfile`` + ``np.load``
reading they replaced, on the same shards, in one run (interleaved, best of N, so a noisy machine affects
both alike).

Run: ``python -m tests.benchmarks.bench_shard_read [--samples 2048] [--repeats 5]`` (from the repository root). Prints samples/s of each
and their ratio (figures in docs/bench/data.md). Shards are shaped like the tiny recipe's stage 2 (the
benchmark of ``bench_datamodule.py``).
"""
from __future__ import annotations

import argparse
import io
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from ddm.shards import decode_sample, iter_shard
from tests.benchmarks.bench_datamodule import write_bench_shards


def reference_read(path: Path) -> int:
    """The previous reader: tarfile in stream mode, members grouped by key, .npy through np.load."""
    key, members, n = None, {}, 0

    def decode(members):
        return {k: np.load(io.BytesIO(v), allow_pickle=False) for k, v in members.items() if k.endswith(".npy")}

    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            if not info.isreg():
                continue
            name_key, _, suffix = info.name.partition(".")
            if name_key != key:
                if key is not None:
                    decode(members)
                    n += 1
                key, members = name_key, {}
            members[suffix] = tar.extractfile(info).read()
    if key is not None:
        decode(members)
        n += 1
    return n


def current_read(path: Path) -> int:
    return sum(1 for key, members in iter_shard(path) if decode_sample(key, members))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_bench_shards(root, args.samples)
        tars = sorted(root.rglob("*.tar"))
        best = {"tarfile + np.load (before)": float("inf"), "iter_shard + decode_sample (now)": float("inf")}
        readers = dict(zip(best, (reference_read, current_read)))
        for _ in range(args.repeats):
            for name, read in readers.items():
                t0 = time.perf_counter()
                n = sum(read(p) for p in tars)
                best[name] = min(best[name], time.perf_counter() - t0)
                assert n == args.samples // 3 * 3, n
    print(f"Shard reading, {n} samples in {len(tars)} tars, best of {args.repeats} (interleaved); "
          f"{platform.machine()}, {platform.python_version()}")
    print("\n| reader | samples/s |\n|---|---:|")
    for name, sec in best.items():
        print(f"| {name} | {n / sec:,.0f} |")
    before, now = best.values()
    print(f"\nspeed-up: {before / now:.2f}x")


if __name__ == "__main__":
    main()
