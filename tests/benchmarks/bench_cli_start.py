"""Start-up of a CLI process in the test suite: a fresh interpreter vs a fork of the warm server
(``tests/fixtures/forked_cli.py``), interleaved, best and median of N.

    python -m tests.benchmarks.bench_cli_start [--repeats 5] [--module train.expert_module]

The module is run as ``__main__`` and does nothing but import what a training job imports (torch, Lightning
and, through it, torchmetrics' eager imports), so the times are the start-up each of the suite's CLI runs pays
before its own work.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from tests.fixtures import forked_cli


def timed(fn) -> float:
    start = time.perf_counter()
    proc = fn()
    if proc.returncode != 0:
        raise RuntimeError(f"the run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--module", default="train.expert_module", help="the module each process runs as __main__")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDM_TEST_FORK_CLI": "1"}
    os.environ["OMP_NUM_THREADS"] = "1"  # the fork server inherits this process's environment
    forked_cli.run(args.module, [], env, 300)  # starts the server (its preload is paid once per test worker)
    fresh, forked = [], []
    for _ in range(args.repeats):  # interleaved: both see the same machine load
        fresh.append(timed(lambda: subprocess.run([sys.executable, "-m", args.module], capture_output=True,
                                                  text=True, env=env, timeout=300)))
        forked.append(timed(lambda: forked_cli.run(args.module, [], env, 300)))
    print(f"{args.module} as __main__, {args.repeats} runs each (seconds, wall)")
    print(f"  fresh interpreter: best {min(fresh):.2f}  median {statistics.median(fresh):.2f}")
    print(f"  forked (warm):     best {min(forked):.2f}  median {statistics.median(forked):.2f}")
    print(f"  fresh / forked: {min(fresh) / min(forked):.1f}x (best), "
          f"{statistics.median(fresh) / statistics.median(forked):.1f}x (median)")


if __name__ == "__main__":
    main()
