"""How well a model folder's router finds the true cluster, per t: ``python -m ddm.eval.routing FOLDER ... --shards DIR``.

For held-out shard samples (latents, pooled CLIP) of the experts a folder holds, the router sees
``x_t = (1 − t)·x0 + t·ε`` at a grid of t (one fixed noise per sample and t, the same for every folder) and
its arg-max (after the prior correction the sampler adds) is compared with the slot of the sample's true
cluster — the pool's slot → ``expert_id`` map (``pool.json``), so folders whose slots were renumbered by
``ddm.pool retire`` / ``add`` are scored against the same samples. Accuracy per t and overall, with the
binomial standard error; a text-blind router should sit at the prior near t = 1, a text-aware one need not.
It compares the two ways of retiring an expert (row dropped vs router retrained) and the two routers of
the study (text-blind vs text-aware).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddm.flow import interpolate
from ddm.model_folder import read_model_index, scan_model_folder
from ddm.pipeline import DDMPipeline
from ddm.pool_manifest import POOL_FILE, read_pool
from ddm.models.text import pad_tokens
from ddm.shards import decode_sample, iter_shard, list_shards

__all__ = ["load_samples", "routing_accuracy", "compare_folders", "main"]

T_GRID = (0.05, 0.15, 0.3, 0.5, 0.7, 0.85, 0.95, 0.99)


def load_samples(shards_dir: str | Path, expert_ids: Sequence[int], split: str = "val",
                 max_per_expert: int = 64) -> dict[str, Any]:
    """Up to ``max_per_expert`` samples of each expert id from ``shards_dir``'s ``split``: ``{"latent" (N, C, T,
    H, W) float32, "clip" (N, D), "t5" (N, L, D) zero-padded, "expert_id" (N,)}``. Raw-frame shards are refused
    (they need the VAE)."""
    latents, clips, t5s, ids = [], [], [], []
    for expert in expert_ids:
        n = 0
        for shard in list_shards(shards_dir, int(expert), split):
            for key, members in iter_shard(shard):
                sample = decode_sample(key, members)
                if "latent" not in sample:
                    raise ValueError(f"'{shard}' holds raw frames: routing accuracy needs latent shards")
                latents.append(torch.from_numpy(sample["latent"].astype(np.float32)))
                clips.append(torch.from_numpy(sample["clip"].astype(np.float32)))
                t5s.append(torch.from_numpy(sample["t5"].astype(np.float32)))
                ids.append(int(expert))
                n += 1
                if n >= max_per_expert:
                    break
            if n >= max_per_expert:
                break
        if n == 0:
            raise ValueError(f"expert {expert} has no {split} samples in '{shards_dir}'")
    return {"latent": torch.stack(latents), "clip": torch.stack(clips), "t5": pad_tokens(t5s)[0],
            "expert_id": torch.tensor(ids)}


def _slots(folder: Path) -> list[Any]:
    """The training ``expert_id`` of each slot: pool.json's map, else 1..K."""
    if (folder / POOL_FILE).is_file():
        return [e["expert_id"] for e in read_pool(folder)["experts"]]
    return list(range(1, len(scan_model_folder(folder, read_model_index(folder)).experts) + 1))


@torch.no_grad()
def routing_accuracy(router: torch.nn.Module, samples: Mapping[str, torch.Tensor], slot_ids: Sequence[Any], *,
                     prior_correction: Sequence[float] | None = None, t_grid: Sequence[float] = T_GRID,
                     seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """Top-1 accuracy of ``router`` against each sample's slot (``slot_ids[j]`` is slot j's expert id) per t.

    Samples whose expert is not in ``slot_ids`` (a retired cluster) are left out and counted.
    """
    slot_of = {str(e): j for j, e in enumerate(slot_ids)}
    keep = torch.tensor([str(int(e)) in slot_of for e in samples["expert_id"]])
    x0, clip, t5 = samples["latent"][keep], samples["clip"][keep], samples["t5"][keep]
    target = torch.tensor([slot_of[str(int(e))] for e in samples["expert_id"][keep]])
    if len(target) == 0:
        raise ValueError("none of the samples belongs to an expert of this folder")
    uses_text = bool(getattr(getattr(router, "cfg", None), "reads_text", False))
    correction = torch.tensor(prior_correction or [0.0] * len(slot_ids), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for t_value in t_grid:
        noise = torch.randn(x0.shape, generator=gen)  # the same draws for every folder (same seed and order)
        hits = 0
        for start in range(0, len(x0), batch_size):
            sl = slice(start, start + batch_size)
            t = torch.full((len(x0[sl]),), float(t_value))
            cond = {"clip": clip[sl], "t5": t5[sl]} if uses_text else {}
            logits = router(interpolate(x0[sl], noise[sl], t), t, cond).float() + correction
            hits += int((logits.argmax(-1) == target[sl]).sum())
        acc = hits / len(target)
        rows.append({"t": float(t_value), "accuracy": acc, "se": math.sqrt(acc * (1 - acc) / len(target))})
    mean = sum(r["accuracy"] for r in rows) / len(rows)
    return {"per_t": rows, "mean_accuracy": mean, "n": int(len(target)), "left_out": int((~keep).sum()),
            "chance": float(np.bincount(target.numpy()).max() / len(target)), "uses_text": uses_text}


def compare_folders(folders: Sequence[str | Path], shards_dir: str | Path, *, split: str = "val",
                    max_per_expert: int = 64, seed: int = 0) -> dict[str, dict[str, Any]]:
    """:func:`routing_accuracy` of each folder's router on the same samples (every folder's experts)."""
    slots = {str(f): _slots(Path(f)) for f in folders}
    ids = sorted({int(e) for s in slots.values() for e in s})
    samples = load_samples(shards_dir, ids, split, max_per_expert)
    out = {}
    for folder in folders:
        pipe = DDMPipeline.from_pretrained(folder, load_text=False)
        if pipe.router is None:
            raise ValueError(f"'{folder}' has no router (a monolith)")
        out[str(folder)] = routing_accuracy(pipe.router.eval(), samples, slots[str(folder)],
                                            prior_correction=pipe.prior_correction, seed=seed)
    return out


def table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per folder: accuracy at every t, the mean, N and chance (the largest cluster's share)."""
    grid = [r["t"] for r in next(iter(results.values()))["per_t"]]
    lines = ["folder | " + " | ".join(f"t={t:g}" for t in grid) + " | mean | N | chance"]
    for folder, r in results.items():
        cells = " | ".join(f"{row['accuracy']:.2f}±{row['se']:.2f}" for row in r["per_t"])
        lines.append(f"{folder} | {cells} | {r['mean_accuracy']:.3f} | {r['n']} | {r['chance']:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the table (and write ``--out`` JSON)."""
    ap = argparse.ArgumentParser(prog="python -m ddm.eval.routing", description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--shards", required=True, type=Path, help="a shards dir holding every folder's clusters")
    ap.add_argument("--split", default="val")
    ap.add_argument("--samples", type=int, default=64, help="held-out samples per expert")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    try:
        results = compare_folders(args.folders, args.shards, split=args.split, max_per_expert=args.samples,
                                  seed=args.seed)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
