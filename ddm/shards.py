"""Per-expert WebDataset shards: the sample format, atomic shard writing, the index, and reading.

The format is shared by data/ (which writes shards), train/ (which reads them) and ddm.evaluate (held-out
captions), so it lives in the bottom layer; ``data.shards`` re-exports it.

Layout (docs/architecture.md, "Shards")::

    <shards_dir> = <prep>/shards/<stage>/
        expert_<k>/<split>-NNNNNN.tar     one WebDataset tar per shard, split in {train, val}
        shards.parquet                     index: key, expert, split, shard (path relative to shards_dir), position,
                                           sha256 (the sample's content hash, :func:`sample_digest`)

A sample is the tar members ``<key>.latent.npy`` (float16 (C, T, H, W)) or ``<key>.frames.npy`` (uint8
(F, H, W, 3), raw-frames mode), ``<key>.t5.npy`` (float16 (L_true, D)), ``<key>.clip.npy`` (float32 (D,)),
``<key>.txt`` and ``<key>.json``. Keys carry no dots: WebDataset splits a member name at its first dot.

Every tar is written under a temporary name and renamed only once complete, so a tar under a final
name is never torn by a crash of the writer. Damage from outside (a flipped byte on disk, a bad copy) is
caught by the content hash the index records per sample: ``python -m data.audit --deep`` re-hashes every
sample, and the DataModule checks each sample it reads.
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import webdataset as wds

from ddm.files import atomic_path, write_parquet_atomic

SPLITS = ("train", "val")
INDEX_NAME = "shards.parquet"
META_FIELDS = ("key", "expert", "split", "caption", "fps", "num_frames", "height", "width", "source")
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("expert", pa.int64()), ("split", pa.string()),
                          ("shard", pa.string()), ("position", pa.int64()), ("sha256", pa.string())])
HASH_COLUMN = "sha256"  # null in indexes written before content hashes existed (their samples are not verified)

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_EXPERT_DIR_RE = re.compile(r"^expert_(\d+)$")


class ShardReadError(RuntimeError):
    """A tar shard could not be read to its end (truncated or corrupt archive)."""


# ---------------------------------------------------------------------------------------------------
# names and paths


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid sample key (letters, digits, ``_`` and ``-``), else raise ValueError."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"invalid sample key {key!r}: keys must be non-empty and use only letters, digits, '_' "
                         "and '-' (WebDataset splits member names at the first dot)")
    return key


def check_split(split: str) -> str:
    """Return ``split`` if it is one of :data:`SPLITS`, else raise ValueError."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


def expert_dirname(expert: int) -> str:
    """``expert_<k>``: the folder of expert ``k`` (1-based) inside a shards dir."""
    if int(expert) < 1:
        raise ValueError(f"expert ids are 1..K, got {expert}")
    return f"expert_{int(expert)}"


def shard_relpath(expert: int, split: str, index: int) -> str:
    """``expert_<k>/<split>-NNNNNN.tar``, relative to the shards dir."""
    return f"{expert_dirname(expert)}/{check_split(split)}-{int(index):06d}.tar"


# ---------------------------------------------------------------------------------------------------
# sample encoding


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


_NPY_MAGIC = b"\x93NUMPY"


@lru_cache(maxsize=1024)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, Fortran order) of an .npy header dict — parsed once per distinct header: the samples of a
    shard repeat a handful of headers, and numpy's own parser (``ast.literal_eval``) is most of the cost of
    reading a small array."""
    d = ast.literal_eval(header.decode("latin1"))
    if not isinstance(d, dict) or not {"descr", "fortran_order", "shape"} <= set(d):
        raise ValueError(f"header is not an .npy header dict: {header[:80]!r}")
    dtype = np.dtype(np.lib.format.descr_to_dtype(d["descr"]))
    shape = tuple(int(n) for n in d["shape"])
    if dtype.hasobject or any(n < 0 for n in shape):
        raise ValueError(f"object arrays and negative shapes are refused (dtype {dtype}, shape {shape})")
    return dtype, shape, bool(d["fortran_order"])


def _npy_array(data: bytes, name: str) -> np.ndarray:
    """Decode one .npy member (what ``np.load(allow_pickle=False)`` accepts, versions 1-3), as a writable array.

    The payload must be exactly as long as the header says (``np.load`` tolerates trailing bytes; a member of
    ours never has any)."""
    try:
        if data[:6] != _NPY_MAGIC or len(data) < 10:
            raise ValueError("no .npy magic")
        major = data[6]
        if major == 1:
            start = 10 + int.from_bytes(data[8:10], "little")
            header = data[10:start]
        elif major in (2, 3):
            start = 12 + int.from_bytes(data[8:12], "little")
            header = data[12:start]
        else:
            raise ValueError(f"unknown .npy format version {major}")
        dtype, shape, fortran = _npy_header(bytes(header))
        count = math.prod(shape)
        if len(data) - start != count * dtype.itemsize:
            raise ValueError(f"{len(data) - start} payload bytes for {count} × {dtype} ({count * dtype.itemsize} "
                             "expected)")
        flat = np.frombuffer(data, dtype=dtype, count=count, offset=start).copy()  # own, writable memory
        return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
    except Exception as e:  # a damaged member: ValueError, SyntaxError (header), TypeError, ...
        raise ValueError(f"{name}: not a readable .npy ({e})") from e


def encode_sample(key: str, *, t5: np.ndarray, clip: np.ndarray, meta: Mapping[str, Any],
                  latent: np.ndarray | None = None, frames: np.ndarray | None = None) -> dict[str, Any]:
    """Pack one sample into WebDataset members (``{"__key__": key, "latent.npy": bytes, ...}``).

    Exactly one of ``latent`` (stored float16 (C, T, H, W)) and ``frames`` (uint8 (F, H, W, 3)) is given.
    ``t5`` is stored float16 (L_true, D), ``clip`` float32 (D,), ``meta`` as JSON with :data:`META_FIELDS`.
    """
    check_key(key)
    if (latent is None) == (frames is None):
        raise ValueError(f"sample {key}: pass exactly one of latent= or frames=")
    missing = [f for f in META_FIELDS if f not in meta]
    if missing:
        raise ValueError(f"sample {key}: metadata lacks {missing}")
    if meta["key"] != key:
        raise ValueError(f"sample {key}: metadata key {meta['key']!r} differs from the sample key")
    t5 = np.asarray(t5)
    clip = np.asarray(clip)
    if t5.ndim != 2 or t5.shape[0] < 1:
        raise ValueError(f"sample {key}: t5 must be (L_true >= 1, D), got {t5.shape}")
    if clip.ndim != 1:
        raise ValueError(f"sample {key}: clip must be (D,), got {clip.shape}")
    members: dict[str, Any] = {"__key__": key}
    if latent is not None:
        latent = np.asarray(latent)
        if latent.ndim != 4:
            raise ValueError(f"sample {key}: latent must be (C, T, H, W), got {latent.shape}")
        members["latent.npy"] = _npy_bytes(latent.astype(np.float16))
    else:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"sample {key}: frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
        members["frames.npy"] = _npy_bytes(frames)
    members["t5.npy"] = _npy_bytes(t5.astype(np.float16))
    members["clip.npy"] = _npy_bytes(clip.astype(np.float32))
    members["txt"] = str(meta["caption"]).encode("utf-8")
    members["json"] = json.dumps({f: meta[f] for f in META_FIELDS}, ensure_ascii=False).encode("utf-8")
    return members


def decode_sample(key: str, members: Mapping[str, bytes]) -> dict[str, Any]:
    """Inverse of :func:`encode_sample`: ``{"key", "latent" | "frames", "t5", "clip", "caption", "meta"}``.

    Raises ValueError naming the key and the member for anything missing, unreadable or mis-shaped.
    """
    body = "latent.npy" if "latent.npy" in members else "frames.npy"
    missing = [m for m in (body, "t5.npy", "clip.npy", "txt", "json") if m not in members]
    if missing:
        raise ValueError(f"sample {key}: missing members {missing} (has {sorted(members)})")
    out: dict[str, Any] = {"key": key}
    if body == "latent.npy":
        latent = _npy_array(members[body], f"{key}.latent.npy")
        if latent.ndim != 4 or latent.dtype != np.float16:
            raise ValueError(f"sample {key}: latent must be float16 (C, T, H, W), got {latent.dtype} {latent.shape}")
        out["latent"] = latent
    else:
        frames = _npy_array(members[body], f"{key}.frames.npy")
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"sample {key}: frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
        out["frames"] = frames
    t5 = _npy_array(members["t5.npy"], f"{key}.t5.npy")
    clip = _npy_array(members["clip.npy"], f"{key}.clip.npy")
    if t5.ndim != 2 or t5.shape[0] < 1:
        raise ValueError(f"sample {key}: t5 must be (L_true >= 1, D), got {t5.shape}")
    if clip.ndim != 1:
        raise ValueError(f"sample {key}: clip must be (D,), got {clip.shape}")
    try:
        meta = json.loads(members["json"].decode("utf-8"))
        caption = members["txt"].decode("utf-8")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"sample {key}: unreadable txt/json member ({e})") from e
    if not isinstance(meta, dict) or meta.get("key") != key or not isinstance(meta.get("expert"), int):
        raise ValueError(f"sample {key}: json metadata is not a dict with this key and an integer expert")
    out.update(t5=t5, clip=clip, caption=caption, meta=meta)
    return out


def sample_digest(members: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of one sample's content: every member (``{suffix: bytes}``, as :func:`iter_shard` yields
    them or :func:`encode_sample` makes them; ``__key__``-style entries are ignored) in sorted name order,
    each as its name, its length and its bytes, so no two different samples share the framing."""
    h = hashlib.sha256()
    for name in sorted(n for n in members if not n.startswith("__")):
        data = members[name]
        h.update(name.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def non_finite_members(sample: Mapping[str, Any]) -> list[str]:
    """Members of a decoded sample (:func:`decode_sample`) whose floats hold NaN or infinity; ``[]`` when all
    are finite (uint8 frames always are)."""
    return [f"{name}.npy" for name in ("latent", "t5", "clip")
            if name in sample and not np.isfinite(sample[name]).all()]


# ---------------------------------------------------------------------------------------------------
# writing


def _tar_writer(fileobj) -> wds.TarWriter:
    # encoder=False: members are bytes already; mtime=0 makes a rerun write byte-identical tars.
    return wds.TarWriter(fileobj, encoder=False, mtime=0)


def write_shard(path: str | Path, samples: Iterable[Mapping[str, Any]]) -> list[str]:
    """Write ``samples`` (from :func:`encode_sample`) into the tar ``path`` atomically; returns the keys in order.

    The tar appears under ``path`` only after the last sample is written; an exception (or a kill)
    part-way leaves no file under the final name.
    """
    keys: list[str] = []
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f, _tar_writer(f) as tar:
            for sample in samples:
                keys.append(check_key(sample["__key__"]))
                tar.write(dict(sample))
    return keys


class ShardWriter:
    """Stream samples into ``<directory>/<split>-NNNNNN.tar``, starting a new tar at ``max_samples`` samples
    or once a tar holds ``max_bytes`` bytes of members; each tar is renamed into place only when complete.

    ``written`` lists ``(key, shard file name, position)`` for every sample in a completed tar. Leaving
    the ``with`` block through an exception discards the tar being written (never a torn tar).
    """

    def __init__(self, directory: str | Path, split: str, *, max_samples: int = 1000, max_bytes: int | None = None,
                 start_index: int = 0) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes}")
        self.directory = Path(directory)
        self.split = check_split(split)
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.index = start_index
        self.written: list[tuple[str, str, int]] = []
        self._pending: list[str] = []
        self._bytes = 0
        self._stack: ExitStack | None = None
        self._tar: wds.TarWriter | None = None

    @property
    def shard_name(self) -> str:
        """File name of the tar being written (or next to be written)."""
        return f"{self.split}-{self.index:06d}.tar"

    def _open(self) -> None:
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.directory / self.shard_name))
        self._tar = _tar_writer(self._stack.enter_context(open(tmp, "wb")))

    def _finish(self) -> None:
        assert self._stack is not None and self._tar is not None
        self._tar.close()
        self._stack.close()  # closes the file, then renames the temp tar into place
        self.written.extend((k, self.shard_name, i) for i, k in enumerate(self._pending))
        self._stack, self._tar, self._pending, self._bytes = None, None, [], 0
        self.index += 1

    def write(self, sample: Mapping[str, Any]) -> None:
        """Append one sample (from :func:`encode_sample`)."""
        if self._tar is None:
            self._open()
        self._pending.append(check_key(sample["__key__"]))
        self._bytes += self._tar.write(dict(sample))
        if len(self._pending) >= self.max_samples or (self.max_bytes is not None and self._bytes >= self.max_bytes):
            self._finish()

    def close(self) -> None:
        """Complete the tar being written, if any."""
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Discard the tar being written (its temp file is removed; completed tars stay)."""
        if self._stack is not None:
            try:
                self._tar.close()
                self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
            finally:
                self._stack, self._tar, self._pending, self._bytes = None, None, [], 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------------------
# the index


def index_path(shards_dir: str | Path) -> Path:
    """``<shards_dir>/shards.parquet``."""
    return Path(shards_dir) / INDEX_NAME


def shard_digests(path: str | Path) -> list[tuple[str, str]]:
    """``[(key, sample_digest)]`` of every sample of a tar, in file order (reads the whole tar)."""
    return [(key, sample_digest(members)) for key, members in iter_shard(path)]


def write_index(shards_dir: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write the index (rows with key, expert, split, shard, position and sha256), sorted by shard then position.

    Rows without a ``sha256`` get it from their tar, read back (one pass over each such tar); a row whose
    key is not at its position in the tar is a ValueError.
    """
    rows = sorted((dict(r) for r in rows), key=lambda r: (r["shard"], r["position"]))
    digests: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        if r.get(HASH_COLUMN):
            continue
        if r["shard"] not in digests:
            digests[r["shard"]] = shard_digests(Path(shards_dir) / r["shard"])
        listed = digests[r["shard"]]
        if not 0 <= r["position"] < len(listed) or listed[r["position"]][0] != r["key"]:
            raise ValueError(f"index row {r['key']} at {r['shard']}#{r['position']} does not match the tar")
        r[HASH_COLUMN] = listed[r["position"]][1]
    table = pa.table({name: [r[name] for r in rows] for name in INDEX_SCHEMA.names}, schema=INDEX_SCHEMA)
    return write_parquet_atomic(table, index_path(shards_dir))


def read_index(shards_dir: str | Path) -> pa.Table:
    """The index of a shards dir; FileNotFoundError when the dir or its ``shards.parquet`` is missing."""
    path = index_path(shards_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no shard index at '{path}': is '{shards_dir}' a shards dir written by "
                                "`python -m data.prepare` (stages encode)?")
    table = pq.read_table(path)
    if HASH_COLUMN not in table.column_names:  # written before content hashes: read, but nothing to verify
        table = table.append_column(HASH_COLUMN, pa.nulls(len(table), pa.string()))
    missing = [n for n in INDEX_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"'{path}' lacks columns {missing}")
    return table.select(INDEX_SCHEMA.names)


def index_digests(shards_dir: str | Path, shards: Iterable[str] | None = None) -> dict[str, dict[str, str]]:
    """``{shard: {key: sha256}}`` from the index (only ``shards`` when given; samples without a hash left out)."""
    table = read_index(shards_dir).select(["shard", "key", HASH_COLUMN])
    if shards is not None:  # filter in Arrow: a worker converts only its own shards' rows to Python
        table = table.filter(pc.is_in(table["shard"], value_set=pa.array(sorted(set(shards)), pa.string())))
    index = table.to_pydict()
    out: dict[str, dict[str, str]] = {}
    for shard, key, digest in zip(index["shard"], index["key"], index[HASH_COLUMN]):
        if digest:
            out.setdefault(shard, {})[key] = digest
    return out


def shard_sizes(shards_dir: str | Path, split: str | None = None) -> dict[str, tuple[int, int]]:
    """``{shard relative path: (expert, number of samples)}`` from the index, optionally for one split."""
    index = read_index(shards_dir).to_pydict()
    sizes: dict[str, tuple[int, int]] = {}
    for shard, expert, s in zip(index["shard"], index["expert"], index["split"]):
        if split is None or s == split:
            sizes[shard] = (expert, sizes.get(shard, (expert, 0))[1] + 1)
    return sizes


def expert_counts(shards_dir: str | Path, split: str = "train") -> dict[int, int]:
    """Samples per expert id in ``split`` (the router's natural class frequencies)."""
    counts: dict[int, int] = {}
    for expert, n in shard_sizes(shards_dir, check_split(split)).values():
        counts[expert] = counts.get(expert, 0) + n
    return dict(sorted(counts.items()))


def expert_priors(shards_dir: str | Path, split: str = "train") -> dict[int, float]:
    """Natural priors ``π_k = n_k / Σ n`` per expert id in ``split``."""
    counts = expert_counts(shards_dir, split)
    total = sum(counts.values())
    if total == 0:
        raise ValueError(f"the '{split}' split of '{shards_dir}' holds no samples")
    return {k: n / total for k, n in counts.items()}


# ---------------------------------------------------------------------------------------------------
# listing and reading


def available_experts(shards_dir: str | Path) -> list[int]:
    """Expert ids that have an ``expert_<k>`` folder in ``shards_dir`` (sorted)."""
    root = Path(shards_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"shards dir '{root}' does not exist (run `python -m data.prepare` first)")
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _EXPERT_DIR_RE.match(p.name)))


def list_shards(shards_dir: str | Path, expert: int, split: str = "train") -> list[Path]:
    """The complete tars of one expert and split, in order (temp files of unfinished writes are ignored)."""
    return sorted((Path(shards_dir) / expert_dirname(expert)).glob(f"{check_split(split)}-[0-9]*.tar"))


_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file type flags (7: contiguous file, read as regular)


def _octal(field: bytes) -> int:
    """A tar header number: NUL/space-terminated octal, or base-256 (GNU, first byte 0x80) for big values."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    """The header's stored checksum against the sum of its bytes with the checksum field as spaces (unsigned, or
    signed as some old writers did)."""
    try:
        stored = _octal(header[148:156])
    except ValueError:
        return False
    rest = header[:148] + b" " * 8 + header[156:]
    return stored in (sum(rest), sum(b - 256 if b > 127 else b for b in rest))


def _pax_records(data: bytes) -> dict[str, str]:
    """``{keyword: value}`` of a pax extended header (``"<len> <keyword>=<value>\\n"`` records)."""
    out, pos = {}, 0
    while pos < len(data):
        length = int(data[pos:data.index(b" ", pos)])
        record = data[data.index(b" ", pos) + 1:pos + length - 1].decode("utf-8")
        keyword, _, value = record.partition("=")
        out[keyword] = value
        pos += length
    return out


def _tar_members(f) -> Iterator[tuple[str, int, bytes]]:
    """``(name, size, payload)`` of each regular member of an uncompressed tar stream, in file order.

    What ``tarfile`` does in stream mode, in a fraction of its time (a shard's members are small, and
    ``tarfile`` parses every header field in Python): ustar/GNU headers with their checksum checked, pax
    ``path``/``size`` records and GNU long names honoured, other member types skipped. As in ``tarfile``,
    the archive ends at a zero block, at the end of the file on a block boundary, or at an unreadable header
    after the first; a payload cut short is returned short (the caller compares it with ``size``).
    """
    first, pending = True, {}
    while True:
        header = f.read(_BLOCK)
        if len(header) < _BLOCK or header.count(0) == _BLOCK:
            if first:
                raise tarfile.ReadError("empty file" if not header else "not a tar (no complete header)")
            return
        if not _checksum_ok(header):
            if first:
                raise tarfile.ReadError("not a tar (bad header checksum)")
            return
        first = False
        size, kind = _octal(header[124:136]), header[156:157]
        name = header[:100].split(b"\0", 1)[0].decode("utf-8")
        if header[257:262] == b"ustar" and header[345:346] != b"\0":
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
        size = int(pending.get("size", size))
        payload = f.read(size)
        f.read(-size % _BLOCK)  # padding to the next block
        if kind in (b"x", b"g", b"L"):  # metadata for the next member
            if len(payload) != size:
                raise tarfile.ReadError(f"extended header before {name!r} is truncated")
            if kind == b"x":
                pending = _pax_records(payload)
            elif kind == b"L":
                pending = {"path": payload.split(b"\0", 1)[0].decode("utf-8")}
            continue
        name, pending = pending.get("path", name), {}
        if kind in _REGULAR:
            yield name, size, payload
            if len(payload) != size:
                return


def iter_shard(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {member suffix: bytes})`` for each sample of a tar, streaming, in file order.

    A truncated or corrupt tar yields every complete sample before the damage, then raises
    :class:`ShardReadError` naming the file. (Read member by member rather than with WebDataset's grouping
    so that the sample just before a damaged member is not lost.)
    """
    path = Path(path)
    key, members = None, {}
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            for name, size, payload in _tar_members(f):
                name_key, _, suffix = name.partition(".")
                if name_key != key:
                    if key is not None:
                        yield key, members
                    key, members = name_key, {}
                if len(payload) != size:
                    raise tarfile.ReadError(f"member {name} is truncated ({len(payload)} of {size} bytes)")
                members[suffix] = payload
    except (tarfile.TarError, EOFError, OSError, ValueError, UnicodeDecodeError) as e:
        raise ShardReadError(f"shard '{path}' is damaged after {key!r}: {e}") from e
    if key is not None:
        yield key, members


def scan_shard(path: str | Path) -> list[tuple[str, set[str]]]:
    """``[(key, member suffixes)]`` of a tar from its headers only (no payload is decoded)."""
    samples: list[tuple[str, set[str]]] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar.getmembers():
                if not info.isreg():
                    continue
                key, _, suffix = info.name.partition(".")
                if not samples or samples[-1][0] != key:
                    samples.append((key, set()))
                samples[-1][1].add(suffix)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardReadError(f"shard '{path}' cannot be listed: {e}") from e
    return samples
