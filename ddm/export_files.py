"""Safetensors exports (one ``master.safetensors`` plus a sharded ``model/`` folder): write, read, verify, build.

An export folder, as the Paris 2.0 / Open-Sora 2.0 releases ship it (DESIGN §5.6)::

    <folder>/master.safetensors                        every tensor in one file
    <folder>/model/model-00001-of-0000N.safetensors    the same tensors split in shards
    <folder>/model/model.safetensors.index.json        {"metadata": {...}, "weight_map": {key: shard}}

Every safetensors header carries the export metadata (``format`` = ``ddm-export-v1``, ``kind``,
``config``, ``expert_id``, ``stage``, ``step``, ``manifest_hash``, ``centroids_hash``,
``train_config``, or any other JSON-able key), each value stored as a JSON-encoded string because
safetensors headers only hold strings. The index keeps the same metadata as plain JSON.

Every export also records ``tensor_sha256`` ({name: hex SHA-256 of the tensor's dtype, shape and bytes}) in
its metadata; :func:`load_export` recomputes them and refuses a file whose tensors changed since the export
was written, naming the file (exports without the key, written before it existed, load unchecked).

Every file is written atomically (:func:`ddm.files.atomic_path`), so a crash mid-write never replaces a good
file with a torn one. The shard index is written last: it is the
commit point of the sharded copy, and shards it no longer names are removed only after it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ddm.files import atomic_write
from ddm.models.weights import load_state_dict_strict
from ddm.models.gated_router import build_router, router_config_from_dict
from ddm.models.layouts import load_expert_state_dict
from ddm.models.presets import ExpertConfig

log = logging.getLogger(__name__)

EXPORT_FORMAT = "ddm-export-v1"
MASTER_FILE = "master.safetensors"
SHARD_DIR = "model"
INDEX_FILE = "model.safetensors.index.json"
HASHES_KEY = "tensor_sha256"  # metadata: {tensor name: tensor_sha256(tensor)}


# --------------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------------

def _encode_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Metadata for a safetensors header: every value JSON-encoded; ``format`` set to ddm-export-v1."""
    fmt = metadata.get("format", EXPORT_FORMAT)
    if fmt != EXPORT_FORMAT:
        raise ValueError(f"metadata 'format' must be '{EXPORT_FORMAT}' (or absent), got {fmt!r}")
    encoded = {}
    for key, value in {**metadata, "format": EXPORT_FORMAT}.items():
        if not isinstance(key, str):
            raise ValueError(f"metadata keys must be strings, got {key!r}")
        try:
            encoded[key] = json.dumps(value, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata['{key}'] is not JSON-serialisable: {e}") from None
    return encoded


def _decode_metadata(header: Mapping[str, str] | None) -> dict[str, Any]:
    """Inverse of :func:`_encode_metadata`; values that are not JSON (foreign files) stay strings."""
    decoded: dict[str, Any] = {}
    for key, value in (header or {}).items():
        try:
            decoded[key] = json.loads(value)
        except (TypeError, ValueError):
            decoded[key] = value
    return decoded


# --------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------

def _prepare_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; a tensor sharing storage with an earlier one is copied (safetensors
    refuses shared storage, and tied weights must keep both names for strict loading)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, str]] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state_dict['{key}'] is a {type(value).__name__}, not a tensor")
        t = value.detach().to("cpu").contiguous()
        storage = (t.untyped_storage().data_ptr(), str(t.device))
        if t.numel() and storage in seen:
            t = t.clone()
        elif t.numel():
            seen.add(storage)
        out[key] = t
    return out


def _split_shards(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split in key order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def save_export(state_dict: Mapping[str, torch.Tensor], folder: str | Path, metadata: Mapping[str, Any], *,
                max_shard_bytes: int = 2 * 1024**3, single_file: bool = True, sharded: bool = True) -> Path:
    """Write an export: ``folder/master.safetensors`` and/or ``folder/model/`` (shards + index), atomically.

    ``metadata`` is any JSON-able dict (``kind``, ``config``, ``expert_id``, ``stage``, ``step``,
    ``manifest_hash``, ``centroids_hash``, ``train_config`` ...); ``format`` is added. Tensors keep
    their dtype. Returns ``folder``.
    """
    if not (single_file or sharded):
        raise ValueError("save_export: at least one of single_file / sharded must be true")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = _prepare_tensors(state_dict)
    header = _encode_metadata({**metadata, HASHES_KEY: tensor_hashes(tensors)})
    if single_file:
        atomic_write(folder / MASTER_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=header))
        log.info("export: wrote %s (%d tensors)", folder / MASTER_FILE, len(tensors))
    if sharded:
        shard_dir = folder / SHARD_DIR
        groups = _split_shards(tensors, max_shard_bytes)
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        weight_map = {}
        for name, keys in zip(names, groups):
            part = {k: tensors[k] for k in keys}
            atomic_write(shard_dir / name, lambda tmp, part=part: save_file(part, str(tmp), metadata=header))
            weight_map.update({k: name for k in keys})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total, **_decode_metadata(header)}, "weight_map": weight_map}
        atomic_write(shard_dir / INDEX_FILE,
                     lambda tmp: tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n"))
        # the new index is in place: shards of an earlier export it does not name can go
        for stale in shard_dir.glob("model-*-of-*.safetensors"):
            if stale.name not in names:
                stale.unlink()
        log.info("export: wrote %s (%d shards)", shard_dir, len(names))
    return folder


# --------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------

def _resolve_export(path: str | Path) -> tuple[str, Path]:
    """("file", a .safetensors file) or ("sharded", an index.json) for a folder, file or model/ folder."""
    p = Path(path)
    if p.is_file():
        return ("sharded", p) if p.name.endswith(".index.json") else ("file", p)
    if p.is_dir():
        for kind, candidate in (("file", p / MASTER_FILE), ("sharded", p / SHARD_DIR / INDEX_FILE),
                                ("sharded", p / INDEX_FILE)):
            if candidate.is_file():
                return kind, candidate
        raise FileNotFoundError(f"'{p}' is not an export: it holds neither {MASTER_FILE} nor "
                                f"{SHARD_DIR}/{INDEX_FILE} (nor {INDEX_FILE})")
    raise FileNotFoundError(f"export not found: '{p}'")


def _read_index(index_path: Path) -> dict[str, Any]:
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_path} is not valid JSON: {e}") from None
    if not isinstance(index.get("weight_map"), dict) or not index["weight_map"]:
        raise ValueError(f"{index_path} has no 'weight_map'")
    missing = sorted({f for f in index["weight_map"].values() if not (index_path.parent / f).is_file()})
    if missing:
        raise FileNotFoundError(f"{index_path} names shard files that are missing: {missing}")
    return index


def _load_file(file: Path, device: str) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, with an error naming the file when it is not readable."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device=device)
    except Exception as err:  # SafetensorError, OSError, ...: the library's message does not name the file
        raise ValueError(f"'{file}' is not a readable safetensors file ({type(err).__name__}: {err}); it is "
                         "damaged or incomplete: export it again or restore it from a copy") from err


def _verify(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], file: Path) -> None:
    """Compare ``tensors`` with the metadata's recorded hashes (exports without them are not checked)."""
    recorded = meta.get(HASHES_KEY)
    if not isinstance(recorded, Mapping):
        return
    got = tensor_hashes(tensors)
    for key in tensors:
        want = recorded.get(key)
        if want is None:
            raise ValueError(f"'{file}': tensor '{key}' has no recorded sha256 in the export metadata; the file "
                             "was modified after the export was written")
        if got[key] != want:
            raise ValueError(f"'{file}': tensor '{key}' does not match its recorded sha256: the file was modified "
                             "or damaged after the export was written; export it again or restore it from a copy")


def _load_sharded(index_path: Path, device: str, meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    weight_map: dict[str, str] = _read_index(index_path)["weight_map"]
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = _load_file(index_path.parent / shard, device)
        listed = {k for k, f in weight_map.items() if f == shard}
        missing, extra = sorted(listed - set(tensors)), sorted(set(tensors) - listed)
        if missing or extra:
            raise ValueError(f"shard {index_path.parent / shard} does not match {index_path.name}: "
                             f"tensors missing {missing[:10]}, not in the index {extra[:10]}")
        _verify(tensors, meta, index_path.parent / shard)
        state_dict.update(tensors)
    return {k: state_dict[k] for k in sorted(weight_map)}  # sorted, as safetensors files are


def load_export(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``(state_dict, metadata)`` from an export folder (``master.safetensors`` preferred, else
    ``model/``), a ``.safetensors`` file, a ``model/`` folder or its index file.

    A sharded copy is validated against its index: a missing shard file, or a tensor missing from
    (or not listed for) its shard, raises. Every tensor is checked against the ``tensor_sha256`` recorded
    in the metadata; an unreadable file or a changed tensor raises a ValueError naming the file.
    """
    kind, file = _resolve_export(path)
    meta = read_export_metadata(file)
    if kind == "file":
        tensors = _load_file(file, "cpu")  # verified where it was read, then moved
        _verify(tensors, meta, file)
    else:
        tensors = _load_sharded(file, "cpu", meta)
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The export metadata (decoded JSON values) without reading any tensor."""
    from safetensors import safe_open

    kind, file = _resolve_export(path)
    if kind == "sharded":
        meta = dict(_read_index(file).get("metadata", {}))
        meta.pop("total_size", None)
        return meta
    try:
        with safe_open(str(file), framework="pt") as f:
            return _decode_metadata(f.metadata())
    except Exception as err:  # SafetensorError: a damaged header; its message does not name the file
        raise ValueError(f"'{file}' is not a readable safetensors file ({type(err).__name__}: {err}); it is "
                         "damaged or incomplete: export it again or restore it from a copy") from err


# --------------------------------------------------------------------------------------------------
# hashes
# --------------------------------------------------------------------------------------------------

def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex SHA-256 over one tensor's dtype, shape and raw bytes (the export's ``tensor_sha256`` entries)."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
    return h.hexdigest()


def tensor_hashes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{name: tensor_sha256(tensor)}`` for every tensor, hashed on several threads (hashlib releases the GIL
    on large buffers, so this scales with the cores: tests/benchmarks/bench_export_hashes.py)."""
    from concurrent.futures import ThreadPoolExecutor

    keys = list(state_dict)
    workers = min(8, os.cpu_count() or 1, max(1, len(keys)))
    if workers == 1:
        return {key: tensor_sha256(state_dict[key]) for key in keys}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(keys, pool.map(lambda key: tensor_sha256(state_dict[key]), keys)))


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 over (name, dtype, shape, raw bytes) of every tensor, in sorted name order.

    Equal hashes mean bit-identical weights, whatever the key order or the device they sit on.
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# model from an export
# --------------------------------------------------------------------------------------------------

def _common_float_dtype(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The one floating dtype of the stored weights, or float32 when they mix dtypes."""
    dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def build_model_from_export(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None
                            ) -> torch.nn.Module:
    """Build the exported model from its metadata (``kind`` = ``expert`` → ``MMDiT``, ``router`` →
    ``Router`` or ``GatedRouter``; ``config`` → their ``from_dict``) and load the weights strictly; returned in eval mode.

    The model is built on the meta device, so no random initialisation is paid for. ``dtype`` casts
    the weights (default: as stored). Expert weights go through
    ``ddm.models.layouts.load_expert_state_dict``, which names the layout converter when the weights
    are in the other (Flux / Open-Sora) layout than the config says.
    """
    state_dict, meta = load_export(path, device=device)
    kind, config = meta.get("kind"), meta.get("config")
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"'{path}' is not a {EXPORT_FORMAT} export (format={meta.get('format')!r})")
    if not isinstance(config, dict):
        raise ValueError(f"'{path}': export metadata has no model 'config'")
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    if kind == "router":
        with torch.device("meta"):
            model = build_router(router_config_from_dict(config))
        load_state_dict_strict(model, state_dict, f"'{path}'")
    elif kind == "expert":
        # imported here, not at the top: the router job writes exports with this module and must never
        # import the expert's code (tests/test_train_router.py)
        from ddm.models.mmdit import MMDiT

        with torch.device("meta"):
            model = MMDiT(ExpertConfig.from_dict(config))
        # the loader copies into existing tensors: give them real (uninitialised) memory, every one of
        # which the strict load then overwrites
        model = model.to(dtype=_common_float_dtype(state_dict)).to_empty(device=device)
        load_expert_state_dict(model, state_dict)
    else:
        raise ValueError(f"'{path}': unknown export kind {kind!r} (expected 'expert' or 'router')")
    return model.eval()
