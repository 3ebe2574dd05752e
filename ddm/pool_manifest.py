"""``pool.json``: the provenance and hashes of a model folder's expert pool, and checking a folder against it.

``pool.json`` sits beside ``model_index.json``; ``ddm.assemble`` writes it when it assembles a folder, and the
pool commands (:mod:`ddm.pool`) write it for the folders they make. Per expert slot (1..K, the router's output
k-1) it records the training ``expert_id`` the slot holds, the preset, config, prediction target and parameter
count, the ``centroids_hash`` and, per stage, the step, training FLOPs (when the export records them), the data
manifest hash (the sha256 of the shard index) and the sha256 of every shard file of the expert's cluster
(``expert_<id>/*.tar`` under the stage's ``geometry.shards_dir``, relative to it, when that folder was
reachable); then the sha256 of every file of the expert's export in the folder. The router gets the same: K,
text-aware or not, the shards of every cluster, its files. File hashes are ``ddm.files.file_sha256``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ddm.export_files import MASTER_FILE, SHARD_DIR
from ddm.files import atomic_write, file_sha256
from ddm.export_metadata import ExportMetadata
from ddm.interop import read_checkpoint_metadata
from ddm.model_folder import FolderLayout, ModelIndex, read_model_index, scan_model_folder, stage_order
from ddm.shards import INDEX_NAME, available_experts, expert_dirname

POOL_FILE = "pool.json"
POOL_FORMAT = "ddm-pool-v1"

# file → sha256, keyed by what identifies the bytes on disk; filled by every hash this process computes, so
# shards shared by the experts and the router, and hard-linked copies, are read once per manifest
_HASHES: dict[tuple[int, int, int, int], str] = {}


# --- hashing ----------------------------------------------------------------------------------------------------
def _stat_key(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def hash_files(paths: Sequence[Path], *, fresh: bool = False) -> list[str]:
    """sha256 of each file (``file_sha256``), on several threads (hashlib releases the GIL). ``fresh`` reads
    every byte again (``verify``); otherwise a file this process hashed before, unchanged, is not re-read."""
    def one(path: Path) -> str:
        key = _stat_key(path)
        if fresh or key not in _HASHES:
            _HASHES[key] = file_sha256(path)
        return _HASHES[key]

    workers = min(8, os.cpu_count() or 1, max(1, len(paths)))
    if workers == 1:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths))


def _files_under(root: Path, rels: Iterable[str]) -> list[str]:
    """Every file under the folders ``rels`` of ``root``, as sorted paths relative to ``root``."""
    found = {str(p.relative_to(root)) for rel in rels for p in (root / rel).rglob("*") if p.is_file()}
    return sorted(found)


def _hash_rel(root: Path, rels: Sequence[str], fresh: bool = False) -> dict[str, str]:
    return dict(zip(rels, hash_files([root / r for r in rels], fresh=fresh)))


# --- what an export records -------------------------------------------------------------------------------------
def shards_dir_of(meta: Mapping[str, Any]) -> str | None:
    """The shard folder the export's training read (:attr:`ddm.export_metadata.ExportMetadata.shards_dir`)."""
    return ExportMetadata.from_dict(meta).shards_dir


def cluster_shards(shards_dir: Path, expert_id: int | str | None) -> list[str]:
    """The shard tars of one cluster (``expert_<id>/*.tar``), or of every cluster for ``all``/None (the
    monolith, the router), relative to ``shards_dir``; temp files of unfinished writes are left out."""
    ids = available_experts(shards_dir) if expert_id in (None, "all") else [int(expert_id)]
    return sorted(str(p.relative_to(shards_dir)) for k in ids for p in (shards_dir / expert_dirname(k)).glob("*.tar")
                  if not p.name.startswith("."))


def param_count(checkpoint: Path) -> int | None:
    """Parameters of a checkpoint from its safetensors headers alone (no tensor is read); None if unknown."""
    files = [checkpoint / MASTER_FILE] if (checkpoint / MASTER_FILE).is_file() else \
        sorted((checkpoint / SHARD_DIR).glob("*.safetensors")) or sorted(checkpoint.glob("*.safetensors"))
    total = 0
    for file in files:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                total += int(torch.Size(entry["shape"]).numel())
    return total or None


def _stage_record(root: Path, path: Path, meta: Mapping[str, Any], expert_id: int | str | None,
                  carried: Mapping[str, Any] | None) -> dict[str, Any]:
    """One stage of an expert or router; ``carried``: that stage's record in the pool this folder derives from,
    whose shard hashes say what the model was trained on (re-reading the shards today cannot: they may have
    changed or moved since)."""
    shards_dir = shards_dir_of(meta)
    record: dict[str, Any] = {
        "path": str(path.relative_to(root)), "step": meta.get("step"),
        "train_flops": meta.get("train_flops"),  # written by train.job.fit since this release
        "manifest_hash": meta.get("manifest_hash") or None, "shards_dir": shards_dir, "shards": None}
    if carried is not None:
        record.update(shards_dir=carried.get("shards_dir"), shards=carried.get("shards"))
    elif shards_dir and Path(shards_dir).is_dir():
        record["shards"] = _hash_rel(Path(shards_dir), cluster_shards(Path(shards_dir), expert_id))
    return record


def _stage_key(stage: str | None, meta: Mapping[str, Any]) -> str:
    return str(stage) if stage is not None else str(meta.get("stage") or "default")


def _is_monolith(index: ModelIndex, layout: FolderLayout) -> bool:
    return bool(index.extra.get("monolith")) or (len(layout.experts) == 1 and not layout.routers)


def _expert_dir(root: Path, stages: Mapping[str, Path]) -> str:
    """The expert's own folder (``expert3``, ``experts/3``): its stage folders' parent, or the checkpoint
    folder itself when the expert folder holds its checkpoint flat."""
    dirs = {p if p.parent == root or p.parent.name.lower() == "experts" else p.parent for p in stages.values()}
    return os.path.commonpath([str(d.relative_to(root)) for d in dirs])


def build_pool_manifest(folder: str | Path, index: ModelIndex | None = None, *,
                        expert_ids: Sequence[int | str] | None = None, history: Sequence[Mapping[str, Any]] = (),
                        retired: Sequence[Mapping[str, Any]] = (), carry: Mapping[str, Any] | None = None
                        ) -> dict[str, Any]:
    """The ``pool.json`` content of a model folder, read from its exports' metadata (module docstring).

    ``expert_ids``: the training id each slot holds (default: the slot number, or ``all`` for a monolith);
    an export whose ``expert_id`` says otherwise is a ValueError naming it (a misplaced expert).
    ``history``: the operations that made the folder; ``retired``: experts retired from the router.
    ``carry``: ``{"experts": [the source pool's entry of each slot], "router": its router entry}`` of the pool
    this folder derives from: their shard records are kept instead of hashing the shards again.
    """
    root = Path(folder)
    index = index or read_model_index(root)
    layout = scan_model_folder(root, index)
    monolith = _is_monolith(index, layout)
    carried_experts = list((carry or {}).get("experts") or [None] * len(layout.experts))
    experts = []
    for slot, stages in layout.experts.items():
        metas = {stage: read_checkpoint_metadata(path) for stage, path in stages.items()}
        want = expert_ids[slot - 1] if expert_ids is not None else ("all" if monolith else slot)
        for stage, meta in metas.items():
            got = meta.get("expert_id")
            if got is not None and str(got) != str(want) and not (monolith and str(got) == "all"):
                raise ValueError(f"'{stages[stage]}' holds the export of expert_id {got} but sits in slot {slot}, "
                                 f"which should hold expert {want}: a misplaced expert export")
        latest = sorted(metas, key=stage_order)[-1]
        config = metas[latest].get("config") or {}
        expert_dir = _expert_dir(root, stages)
        carried = (carried_experts[slot - 1] or {}).get("stages") or {}
        experts.append({
            "slot": slot, "folder": expert_dir, "expert_id": want, "preset": config.get("preset"),
            "params": param_count(stages[latest]), "config": config,
            "prediction": metas[latest].get("prediction") or "velocity",  # heterogeneous pools
            "centroids_hash": metas[latest].get("centroids_hash") or None,
            "stages": {s: _stage_record(root, stages[s], m, want, carried.get(s)) for s, m in metas.items()},
            "files": _hash_rel(root, _files_under(root, [expert_dir]))})
    router = None
    if layout.routers:
        metas = {_stage_key(s, m): (p, m) for s, p in layout.routers.items() for m in [read_checkpoint_metadata(p)]}
        path, last = metas[sorted(metas, key=stage_order)[-1]]
        config = last.get("config") or {}
        carried = ((carry or {}).get("router") or {}).get("stages") or {}
        router = {
            "num_experts": int(config.get("num_experts") or last.get("num_experts") or 0),
            # exports older than "uses_text" predate t5_dim too: pooled CLIP was their only text input
            "uses_text": bool(last.get("uses_text", config.get("text_dim") is not None)),
            "preset": config.get("preset"), "params": param_count(path),
            "centroids_hash": last.get("centroids_hash") or None,
            "stages": {s: _stage_record(root, p, m, None, carried.get(s)) for s, (p, m) in metas.items()},
            "files": _hash_rel(root, _files_under(root, [str(p.relative_to(root)) for p, _ in metas.values()])),
            "retired": [dict(r) for r in retired]}
    return {"format": POOL_FORMAT, "num_experts": len(experts), "monolith": monolith, "experts": experts,
            "router": router, "history": [dict(h) for h in history]}


def _stamp(operation: Mapping[str, Any]) -> dict[str, Any]:
    return {**operation, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_pool_manifest(folder: str | Path, index: ModelIndex | None = None, *, source: str | Path | None = None,
                        operation: Mapping[str, Any] | None = None, **kw: Any) -> Path:
    """Build and write ``folder/pool.json`` atomically (:func:`build_pool_manifest`'s ``kw``). ``source``: a
    folder of the same experts whose ``pool.json`` this one derives from (its slot → ``expert_id`` map,
    shard records, retired experts and history carry over); ``operation``: the history entry of what made
    this folder (a time stamp is added). Returns the path."""
    previous = read_pool(source) if source is not None and (Path(source) / POOL_FILE).is_file() else None
    history = list(kw.pop("history", None) or (previous or {}).get("history") or [])
    if previous is not None:
        kw.setdefault("expert_ids", [e["expert_id"] for e in previous["experts"]])
        kw.setdefault("retired", (previous.get("router") or {}).get("retired") or ())
        kw.setdefault("carry", {"experts": previous["experts"], "router": previous.get("router")})
    if operation is not None:
        history.append(_stamp(operation))
    manifest = build_pool_manifest(folder, index, history=history, **kw)
    text = json.dumps(manifest, indent=2) + "\n"
    return atomic_write(Path(folder) / POOL_FILE, lambda tmp: tmp.write_text(text))


def read_pool(folder: str | Path) -> dict[str, Any]:
    """Parse ``folder/pool.json``; a FileNotFoundError says how to make one."""
    path = Path(folder) / POOL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"'{folder}' has no {POOL_FILE} (export it with python -m ddm.assemble, or record "
                                f"one for this folder with python -m ddm.pool init {folder})")
    try:
        pool = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(pool, dict) or pool.get("format") != POOL_FORMAT:
        raise ValueError(f"{path} is not a {POOL_FORMAT} manifest")
    return pool


# --- list -------------------------------------------------------------------------------------------------------
def _human(n: int | None) -> str:
    if not n:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _steps(stages: Mapping[str, Any]) -> str:
    return " ".join(f"{s}:{r.get('step')}" for s, r in stages.items())


def _data(stages: Mapping[str, Any]) -> str:
    hashes = {s: (r.get("manifest_hash") or "?")[:12] for s, r in stages.items()}
    return next(iter(hashes.values())) if len(set(hashes.values())) == 1 else \
        " ".join(f"{s}:{h}" for s, h in hashes.items())


def pool_table(pool: Mapping[str, Any]) -> str:
    """The ``list`` table: one row per expert slot, then the router's line."""
    rows = [("slot", "expert_id", "preset", "params", "target", "steps", "data")]
    rows += [(str(e["slot"]), str(e["expert_id"]), str(e.get("preset")), _human(e.get("params")),
              str(e.get("prediction") or "velocity"), _steps(e["stages"]), _data(e["stages"]))
             for e in pool["experts"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    router = pool.get("router")
    if router is None:
        lines.append("router: none (a monolith)" if pool.get("monolith") else "router: none")
    else:
        retired = ", ".join(f"expert_id {r['expert_id']}" for r in router.get("retired") or [])
        lines.append(f"router: K={router['num_experts']}, text-aware: {'yes' if router.get('uses_text') else 'no'}, "
                     f"preset {router.get('preset')}, params {_human(router.get('params'))}, steps "
                     f"{_steps(router['stages'])}, data {_data(router['stages'])}"
                     + (f", retired: {retired}" if retired else ""))
    return "\n".join(lines)


# --- verify -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
    """What ``verify`` found: ``problems`` (each a sentence naming the file or slot), ``notes`` (what could
    not be checked), and counts of what was checked."""

    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    files: int = 0
    shards: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.problems


def _check_files(root: Path, owner: str, recorded: Mapping[str, str], folders: Iterable[str], report: Report) -> None:
    present = set(_files_under(root, folders))
    for rel in sorted(set(recorded) - present):
        report.problems.append(f"{owner}: '{rel}' is recorded in {POOL_FILE} but missing from the folder")
    for rel in sorted(present - set(recorded)):
        report.problems.append(f"{owner}: '{rel}' is in the folder but not recorded in {POOL_FILE} (an added file)")
    rels = sorted(set(recorded) & present)
    for rel, digest in zip(rels, hash_files([root / r for r in rels], fresh=True)):
        report.files += 1
        if digest != recorded[rel]:
            report.problems.append(f"{owner}: '{rel}' does not match its recorded sha256 (recorded "
                                   f"{recorded[rel][:12]}…, now {digest[:12]}…): the file was changed or replaced")


def _shards_dir_for(record: Mapping[str, Any], overrides: Sequence[Path]) -> Path | None:
    """Where to find a stage's shards: of the ``--shards`` folders, the one whose index hashes to the recorded
    manifest (else the only one given); without ``--shards``, the recorded folder."""
    if overrides:
        want = record.get("manifest_hash")
        for d in overrides:
            if want and (d / INDEX_NAME).is_file() and hash_files([d / INDEX_NAME])[0] == want:
                return d
        return overrides[0] if len(overrides) == 1 else None
    return Path(record["shards_dir"]) if record.get("shards_dir") else None


def _check_shards(owner: str, stages: Mapping[str, Any], overrides: Sequence[Path], report: Report) -> None:
    for stage, record in stages.items():
        if record.get("shards") is None:
            report.notes.append(f"{owner} {stage}: no shard hashes recorded (its shards dir was not reachable at "
                                "export)")
            continue
        d = _shards_dir_for(record, overrides)
        if d is None or not d.is_dir():
            report.notes.append(f"{owner} {stage}: shards dir '{d or record.get('shards_dir')}' not reachable: "
                                "shards not checked")
            continue
        if record.get("manifest_hash") and (d / INDEX_NAME).is_file():
            if hash_files([d / INDEX_NAME], fresh=True)[0] != record["manifest_hash"]:
                report.problems.append(f"{owner} {stage}: the shard index '{d / INDEX_NAME}' does not hash to the "
                                       f"recorded manifest_hash {record['manifest_hash'][:12]}…")
        recorded = record["shards"]
        missing = sorted(r for r in recorded if not (d / r).is_file())
        report.problems += [f"{owner} {stage}: shard '{d / r}' is missing" for r in missing]
        rels = sorted(set(recorded) - set(missing))
        for rel, digest in zip(rels, hash_files([d / r for r in rels], fresh=True)):
            report.shards += 1
            if digest != recorded[rel]:
                report.problems.append(f"{owner} {stage}: shard '{d / rel}' does not match its recorded sha256: "
                                       "the training data changed since the expert was trained")


def verify_folder(folder: str | Path, shards: Sequence[str | Path] = (), check_shards: bool = True) -> Report:
    """Check a model folder against its ``pool.json``: every file hash, the expert ids in each slot's exports,
    the router's K, and (``check_shards``) each recorded shard where its folder is reachable."""
    root, report = Path(folder), Report()
    try:
        pool, index = read_pool(root), read_model_index(root)
        layout = scan_model_folder(root, index)
    except (FileNotFoundError, ValueError) as err:
        report.problems.append(str(err))
        return report
    overrides = [Path(s) for s in shards]
    if len(pool["experts"]) != len(layout.experts):
        report.problems.append(f"{POOL_FILE} records {len(pool['experts'])} experts but the folder holds "
                               f"{len(layout.experts)}")
    for entry in pool["experts"]:
        slot, owner = int(entry["slot"]), f"expert slot {entry['slot']}"
        _check_files(root, owner, entry["files"], [entry["folder"]], report)
        for stage, path in layout.experts.get(slot, {}).items():
            got = read_checkpoint_metadata(path).get("expert_id")
            if got is not None and str(got) != str(entry["expert_id"]):
                report.problems.append(
                    f"{owner}: '{path.relative_to(root)}' holds the export of expert_id {got}, but {POOL_FILE} "
                    f"records slot {slot} as expert {entry['expert_id']} (a swapped or misplaced expert export)")
        if check_shards:
            _check_shards(owner, entry["stages"], overrides, report)
    router = pool.get("router")
    if router is not None:
        _check_files(root, "router", router["files"], [r["path"] for r in router["stages"].values()], report)
        if check_shards:
            _check_shards("router", router["stages"], overrides, report)
    elif layout.routers:
        report.problems.append(f"the folder holds a router but {POOL_FILE} records none")
    for stage, path in layout.routers.items():
        meta = read_checkpoint_metadata(path)
        for name, k in (("its config", (meta.get("config") or {}).get("num_experts")),
                        ("its metadata", meta.get("num_experts"))):
            if k is not None and int(k) != len(layout.experts):
                report.problems.append(f"router '{path.relative_to(root)}': {name} predicts {k} experts but the "
                                       f"folder holds {len(layout.experts)} (a router of the wrong K)")
    return report
