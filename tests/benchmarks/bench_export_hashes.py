"""Benchmark: what the per-tensor sha256 check costs when an export is loaded.

    python tests/benchmarks/bench_export_hashes.py                 # 512 MiB of float32 weights
    python tests/benchmarks/bench_export_hashes.py --mib 64        # a quick look

Writes one export (``ddm.export_files.save_export``, master.safetensors only) of ``--mib`` MiB in tensors
of 4 MiB, then, in one process and one run, times (best of ``--repeats``, file in the page cache):

- ``plain``: ``safetensors.torch.load_file`` (what loading cost before the check; on the CPU it maps the
  file lazily, so no byte is read yet);
- ``plain+read``: the same plus a copy of every tensor (what using the weights costs at least: moving
  them to a GPU or into a model reads every byte);
- ``verified``: ``ddm.export_files.load_export`` (the same read plus the sha256 of every tensor);
- ``hash``: ``ddm.export_files.tensor_hashes`` alone on the loaded tensors (hashing throughput).

Prints the times, hashing throughput in MB/s and the ratios verified / plain+read and verified / plain.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="export size in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from safetensors.torch import load_file

    from ddm.export_files import MASTER_FILE, load_export, save_export, tensor_hashes

    per = 1024 * 1024  # float32 elements per 4 MiB tensor
    sd = {f"block{i}.weight": torch.randn(per) for i in range(max(1, args.mib // 4))}
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        save_export(sd, folder, {"kind": "expert"}, sharded=False)
        plain = best_of(lambda: load_file(str(folder / MASTER_FILE)), args.repeats)
        read = best_of(lambda: {k: v.clone() for k, v in load_file(str(folder / MASTER_FILE)).items()},
                       args.repeats)
        verified = best_of(lambda: load_export(folder), args.repeats)
        loaded = load_file(str(folder / MASTER_FILE))
        hashing = best_of(lambda: tensor_hashes(loaded), args.repeats)
    print(f"export of {nbytes / 2**20:.0f} MiB ({len(sd)} tensors), best of {args.repeats}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"  plain load_file        {plain:8.3f} s")
    print(f"  plain load + read      {read:8.3f} s")
    print(f"  load_export (verified) {verified:8.3f} s")
    print(f"  sha256 of every tensor {hashing:8.3f} s  ({nbytes / hashing / 1e6:,.0f} MB/s)")
    print(f"  ratio verified / plain+read {verified / read:6.2f}x")
    print(f"  ratio verified / plain      {verified / plain:6.1f}x  (lazy mmap: no byte read)")


if __name__ == "__main__":
    main()
