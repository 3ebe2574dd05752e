"""``python -m ddm.pool``: list, verify, grow and shrink the expert pool of a model folder without retraining it.

The pool's record is ``pool.json`` (:mod:`ddm.pool_manifest`: per expert the data, clustering, config,
training FLOPs and every file's hash)::

    python -m ddm.pool list FOLDER                                  the experts and the router, one line each
    python -m ddm.pool verify FOLDER [--shards DIR ...]             every hash, expert slots, the router's K
    python -m ddm.pool retire FOLDER --expert J --out NEW           a K-1 folder without expert J (zero-cost)
        [--router-runs RUNS]                                        ... with a router retrained without it
    python -m ddm.pool add FOLDER --runs RUNS --expert N --out NEW  a K+1 folder with expert N and a new router
    python -m ddm.pool init FOLDER                                  record pool.json for a folder that lacks one

**Retiring** an expert is free: its folder is left out, the others are renumbered 1..K-1 (files hard-linked
when the file system allows, else copied; every file checked against the hashes of the source's pool.json),
and the router's last head layer loses row J-1 (weight and bias), so the other experts' logits are exactly
those of the original router and the softmax renormalises over them: p'_k = p_k / (1 - p_J). That is an
approximation of a router retrained without cluster J: the retired cluster's probability mass goes to the
other experts in proportion to their weights, not to its nearest neighbours alone. The per-expert router
metadata (``prior_correction``, ``expert_counts``, ``num_experts``) loses entry J as well. The kept experts'
exports are unchanged, so their metadata still names the training ``expert_id``; ``pool.json`` maps slot →
``expert_id`` and ``verify`` checks the exports against that map. **Retiring by retraining**: ``python -m
train.router router_experts=[<the kept ids>] num_experts=K-1`` trains a router on the kept clusters only, and
``--router-runs`` puts it in place of the old one (its recorded ``expert_ids`` must be the kept experts').
``python -m ddm.eval.routing`` compares the two routers' accuracy per t on held-out shards.

**Adding** an expert (after ``data.prepare mode=extend`` made its data, :mod:`data.extend`): the new expert's
run ``RUNS/expert<N>/<stage>/export`` (one per stage the folder has) joins as slot K+1 and the router of
``RUNS/router/`` — trained over all K+1 clusters — replaces the old one. The old experts' files are
hard-linked (else copied) and checked against the source's pool.json, never re-exported; the new exports are
copied with their per-tensor hashes checked. Refused, naming the field: a new expert whose VAE, latent
geometry, text widths or latent channels differ from the pool's, an ``expert_id`` the pool already holds, or
a router whose K is not K+1. ``--router gated`` keeps the old router instead and uses the new one only to tell
new from old (:mod:`ddm.models.gated_router`): the old experts are then mixed exactly as before wherever the
gate is sure a sample is old. A gated router's zero-cost retire is refused (retire it by retraining).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ddm.export_files import MASTER_FILE, SHARD_DIR
from ddm.files import link_or_copy, staging_dir, swap_into_place
from ddm.assemble import find_router_exports, stage_exports
from ddm.export_metadata import ExportMetadata
from ddm.interop import load_checkpoint, read_checkpoint_metadata
from ddm.model_folder import (MODEL_INDEX, copy_export, read_model_index, router_for_stage, scan_model_folder,
                              stage_order, write_model_index)
from ddm.pool_manifest import (POOL_FILE, hash_files, pool_table, read_pool, verify_folder,  # noqa: F401
                               write_pool_manifest)
from ddm.models.gated_router import GatedRouterConfig, fold_prior_correction, gated_state_dict, router_config_from_dict
from ddm.models.router import head_output_keys

# --- retire -----------------------------------------------------------------------------------------------------
def _place(src: Path, dst: Path, link: bool) -> None:
    """``dst`` as a hard link of ``src`` (when ``link`` and the file system allows), else a copy."""
    link_or_copy(src, dst, link)


def _place_tree(src: Path, dst: Path, link: bool) -> None:
    if src.is_symlink() or src.is_file():
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))  # a --link export's vae.pt / t5/: keep pointing at the source
        else:
            _place(src, dst, link)
        return
    shutil.copytree(src, dst, symlinks=True, copy_function=lambda s, d: _place(Path(s), Path(d), link))


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A fresh staging folder beside ``out``, swapped into place when the block succeeds, else removed."""
    staged = staging_dir(out)
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    swap_into_place(staged, out)


def _place_kept_parts(root: Path, pool: Mapping[str, Any], layout: Any, kept: Sequence[Mapping[str, Any]],
                      staged: Path, link: bool) -> list[str]:
    """Place the third-party parts (t5/, clip/, vae.pt, nulls, ...) as they are and the ``kept`` experts' files
    as slots 1..len(kept), each checked against the hash pool.json recorded; returns the slot folder names."""
    expert_roots = {e["folder"].split("/")[0] for e in pool["experts"]}
    router_roots = {str(p.relative_to(root)).split("/")[0] for p in layout.routers.values()}
    for child in sorted(root.iterdir()):
        if child.name not in expert_roots | router_roots | {MODEL_INDEX, POOL_FILE}:
            _place_tree(child, staged / child.name, link)
    names = []
    for slot, entry in enumerate(kept, start=1):
        names.append(f"expert{slot}")
        for rel, digest in entry["files"].items():
            new_rel = names[-1] + rel[len(entry["folder"]):]
            _place(root / rel, staged / new_rel, link)
            if hash_files([staged / new_rel])[0] != digest:  # a copy that differs from what was verified
                raise OSError(f"'{staged / new_rel}' does not hash like its source '{root / rel}'")
    return names


def _new_routers(runs: Path, stages: Sequence[str], expert_ids: Sequence[Any], what: str) -> dict[str, Path]:
    """The router export(s) of ``runs/router/`` for a pool of ``expert_ids`` (slot order): K must match, and
    so must the training ids of its outputs when its export records them (``expert_ids``)."""
    routers = find_router_exports(runs, stages)
    for path in routers.values():
        meta = read_checkpoint_metadata(path)
        got = int((meta.get("config") or {}).get("num_experts") or meta.get("num_experts") or 0)
        if got != len(expert_ids):
            raise ValueError(f"the router '{path}' predicts {got} experts but {what} has {len(expert_ids)}: train "
                             f"it with num_experts={len(expert_ids)}")
        ids = meta.get("expert_ids")
        if ids is not None and [str(i) for i in ids] != [str(i) for i in expert_ids]:
            raise ValueError(f"the router '{path}' was trained for experts {ids} but {what} holds {list(expert_ids)}")
    return routers


def _place_routers(routers: Mapping[str, Path], staged: Path,
                   gated_over: Mapping[str | None, Path] | None = None) -> str | dict[str, str]:
    """Copy the router export(s) into ``staged`` (``Router/``, or ``Router/<stage>/`` when there are several;
    every tensor's hash checked on load) and return the index's ``router`` entry. With ``gated_over`` (the old
    folder's routers by stage), each new router becomes the gate of a ``GatedRouter`` over the old one."""
    entry: str | dict[str, str] = "Router" if len(routers) == 1 else {s: f"Router/{s}" for s in routers}
    for stage, path in routers.items():
        dst = staged / (entry if isinstance(entry, str) else entry[stage])
        if gated_over is None:
            copy_export(path, dst)
        else:
            state_dict, meta = gate_router(router_for_stage(gated_over, stage)[0], path)
            copy_export(None, dst, state_dict=state_dict, metadata=meta)
    return entry


def gate_router(base: str | Path, gate: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and metadata of a ``GatedRouter`` export (:mod:`ddm.models.gated_router`): the pool's K-way
    router ``base`` kept exactly, gated by the K+1-way router ``gate`` trained over all K+1 clusters. Each
    part's recorded ``prior_correction`` is folded into its head bias, so the composite records zeros."""
    (base_sd, base_meta), (gate_sd, gate_meta) = load_checkpoint(base), load_checkpoint(gate)
    for path, meta in ((base, base_meta), (gate, gate_meta)):
        if meta.get("kind") != "router":
            raise ValueError(f"'{path}' holds a {meta.get('kind')!r} export, not a router")
    gate_cfg = router_config_from_dict(gate_meta["config"])
    if isinstance(gate_cfg, GatedRouterConfig):
        raise ValueError(f"the gate '{gate}' must be a plain router trained over all the grown pool's clusters")
    cfg = GatedRouterConfig(router_config_from_dict(base_meta["config"]), gate_cfg)
    base_ids, gate_ids = base_meta.get("expert_ids"), gate_meta.get("expert_ids")
    if base_ids is not None and gate_ids is not None and [str(i) for i in gate_ids[:-1]] != [str(i) for i in base_ids]:
        raise ValueError(f"the gate '{gate}' routes experts {gate_ids} but the base router '{base}' {base_ids}: "
                         "the gate's first K outputs must be the base's experts, in order")
    if isinstance(cfg.base, GatedRouterConfig) and any(float(c) for c in base_meta.get("prior_correction") or []):
        raise ValueError(f"'{base}' is a gated router with a non-zero prior_correction; it cannot be folded")
    state_dict = gated_state_dict(fold_prior_correction(base_sd, base_meta.get("prior_correction")),
                                  fold_prior_correction(gate_sd, gate_meta.get("prior_correction")))
    meta = {k: v for k, v in gate_meta.items() if k not in ("tensor_sha256", "_path")}
    meta.update(config=cfg.to_dict(), num_experts=cfg.num_experts, prior_correction=[0.0] * cfg.num_experts,
                uses_text=cfg.reads_text,
                train_flops=(base_meta.get("train_flops") or 0) + (gate_meta.get("train_flops") or 0) or None,
                composition={"type": "gated", **{name: {"path": str(Path(p).resolve()), "step": m.get("step"),
                                                        "experiment": m.get("experiment")}
                                                 for name, p, m in (("base", base, base_meta),
                                                                    ("gate", gate, gate_meta))}})
    return state_dict, meta


def grow_router(state_dict: Mapping[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """A K-way router's weights with output rows added up to ``num_experts`` — to fine-tune the grown pool's
    router from the old one. Every old row is kept exactly; a new row starts as the mean of the old rows (its
    logit starts at the average of the others: no expert is favoured before training)."""
    weight_key, bias_key = head_output_keys(state_dict)
    k = state_dict[weight_key].shape[0]
    if num_experts < k:
        raise ValueError(f"the router predicts {k} experts; growing it to {num_experts} would drop outputs")
    out = dict(state_dict)
    for key in (weight_key, bias_key):
        if key in state_dict:
            old = state_dict[key]
            out[key] = torch.cat([old, old.mean(0, keepdim=True).expand(num_experts - k, *old.shape[1:])]).clone()
    return out


def retire_router(state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any], expert: int
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Drop output ``expert`` (1-based) of a router: row ``expert-1`` of its last head layer and entry
    ``expert`` of its per-expert metadata. The other logits are unchanged (module docstring)."""
    if (meta.get("config") or {}).get("type") == "gated":
        raise ValueError("the router is a gated composite (ddm.pool add --router gated): dropping one row would not "
                         "renormalise it as documented; retire by retraining (--router-runs)")
    weight_key, bias_key = head_output_keys(state_dict)
    k = state_dict[weight_key].shape[0]
    if not 1 <= expert <= k:
        raise ValueError(f"expert {expert} is out of range: the router predicts experts 1..{k}")
    keep = [i for i in range(k) if i != expert - 1]
    out = dict(state_dict)
    out[weight_key] = state_dict[weight_key][keep].clone()
    if bias_key in state_dict:
        out[bias_key] = state_dict[bias_key][keep].clone()
    new = {key: v for key, v in meta.items() if key not in ("tensor_sha256", "_path")}
    new["config"] = {**(meta.get("config") or {}), "num_experts": k - 1}
    new["num_experts"] = k - 1
    if isinstance(meta.get("prior_correction"), list):
        new["prior_correction"] = [meta["prior_correction"][i] for i in keep]
    if isinstance(meta.get("expert_counts"), Mapping):  # keyed by expert id 1..K: renumbered like the experts
        counts = meta["expert_counts"]
        new["expert_counts"] = {str(n + 1): counts[str(i + 1)] for n, i in enumerate(keep) if str(i + 1) in counts}
    return out, new


def retire_expert(folder: str | Path, expert: int, out: str | Path, *, link: bool = True,
                  router_runs: str | Path | None = None) -> Path:
    """Write ``out``: the model folder ``folder`` without expert slot ``expert`` (module docstring). The
    router: the old one without row ``expert`` (zero-cost), or the router retrained without that expert in
    ``router_runs/router/`` (``train.router router_experts=[...]``). The source must verify first. Returns ``out``."""
    root, out = Path(folder), Path(out)
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"'{out}' already exists: pick a new --out (retire never overwrites a folder)")
    pool, index = read_pool(root), read_model_index(root)
    layout = scan_model_folder(root, index)
    k = len(layout.experts)
    if k == 1:
        raise ValueError(f"'{root}' holds a single expert: retiring the last expert would leave no model")
    if not 1 <= expert <= k:
        raise ValueError(f"expert {expert} is out of range: '{root}' holds experts 1..{k}")
    report = verify_folder(root, check_shards=False)
    if not report.ok:
        raise ValueError(f"'{root}' does not verify, so it is not retired from:\n  " + "\n  ".join(report.problems))
    kept = [e for e in pool["experts"] if int(e["slot"]) != expert]
    gone = next(e for e in pool["experts"] if int(e["slot"]) == expert)
    stages = sorted(layout.experts[1], key=stage_order)
    retrained = None if router_runs is None else \
        _new_routers(Path(router_runs), stages, [e["expert_id"] for e in kept], "the pool without it")
    with _staged(out) as staged:
        names = _place_kept_parts(root, pool, layout, kept, staged, link)
        router_entry = index.router
        if retrained is not None:
            router_entry = _place_routers(retrained, staged)
        else:
            for path in layout.routers.values():
                state_dict, meta = load_checkpoint(path)
                state_dict, meta = retire_router(state_dict, meta, expert)
                copy_export(None, staged / path.relative_to(root), state_dict=state_dict, metadata=meta,
                            single_file=(path / MASTER_FILE).is_file() or not (path / SHARD_DIR).is_dir(),
                            sharded=(path / SHARD_DIR).is_dir())
        new_index = dataclasses.replace(index, num_experts=k - 1, experts=names, router=router_entry,
                                        extra=dict(index.extra))
        steps = (new_index.extra.get("source") or {}).get("steps")
        if isinstance(steps, Mapping):  # "expert<k>/<stage>" labels follow the renumbering
            new_index.extra["source"] = {**new_index.extra["source"], "steps": _renumber_steps(steps, expert)}
        retired = [*((pool.get("router") or {}).get("retired") or []),
                   {"slot": expert, "expert_id": gone["expert_id"], "from": str(root.resolve())}]
        write_pool_manifest(staged, new_index, expert_ids=[e["expert_id"] for e in kept], retired=retired,
                            carry={"experts": kept, "router": None if retrained else pool.get("router")},
                            history=pool.get("history"),
                            operation={"op": "retire", "slot": expert, "expert_id": gone["expert_id"],
                                       "from": str(root.resolve()),
                                       "router": "retrained" if retrained else "row dropped (zero-cost)",
                                       **({"router_runs": str(Path(router_runs).resolve())} if retrained else {})})
        write_model_index(staged, new_index)
    return out


def _renumber_steps(steps: Mapping[str, Any], retired: int) -> dict[str, Any]:
    out = {}
    for label, step in steps.items():
        m = re.fullmatch(r"expert(\d+)(/.*)?", label)
        if m is None:
            out[label] = step
        elif int(m.group(1)) != retired:
            k = int(m.group(1))
            out[f"expert{k - 1 if k > retired else k}{m.group(2) or ''}"] = step
    return out


# --- add --------------------------------------------------------------------------------------------------------
# What a joining expert must share with the pool, per stage (export metadata ``geometry``, from its shards):
# the latent space and the text encoders' widths; its size and prediction target may differ (heterogeneous).
JOIN_GEOMETRY = ("height", "width", "num_frames", "latent_shape", "frames_shape", "vae", "t5_dim", "clip_dim")
JOIN_CONFIG = ("latent_channels", "context_in_dim", "vec_in_dim")
ADD_ROUTERS = ("retrained", "gated")


def check_joining_expert(pool_meta: Mapping[str, Any], new_meta: Mapping[str, Any], stage: str, label: str) -> None:
    """A ValueError naming the first field in which the joining expert's ``stage`` export differs from the pool's."""
    if new_meta.get("kind") not in (None, "expert"):
        raise ValueError(f"{label} holds a {new_meta.get('kind')!r} export, not an expert")
    pairs = [(f"config.{f}", (pool_meta.get("config") or {}).get(f), (new_meta.get("config") or {}).get(f))
             for f in JOIN_CONFIG]
    pairs += [(f"geometry.{f}", (pool_meta.get("geometry") or {}).get(f), (new_meta.get("geometry") or {}).get(f))
              for f in JOIN_GEOMETRY]
    pairs.append(("vae", ExportMetadata.from_dict(pool_meta).latent_space, ExportMetadata.from_dict(new_meta).latent_space))
    for name, ours, theirs in pairs:
        if ours is not None and theirs is not None and ours != theirs:
            raise ValueError(f"{label} ({stage}) cannot join the pool: its {name} is {theirs!r} but the pool's is "
                             f"{ours!r} (train it on the pool's extended data with the pool's VAE and text encoders)")


def add_expert(folder: str | Path, runs: str | Path, expert_id: int, out: str | Path, *, link: bool = True,
               router: str = "retrained") -> Path:
    """Write ``out``: ``folder`` plus the expert of ``runs/expert<expert_id>`` as slot K+1 and the K+1-way router
    of ``runs/router`` (``router="retrained"``), or that router as the gate over the folder's own K-way router
    (``router="gated"``; module docstring). The source must verify first. Returns ``out``."""
    if router not in ADD_ROUTERS:
        raise ValueError(f"router must be one of {ADD_ROUTERS}, got {router!r}")
    root, runs, out = Path(folder), Path(runs), Path(out)
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"'{out}' already exists: pick a new --out (add never overwrites a folder)")
    pool, index = read_pool(root), read_model_index(root)
    layout = scan_model_folder(root, index)
    k = len(layout.experts)
    if pool.get("monolith"):
        raise ValueError(f"'{root}' holds a monolith: experts join a routed pool")
    if any(str(e["expert_id"]) == str(expert_id) for e in pool["experts"]):
        raise ValueError(f"expert_id {expert_id} is already in '{root}' (slots: "
                         f"{[e['expert_id'] for e in pool['experts']]}); a joining expert needs a new id")
    stages = sorted(layout.experts[1], key=stage_order)
    found = stage_exports(runs / f"expert{expert_id}")
    missing = [s for s in stages if s not in found]
    if missing:
        raise FileNotFoundError(f"'{runs / f'expert{expert_id}'}' has no export of stage(s) {missing} that the "
                                f"pool has (expected <stage>/export for {stages})")
    for stage in stages:
        check_joining_expert(read_checkpoint_metadata(layout.experts[1][stage]),
                             read_checkpoint_metadata(found[stage]), stage, f"'{found[stage]}'")
    routers = _new_routers(runs, stages, [e["expert_id"] for e in pool["experts"]] + [expert_id], "the grown pool")
    report = verify_folder(root, check_shards=False)
    if not report.ok:
        raise ValueError(f"'{root}' does not verify, so nothing is added to it:\n  " + "\n  ".join(report.problems))
    with _staged(out) as staged:
        # the old experts: the same bytes, never re-exported
        names = _place_kept_parts(root, pool, layout, pool["experts"], staged, link)
        names.append(f"expert{k + 1}")
        for stage in stages:  # load_checkpoint checks every tensor against its recorded sha256
            copy_export(found[stage], staged / names[-1] / stage)
        router_index = _place_routers(routers, staged, layout.routers if router == "gated" else None)
        new_index = dataclasses.replace(index, num_experts=k + 1, experts=names, router=router_index,
                                        extra=dict(index.extra))
        write_pool_manifest(staged, new_index, expert_ids=[e["expert_id"] for e in pool["experts"]] + [expert_id],
                            carry={"experts": [*pool["experts"], None], "router": None}, retired=(),
                            history=pool.get("history"),
                            operation={"op": "add", "slot": k + 1, "expert_id": expert_id, "from": str(root.resolve()),
                                       "runs": str(runs.resolve()), "router": router})
        write_model_index(staged, new_index)
    return out


# --- the CLI ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``python -m ddm.pool`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m ddm.pool", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the experts and the router of a model folder").add_argument("folder", type=Path)
    verify = sub.add_parser("verify", help="check the folder against its pool.json")
    verify.add_argument("folder", type=Path)
    verify.add_argument("--shards", action="append", type=Path, default=[],
                        help="a shards dir to check the recorded shards in (repeatable; default: the recorded dirs)")
    retire = sub.add_parser("retire", help="a new folder without one expert (zero-cost: the router's row dropped)")
    retire.add_argument("folder", type=Path)
    retire.add_argument("--expert", type=int, required=True, help="the slot to retire (1..K)")
    retire.add_argument("--out", type=Path, required=True, help="the new folder (must not exist)")
    retire.add_argument("--copy", action="store_true", help="copy the files instead of hard-linking them")
    retire.add_argument("--router-runs", type=Path, default=None,
                        help="runs/<experiment> whose router/ was retrained without the expert (train.router "
                             "router_experts=[...]); default: drop the expert's row of the old router (zero-cost)")
    add = sub.add_parser("add", help="a new folder with one more expert and the K+1-way router")
    add.add_argument("folder", type=Path)
    add.add_argument("--runs", type=Path, required=True, help="runs/<experiment> holding expert<N>/ and router/")
    add.add_argument("--expert", type=int, required=True, help="the joining expert's id N (its run expert<N>/)")
    add.add_argument("--out", type=Path, required=True, help="the new folder (must not exist)")
    add.add_argument("--copy", action="store_true", help="copy the old experts' files instead of hard-linking them")
    add.add_argument("--router", choices=ADD_ROUTERS, default="retrained",
                     help="retrained: the K+1-way router of RUNS/router replaces the old one; gated: it only gates "
                          "(new vs old) and the old K-way router keeps routing among the old experts, exactly")
    sub.add_parser("init", help="record pool.json for a folder that has none").add_argument("folder", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (non-zero when verify finds a problem or a command fails)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            print(pool_table(read_pool(args.folder)))
        elif args.command == "verify":
            report = verify_folder(args.folder, args.shards)
            if not report.ok:
                for line in [f"FAIL: {p}" for p in report.problems] + [f"note: {n}" for n in report.notes]:
                    print(line, file=sys.stderr)
                print(f"{args.folder}: {len(report.problems)} problem(s)", file=sys.stderr)
                return 1
            unchecked = f"; shards of {len(report.notes)} stage record(s) not checked (no hashes recorded or " \
                        "shards dir not reachable)" if report.notes else ""
            print(f"OK: {args.folder}: {report.files} files and {report.shards} shards match {POOL_FILE}{unchecked}")
        elif args.command == "retire":
            out = retire_expert(args.folder, args.expert, args.out, link=not args.copy, router_runs=args.router_runs)
            print(f"retired expert {args.expert}: {out} ({read_pool(out)['num_experts']} experts)")
        elif args.command == "add":
            out = add_expert(args.folder, args.runs, args.expert, args.out, link=not args.copy, router=args.router)
            print(f"added expert {args.expert}: {out} ({read_pool(out)['num_experts']} experts)")
        else:
            if (args.folder / POOL_FILE).exists():
                raise FileExistsError(f"'{args.folder / POOL_FILE}' exists: init records a folder only once")
            write_pool_manifest(args.folder, operation={"op": "init"})
            print(f"wrote {args.folder / POOL_FILE}")
    except (FileNotFoundError, FileExistsError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
