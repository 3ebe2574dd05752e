"""Benchmark: two-level balanced k-means (data.cluster) against faiss k-means on 1,000,000 × 768.

    python tests/benchmarks/bench_cluster.py                      # full size, K = 3 and 8
    python tests/benchmarks/bench_cluster.py --n 100000 --ks 3    # a quick look

The data: unit-norm "embeddings" drawn around 64 random centres with Zipf-like cluster sizes (the
largest cluster ~10× the smallest, as real data is), generated once (seeded) into ``--workdir``.
Every method runs in its own subprocess: wall time of the clustering call only (data already in
RAM); memory = the subprocess's RSS after loading the data and its peak RSS during clustering (VmHWM,
reset after the load; it sees torch's and faiss's allocations, unlike tracemalloc). Methods, all
with the same iterations and threads:

- ``ours``: ``two_level_kmeans`` — fine k-means (1024 centres on a 65,536 subsample), balanced
  grouping into K, balanced assignment of all N (band: largest ≤ 1.1 × smallest).
- ``faiss-2level``: the same two-level structure with faiss (fine ``faiss.Kmeans`` on the same-size
  subsample, ``IndexFlatL2`` search of all N, weighted ``faiss.Kmeans`` of the fine centres into K);
  no balancing.
- ``faiss-flat``: plain ``faiss.Kmeans`` into K trained on all N, then a search of all N.
- ``faiss-flat-default``: the same with faiss's default subsampling (256 points per centre).

Prints a Markdown table (time, peak RSS, cluster sizes, largest/smallest) and writes JSON to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

METHODS = ("ours", "faiss-2level", "faiss-flat", "faiss-flat-default")


def make_data(path: Path, n: int, dim: int, centres: int = 64, seed: int = 0) -> None:
    """Clustered unit vectors: centre + noise (noise norm ≈ 1.2× the centre's), Zipf-like sizes."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((centres, dim)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    p = 1.0 / np.arange(1, centres + 1) ** 0.6
    labels = rng.choice(centres, size=n, p=p / p.sum())
    x = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.float32, shape=(n, dim))
    step = 65536
    for s in range(0, n, step):
        e = min(n, s + step)
        block = mu[labels[s:e]] + rng.standard_normal((e - s, dim)).astype(np.float32) * (1.2 / np.sqrt(dim))
        x[s:e] = block / np.linalg.norm(block, axis=1, keepdims=True)
    x.flush()
    del x
    os.replace(path.with_suffix(".tmp.npy"), path)


def memory_gib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in GiB.

    Not ``resource.getrusage(...).ru_maxrss``: on Linux it survives ``execve``, so every worker would
    report the parent's peak (the parent generated the 3 GiB data set).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # non-Linux fallback


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0), so the next peak is the clustering's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_method(method: str, x: np.ndarray, k: int, fine: int, subsample: int, iters: int, threads: int) -> dict:
    """Cluster ``x`` with one method; returns time, sizes and iterations."""
    n, dim = x.shape
    if method == "ours":
        import torch

        from data.cluster import two_level_kmeans

        torch.set_num_threads(threads)
        xt = torch.from_numpy(x)
        t0 = time.perf_counter()
        fit = two_level_kmeans(xt, k, fine_clusters=fine, subsample=subsample, iters=iters, seed=0)
        seconds = time.perf_counter() - t0
        labels = fit.labels.numpy()
    else:
        import faiss

        faiss.omp_set_num_threads(threads)
        t0 = time.perf_counter()
        if method == "faiss-2level":
            sub = x[np.sort(np.random.default_rng(0).choice(n, subsample, replace=False))]
            fine_km = faiss.Kmeans(dim, fine, niter=iters, seed=1, max_points_per_centroid=subsample // fine + 1)
            fine_km.train(sub)
            index = faiss.IndexFlatL2(dim)
            index.add(fine_km.centroids)
            fine_labels = index.search(x, 1)[1].ravel()
            weight = np.bincount(fine_labels, minlength=fine).astype(np.float32)
            coarse = faiss.Kmeans(dim, k, niter=100, seed=1, max_points_per_centroid=fine)
            coarse.train(fine_km.centroids, weights=weight)
            labels = coarse.index.search(fine_km.centroids, 1)[1].ravel()[fine_labels]
        else:
            per_centre = n // k + 1 if method == "faiss-flat" else 256
            km = faiss.Kmeans(dim, k, niter=iters, seed=1, max_points_per_centroid=per_centre)
            km.train(x)
            labels = km.index.search(x, 1)[1].ravel()
        seconds = time.perf_counter() - t0
    sizes = np.bincount(labels, minlength=k)
    return {"method": method, "k": k, "seconds": seconds, "sizes": sizes.tolist(),
            "ratio": float(sizes.max() / max(sizes.min(), 1))}


def worker(args: argparse.Namespace) -> None:
    if args.worker == "ours":  # libraries first: their import RSS is not the clustering's
        import data.cluster  # noqa: F401
    else:
        import faiss  # noqa: F401
    x = np.load(args.workdir / "x.npy")  # fully in RAM, like an embeddings file read for clustering
    data_gib = memory_gib("VmRSS")
    reset = reset_peak()
    result = run_method(args.worker, x, args.k, args.fine, args.subsample, args.iters, args.threads)
    result.update(peak_rss_gib=memory_gib("VmHWM"), rss_after_load_gib=data_gib, peak_is_clustering_only=reset,
                  load_avg=os.getloadavg()[0])
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 8])
    ap.add_argument("--fine", type=int, default=1024)
    ap.add_argument("--subsample", type=int, default=65536)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=2, help="runs per method; the best time is reported")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_cluster"))
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / "x.npy"
    if not data.exists() or np.load(data, mmap_mode="r").shape != (args.n, args.dim):
        print(f"generating {args.n:,} × {args.dim} clustered embeddings → {data}", flush=True)
        make_data(data, args.n, args.dim)
    runs: dict[tuple[int, str], list[dict]] = {}
    for k in args.ks:
        for rep in range(args.repeats):  # interleaved repeats: load drift on a shared machine hits every method
            for method in args.methods:
                cmd = [sys.executable, __file__, "--worker", method, "--k", str(k), "--n", str(args.n),
                       "--dim", str(args.dim), "--fine", str(args.fine), "--subsample", str(args.subsample),
                       "--iters", str(args.iters), "--threads", str(args.threads), "--workdir", str(args.workdir)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if out.returncode or not lines:
                    raise RuntimeError(f"{method} K={k} failed:\n{out.stderr[-3000:]}")
                r = json.loads(lines[-1][7:])
                runs.setdefault((k, method), []).append(r)
                print(f"K={k} run {rep + 1} {method:>18}: {r['seconds']:7.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB"
                      f" (data loaded: {r['rss_after_load_gib']:.2f}), ratio {r['ratio']:.3f}, "
                      f"load avg {r['load_avg']:.1f}", flush=True)
    print("\n| K | method | best time (s) | all runs (s) | peak RSS, GiB (+ over the loaded data) | sizes "
          "| largest/smallest |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for (k, method), rs in runs.items():
        best = min(rs, key=lambda r: r["seconds"])
        results.append({**best, "all_seconds": [r["seconds"] for r in rs]})
        times = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        sizes = ", ".join(map(str, best["sizes"]))
        extra = max(r["peak_rss_gib"] - r["rss_after_load_gib"] for r in rs)
        print(f"| {k} | {method} | {best['seconds']:.1f} | {times} | {max(r['peak_rss_gib'] for r in rs):.2f} "
              f"(+{extra:.2f}) | {sizes} | {best['ratio']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
