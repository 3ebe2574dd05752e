"""Ingest: raw videos/images + captions → ``manifest.parquet`` (and ``rejected.parquet``).

Input is either a folder, scanned recursively for videos and images with sidecar ``.txt`` captions
(``clip.mp4`` + ``clip.txt``), or a CSV/parquet manifest with ``path,text`` columns (Open-Sora's
convention; relative paths resolve against the manifest's folder). Every file is probed with PyAV,
decoding all frames, so the frame counts downstream stages rely on are real.

Output ``manifest.parquet`` columns: ``key`` (stable, unique, dot-free, from the relative path),
``path`` (absolute), ``caption``, ``kind`` (video|image), ``num_frames``, ``fps`` (0.0 for images),
``height``, ``width``. Anything unusable — undecodable, zero-byte, too few frames, smaller than
``min_size`` px on its shorter side or more elongated than ``max_aspect`` (a 2×2 or 16×1024 clip would
otherwise be up-scaled many times over at encode), no caption, a caption that is not UTF-8 — goes to
``rejected.parquet`` (``path``, ``reason``) and the run goes on. A manifest that is not valid UTF-8 is an
error naming the file, the line and the offending byte.
"""
from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from data.step import StepResult, completed_result, fingerprint, mark_step_done, write_parquet_atomic
from ddm.video_io import probe_video

log = logging.getLogger(__name__)

STEP = "ingest"
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "gif")
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("path", pa.string()), ("caption", pa.string()), ("kind", pa.string()),
    ("num_frames", pa.int64()), ("fps", pa.float64()), ("height", pa.int64()), ("width", pa.int64()),
])
REJECTED_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])
_DUPLICATE = "duplicate path (listed more than once)"


@dataclass
class _Candidate:
    path: Path  # absolute
    rel: str  # relative path the key is derived from
    kind: str  # video | image
    caption: str | None
    problem: str | None = None  # a reason to reject found before probing


def _norm_exts(exts: Sequence[str]) -> frozenset[str]:
    return frozenset("." + e.lower().lstrip(".") for e in exts)


def _read_caption(media: Path) -> tuple[str | None, str | None]:
    """(caption, problem) from the sidecar ``.txt`` beside ``media``."""
    sidecar = media.with_suffix(".txt")
    if not sidecar.is_file():
        return None, f"missing caption file {sidecar.name}"
    try:
        text = sidecar.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as e:
        return None, f"caption {sidecar.name} is not valid UTF-8 ({e.reason} at byte {e.start})"
    return (text, None) if text else (None, f"caption {sidecar.name} is empty")


def _scan_folder(root: Path, video_exts: frozenset[str], image_exts: frozenset[str]) -> list[_Candidate]:
    out = []
    for p in sorted(root.rglob("*")):
        ext = p.suffix.lower()
        if not p.is_file() or ext not in video_exts | image_exts or p.name.startswith("."):
            continue
        caption, problem = _read_caption(p)
        out.append(_Candidate(p.resolve(), p.relative_to(root).as_posix(),
                              "image" if ext in image_exts else "video", caption, problem))
    return out


_RECODE_HINT = "re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 old.csv > new.csv`)"


def _check_csv_utf8(manifest: Path) -> None:
    """ValueError naming the line and byte when a CSV manifest is not UTF-8 (pyarrow would otherwise read
    such a column as bytes, and the captions would silently become ``"b'caf\\xe9'"``)."""
    data = manifest.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"manifest '{manifest}' is not valid UTF-8: byte 0x{data[e.start]:02x} at line {line}, "
                         f"column {column} ({e.reason}); {_RECODE_HINT}") from None


def _text_column(table: pa.Table, name: str, manifest: Path) -> list:
    """A column as Python strings; a binary column (a parquet written with bytes) must hold UTF-8."""
    values = table.column(name).to_pylist()
    if not (pa.types.is_binary(table.column(name).type) or pa.types.is_large_binary(table.column(name).type)):
        return values
    out = []
    for row, raw in enumerate(values, start=1):
        try:
            out.append(None if raw is None else raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"manifest '{manifest}' is not valid UTF-8: column '{name}', row {row}, byte "
                             f"0x{raw[e.start]:02x} at position {e.start} ({e.reason}); {_RECODE_HINT}") from None
    return out


def _read_manifest(manifest: Path, video_exts: frozenset[str], image_exts: frozenset[str]) -> list[_Candidate]:
    is_csv = manifest.suffix.lower() == ".csv"
    if is_csv:
        _check_csv_utf8(manifest)
    try:
        table = pacsv.read_csv(manifest) if is_csv else pq.read_table(manifest)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"cannot read manifest '{manifest}': {e}") from e
    missing = {"path", "text"} - set(table.column_names)
    if missing:
        raise ValueError(f"manifest '{manifest}' lacks column(s) {sorted(missing)}; it needs 'path' and 'text'")
    out = []
    for raw_path, text in zip(_text_column(table, "path", manifest), _text_column(table, "text", manifest)):
        if raw_path is None or not str(raw_path).strip():
            continue  # a blank row has no file to report
        given = Path(str(raw_path))
        path = (given if given.is_absolute() else manifest.parent / given).resolve()
        try:
            rel = path.relative_to(manifest.parent.resolve()).as_posix()
        except ValueError:  # outside the manifest's folder: key from the absolute path
            rel = path.as_posix().lstrip("/")
        ext = path.suffix.lower()
        caption = None if text is None else str(text).strip()
        problem = None
        if ext not in video_exts | image_exts:
            problem = f"unsupported extension '{ext}'"
        elif not path.is_file():
            problem = "file not found"
        elif not caption:
            problem = "empty caption in manifest"
        out.append(_Candidate(path, rel, "image" if ext in image_exts else "video", caption, problem))
    return out


def _sanitize(rel: str) -> str:
    """A WebDataset-safe key fragment: no dots, no slashes, no spaces."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", rel.replace("/", "__"))


def make_keys(rels: Sequence[str]) -> list[str]:
    """Stable, unique, dot-free keys from relative paths.

    ``videos/clip_001.mp4`` → ``videos__clip_001``. Paths that would share a key get their extension
    appended (``clip_001_mp4``); any clash left after that gets a hash of the full relative path.
    """
    keys = [_sanitize(str(Path(r).with_suffix(""))) for r in rels]
    clashes = Counter(keys)
    keys = [k if clashes[k] == 1 else f"{k}_{_sanitize(Path(r).suffix.lstrip('.'))}" for k, r in zip(keys, rels)]
    clashes = Counter(keys)
    return [k if clashes[k] == 1 else f"{k}_{hashlib.sha1(r.encode()).hexdigest()[:8]}"
            for k, r in zip(keys, rels)]


def _probe(c: _Candidate, min_frames: int, min_size: int, max_aspect: float) -> dict | str:
    """Probe one candidate: a manifest row, or the reason it is rejected."""
    if c.problem:
        return c.problem
    try:
        info = probe_video(c.path)
    except (ValueError, FileNotFoundError) as e:
        return f"undecodable: {e}"
    if c.kind == "video" and info["num_frames"] < min_frames:
        return f"only {info['num_frames']} decodable frame(s), fewer than min_frames={min_frames}"
    h, w = info["height"], info["width"]
    if min(h, w) < min_size:
        return f"too small: {w}x{h} px, the shorter side is below min_size={min_size}"
    if max(h, w) / min(h, w) > max_aspect:
        return f"too elongated: {w}x{h} px, aspect ratio {max(h, w) / min(h, w):.3g} above max_aspect={max_aspect:g}"
    return {"path": str(c.path), "caption": c.caption, "kind": c.kind, "num_frames": info["num_frames"],
            "fps": info["fps"], "height": info["height"], "width": info["width"]}


def _collect(input_path: Path, video_exts: frozenset[str], image_exts: frozenset[str]) -> list[_Candidate]:
    if not input_path.exists():
        raise FileNotFoundError(f"ingest input not found: '{input_path}'")
    if input_path.is_dir():
        found = _scan_folder(input_path, video_exts, image_exts)
        what = f"no files with extensions {sorted(video_exts | image_exts)} under '{input_path}'"
    elif input_path.suffix.lower() in (".csv", ".parquet"):
        found = _read_manifest(input_path, video_exts, image_exts)
        what = f"manifest '{input_path}' lists no files"
    else:
        raise ValueError(f"ingest input '{input_path}' must be a folder or a .csv/.parquet manifest")
    if not found:
        raise ValueError(f"nothing to ingest: {what}")
    return found


def ingest(input_path: str | Path, out_dir: str | Path, *, video_exts: Sequence[str] = VIDEO_EXTS,
           image_exts: Sequence[str] = IMAGE_EXTS, min_frames: int = 1, min_size: int = 16, max_aspect: float = 4.0,
           workers: int = 1, progress: bool = True) -> StepResult:
    """Probe every video/image under ``input_path`` and write ``out_dir/manifest.parquet`` + ``rejected.parquet``.

    Files whose shorter side is below ``min_size`` px, or whose longer side is more than ``max_aspect``
    times the shorter, are rejected with the reason (encode would up-scale them to the stage resolution).

    ``workers`` > 1 probes files in a thread pool (PyAV decodes outside the GIL). Skips all work when
    the same inputs and settings were already ingested into ``out_dir``.
    """
    t0 = time.perf_counter()
    src, out = Path(input_path).expanduser(), Path(out_dir)
    vexts, iexts = _norm_exts(video_exts), _norm_exts(image_exts)
    if min_frames < 1:
        raise ValueError(f"min_frames must be >= 1, got {min_frames}")
    if min_size < 1 or not max_aspect >= 1.0:
        raise ValueError(f"min_size must be >= 1 and max_aspect >= 1, got {min_size} and {max_aspect}")
    candidates = _collect(src, vexts, iexts)
    config = {"stage": STEP,  # (key kept: it is part of the fingerprint)
               "input": str(src.resolve()), "video_exts": sorted(vexts),
              "image_exts": sorted(iexts), "min_frames": min_frames, "min_size": min_size, "max_aspect": max_aspect}
    # The files that matter: the manifest (if any), every media file and its sidecar caption.
    files = [] if src.is_dir() else [src]
    files += [p for c in candidates for p in (c.path, c.path.with_suffix(".txt")) if p.is_file()]
    fp = fingerprint(config, files)
    if done := completed_result(out, STEP, fp):
        return done

    log.info("[ingest] probing %d files from %s", len(candidates), src)
    seen: set[Path] = set()
    for c in candidates:
        if c.path in seen:
            c.problem = _DUPLICATE
        seen.add(c.path)
    unique = [c for c in candidates if c.problem != _DUPLICATE]
    key_of = dict(zip((c.path for c in unique), make_keys([c.rel for c in unique])))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        probed = list(tqdm(pool.map(lambda c: _probe(c, min_frames, min_size, max_aspect), candidates), total=len(candidates),
                           desc="ingest", disable=not progress))
    rows, rejected = [], []
    for c, res in zip(candidates, probed):
        if isinstance(res, str):
            rejected.append({"path": str(c.path), "reason": res})
            log.warning("[ingest] rejected %s: %s", c.path, res)
        else:
            rows.append({"key": key_of[c.path], **res})
    rows.sort(key=lambda r: r["key"])
    out.mkdir(parents=True, exist_ok=True)
    manifest = write_parquet_atomic(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), out / "manifest.parquet")
    rejects = write_parquet_atomic(pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA), out / "rejected.parquet")
    result = StepResult(STEP, len(candidates), len(rows), len(rejected), time.perf_counter() - t0,
                         [str(manifest), str(rejects)])
    mark_step_done(out, STEP, fp, result)
    log.info(result.summary_line())
    return result
