"""Plumbing shared by the data-preparation steps: results, idempotency markers, atomic writes.

("Step" is a data-preparation step; "stage" is kept for the training stages, stage2 / stage3.)
Every step (ingest, embed, cluster, encode, ...) is a function ``step(inputs, out_dir, **config) ->
StepResult``. A step computes a *fingerprint* of its config and its input files; after all its outputs
are written it drops a small JSON marker ``out_dir/<step>.done.json``. A rerun with the same fingerprint
whose outputs still exist does no work and returns the recorded result (``skipped=True``); a changed
config, a touched input or a deleted output reruns the step. Markers written before the rename (their
result's ``stage`` key) read the same.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ddm.files import atomic_path, write_parquet_atomic

log = logging.getLogger(__name__)

MARKER_FORMAT = "ddm-stage-v1"  # on disk: kept, so folders prepared before the rename stay done


@dataclass
class StepResult:
    """What one step run did: counts, time and where its outputs are."""

    step: str
    n_input: int
    n_output: int
    n_rejected: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    skipped: bool = False  # True when the step was already done and nothing ran
    info: dict[str, Any] = field(default_factory=dict)  # step-specific facts worth keeping (JSON-ready)

    @property
    def output(self) -> Path:
        """The main output (the first one listed)."""
        if not self.outputs:
            raise ValueError(f"step '{self.step}' recorded no outputs")
        return Path(self.outputs[0])

    def summary_line(self) -> str:
        """One log line, e.g. ``[ingest] 120 in → 118 ok, 2 rejected in 3.2s → out/manifest.parquet``."""
        where = ", ".join(self.outputs) if self.outputs else "(no outputs)"
        if self.skipped:
            return f"[{self.step}] up to date ({self.n_output} ok, {self.n_rejected} rejected) → {where}"
        return (f"[{self.step}] {self.n_input} in → {self.n_output} ok, {self.n_rejected} rejected "
                f"in {self.seconds:.1f}s → {where}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the marker's payload)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepResult:
        """Inverse of :meth:`to_dict` (a marker written before the rename names its step ``stage``)."""
        d = {"step": d["stage"], **d} if "stage" in d else dict(d)
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
            raise FileNotFoundError(f"step input not found: '{p}'")


def fingerprint(config: Mapping[str, Any], inputs: Iterable[str | Path] = ()) -> str:
    """Hash of a step's config (JSON-serialisable) and its inputs' paths, sizes and mtimes.

    Folders are walked recursively. Sizes + nanosecond mtimes stand in for content hashes: hashing
    terabytes of video on every rerun would cost more than the steps themselves.
    """
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for p in _walk(inputs):
        h.update(json.dumps(_file_signature(p)).encode())
    return h.hexdigest()[:16]


def marker_path(out_dir: str | Path, step: str) -> Path:
    """Where the done-marker of ``step`` lives."""
    return Path(out_dir) / f"{step}.done.json"


def step_is_done(out_dir: str | Path, step: str, fingerprint: str) -> bool:
    """True when ``step`` finished in ``out_dir`` with this fingerprint and its outputs still exist."""
    marker = marker_path(out_dir, step)
    if not marker.is_file():
        return False
    try:
        payload = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # a damaged marker means "not done", never a crash
    if payload.get("format") != MARKER_FORMAT or payload.get("fingerprint") != fingerprint:
        return False
    return all(Path(o).exists() for o in payload.get("result", {}).get("outputs", []))


def load_step_result(out_dir: str | Path, step: str) -> StepResult:
    """The result recorded by the last completed run of ``step``, flagged ``skipped=True``."""
    payload = json.loads(marker_path(out_dir, step).read_text())
    return replace(StepResult.from_dict(payload["result"]), skipped=True)


def completed_result(out_dir: str | Path, step: str, fingerprint: str) -> StepResult | None:
    """The recorded (skipped) result when ``step`` is already done with this fingerprint, else None.

    The usual opening of a step: ``if (done := completed_result(out, STAGE, fp)): return done``.
    """
    if not step_is_done(out_dir, step, fingerprint):
        return None
    result = load_step_result(out_dir, step)
    log.info(result.summary_line())
    return result


def mark_step_done(out_dir: str | Path, step: str, fingerprint: str, result: StepResult) -> Path:
    """Record that ``step`` completed; call only after every output is in place."""
    marker = marker_path(out_dir, step)
    payload = {"format": MARKER_FORMAT, "step": step, "fingerprint": fingerprint, "result": result.to_dict()}
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    return marker


