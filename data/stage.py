"""Plumbing shared by the data-preparation stages: results, idempotency markers, atomic writes.

Every stage (ingest, embed, cluster, encode, ...) is a function ``stage(inputs, out_dir, **config) ->
StageResult``. A stage computes a *fingerprint* of its config and its input files; after all its outputs
are written it drops a small JSON marker ``out_dir/<stage>.done.json``. A rerun with the same fingerprint
whose outputs still exist does no work and returns the recorded result (``skipped=True``); a changed
config, a touched input or a deleted output reruns the stage.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ddm.checkpoint import atomic_path, write_parquet_atomic  # the one temp-file + fsync + rename helper

log = logging.getLogger(__name__)

MARKER_FORMAT = "ddm-stage-v1"


@dataclass
class StageResult:
    """What one stage run did: counts, time and where its outputs are."""

    stage: str
    n_input: int
    n_output: int
    n_rejected: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    skipped: bool = False  # True when the stage was already done and nothing ran
    info: dict[str, Any] = field(default_factory=dict)  # stage-specific facts worth keeping (JSON-ready)

    @property
    def output(self) -> Path:
        """The main output (the first one listed)."""
        if not self.outputs:
            raise ValueError(f"stage '{self.stage}' recorded no outputs")
        return Path(self.outputs[0])

    def summary_line(self) -> str:
        """One log line, e.g. ``[ingest] 120 in → 118 ok, 2 rejected in 3.2s → out/manifest.parquet``."""
        where = ", ".join(self.outputs) if self.outputs else "(no outputs)"
        if self.skipped:
            return f"[{self.stage}] up to date ({self.n_output} ok, {self.n_rejected} rejected) → {where}"
        return (f"[{self.stage}] {self.n_input} in → {self.n_output} ok, {self.n_rejected} rejected "
                f"in {self.seconds:.1f}s → {where}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the marker's payload)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StageResult:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _file_signature(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _walk(paths: Iterable[str | Path]) -> Iterator[Path]:
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.is_file())
        elif p.exists():
            yield p
        else:
            raise FileNotFoundError(f"stage input not found: '{p}'")


def fingerprint(config: Mapping[str, Any], inputs: Iterable[str | Path] = ()) -> str:
    """Hash of a stage's config (JSON-serialisable) and its inputs' paths, sizes and mtimes.

    Folders are walked recursively. Sizes + nanosecond mtimes stand in for content hashes: hashing
    terabytes of video on every rerun would cost more than the stages themselves.
    """
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for p in _walk(inputs):
        h.update(json.dumps(_file_signature(p)).encode())
    return h.hexdigest()[:16]


def marker_path(out_dir: str | Path, stage: str) -> Path:
    """Where the done-marker of ``stage`` lives."""
    return Path(out_dir) / f"{stage}.done.json"


def stage_is_done(out_dir: str | Path, stage: str, fingerprint: str) -> bool:
    """True when ``stage`` finished in ``out_dir`` with this fingerprint and its outputs still exist."""
    marker = marker_path(out_dir, stage)
    if not marker.is_file():
        return False
    try:
        payload = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # a damaged marker means "not done", never a crash
    if payload.get("format") != MARKER_FORMAT or payload.get("fingerprint") != fingerprint:
        return False
    return all(Path(o).exists() for o in payload.get("result", {}).get("outputs", []))


def load_stage_result(out_dir: str | Path, stage: str) -> StageResult:
    """The result recorded by the last completed run of ``stage``, flagged ``skipped=True``."""
    payload = json.loads(marker_path(out_dir, stage).read_text())
    return replace(StageResult.from_dict(payload["result"]), skipped=True)


def completed_result(out_dir: str | Path, stage: str, fingerprint: str) -> StageResult | None:
    """The recorded (skipped) result when ``stage`` is already done with this fingerprint, else None.

    The usual opening of a stage: ``if (done := completed_result(out, STAGE, fp)): return done``.
    """
    if not stage_is_done(out_dir, stage, fingerprint):
        return None
    result = load_stage_result(out_dir, stage)
    log.info(result.summary_line())
    return result


def mark_stage_done(out_dir: str | Path, stage: str, fingerprint: str, result: StageResult) -> Path:
    """Record that ``stage`` completed; call only after every output is in place."""
    marker = marker_path(out_dir, stage)
    payload = {"format": MARKER_FORMAT, "stage": stage, "fingerprint": fingerprint, "result": result.to_dict()}
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    return marker


