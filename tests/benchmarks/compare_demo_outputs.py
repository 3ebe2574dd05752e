"""Are two demo output folders the same, bit for bit? ``python -m tests.benchmarks.compare_demo_outputs A B``

For a refactor that must not change behaviour (issue 17's acceptance): run ``launch/demo.sh`` (any profile) at
the commit before and after with the same seeds into two folders, then compare them here. Compared by content,
not by path-bearing metadata:

* shards (``prep/**.tar``): every member's bytes (member names included, tar headers' times left out; the
  output folder's own path, which a sample's ``.json`` records as its source, masked);
* exports (``runs/**/export/master.safetensors``): every tensor's bytes and dtype (the metadata records the
  absolute shard folder, which differs between the two output folders by construction);
* the clips, samples and evaluation videos (``raw/``, ``samples/``, ``eval/videos/``: ``.mp4``, ``.npy``, ``.png``):
  file bytes.

Prints one line per group (equal / which files differ) and exits 1 when anything differs.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tarfile
from pathlib import Path

import torch
from safetensors import safe_open


def _tar_digest(path: Path, root: Path) -> str:
    h = hashlib.sha256()
    with tarfile.open(path) as tar:
        for member in tar:
            h.update(member.name.encode())
            f = tar.extractfile(member)
            if f is not None:  # a sample's .json names its source clip by absolute path: the output folder masked
                h.update(f.read().replace(str(root.resolve()).encode(), b"<OUT>"))
    return h.hexdigest()


def _tensors_digest(path: Path, root: Path) -> str:
    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for key in sorted(f.keys()):
            t = f.get_tensor(key).contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype (bf16 too)
    return h.hexdigest()


def _file_digest(path: Path, root: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


GROUPS = {
    "shards": ("prep", "**/*.tar", _tar_digest),
    "exports": ("runs", "**/export/master.safetensors", _tensors_digest),
    "clips": ("raw", "**/*.mp4", _file_digest),
    "samples": ("samples", "**/*.mp4", _file_digest),
    "evaluation videos": ("eval/videos", "**/*.npy", _file_digest),
}


def compare(a: Path, b: Path) -> dict[str, tuple[int, list[str]]]:
    """``{group: (files compared, [relative paths that differ or exist on one side only])}``."""
    out = {}
    for group, (sub, pattern, digest) in GROUPS.items():
        fa = {p.relative_to(a / sub): p for p in sorted((a / sub).glob(pattern))} if (a / sub).is_dir() else {}
        fb = {p.relative_to(b / sub): p for p in sorted((b / sub).glob(pattern))} if (b / sub).is_dir() else {}
        diff = sorted(str(r) + (" (one side only)" if (r in fa) != (r in fb) else "")
                      for r in set(fa) | set(fb) if r not in fa or r not in fb or digest(fa[r], a) != digest(fb[r], b))
        out[group] = (len(set(fa) | set(fb)), diff)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    same = True
    for group, (n, diff) in compare(args.a, args.b).items():
        same &= not diff
        print(f"{group:18s} {n:4d} files: " + ("bit-identical" if not diff else f"{len(diff)} differ, e.g. {diff[:3]}"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
