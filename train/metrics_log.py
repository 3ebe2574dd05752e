"""A run's metrics history across requeues: one CSV per job segment plus a merged ``metrics.csv`` view.

Lightning's CSV logger deletes ``metrics.csv`` when it starts in a folder that already holds one, so a
resumed job would keep only its last segment's curve. Each start of a job therefore logs to a folder of
its own, and the merged view is rebuilt from all of them::

    <run_dir>/logs/csv/segment-001/metrics.csv     the first start (hparams.yaml beside it)
    <run_dir>/logs/csv/segment-002/metrics.csv     the first resume ...
    <run_dir>/logs/csv/metrics.csv                 every segment, in order (rebuilt at each start and end)

A resume continues from a checkpoint, so rows an earlier segment logged at or after the step where a
later segment starts describe training that was rolled back: the merged view keeps the later rows.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path

from ddm.files import atomic_write

log = logging.getLogger("ddm.train")

METRICS_FILE = "metrics.csv"
_SEGMENT = re.compile(r"segment-(\d+)")


def csv_dir(run_dir: Path) -> Path:
    """``<run_dir>/logs/csv``: the segments and the merged view."""
    return Path(run_dir) / "logs" / "csv"


def segments(folder: Path) -> list[Path]:
    """The segment folders under ``folder``, oldest first."""
    found = [(int(m.group(1)), p) for p in folder.glob("segment-*") if (m := _SEGMENT.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def next_segment(run_dir: Path, adopt_legacy: bool = True) -> str:
    """The folder name (``segment-NNN``) the job starting now logs to. With ``adopt_legacy`` (rank 0), a
    ``metrics.csv`` written before segments existed becomes ``segment-000`` so its rows are kept."""
    folder = csv_dir(run_dir)
    existing = segments(folder)
    legacy = folder / METRICS_FILE
    if adopt_legacy and not existing and legacy.is_file():
        (folder / "segment-000").mkdir(parents=True, exist_ok=True)
        os.replace(legacy, folder / "segment-000" / METRICS_FILE)
        existing = segments(folder)
        log.info("kept the metrics of an earlier run as %s", folder / "segment-000")
    last = int(_SEGMENT.fullmatch(existing[-1].name).group(1)) if existing else 0
    return f"segment-{last + 1:03d}"


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


def merge_metrics(run_dir: Path) -> Path | None:
    """Rebuild ``logs/csv/metrics.csv`` from every segment (see the module docstring); None when no segment
    has logged anything yet."""
    folder = csv_dir(run_dir)
    parts = []
    for seg in segments(folder):
        path = seg / METRICS_FILE
        if path.is_file():
            try:
                parts.append(_read(path))
            except (OSError, csv.Error, UnicodeDecodeError) as err:  # a file torn by kill -9
                log.warning("metrics of %s are unreadable (%s): left out of %s", seg, err, folder / METRICS_FILE)
    if not parts:
        return None
    kept: list[list[dict[str, str]]] = []
    cut: int | None = None  # the earliest step a later segment restarted from
    for _, rows in reversed(parts):
        kept.append([r for r in rows if cut is None or (s := _step(r)) is None or s < cut])
        starts = [s for r in rows if (s := _step(r)) is not None]
        if starts:
            cut = min(starts) if cut is None else min(cut, min(starts))
    rows = [r for part in reversed(kept) for r in part]
    fields = sorted({f for names, _ in parts for f in names})

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(folder / METRICS_FILE, write)
