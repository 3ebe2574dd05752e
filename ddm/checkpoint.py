"""Safetensors exports (one ``master.safetensors`` plus a sharded ``model/`` folder) and atomic writes.

An export folder, as the Paris 2.0 / Open-Sora 2.0 releases ship it (DESIGN §5.6)::

    <folder>/master.safetensors                        every tensor in one file
    <folder>/model/model-00001-of-0000N.safetensors    the same tensors split in shards
    <folder>/model/model.safetensors.index.json        {"metadata": {...}, "weight_map": {key: shard}}

Every safetensors header carries the export metadata (``format`` = ``ddm-export-v1``, ``kind``,
``config``, ``expert_id``, ``stage``, ``step``, ``manifest_hash``, ``centroids_hash``,
``train_config``, or any other JSON-able key), each value stored as a JSON-encoded string because
safetensors headers only hold strings. The index keeps the same metadata as plain JSON.

Every file is written atomically (temp file in the same folder, fsync, ``os.replace``), so a crash
mid-write never replaces a good file with a torn one. The shard index is written last: it is the
commit point of the sharded copy, and shards it no longer names are removed only after it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

EXPORT_FORMAT = "ddm-export-v1"
MASTER_FILE = "master.safetensors"
SHARD_DIR = "model"
INDEX_FILE = "model.safetensors.index.json"


# --------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    """Flush a directory entry (the rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``writer(tmp_path)``, then move it into place atomically.

    ``writer`` writes the whole file at the temporary path it is given (same folder, so the final
    ``os.replace`` is a rename on one file system). If ``writer`` raises, the temporary file is
    removed and an existing file at ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)``, atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
