"""``python -m ddm.evaluate``: DDM routing strategies against the compute-matched monolith, Paris 2.0's table.

For one prompt set and several model folders (``ddm.assemble``'s DDM folder with strategies, the monolith
folder as the baseline) it generates the videos — or reuses the ones already generated — computes FVD,
CLIP text-video, aesthetic and motion, and writes ``<out>/metrics.json`` first, then ``report.md`` and
``plots/*.png`` from it (:mod:`ddm.eval.report`)::

    python -m ddm.evaluate --model ddm=paris:top1,top2,full --model mono=paris_mono --baseline mono \\
        --out eval/ --prompts-from-shards prep/shards/stage2 --num-videos 256 \\
        --real-videos prep/manifest.parquet --i3d i3d_torchscript.pt --clip paris/clip \\
        --aesthetic sac+logos+ava1-l14-linearMSE.pth

Runs. ``--model NAME=FOLDER[:STRATEGY,...]``; strategies are ``top1``, ``topN`` (top-N renormalised,
``top2`` = Paris 1.0's best), ``full``, ``threshold`` and ``oracle`` (the expert of each prompt's true
cluster, from ``--oracle-ids``). A DDM folder without strategies runs
``top1,top2,full``; a monolith folder (one expert) runs once, as strategy ``single``. Each run is named
``NAME/STRATEGY`` (or ``NAME`` for a monolith); ``--baseline`` takes either form when unambiguous.

Every run shares the prompts and the seeds (video i: prompt i mod P, seed ``--seed`` + i), so the runs are
paired video by video and the report adds the paired difference's SE to each comparison.

Resumable generation. Videos go to ``<out>/videos/<NAME>/<STRATEGY>/<i>.mp4`` (6-digit i), each batch's
routing trace to ``trace-*.json`` beside them, and ``run.json`` records the generation settings and, per
video, its prompt, seed and trace row. ``run.json`` is the commit point: it is rewritten (atomically) only
after a batch's trace and mp4 files are in place, and the mp4 files are written atomically, so a killed run
never leaves a video a rerun would trust half-written. A rerun regenerates only the videos ``run.json`` does
not list; other settings, prompts or seeds than recorded raise instead of mixing two evaluations.

FVD needs ``--real-videos`` (a folder of videos or a prep ``manifest.parquet``); the real statistics are
cached (:func:`ddm.eval.fvd.real_feature_stats`). Without them FVD is skipped and the report says so.

Frames. Videos are generated at the frame count the models were trained on (the stage's ``num_frames`` in
the first model folder's ``model_index.json``) unless ``--num-frames`` says otherwise. FVD's I3D needs 16-frame
clips and never pads or loops frames: with shorter default videos it is skipped (a note says so); an explicit
shorter ``--num-frames`` with FVD asked for raises.

Tiny mode. ``--tiny-backbones DIR`` builds (once) a random-init I3D, CLIP and aesthetic head in DIR; every
number is then labelled ``tiny-random (test only)``.

The synthetic data's own metrics (:mod:`ddm.eval.reference`). ``--groundtruth DIR`` (a ``data.synthetic``
folder of a held-out seed) adds the ground-truth accuracies — prompt accuracy, family, background, colour,
direction, speed, each mean ± SE with chance levels — by image analysis of each video against its prompt
(:mod:`ddm.eval.groundtruth`; no learned weights); its captions are the prompts unless ``--prompts`` /
``--prompts-from-shards`` are given. ``--domain-backbone PATH`` adds the domain FVD with its real-vs-real floor
(:mod:`ddm.eval.domain`; built and cached at PATH in seconds when missing). Both score each video from the
exact frames the model made (``<i>.npy`` beside the mp4: a 16-px mp4 smears the colour of a 3-px shape), and a
contact sheet (``contact_sheet.png``: per prompt, the real clip and every run's frames) is written.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from ddm.files import atomic_write
from ddm.eval.classic import (Backbones, SharedImageEmbeddings, build_tiny_backbones, compute_metrics, load_backbones,
                              real_video_paths)
from ddm.eval.generation import RunFolder, generate_run, load_run_videos
from ddm.eval.report import CLASSIC_METRICS, EVAL_FORMAT, METRICS, compare_runs, write_report
from ddm.eval.runs import (DDM_DEFAULT_STRATEGIES, MONOLITH_STRATEGY, ModelSpec, RunSpec,  # noqa: F401
                           model_runs, parse_model_arg, parse_strategy)
from ddm.eval.stats import TINY_LABEL
from ddm.sampling_spec import SamplingSpec
from ddm.model_folder import canonical_stage, read_model_index
from ddm.eval.contact_sheet import write_contact_sheet
from ddm.shards import check_split, iter_shard, read_index
from ddm.video_io import probe_video
from ddm.eval.reference import check_synthetic_request, DOMAIN_METRIC, GT_METRICS, SyntheticMetrics, SyntheticReference

__all__ = ["ModelSpec", "RunSpec", "parse_model_arg", "parse_strategy", "read_prompt_file", "shard_captions",
           "Backbones", "build_tiny_backbones", "load_backbones", "SharedImageEmbeddings", "RunFolder",
           "generate_run", "real_video_paths", "compute_metrics", "check_metric_names", "evaluate",
           "main"]

log = logging.getLogger("ddm.evaluate")

CONTACT_SHEET_ROWS = 6


# --- prompts ---------------------------------------------------------------------------------------------------
def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line (``ddm.generate``'s reader); ValueError when there are none."""
    from ddm.generate import read_prompts

    if not Path(path).is_file():
        raise FileNotFoundError(f"prompt file '{path}' does not exist")
    return read_prompts(Path(path))


def shard_captions(shards_dir: str | Path, split: str = "val") -> list[str]:
    """The captions of one split of a shards dir (``ddm.shards`` index order): the held-out prompts."""
    index = read_index(shards_dir).to_pydict()
    wanted = {k for k, s in zip(index["key"], index["split"]) if s == check_split(split)}
    shards = sorted({sh for sh, s in zip(index["shard"], index["split"]) if s == split})
    captions = []
    for shard in shards:
        for key, members in iter_shard(Path(shards_dir) / shard):
            if key in wanted:
                if "txt" not in members:
                    raise ValueError(f"sample {key} in '{shard}' has no caption (txt member)")
                captions.append(members["txt"].decode("utf-8").strip())
    if not captions:
        raise ValueError(f"the '{split}' split of '{shards_dir}' holds no samples, so there is no prompt to "
                         "evaluate on")
    return captions


# --- the evaluation --------------------------------------------------------------------------------------------

def check_metric_names(metrics: Sequence[str]) -> None:
    """ValueError unless ``metrics`` is a non-empty list of names from :data:`ddm.eval.report.METRICS`."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metrics {unknown or list(metrics)}; choose from {','.join(METRICS)}")


def _model_error(spec: ModelSpec, e: Exception) -> Exception:
    """A loading failure of a model folder, re-raised naming the model (missing files stay FileNotFoundError)."""
    if isinstance(e, FileNotFoundError):
        return FileNotFoundError(f"model {spec.name!r} ({spec.folder}): {e}")
    return ValueError(f"model {spec.name!r}: '{spec.folder}' does not load as a DDM or monolith model folder "
                      f"({type(e).__name__}: {e})")


def _declared_num_experts(spec: ModelSpec) -> int | None:
    """``num_experts`` from the folder's ``model_index.json`` (None when it does not say)."""
    try:
        return read_model_index(spec.folder).num_experts
    except (OSError, ValueError) as e:
        raise _model_error(spec, e) from e


def _load_pipeline(spec: ModelSpec, *, stage: str | None, device: str, dtype: Any) -> Any:
    from ddm.pipeline import DDMPipeline

    log.info("model %s: loading %s", spec.name, spec.folder)
    try:
        return DDMPipeline.from_pretrained(spec.folder, stage=stage, device=device, dtype=dtype)
    except Exception as e:  # any failure to load is the same problem to the user: this folder is not usable
        raise _model_error(spec, e) from e


def _video_shape(path: Path) -> tuple[int, int, int]:
    info = probe_video(path, exact=False)
    return info["num_frames"], info["height"], info["width"]


def evaluate(models: Sequence[ModelSpec], baseline: str, out: str | Path, prompts: Sequence[str], *,
             prompt_source: str = "prompts", num_videos: int | None = None, seed: int = 0,
             steps: int | None = None, cfg: float | None = None, stage: str | None = None,
             num_frames: int | None = None, height: int | None = None, width: int | None = None,
             threshold: float = 0.1, metrics: Sequence[str] = tuple(METRICS),
             backbones: Backbones | None = None, real_videos: str | Path | None = None,
             cache_dir: str | Path | None = None, batch_size: int = 4, fps: float | None = None,
             frame_stride: int = 1, motion_resolution: int | None = None, device: str = "cpu", dtype: Any = None,
             progress: bool = True, reference: Any = None, domain_backbone: str | Path | None = None,
             contact_sheet_rows: int = CONTACT_SHEET_ROWS, oracle_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Generate (or reuse) every run's videos, compute the metrics, write ``metrics.json``, ``report.md``, plots.

    Everything that can be checked before generating is checked first (prompts, metric names, backbones,
    model folders, strategies, the baseline, the real videos). ``steps``/``cfg`` left None use each model
    folder's scheduler defaults (``model_index.json``), ``num_frames`` the frames the models were trained on.
    ``reference`` (a :class:`ddm.eval.reference.SyntheticReference`) enables the ground-truth metrics and,
    with ``domain_backbone``, the domain FVD. ``oracle_ids`` (one expert id 1..K per prompt, the prompt's true
    cluster) is what an ``oracle`` run samples with. Returns the evaluation record (the content of
    ``metrics.json``); see the module docstring.
    """
    from ddm.eval.fvd import ClipSettings

    out, prompts, backbones = Path(out), list(prompts), backbones or Backbones()
    if not prompts:
        raise ValueError("the prompt set is empty: there is nothing to evaluate")
    check_metric_names(metrics)
    _check_backbones(metrics, backbones, fvd_wanted=real_videos is not None)
    if reference is not None or any(m.startswith("gt_") or m == "domain_fvd" for m in metrics):
        check_synthetic_request(metrics, prompts, reference, domain_backbone,
                                num_videos if num_videos is not None else len(prompts))
    names = [m.name for m in models]
    if not models or len(set(names)) != len(names):
        raise ValueError(f"give each --model a distinct NAME, got {names}")
    n = num_videos if num_videos is not None else len(prompts)
    if n < 1:
        raise ValueError(f"--num-videos must be >= 1, got {n}")
    clip_settings = ClipSettings()
    fvd_on = "fvd" in metrics and real_videos is not None
    notes: list[str] = []
    if num_frames is None:
        num_frames = trained_frames(models[0], stage)
        if fvd_on and num_frames is not None and num_frames < clip_settings.frames_needed:
            fvd_on = False
            notes.append(f"FVD (I3D) skipped: the models were trained on {num_frames}-frame videos and I3D needs "
                         f"{clip_settings.frames_needed}; pass --num-frames {clip_settings.frames_needed} to force it.")
    elif fvd_on and num_frames < clip_settings.frames_needed:
        raise ValueError(f"FVD needs videos of at least {clip_settings.frames_needed} frames, but --num-frames is "
                         f"{num_frames}: use 17 (or drop fvd from --metrics)")
    declared = {m.name: _declared_num_experts(m) for m in models}
    planned = {m.name: model_runs(m, declared[m.name]) for m in models if declared[m.name] is not None}
    if len(planned) == len(models):  # every run is known: a wrong --baseline fails before any generation
        _resolve_baseline(baseline, [{"name": r.name, "model": r.model} for rs in planned.values() for r in rs])

    wants_oracle = any(parse_strategy(st)[0] == "oracle" for m in models for st in (m.strategies or ()))
    if wants_oracle and (oracle_ids is None or len(oracle_ids) != len(prompts)):
        raise ValueError(f"an oracle run needs one expert id per prompt (--oracle-ids): got "
                         f"{'none' if oracle_ids is None else len(oracle_ids)} for {len(prompts)} prompts")
    video_prompts = [prompts[i % len(prompts)] for i in range(n)]
    per_prompt = {"oracle_ids": [int(oracle_ids[i % len(prompts)]) for i in range(n)]} if wants_oracle else {}
    seeds = [seed + i for i in range(n)]
    if n > len(prompts):
        notes.append(f"{n} videos from {len(prompts)} prompts: prompts repeat (video i uses prompt i mod "
                     f"{len(prompts)}, each with its own seed).")
    real_stats = None
    if fvd_on:
        real_stats = _real_stats(real_videos, backbones.i3d, Path(cache_dir or out / "fvd_cache"), clip_settings,
                                 batch_size=batch_size, progress=progress, notes=notes)
    elif "fvd" in metrics and real_videos is None:
        notes.append("FVD skipped: no --real-videos given (FVD compares generated with real videos).")

    gen = {"num_steps": steps, "cfg_scale": cfg, "num_frames": num_frames, "height": height, "width": width}
    runs: list[dict[str, Any]] = []
    for spec in models:
        runs += _generate_model(spec, planned.get(spec.name), out, video_prompts, seeds, gen, threshold=threshold,
                                stage=stage, device=device, dtype=dtype, batch_size=batch_size, fps=fps,
                                progress=progress, per_prompt=per_prompt)
        sizes = {(r["videos"]["frames"], r["videos"]["height"], r["videos"]["width"]): r["name"] for r in runs}
        if len(sizes) > 1:
            raise ValueError("runs made videos of different sizes: " + ", ".join(
                f"{name} {_fmt_shape(shape)}" for shape, name in sizes.items())
                + "; compare models at one size (--num-frames, --height, --width)")
        short = [r for r in runs if r["videos"]["frames"] < clip_settings.frames_needed]
        if fvd_on and short:
            raise ValueError(f"{short[0]['name']}: FVD needs videos of at least {clip_settings.frames_needed} frames "
                             f"but this run's have {short[0]['videos']['frames']}; generate longer videos with "
                             "--num-frames 17")
    baseline = _resolve_baseline(baseline, runs)

    synthetic = None
    if reference is not None:
        synthetic = SyntheticMetrics(metrics, reference, domain_backbone, runs[0]["videos"], notes)
    run_paths = {r["name"]: r.pop("_paths") for r in runs}
    for r in runs:
        paths = run_paths[r["name"]]
        results = compute_metrics(paths, video_prompts, metrics, backbones, real_stats=real_stats,
                                  frame_stride=frame_stride, motion_resolution=motion_resolution,
                                  batch_size=batch_size, progress=progress, name=r["name"])
        if synthetic is not None:
            results.update(synthetic.run_metrics(load_run_videos(paths), video_prompts, r["name"]))
        r["metrics"] = {k: v.to_dict() for k, v in results.items()}
        for v in results.values():
            log.info("%s: %s", r["name"], v)
    record = {
        "format": EVAL_FORMAT, "baseline": baseline, "notes": notes, "runs": runs,
        "settings": {"num_videos": n, "num_prompts": len(prompts), "prompt_source": prompt_source, "seed": seed,
                     "steps": steps, "cfg": cfg, "stage": stage, "num_frames": num_frames, "height": height,
                     "width": width, "metrics": list(metrics), "frame_stride": frame_stride,
                     "motion_resolution": motion_resolution, "fps": fps, "runs": [r["name"] for r in runs],
                     "groundtruth": str(reference.root) if reference else None,
                     "domain_backbone": str(domain_backbone) if domain_backbone else None,
                     "tiny_backbones": any(getattr(b, "tiny", False) for b in (backbones.i3d, backbones.clip))},
        "comparison": compare_runs(runs, baseline),
    }
    metrics_path = atomic_write(out / "metrics.json",
                                lambda tmp: tmp.write_text(json.dumps(record, indent=1, allow_nan=False)))
    written = write_report(metrics_path)
    log.info("wrote %s, %s and %d plot(s) in %s", metrics_path, written["report"], len(written) - 1, out / "plots")
    if reference is not None and contact_sheet_rows > 0:
        rows = min(contact_sheet_rows, n)
        sheet = write_contact_sheet(
            out / "contact_sheet.png", video_prompts[:rows],
            {"real": synthetic.real_for_prompts(video_prompts[:rows]),
             **{r["name"]: load_run_videos(run_paths[r["name"]][:rows]) for r in runs}})
        log.info("wrote %s", sheet)
    return record


def trained_frames(spec: ModelSpec, stage: str | None) -> int | None:
    """The frame count of ``stage`` (default: the folder's default stage) in a folder's ``model_index.json``."""
    try:
        index = read_model_index(spec.folder)
    except (OSError, ValueError) as e:
        raise _model_error(spec, e) from e
    name = stage or index.default_stage
    if name is None:
        return None
    geometry = index.stages.get(name) or index.stages.get(canonical_stage(name, index.stages) or "")
    return geometry.num_frames if geometry is not None else None


def _check_backbones(metrics: Sequence[str], backbones: Backbones, *, fvd_wanted: bool) -> None:
    missing = [m for m, net in (("clip", backbones.clip), ("aesthetic", backbones.aesthetic))
               if m in metrics and net is None]
    if "fvd" in metrics and fvd_wanted and backbones.i3d is None:
        missing.append("fvd")
    if missing:
        raise ValueError(f"metrics {missing} need their backbones loaded (see load_backbones)")


def _real_stats(real_videos: str | Path, i3d: Any, cache_dir: Path, settings: Any, *, batch_size: int,
                progress: bool, notes: list[str]) -> Any:
    """The real set's cached I3D statistics; notes say how many videos were used and left out."""
    from ddm.eval.fvd import real_feature_stats

    paths, short = real_video_paths(real_videos, settings.frames_needed)
    if short:
        notes.append(f"FVD: {short} real video(s) shorter than {settings.frames_needed} frames left out.")
    try:
        stats = real_feature_stats(paths, i3d, cache_dir, settings, batch_size=batch_size, progress=progress)
    except ValueError as e:
        raise ValueError(f"real videos '{real_videos}': {e}") from e
    notes.append(f"FVD real set: {stats.n} videos from {real_videos}.")
    return stats


def _generate_model(spec: ModelSpec, runs: list[RunSpec] | None, out: Path, prompts: list[str], seeds: list[int],
                    gen: dict[str, Any], *, threshold: float, stage: str | None, device: str, dtype: Any,
                    batch_size: int, fps: float | None, progress: bool,
                    per_prompt: dict[str, list[Any]] | None = None) -> list[dict[str, Any]]:
    """Generate (or reuse) the videos of every run of one model; the model is loaded only if needed.
    ``per_prompt`` (``oracle_ids``) goes to the oracle runs, one value per video."""
    pipe = None
    if runs is None:  # the index does not say how many experts: the loaded model does
        pipe = _load_pipeline(spec, stage=stage, device=device, dtype=dtype)
        runs = model_runs(spec, int(pipe.num_experts))
    records = []
    for run in runs:
        sampler = run.sampler_args(threshold)
        extra = dict(per_prompt or {}) if sampler["strategy"] == "oracle" else {}
        settings = {"folder": str(spec.folder.resolve()), "stage": stage, "num_experts": run.num_experts,
                    **sampler, **gen, **extra}  # the oracle ids are settings: other ids never reuse these videos
        folder = RunFolder(out / "videos" / run.model / run.strategy, settings)
        if pipe is None and not all(folder.is_done(i, p, s) for i, (p, s) in enumerate(zip(prompts, seeds))):
            pipe = _load_pipeline(spec, stage=stage, device=device, dtype=dtype)
            if int(pipe.num_experts) != run.num_experts:
                raise ValueError(f"model {spec.name!r}: model_index.json says {run.num_experts} experts but "
                                 f"{pipe.num_experts} loaded")
        sampling = SamplingSpec(run.routing(threshold), num_steps=gen["num_steps"], cfg_scale=gen["cfg_scale"])
        size = {key: gen[key] for key in ("num_frames", "height", "width")}
        reused, generated = generate_run(pipe, folder, prompts, seeds, spec=sampling, generate_kwargs=size,
                                         batch_size=batch_size, fps=fps, progress=progress, name=run.name,
                                         per_prompt=extra)
        frames, height, width = _video_shape(folder.video_path(0))
        trace = folder.routing_trace(len(prompts))
        records.append({
            "name": run.name, "model": run.model, "strategy": run.strategy, "folder": str(spec.folder),
            "num_experts": run.num_experts, "generation": settings, "resolved": folder.resolved,
            "videos": {"n": len(prompts), "reused": reused, "generated": generated, "frames": frames,
                       "height": height, "width": width, "dir": str(folder.path)},
            "routing": None if trace is None else {
                "strategy": trace.strategy, "t": [float(t) for t in trace.t],
                "mean_weights": trace.mean_weights.double().tolist(),
                "samples_per_expert": trace.samples_per_expert.tolist()},
            "_paths": [folder.video_path(i) for i in range(len(prompts))]})
    return records


def _fmt_shape(shape: tuple[int, int, int]) -> str:
    return f"({shape[0]} frames, {shape[1]}x{shape[2]})"


def _resolve_baseline(baseline: str, runs: Sequence[dict[str, Any]]) -> str:
    """A run name, or a model name that has exactly one run."""
    names = [r["name"] for r in runs]
    if baseline in names:
        return baseline
    of_model = [r["name"] for r in runs if r["model"] == baseline]
    if len(of_model) == 1:
        return of_model[0]
    if of_model:
        raise ValueError(f"--baseline {baseline!r} has several runs {of_model}: name one of them")
    raise ValueError(f"--baseline {baseline!r} is none of the evaluated runs {names}")


# --- CLI -------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``python -m ddm.evaluate`` argument parser (no checks beyond argparse's)."""
    p = argparse.ArgumentParser(prog="python -m ddm.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER[:STRATEGY,...]",
                   help="a model folder to evaluate (repeatable); strategies: top1, topN, full, threshold")
    p.add_argument("--baseline", required=True, help="the run (NAME or NAME/STRATEGY) the others are compared with")
    p.add_argument("--out", required=True, type=Path, help="output folder (videos/, metrics.json, report.md, plots/)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", type=Path, help="text file, one prompt per line")
    src.add_argument("--prompts-from-shards", type=Path, metavar="SHARDS_DIR",
                     help="use the held-out captions of a shards dir (see --split)")
    p.add_argument("--groundtruth", type=Path, metavar="SYNTHETIC_DIR",
                   help="a data.synthetic folder (or its synthetic.csv) of a held-out seed: adds the ground-truth "
                        "accuracies; its captions are the prompts unless --prompts/--prompts-from-shards are given")
    p.add_argument("--domain-backbone", type=Path, metavar="PATH",
                   help="the domain backbone (.safetensors; built and cached there when missing): adds the domain "
                        "FVD with its real-vs-real floor (needs --groundtruth with >= 2N clips)")
    p.add_argument("--contact-sheet-rows", type=int, default=CONTACT_SHEET_ROWS,
                   help="prompts shown in contact_sheet.png (with --groundtruth; 0 = none)")
    p.add_argument("--split", default="val", help="split of --prompts-from-shards (default: val)")
    p.add_argument("--num-videos", type=int, help="videos per run (default: one per prompt; more repeat prompts)")
    p.add_argument("--seed", type=int, default=0, help="video i uses seed SEED + i in every run (default 0)")
    # --steps, --cfg and --frames: the old spellings, deprecated aliases for one release (ddm.generate and
    # ddm.assemble share the --num-steps/--cfg-scale/--num-frames names); the dest names are unchanged.
    p.add_argument("--num-steps", "--steps", dest="steps", type=int,
                   help="Euler steps (default: each model folder's scheduler, else 50); --steps is a deprecated alias")
    p.add_argument("--cfg-scale", "--cfg", dest="cfg", type=float,
                   help="guidance scale (default: each model folder's scheduler, else 7.5); --cfg is a deprecated "
                        "alias")
    p.add_argument("--stage", help="checkpoint stage to load (default: the folder's)")
    p.add_argument("--num-frames", "--frames", dest="num_frames", type=int,
                   help="frames per video (default: what the models were trained on); --frames is a deprecated alias")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--threshold", type=float, default=0.1, help="weight cut-off of the 'threshold' strategy")
    p.add_argument("--oracle-ids", type=Path, metavar="JSON",
                   help="a JSON list: the true cluster (expert id 1..K) of each prompt, for 'oracle' runs")
    p.add_argument("--real-videos", type=Path, metavar="DIR_OR_MANIFEST", help="real videos for FVD")
    p.add_argument("--cache-dir", type=Path, help="where real-video FVD statistics are cached (default OUT/fvd_cache)")
    p.add_argument("--i3d", type=Path, help="i3d_torchscript.pt (FVD)")
    p.add_argument("--clip", type=Path, help="CLIP ViT-L/14 folder (CLIP score, aesthetic)")
    p.add_argument("--aesthetic", type=Path, help="sac+logos+ava1-l14-linearMSE.pth")
    p.add_argument("--tiny-backbones", type=Path, metavar="DIR",
                   help=f"build/reuse random-init test backbones in DIR instead ({TINY_LABEL})")
    p.add_argument("--metrics", help=f"comma-separated subset of {','.join(METRICS)}; 'groundtruth' = every gt_* "
                                     f"(default: {','.join(CLASSIC_METRICS)}; with --groundtruth: the ground-truth "
                                     "metrics, domain_fvd with --domain-backbone, motion, and those of fvd/clip/"
                                     "aesthetic whose networks are given)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--fps", type=float, help="frame rate stored in the mp4 files (default: the model's, else 8)")
    p.add_argument("--frame-stride", type=int, default=1, help="score every n-th frame for CLIP and aesthetic")
    p.add_argument("--motion-resolution", type=int, help="short side motion is measured at (default: native)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype (default: the folder's)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The CLI; returns the evaluation record."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.metrics is None and (args.groundtruth or args.domain_backbone):
        # the synthetic metrics, motion, and the classic ones whose networks were given
        given = {"fvd": args.i3d, "clip": args.clip, "aesthetic": args.aesthetic and args.clip}
        metrics = [m for m in CLASSIC_METRICS if m == "motion" or given.get(m) or args.tiny_backbones]
        metrics += (list(GT_METRICS) if args.groundtruth else []) + ([DOMAIN_METRIC] if args.domain_backbone else [])
    elif args.metrics is None:
        metrics = list(CLASSIC_METRICS)
    else:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        metrics = [k for m in metrics for k in (GT_METRICS if m == "groundtruth" else [m])]
    check_metric_names(metrics)
    models = [parse_model_arg(m) for m in args.model]
    reference = SyntheticReference.load(args.groundtruth) if args.groundtruth is not None else None
    if args.prompts is not None:
        prompts, source = read_prompt_file(args.prompts), str(args.prompts)
    elif args.prompts_from_shards is not None:
        prompts = shard_captions(args.prompts_from_shards, args.split)
        source = f"{args.prompts_from_shards} ({args.split} split)"
    elif reference is not None:
        prompts, source = reference.prompts, f"{reference.root} (held-out synthetic captions)"
    else:
        parser.error("give the prompts: --prompts FILE, --prompts-from-shards DIR or --groundtruth DIR")
    num_frames = args.num_frames
    if args.tiny_backbones is not None:
        if any(x is not None for x in (args.i3d, args.clip, args.aesthetic)):
            parser.error("--tiny-backbones replaces --i3d/--clip/--aesthetic: give one or the other")
        paths = build_tiny_backbones(args.tiny_backbones)
        i3d, clip, aesthetic = paths["i3d"], paths["clip"], paths["aesthetic"]
    else:
        i3d, clip, aesthetic = args.i3d, args.clip, args.aesthetic
    backbones = load_backbones([m for m in metrics if m != "fvd" or args.real_videos is not None],
                               i3d=i3d, clip=clip, aesthetic=aesthetic, device=args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    record = evaluate(models, args.baseline, args.out, prompts, prompt_source=source, num_videos=args.num_videos,
                      seed=args.seed, steps=args.steps, cfg=args.cfg, stage=args.stage, num_frames=num_frames,
                      height=args.height, width=args.width, threshold=args.threshold, metrics=metrics,
                      backbones=backbones, real_videos=args.real_videos, cache_dir=args.cache_dir,
                      batch_size=args.batch_size, fps=args.fps, frame_stride=args.frame_stride,
                      motion_resolution=args.motion_resolution, device=args.device, dtype=dtype,
                      progress=not args.no_progress, reference=reference, domain_backbone=args.domain_backbone,
                      contact_sheet_rows=args.contact_sheet_rows,
                      oracle_ids=json.loads(args.oracle_ids.read_text()) if args.oracle_ids else None)
    reused = sum(r["videos"]["reused"] for r in record["runs"])
    generated = sum(r["videos"]["generated"] for r in record["runs"])
    print(f"reused {reused} video(s), generated {generated}; report: {Path(args.out) / 'report.md'}")
    return record


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # a problem with the inputs: the message, not a traceback
        log.error("%s", e)
        raise SystemExit(f"error: {e}") from None
