"""``python -m data.prepare mode=extend input=NEW``: new clips join a prepared pool as expert K+1.

The point of a decentralized pool is that the existing experts never retrain and their data never changes.
So extending writes nothing into the prep folder it extends; it builds a new prep folder for the K+1 pool
beside it, ``<prep>/extend/expert_<K+1>/``::

    ingest/ embeddings.parquet     the new clips, ingested and embedded with the same embedder
    new_assignments.parquet        the clips that form expert K+1 (key, expert, distance)
    existing.parquet               the clips nearer an existing cluster (key, expert, distance): reported, not encoded
    assignments.parquet            the K+1 pool's assignments (the old ones byte-for-byte as rows, then the new)
    centroids.safetensors          the K+1 clustering: the old fine centres + the new cluster's own k-means centres
    new/shards/<stage>/            the new expert's shards as encoded
    shards/<stage>/                the K+1 pool: every old tar hard-linked (else copied) unchanged, the new
                                   expert's tars, one merged shards.parquet and the old encode_plan.json
    extend.json                    what was decided and why (counts, threshold, rule, source hashes)

**The rule** (``extend.rule``): ``distance`` (default) puts a new clip into expert K+1 when its distance to the
existing clustering (:func:`data.cluster.assign_new`: nearest fine centre plus the expert price) exceeds
``extend.threshold`` — by default the ``extend.quantile`` (0.99) quantile of the existing clips' own
distances, i.e. farther than 99 % of the data the experts were trained on; nearer clips belong to an existing
cluster and wait for that expert's next data refresh (listed in ``existing.parquet``). ``declared`` puts every
new clip into expert K+1 (the site says it is a new domain). New keys get the prefix ``x<K+1>-`` so they never
collide with the old ones.

Then ``python -m train.expert expert=K+1 num_experts=K+1 paths.data_dir=<that folder>`` trains the new expert,
``python -m train.router num_experts=K+1 paths.data_dir=<that folder>`` the K+1-way router, and
``python -m ddm.pool add`` assembles the folder. Run once per stage (``encode.stage=stage3`` reuses the decision).
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from data.cluster import CENTROIDS_FORMAT, MIN_POINTS_PER_FINE, assign_new, kmeans_fit
from data.embed import embed, load_embeddings
from data.encode import PLAN_NAME, encode, shards_dir_for
from data.geometry import read_shard_geometry
from data.ingest import ingest
from ddm.files import atomic_path, atomic_write, file_sha256, link_or_copy, write_parquet_atomic
from ddm.shards import available_experts, expert_dirname, index_path, read_index, write_index

log = logging.getLogger("data.extend")

RULES = ("distance", "declared")
EXTEND_FILE = "extend.json"
GEOMETRY_FIELDS = ("height", "width", "num_frames", "fps", "latent_shape", "frames_shape", "vae", "t5_dim",
                   "clip_dim")


def extension_dir(prep: str | Path, new_expert: int) -> Path:
    """Where the K+1 pool of ``prep`` is built."""
    return Path(prep) / "extend" / expert_dirname(new_expert)


def pool_size(prep: Path, stage: str) -> int:
    """K: the experts of ``prep``'s shards of ``stage`` (they must be 1..K) and of its clustering."""
    shards = shards_dir_for(prep, stage)
    experts = available_experts(shards)
    if experts != list(range(1, len(experts) + 1)) or not experts:
        raise ValueError(f"'{shards}' holds experts {experts}, not 1..K: only a complete pool can be extended")
    clustered = int(load_file(str(prep / "centroids.safetensors"))["fine_expert"].max())
    if clustered != len(experts):
        raise ValueError(f"'{prep / 'centroids.safetensors'}' clusters into {clustered} experts but '{shards}' "
                         f"holds {len(experts)}")
    return len(experts)


def decide(new_distances: np.ndarray, old_distances: np.ndarray, rule: str, threshold: float | None,
           quantile: float) -> tuple[np.ndarray, float | None]:
    """``(is_new (N,) bool, threshold used)`` by the rule of the module docstring."""
    if rule not in RULES:
        raise ValueError(f"extend.rule must be one of {RULES}, got {rule!r}")
    if rule == "declared":
        return np.ones(len(new_distances), dtype=bool), None
    if threshold is None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"extend.quantile must be in (0, 1], got {quantile}")
        threshold = float(np.quantile(old_distances, quantile))
    return new_distances > threshold, float(threshold)


def _prefixed_manifest(src: Path, dst: Path, prefix: str) -> Path:
    table = pq.read_table(src)
    keys = [prefix + k for k in table.column("key").to_pylist()]
    table = table.set_column(table.column_names.index("key"), "key", pa.array(keys, pa.string()))
    return write_parquet_atomic(table, dst)


def _extended_centroids(prep: Path, x_new: torch.Tensor, new_expert: int, fine_clusters: int, seed: int,
                        out: Path) -> Path:
    """The old clustering plus the new cluster's own fine centres (k-means on its clips), expert ``new_expert``."""
    old = load_file(str(prep / "centroids.safetensors"))
    k = max(1, min(fine_clusters, len(x_new) // MIN_POINTS_PER_FINE))  # the cap cluster() uses too
    fit = kmeans_fit(x_new, k, seed=seed, balanced=False, progress=False)
    fine = fit.centroids.float().cpu()
    tensors = {"fine_centroids": torch.cat([old["fine_centroids"], fine]).contiguous(),
               "fine_expert": torch.cat([old["fine_expert"], torch.full((len(fine),), new_expert,
                                                                        dtype=old["fine_expert"].dtype)]),
               "coarse_centroids": torch.cat([old["coarse_centroids"], x_new.mean(0, keepdim=True).float()]),
               "expert_prices": torch.cat([old["expert_prices"], torch.zeros(1, dtype=old["expert_prices"].dtype)])}
    meta = {"format": CENTROIDS_FORMAT, "num_experts": json.dumps(new_expert),
            "extended_from": str((prep / "centroids.safetensors").resolve())}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return out


def _check_same_geometry(old_dir: Path, new_dir: Path) -> None:
    old, new = read_shard_geometry(old_dir), read_shard_geometry(new_dir)
    diff = [(f, getattr(old, f), getattr(new, f)) for f in GEOMETRY_FIELDS if getattr(old, f) != getattr(new, f)]
    if diff:
        raise ValueError("the new expert's shards do not match the pool's: " + "; ".join(
            f"{f} {n} vs {o} in '{old_dir}'" for f, o, n in diff) + " (use the pool's recipe, VAE and text encoders)")


def _merge_pool_shards(old_dir: Path, new_dir: Path, out_dir: Path) -> int:
    """``out_dir`` = every old tar (linked) + the new expert's tars + one index; returns the new samples."""
    old_rows, new_rows = read_index(old_dir).to_pylist(), read_index(new_dir).to_pylist()
    for rows, src in ((old_rows, old_dir), (new_rows, new_dir)):
        for shard in sorted({r["shard"] for r in rows}):
            link_or_copy(src / shard, out_dir / shard)  # the old tars stay exactly as they were
    shutil.copy2(old_dir / PLAN_NAME, out_dir / PLAN_NAME)  # the pool's geometry record (checked equal above)
    write_index(out_dir, old_rows + new_rows)
    return len(new_rows)


def extend(cfg: Any, *, embedder: Mapping[str, Any], text: Mapping[str, str], vae: Mapping[str, Any] | None,
           progress: bool = True) -> dict[str, Any]:
    """Build the K+1 pool of ``cfg.paths.data_dir`` from ``cfg.input`` (module docstring); returns extend.json."""
    prep = Path(cfg.paths.data_dir)
    stage = str(cfg.encode.stage)
    for need in ("centroids.safetensors", "assignments.parquet"):
        if not (prep / need).is_file():
            raise FileNotFoundError(f"'{prep / need}' not found: extend a prep folder that data.prepare clustered")
    k = pool_size(prep, stage)
    new_id = k + 1
    work = extension_dir(prep, new_id)
    log.info("[extend] %s: %d experts; new clips from %s → expert %d in %s", prep, k, cfg.input, new_id, work)
    ingest(cfg.input, work / "ingest", min_frames=cfg.ingest.min_frames, min_size=cfg.ingest.min_size,
           max_aspect=cfg.ingest.max_aspect, workers=cfg.ingest.workers, progress=progress)
    manifest = _prefixed_manifest(work / "ingest" / "manifest.parquet", work / "new_manifest.parquet", f"x{new_id}-")
    embed(manifest, work, embedder=dict(embedder), frames=cfg.embed.frames, batch_size=cfg.embed.batch_size,
          device=cfg.device, progress=progress)
    keys, x_new = load_embeddings(work / "embeddings.parquet")
    nearest, dist = assign_new(x_new, prep / "centroids.safetensors")
    old = pq.read_table(prep / "assignments.parquet")
    is_new, threshold = decide(dist.numpy(), old.column("distance").to_numpy(), str(cfg.extend.rule),
                               cfg.extend.threshold, float(cfg.extend.quantile))
    if not is_new.any():
        raise ValueError(f"none of the {len(keys)} new clips is farther than {threshold:.4g} from the existing "
                         f"clusters (they belong to experts {sorted(set(nearest.tolist()))}); nothing forms expert "
                         f"{new_id}. Lower extend.threshold, or set extend.rule=declared if they are a new domain")
    pick = np.flatnonzero(is_new)
    rest = np.flatnonzero(~is_new)
    new_table = pa.table({"key": pa.array([keys[i] for i in pick], pa.string()),
                          "expert": pa.array(np.full(len(pick), new_id), pa.int64()),
                          "distance": pa.array(dist.numpy()[pick], pa.float32())})
    write_parquet_atomic(new_table, work / "new_assignments.parquet")
    write_parquet_atomic(pa.table({"key": pa.array([keys[i] for i in rest], pa.string()),
                                   "expert": pa.array(nearest.numpy()[rest], pa.int64()),
                                   "distance": pa.array(dist.numpy()[rest], pa.float32())}), work / "existing.parquet")
    write_parquet_atomic(pa.concat_tables([old.select(["key", "expert", "distance"]).cast(new_table.schema),
                                           new_table]), work / "assignments.parquet")
    _extended_centroids(prep, x_new[torch.as_tensor(pick)], new_id, int(cfg.extend.fine_clusters),
                        int(cfg.cluster.seed), work / "centroids.safetensors")
    e = cfg.encode
    encode(manifest, work / "new_assignments.parquet", work / "new", stage=stage, resolution=e.resolution,
           num_frames=e.num_frames, fps=e.fps, vae=vae, text=text, val_fraction=e.val_fraction,
           samples_per_shard=e.samples_per_shard, image_mode=e.image_mode, batch_size=e.batch_size,
           device=cfg.device, progress=progress)
    old_shards, new_shards = shards_dir_for(prep, stage), shards_dir_for(work / "new", stage)
    _check_same_geometry(old_shards, new_shards)
    pool_shards = shards_dir_for(work, stage)
    encoded = _merge_pool_shards(old_shards, new_shards, pool_shards)
    record = {"new_expert": new_id, "experts_before": k, "input": str(cfg.input), "rule": str(cfg.extend.rule),
              "threshold": threshold, "quantile": float(cfg.extend.quantile), "new_clips": len(keys),
              "to_new_expert": len(pick), "to_existing": {str(j): int((nearest.numpy()[rest] == j).sum())
                                                         for j in range(1, k + 1)},
              "encoded": encoded, "source_prep": str(prep.resolve()),
              "source_centroids_sha256": file_sha256(prep / "centroids.safetensors"),
              "source_index_sha256": {stage: file_sha256(index_path(old_shards))},
              "shards": {stage: str(pool_shards)}}
    previous = json.loads((work / EXTEND_FILE).read_text()) if (work / EXTEND_FILE).is_file() else {}
    for field in ("source_index_sha256", "shards"):
        record[field] = {**previous.get(field, {}), **record[field]}
    atomic_write(work / EXTEND_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
    log.info("[extend] %d of %d new clips form expert %d (threshold %s); %d belong to existing experts %s",
             len(pick), len(keys), new_id, "declared" if threshold is None else f"{threshold:.4g}", len(rest),
             record["to_existing"])
    log.info("[extend] next: python -m train.expert expert=%d num_experts=%d paths.data_dir=%s; then "
             "python -m train.router num_experts=%d paths.data_dir=%s; then python -m ddm.pool add", new_id,
             new_id, work, new_id, work)
    return record
