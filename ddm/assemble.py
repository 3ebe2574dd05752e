"""``python -m ddm.assemble``: assemble a Paris model folder (``ddm.pipeline``) from training runs.

::

    runs/<exp>/expert<k>/<stage>/export  →  <out>/expert<k>/<stage>/  master.safetensors + model/ (sharded)
    runs/<exp>/monolith/<stage>/export   →  <out>/expert1/<stage>/     (--monolith: the one-expert baseline)
    runs/<exp>/router/<stage>/export     →  <out>/Router/              (Router/<stage>/ when several stages have one)
    the text encoders of the runs        →  <out>/t5/, <out>/clip/     (copied; --link symlinks; --text-from DIR)
    null_t5.pt, null_clip.pt             →  copied from beside the encoders, else generated with them
    the VAE                              →  a spec in model_index.json for weight-free VAEs (pixel, hunyuan-tiny);
                                            vae.pt copied (--link: symlinked) for the HunyuanVideo VAE
    pool.json                            →  provenance: per expert its id, config, data and shard hashes, steps,
                                            and the sha256 of every file of its export (ddm.pool)
    model_index.json                     →  filled from the exports' metadata, written last

``--no-third-party`` leaves out vae.pt, t5/ and clip/ (the Paris release layout: users place them; the
index still names them). Every export must come from the same experiment: the same clustering
(``centroids_hash``), number of experts, VAE and, per stage, the same shards (``manifest_hash``) and
geometry; a disagreement is an error naming the field and the exports.

Nothing is written before every export is found and checked. The folder is then assembled at
``.<out>.partial`` beside ``--out`` and swapped in only when complete (``--overwrite``: the old folder is
set aside as ``.<out>.old`` and removed after the swap), so a failed export never loses an existing folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ddm.assets import require_path
from ddm.export_files import load_export, read_export_metadata
from ddm.files import remove_path, staging_dir, swap_into_place
from ddm.export_metadata import ExportMetadata
from ddm.interop import DTYPES
from ddm.models.text import NULL_CLIP_FILE, NULL_T5_FILE, TextEncoders, make_null_tensors
from ddm.model_folder import (ARCHITECTURES, DEFAULT_SCHEDULER, MODEL_INDEX, ROUTER_DIR, VAE_FILE, ModelIndex,
                              copy_export, is_export_dir, place_folder, stage_geometry_from_metadata, stage_order,
                              write_model_index)
from ddm.pool_manifest import write_pool_manifest

log = logging.getLogger("ddm.assemble")

WEIGHT_FREE_VAES = ("pixel", "hunyuan-tiny")  # rebuilt from their spec: nothing to copy


# --- finding the exports -----------------------------------------------------------------------------------------
def stage_exports(role_dir: Path) -> dict[str, Path]:
    """``{stage: <role_dir>/<stage>/export}`` for every stage folder that holds an export."""
    if not role_dir.is_dir():
        return {}
    return {p.name: p / "export" for p in sorted(role_dir.iterdir()) if is_export_dir(p / "export")}


def find_expert_exports(runs: Path, monolith: bool, stages: Sequence[str] | None) -> dict[int, dict[str, Path]]:
    """``{expert id: {stage: export folder}}`` (the monolith as expert 1), each expert holding every stage."""
    if monolith:
        found = {1: stage_exports(runs / "monolith")}
        if not found[1]:
            raise FileNotFoundError(f"no monolith export in '{runs / 'monolith'}' (expected "
                                    f"monolith/<stage>/export; train it with python -m train.expert expert=all)")
    else:
        dirs = {int(m.group(1)): p for p in runs.iterdir() if (m := re.fullmatch(r"expert(\d+)", p.name))} \
            if runs.is_dir() else {}
        if not dirs:
            raise FileNotFoundError(f"no expert runs in '{runs}' (expected expert1/ … expertK/)")
        found = {k: stage_exports(dirs[k]) for k in sorted(dirs)}
        ids = sorted(found)
        if ids != list(range(1, len(ids) + 1)):
            missing = sorted(set(range(1, max(ids) + 1)) - set(ids))
            raise FileNotFoundError(f"'{runs}' lacks the run of expert {missing} (found experts {ids})")
    wanted = list(stages) if stages else sorted({s for per in found.values() for s in per}, key=stage_order)
    for k, per in found.items():
        name = "the monolith" if monolith else f"expert {k}"
        for stage in wanted:
            if stage not in per:
                where = runs / ("monolith" if monolith else f"expert{k}") / stage / "export"
                raise FileNotFoundError(f"{name} has no {stage} export ('{where}' is missing); have: "
                                        f"{', '.join(per) or 'none'}")
    return {k: {s: per[s] for s in wanted} for k, per in found.items()}


def find_router_exports(runs: Path, stages: Sequence[str]) -> dict[str, Path]:
    """The router export(s) to bundle: those of ``stages``, else the latest one (it is resolution-agnostic)."""
    found = stage_exports(runs / "router")
    if is_export_dir(runs / "router" / "export"):  # a stage-less router run dir
        found.setdefault(str(read_export_metadata(runs / "router" / "export").get("stage") or "router"),
                         runs / "router" / "export")
    if not found:
        raise FileNotFoundError(f"no router export in '{runs / 'router'}' (expected router/<stage>/export; train "
                                "it with python -m train.router, or export the monolith with --monolith)")
    matching = {s: p for s, p in found.items() if s in stages}
    if matching:
        return matching
    latest = sorted(found, key=stage_order)[-1]
    log.info("no router for %s: bundling the %s router (routers are resolution-agnostic)", ", ".join(stages), latest)
    return {latest: found[latest]}


# --- agreement between exports -----------------------------------------------------------------------------------
def _shared_fields(meta: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The fields every export of one experiment must share (``stage:``-prefixed: only within a stage)."""
    typed = ExportMetadata.from_dict(meta)
    spec = typed.stage_spec
    return {
        "experiment": typed.experiment,
        "centroids_hash": typed.centroids_hash,
        "num_experts": typed.num_experts if typed.kind != "router" else None,  # a router's K is checked apart
        # where the VAE file sat and how it ran may differ between clusters; the latent space may not
        "vae": typed.latent_space,
        "vae_spatial_factor": spec.vae_spatial_factor,
        f"{stage}:manifest_hash": typed.shards_index_hash,
        f"{stage}:geometry": {"resolution": spec.resolution, "num_frames": spec.num_frames, "fps": spec.fps},
    }


def check_agreement(metas: Mapping[str, tuple[str, Mapping[str, Any]]]) -> None:
    """``metas``: {label: (stage, metadata)}. Raise a ValueError naming the first field two exports disagree on."""
    seen: dict[str, tuple[str, Any]] = {}
    for label, (stage, meta) in metas.items():
        for name, value in _shared_fields(meta, stage).items():
            if value is None or value == "":
                continue  # a field this export does not record cannot disagree
            if name in seen and seen[name][1] != value:
                other, theirs = seen[name]
                raise ValueError(f"the exports disagree on {name}: {other} has {_short(theirs)} but {label} has "
                                 f"{_short(value)}; bundle exports of one experiment (same data, clustering, K)")
            seen.setdefault(name, (label, value))


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


# --- third-party components --------------------------------------------------------------------------------------
def vae_entry(spec: Mapping[str, Any] | str, out: Path, mode: str | None) -> str | dict[str, Any]:
    """What ``model_index.json`` names as the VAE; a real VAE file is placed at ``out/vae.pt`` (``mode`` copy or
    link; None places nothing and only names it)."""
    if isinstance(spec, str):
        spec = json.loads(spec) if spec.lstrip().startswith("{") else {"type": "hunyuan", "path": spec}
    spec = {k: v for k, v in dict(spec).items() if k not in ("device", "dtype")}  # the loader decides those
    if spec.get("type") in WEIGHT_FREE_VAES:
        return spec
    if spec.get("type") != "hunyuan" or not spec.get("path"):
        raise ValueError(f"cannot bundle the VAE spec {spec}: expected a type in {WEIGHT_FREE_VAES} or "
                         "{'type': 'hunyuan', 'path': ...}")
    if mode is not None:
        place_folder(require_path(spec["path"], "vae"), out / VAE_FILE, mode)
        log.info("VAE: %s %s → %s", "copied" if mode == "copy" else "linked", spec["path"], out / VAE_FILE)
    extra = {k: v for k, v in spec.items() if k not in ("type", "path")}
    return {**spec, "path": VAE_FILE} if extra else VAE_FILE


def bundle_text(t5_dir: Path, clip_dir: Path, out: Path, mode: str | None) -> None:
    """Place the text encoders (``mode`` copy/link, None: not) and the null tensors (copied from beside the
    encoders, else generated with them; skipped with a warning when neither is possible)."""
    if mode is not None:
        place_folder(require_path(t5_dir, "t5"), out / "t5", mode)
        place_folder(require_path(clip_dir, "clip"), out / "clip", mode)
        log.info("text encoders: %s %s, %s → %s", "copied" if mode == "copy" else "linked", t5_dir, clip_dir, out)
    nulls = [t5_dir.parent / NULL_T5_FILE, t5_dir.parent / NULL_CLIP_FILE]
    if all(p.is_file() for p in nulls):
        for p in nulls:
            place_folder(p, out / p.name)
        log.info("null tensors copied from %s", t5_dir.parent)
    elif t5_dir.is_dir() and clip_dir.is_dir():
        make_null_tensors(TextEncoders.from_folder(t5_dir, clip_dir), out)
    else:
        log.warning("no null tensors written: neither %s nor the encoders exist; make them later with "
                    "python -m ddm.models.text --make-null %s", nulls[0], out)


# --- the folder ----------------------------------------------------------------------------------------------------
def export_folder(runs: str | Path, out: str | Path, *, monolith: bool = False, stages: Sequence[str] | None = None,
                  sharded: bool = True, text_from: str | Path | None = None, vae: str | None = None,
                  third_party: str | None = "copy", overwrite: bool = False,
                  scheduler: dict[str, Any] | None = None, dtype: str | None = None, single_file: bool = True,
                  checkpoint_format: str = "ddm") -> Path:
    """Assemble a model folder from ``runs`` (= ``runs/<experiment>``) into ``out``; see the module docstring.

    ``third_party``: ``copy`` | ``link`` | None (do not bundle vae.pt, t5/, clip/). ``scheduler``: sampling
    defaults recorded in the index (``num_steps``, ``cfg_scale``) over the Paris defaults. ``dtype``: ``fp32`` |
    ``bf16`` | ``fp16`` casts every checkpoint (default: as trained). ``single_file`` / ``sharded``: which copies
    (master.safetensors, model/) to write. ``checkpoint_format="diffusers"``: experts as FluxTransformer2DModel
    folders, the VAE as AutoencoderKLHunyuanVideo, a scheduler config (``ddm.interop_export``). Returns ``out``.
    """
    if checkpoint_format not in ("ddm", "diffusers"):
        raise ValueError(f"checkpoint_format must be 'ddm' or 'diffusers', got {checkpoint_format!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not (single_file or sharded):
        raise ValueError("write at least one copy: master.safetensors (single_file) or model/ (sharded)")
    if checkpoint_format == "diffusers":
        from ddm.interop_export import export_diffusers

        out = Path(out)
        if out.exists() and not overwrite:
            raise FileExistsError(f"'{out}' already exists; pass --overwrite to replace it")
        native = out.with_name(f".{out.name}.native")
        export_folder(runs, native, monolith=monolith, stages=stages, sharded=False, text_from=text_from, vae=vae,
                      third_party=third_party, overwrite=True, scheduler=scheduler)
        try:
            return export_diffusers(native, out, dtype=DTYPES[dtype] if dtype else None, overwrite=overwrite)
        finally:
            remove_path(native)
    runs, out = Path(runs), Path(out)
    if out.exists() and not overwrite:
        if (out / MODEL_INDEX).exists():
            raise FileExistsError(f"'{out}' already holds a model folder; pass --overwrite to replace it")
        if not out.is_dir() or any(out.iterdir()):
            raise FileExistsError(f"'{out}' exists and is not an empty folder; pass --overwrite to replace it")
    # everything is validated before anything is written: a failed export never touches an existing folder
    experts = find_expert_exports(runs, monolith, stages)
    stage_names = list(next(iter(experts.values())))
    routers = {} if monolith else find_router_exports(runs, stage_names)
    metas = {f"expert{k}/{s}": (s, read_export_metadata(p)) for k, per in experts.items() for s, p in per.items()}
    metas.update({f"router/{s}": (s, read_export_metadata(p)) for s, p in routers.items()})
    check_agreement(metas)
    num_experts = len(experts)
    first = metas[f"expert1/{stage_names[-1]}"][1]
    typed = ExportMetadata.from_dict(first)
    if not monolith:
        trained_k = typed.num_experts
        if trained_k is not None and int(trained_k) != num_experts:
            raise ValueError(f"the runs were trained with num_experts={trained_k} but '{runs}' holds {num_experts} "
                             "expert runs")
        for stage, path in routers.items():
            predicted = int(metas[f"router/{stage}"][1].get("num_experts") or 0)
            if predicted != num_experts:
                raise ValueError(f"the router predicts {predicted} experts but {num_experts} experts are exported "
                                 f"(router '{path}')")
    kinds = {label: m.get("kind") for label, (_, m) in metas.items()}
    wrong = {label: kind for label, kind in kinds.items() if kind != ("router" if label.startswith("router") else
                                                                      "expert")}
    if wrong:
        raise ValueError(f"exports of the wrong kind: {wrong}")

    text = typed.text or {}
    if text_from is not None:
        t5_dir, clip_dir = Path(text_from) / "t5", Path(text_from) / "clip"
    elif text.get("t5_dir") and text.get("clip_dir"):
        t5_dir, clip_dir = Path(text["t5_dir"]), Path(text["clip_dir"])
    else:
        raise ValueError("the exports name no text encoders (text.t5_dir, text.clip_dir): pass "
                         "--text-from DIR (a folder holding t5/ and clip/)")
    vae_spec = vae if vae is not None else typed.vae
    if not vae_spec:
        raise ValueError("the exports name no VAE: pass --vae PATH or --vae '{\"type\": ...}'")

    final, out = out, staging_dir(out)
    remove_path(out)  # left by an export killed mid-write
    out.mkdir(parents=True)
    try:
        jobs = [(src, out / f"expert{k}" / s) for k, per in experts.items() for s, src in per.items()]
        bundle_text(t5_dir, clip_dir, out, third_party)
        router_rel: str | dict[str, str] | None = None
        if routers:
            router_rel = ROUTER_DIR if len(routers) == 1 else {s: f"{ROUTER_DIR}/{s}" for s in routers}
            jobs += [(src, out / (ROUTER_DIR if len(routers) == 1 else f"{ROUTER_DIR}/{s}"))
                     for s, src in routers.items()]
        for src, dst in tqdm(jobs, desc="exporting checkpoints", unit="ckpt"):
            if dtype is None:
                copy_export(src, dst, single_file=single_file, sharded=sharded)
            else:
                state_dict, meta = load_export(src)
                state_dict = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state_dict.items()}
                copy_export(src, dst, single_file=single_file, sharded=sharded, state_dict=state_dict,
                            metadata={**meta, "export_dtype": dtype})
            log.info("%s → %s", src, dst)

        config = typed.config
        shift = typed.stage_spec.flow_shift
        index = ModelIndex(
            num_experts=num_experts, experts=[f"expert{k}" for k in experts],
            expert_architecture=ARCHITECTURES.get(config.get("layout"), config.get("layout")),
            router_architecture="dit-router" if routers else None, router=router_rel,
            vae=vae_entry(vae_spec, out, third_party),
            stages={s: stage_geometry_from_metadata(metas[f"expert1/{s}"][1], s) for s in stage_names},
            default_stage=stage_names[-1], text_pad_to=typed.stage_spec.text_pad_to,
            scheduler={**DEFAULT_SCHEDULER, "shift": shift if shift is not None else "video", **(scheduler or {})},
            extra={"expert_preset": config.get("preset"), "monolith": monolith, "source": {
                "runs": str(runs.resolve()), "experiment": first.get("experiment"),
                "centroids_hash": first.get("centroids_hash"),
                "steps": {label: m.get("step") for label, (_, m) in metas.items()}}},
        )
        # pool.json (provenance and hashes of every expert and router file, ddm.pool), then the index: last
        write_pool_manifest(out, index, operation={"op": "export", "runs": str(runs.resolve())})
        write_model_index(out, index)
    except BaseException:
        remove_path(out)  # the staged copy only; ``final`` was never touched
        raise
    swap_into_place(out, final)
    log.info("model folder written: %s (%d expert(s), stages %s, router %s)", final, num_experts,
             ", ".join(stage_names), router_rel)
    return final


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m ddm.assemble`` argument parser (no checks beyond argparse's)."""
    parser = argparse.ArgumentParser(prog="python -m ddm.assemble", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, type=Path, help="runs/<experiment> (the training run dirs)")
    parser.add_argument("--out", required=True, type=Path, help="the model folder to write")
    parser.add_argument("--monolith", action="store_true", help="a one-expert folder from runs/<exp>/monolith/")
    parser.add_argument("--stages", default=None, help="comma-separated stages (default: every stage exported)")
    parser.add_argument("--no-sharded", action="store_true", help="write only master.safetensors, no model/")
    parser.add_argument("--formats", default="master,sharded",
                        help="copies of each checkpoint: master (master.safetensors), sharded (model/), or both "
                             "(default: master,sharded, as Paris ships)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast every checkpoint to this dtype (default: as trained)")
    parser.add_argument("--format", dest="checkpoint_format", choices=("ddm", "diffusers"), default="ddm",
                        help="ddm: our folder; diffusers: experts as FluxTransformer2DModel folders, the VAE as "
                             "AutoencoderKLHunyuanVideo, a FlowMatchEulerDiscreteScheduler config")
    parser.add_argument("--text-from", type=Path, default=None,
                        help="folder with t5/ and clip/ (default: the text encoders the runs trained with)")
    parser.add_argument("--vae", default=None, help="a vae.pt path or a JSON VAE spec (default: the runs' config)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--link", action="store_true", help="symlink vae.pt, t5/ and clip/ instead of copying them")
    group.add_argument("--no-third-party", action="store_true",
                       help="do not bundle vae.pt, t5/, clip/ (users place them; the index still names them)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model folder at --out")
    # --steps/--cfg: ddm.generate's and ddm.evaluate's old spellings, accepted here too for one release so the
    # three CLIs take the same words (deprecated aliases; the dest names stay num_steps/cfg_scale).
    parser.add_argument("--num-steps", "--steps", dest="num_steps", type=int, default=None,
                        help=f"default Euler steps recorded in the index (else {DEFAULT_SCHEDULER['num_steps']}); "
                             "--steps is a deprecated alias")
    parser.add_argument("--cfg-scale", "--cfg", dest="cfg_scale", type=float, default=None,
                        help=f"default guidance scale recorded in the index (else {DEFAULT_SCHEDULER['cfg_scale']}); "
                             "--cfg is a deprecated alias")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI: export the training runs to a model folder."""
    parser = build_parser()
    args = parser.parse_args(argv)
    scheduler = {key: value for key, value in (("num_steps", args.num_steps), ("cfg_scale", args.cfg_scale))
                 if value is not None}
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    third_party = None if args.no_third_party else ("link" if args.link else "copy")
    formats = {f.strip() for f in args.formats.split(",") if f.strip()}
    if not formats or formats - {"master", "sharded"}:
        parser.error(f"--formats takes master, sharded or master,sharded; got {args.formats!r}")
    out = export_folder(args.runs, args.out, monolith=args.monolith, stages=stages,
                        sharded="sharded" in formats and not args.no_sharded, single_file="master" in formats,
                        text_from=args.text_from, vae=args.vae, third_party=third_party, overwrite=args.overwrite,
                        scheduler=scheduler, dtype=args.dtype, checkpoint_format=args.checkpoint_format)
    print(f"model folder written to {out}")


if __name__ == "__main__":
    main()
