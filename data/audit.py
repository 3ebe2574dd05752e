"""Audit a prepared data set: ``python -m data.audit <prep_dir> [--stage stage2] [--deep]``.

Checks, for one stage's shards (``<prep_dir>/shards/<stage>/``), that

* every manifest key not rejected by encode is in exactly one shard, of the expert its assignment names;
* every shard sample is a manifest key (and was not rejected), with all its members;
* ``shards.parquet`` lists exactly what the tars hold (key, expert, split, shard, position).

and, with ``--deep``, that every sample's content is what encode wrote: its SHA-256 (over all its members)
equals the one ``shards.parquet`` recorded, and it decodes to finite latents / text embeddings.

(Clips rejected by ingest never reach the manifest.) Prints a summary; exits 1 on any mismatch,
listing the first offenders of each kind, each naming its shard and key. Without ``--deep`` only tar
headers are read, so it is cheap on large sets; ``--deep`` reads every byte once.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from data.encode import REJECTED_NAME, shards_dir_for
from ddm.shards import (HASH_COLUMN, ShardReadError, available_experts, decode_sample, expert_dirname, iter_shard,
                         non_finite_members, read_index, sample_digest, scan_shard)

REQUIRED_MEMBERS = ("t5.npy", "clip.npy", "txt", "json")
_SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")


@dataclass
class AuditReport:
    """What the audit found: counts, and problems grouped by kind (each a list of offenders)."""

    prep_dir: Path
    stage: str
    deep: bool = False
    manifest: int = 0
    rejected: int = 0
    samples: int = 0
    shards: int = 0
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    def summary(self, max_listed: int = 10) -> str:
        """A multi-line report: one count line, then each kind of problem with its first offenders."""
        lines = [f"[audit{' --deep' if self.deep else ''}] {self.prep_dir} stage {self.stage}: {self.manifest} "
                 f"manifest keys, {self.rejected} "
                 f"rejected by encode, {self.samples} samples in {self.shards} shards → "
                 + ("OK" if self.ok else f"{sum(map(len, self.problems.values()))} problems")]
        lines += [f"  note: {n}" for n in self.notes]
        for kind, offenders in self.problems.items():
            if offenders:
                more = f" (+{len(offenders) - max_listed} more)" if len(offenders) > max_listed else ""
                lines.append(f"  {kind}: {len(offenders)}{more}")
                lines += [f"    {o}" for o in offenders[:max_listed]]
        return "\n".join(lines)


def _read_column_map(path: Path, value: str) -> dict[str, object]:
    table = pq.read_table(path, columns=["key", value]).to_pydict()
    return dict(zip(table["key"], table[value]))


def _listing(path: Path, deep: bool) -> list[tuple[str, set[str], str | None, str | None]]:
    """``[(key, member suffixes, sha256, content problem)]`` of a tar: headers only, or (deep) every payload
    hashed and decoded. Raises ShardReadError for a damaged tar."""
    if not deep:
        return [(key, members, None, None) for key, members in scan_shard(path)]
    out = []
    for key, members in iter_shard(path):
        problem = None
        try:
            bad = non_finite_members(decode_sample(key, members))
            if bad:
                problem = f"non-finite values in {', '.join(bad)}"
        except ValueError as e:
            problem = f"undecodable: {e}"
        out.append((key, set(members), sample_digest(members), problem))
    return out


def audit(prep_dir: str | Path, stage: str = "stage2", *, deep: bool = False) -> AuditReport:
    """Compare manifest, assignments, encode rejects, tars and index of one stage; with ``deep``, also every
    sample's content hash and values. See the module docstring."""
    prep = Path(prep_dir)
    shards_dir = shards_dir_for(prep, stage)
    report = AuditReport(prep, stage, deep)
    for p in (prep / "manifest.parquet", prep / "assignments.parquet", shards_dir / REJECTED_NAME):
        if not p.is_file():
            raise FileNotFoundError(f"cannot audit: '{p}' is missing (has `python -m data.prepare` run for "
                                    f"encode.stage={stage}?)")
    manifest = set(pq.read_table(prep / "manifest.parquet", columns=["key"]).column("key").to_pylist())
    assigned = _read_column_map(prep / "assignments.parquet", "expert")
    rejected = _read_column_map(shards_dir / REJECTED_NAME, "reason")
    report.manifest, report.rejected = len(manifest), len(rejected)
    problems = report.problems
    try:
        index_rows = read_index(shards_dir).to_pylist()
    except (FileNotFoundError, ValueError) as e:
        problems["index unreadable"].append(str(e))
        index_rows = None
    recorded = {(r["shard"], r["key"]): r[HASH_COLUMN] for r in index_rows or ()}
    unhashed = 0

    # what the tars hold
    in_tars: set[tuple[str, int, str, str, int]] = set()
    places: dict[str, list[str]] = defaultdict(list)
    for expert in available_experts(shards_dir):
        folder = shards_dir / expert_dirname(expert)
        leftovers = sorted(p.name for p in folder.glob(".*.tmp*"))
        if leftovers:
            report.notes.append(f"{folder}: unfinished temp tars {leftovers} (ignored; rerun encode to clean up)")
        for path in sorted(folder.glob("*.tar")):
            if path.name.startswith("."):
                continue
            rel = f"{folder.name}/{path.name}"
            if not _SHARD_RE.match(path.name):
                problems["unexpected file names"].append(rel)
                continue
            report.shards += 1
            try:
                listed = _listing(path, deep)
            except ShardReadError as e:
                problems["unreadable shards"].append(str(e))
                continue
            for position, (key, members, digest, content_problem) in enumerate(listed):
                report.samples += 1
                split = path.name.split("-")[0]
                in_tars.add((key, expert, split, rel, position))
                places[key].append(rel)
                body = {"latent.npy", "frames.npy"} & members
                lacking = [m for m in REQUIRED_MEMBERS if m not in members]
                if len(body) != 1 or lacking:
                    problems["incomplete samples"].append(f"{key} in {rel}: members {sorted(members)}")
                if deep:
                    want = recorded.get((rel, key))
                    if want is None:
                        unhashed += 1
                    elif digest != want:
                        problems["content hash mismatches"].append(
                            f"{key} in {rel}: sha256 {digest[:12]}… but the index recorded {want[:12]}…")
                    if content_problem:
                        problems["bad sample contents"].append(f"{key} in {rel}: {content_problem}")
                if key not in manifest:
                    problems["samples not in the manifest"].append(f"{key} in {rel}")
                elif key in rejected:
                    problems["rejected samples present in shards"].append(f"{key} in {rel} ({rejected[key]})")
                elif assigned.get(key) != expert:
                    problems["samples in the wrong expert"].append(
                        f"{key} in {rel}, assigned to expert {assigned.get(key)}")

    for key, where in sorted(places.items()):
        if len(where) > 1:
            problems["samples in more than one place"].append(f"{key}: {', '.join(where)}")
    for key in sorted(manifest - set(rejected) - set(places)):
        problems["manifest keys missing from the shards"].append(f"{key} (expert {assigned.get(key)})")

    if unhashed:
        report.notes.append(f"{unhashed} samples have no content hash in the index (an index written before "
                            "hashes existed, or rows not in the index): their contents are not verified")

    # the index against the tars
    if index_rows is not None:
        indexed = {(r["key"], r["expert"], r["split"], r["shard"], r["position"]) for r in index_rows}
        for row in sorted(indexed - in_tars):
            problems["index rows not matching the tars"].append(f"{row[0]} at {row[3]}#{row[4]}")
        for row in sorted(in_tars - indexed):
            problems["tar samples missing from the index"].append(f"{row[0]} at {row[3]}#{row[4]}")
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0: consistent, 1: mismatches)."""
    ap = argparse.ArgumentParser(description="Check that a prepared data set's shards match its manifest, "
                                             "assignments and index.")
    ap.add_argument("prep_dir", help="the prep folder (paths.data_dir of `python -m data.prepare`)")
    ap.add_argument("--stage", default="stage2", help="which shards/<stage> to audit (default: stage2)")
    ap.add_argument("--deep", action="store_true",
                    help="also re-hash every sample against shards.parquet and check it decodes to finite values "
                         "(reads every byte)")
    ap.add_argument("--max-listed", type=int, default=10, help="offenders listed per kind of problem")
    args = ap.parse_args(argv)
    try:
        report = audit(args.prep_dir, args.stage, deep=args.deep)
    except FileNotFoundError as e:
        print(f"[audit] {e}", file=sys.stderr)
        return 1
    print(report.summary(args.max_listed))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
