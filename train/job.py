"""Building a training job's pieces from its config: geometry, budget, data, text nulls, weights, the fit.

Shared by ``train.expert`` and ``train.router`` so the two jobs have one run-dir, resume, logging and
export path (the router is the same machinery with a different module).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ddm.export_files import read_export_metadata, save_export
from ddm.files import file_sha256
from ddm.export_metadata import ExportMetadata, StageSpec
from ddm import flow
from ddm.flow import latent_frames
from ddm.models import budget as expert_budget_lib
from ddm.models.context_parallel import tokens_per_rank
from ddm.models.presets import ExpertConfig, get_expert_config
from ddm.models.router import RouterConfig, get_router_config, router_flops
from ddm.models.vae import build_vae, vae_spatial_factor
from train.ledger import ComputeLedger, match_monolith
from train.metrics_log import merge_metrics
from train.run import (StartPlan, build_loggers, build_trainer, checkpoint_dir, export_dir, is_rank_zero_process,
                       world_size)
from train.run import deepspeed_config
from ddm.shards import available_experts, expert_counts, index_path, list_shards
from train.sharding import LazyExport
from ddm.models.layouts import detect_layout
from train.ema import cast_for_export
from train.export import gather_full_state_dict

log = logging.getLogger("ddm.train")


# --- identity and geometry ----------------------------------------------------------------------------

def parse_expert(expert: Any, num_experts: int) -> int | str:
    """``1..num_experts`` or ``"all"``; anything else is a clear error."""
    if str(expert) == "all":
        return "all"
    try:
        k = int(expert)
    except (TypeError, ValueError):
        raise ValueError(f"expert must be an integer in 1..{num_experts} or 'all', got {expert!r}") from None
    if not 1 <= k <= int(num_experts):
        raise ValueError(f"expert={k} is outside 1..{num_experts} (num_experts={num_experts}); "
                         "expert ids start at 1, and expert=all trains the monolithic baseline")
    return k


@dataclass(frozen=True)
class Geometry:
    """Pixel and latent sizes of one stage."""

    resolution: int
    num_frames: int
    spatial_factor: int
    latent_frames: int
    latent_size: int
    text_tokens: int


def stage_geometry(cfg: DictConfig) -> Geometry:
    res, frames = int(cfg.stage.resolution), int(cfg.stage.num_frames)
    sf = vae_spatial_factor(OmegaConf.to_container(cfg.vae, resolve=True))  # one source: the VAE config
    if res % sf:
        raise ValueError(f"stage resolution {res} is not divisible by the VAE's spatial factor {sf}")
    text = cfg.recipe.text_pad_to
    return Geometry(res, frames, sf, latent_frames(frames), res // sf, int(text) if text else 32)


def expert_config(cfg: DictConfig) -> ExpertConfig:
    return get_expert_config(cfg.model.preset, **dict(cfg.model.get("overrides") or {}))


MEMBER_KEYS = ("model", "prediction")  # what ``expert_overrides.<k>`` may change


def expert_overrides(cfg: DictConfig) -> dict[int, dict[str, Any]]:
    """``cfg.expert_overrides`` checked: {expert id: {"model": {ExpertConfig field: value}, "prediction": ...}}."""
    node = cfg.get("expert_overrides")
    raw = OmegaConf.to_container(node, resolve=True) if node else {}
    out: dict[int, dict[str, Any]] = {}
    for key, entry in raw.items():
        k = parse_expert(key, cfg.num_experts)
        if k == "all":
            raise ValueError("expert_overrides are per expert (1..num_experts); the monolith uses `model` itself")
        unknown = sorted(set(entry or {}) - set(MEMBER_KEYS))
        if unknown:
            raise ValueError(f"expert_overrides.{k} has unknown keys {unknown}; expected {list(MEMBER_KEYS)}")
        entry = dict(entry or {})
        if "prediction" in entry:
            flow.check_prediction(entry["prediction"])
        out[k] = entry
    return out


def member_settings(cfg: DictConfig, expert: int | str) -> tuple[dict[str, Any], str]:
    """The model overrides and prediction target of ``expert`` in this (possibly heterogeneous) pool: the
    job's ``model.overrides`` / ``flow.prediction`` with the expert's ``expert_overrides`` entry on top."""
    entry = expert_overrides(cfg).get(expert, {}) if expert != "all" else {}
    overrides = {**dict(cfg.model.get("overrides") or {}), **dict(entry.get("model") or {})}
    prediction = str(entry.get("prediction") or cfg.flow.get("prediction") or "velocity")
    flow.check_prediction(prediction)
    return overrides, prediction


def member_config(cfg: DictConfig, expert: int | str) -> tuple[ExpertConfig, str]:
    """The model config and prediction target of ``expert`` in this (possibly heterogeneous) pool."""
    overrides, prediction = member_settings(cfg, expert)
    return get_expert_config(cfg.model.preset, **overrides), prediction


def apply_expert_overrides(cfg: DictConfig, expert: int | str) -> None:
    """Write expert ``expert``'s :func:`member_settings` into ``cfg.model.overrides`` and ``cfg.flow.prediction``
    (in place), so the job, its saved config and its export describe this expert."""
    from omegaconf import open_dict

    overrides, prediction = member_settings(cfg, expert)
    with open_dict(cfg):
        if overrides != dict(cfg.model.get("overrides") or {}):
            cfg.model.overrides = overrides
        if prediction != str(cfg.flow.get("prediction") or "velocity"):
            cfg.flow.prediction = prediction


def router_config(cfg: DictConfig, num_experts: int) -> RouterConfig:
    overrides = dict(cfg.router_model.get("overrides") or {})
    overrides.setdefault("num_experts", int(num_experts))
    return get_router_config(cfg.router_model.preset, **overrides)


@dataclass(frozen=True)
class Budget:
    params: int
    tokens_per_sample: int  # image + text tokens
    image_tokens: int
    flops_per_sample: float  # training FLOPs


def expert_budget(model_cfg: ExpertConfig, g: Geometry) -> Budget:
    tokens = expert_budget_lib.tokens_per_sample(model_cfg, g.resolution, g.resolution, g.num_frames,
                                                 g.text_tokens, spatial_factor=g.spatial_factor)
    flops = expert_budget_lib.training_flops_per_sample(model_cfg, g.resolution, g.resolution, g.num_frames,
                                                        g.text_tokens, spatial_factor=g.spatial_factor)
    return Budget(expert_budget_lib.count_parameters(model_cfg), tokens["image_tokens"] + g.text_tokens,
                  tokens["image_tokens"], float(flops))


def router_training_flops(router_cfg: RouterConfig, g: Geometry) -> float:
    shape = (router_cfg.latent_channels, g.latent_frames, g.latent_size, g.latent_size)
    return 3.0 * float(router_flops(router_cfg, shape))


def router_tokens(router_cfg: RouterConfig, g: Geometry) -> int:
    """Tokens one router call sees (its coarse patches plus the CLS token)."""
    pt, ph, pw = router_cfg.patch_size
    return (g.latent_frames // pt) * (g.latent_size // ph) * (g.latent_size // pw) + 1


def compute_ledger(cfg: DictConfig, budget: Budget, world: int) -> ComputeLedger:
    """The monolith's compute matched to K experts (+ the router, on the DDM side)."""
    g = stage_geometry(cfg)
    r_flops = router_training_flops(router_config(cfg, cfg.num_experts), g)
    # a heterogeneous pool charges each expert its own FLOPs (expert_overrides)
    per_expert = ([expert_budget(member_config(cfg, k)[0], g).flops_per_sample
                   for k in range(1, int(cfg.num_experts) + 1)] if expert_overrides(cfg) else None)
    return match_monolith(int(cfg.num_experts), budget.flops_per_sample, int(cfg.stage.batch_size) * world,
                          int(cfg.stage.max_steps), r_flops, int(cfg.router_batch_size) * world,
                          int(cfg.router_steps), by=cfg.compute_match_by,
                          include_router=bool(cfg.compute_match_include_router), expert_flops_per_sample=per_expert)


def _budget_strategy(cfg: DictConfig) -> str:
    """The ``ddm.models.budget`` strategy name of ``cfg.strategy`` (auto = one device = ddp)."""
    name = {"deepspeed": f"zero{cfg.strategy.get('stage', 2)}"}.get(cfg.strategy.name, cfg.strategy.name)
    return "ddp" if name == "auto" else name


def _budget_precision(precision: Any) -> str:
    """The ``ddm.models.budget`` precision of ``trainer.precision`` (fp16 mixed is counted like bf16 mixed)."""
    p = str(precision)
    p = {"32": "32-true", "16-mixed": "bf16-mixed", "bf16": "bf16-mixed", "bf16-true": "bf16-true"}.get(p, p)
    return p if p in expert_budget_lib.PRECISIONS else "32-true"


def dry_run_report(cfg: DictConfig, model_cfg: ExpertConfig, budget: Budget, g: Geometry, run_dir: Path,
                   batch_size: int, max_steps: int, world: int, context_parallel: int = 1) -> str:
    """What the job would do, computed on the meta device, with nothing allocated: sizes, tokens, FLOPs and
    the per-GPU memory breakdown (``ddm.models.budget.training_memory``) against ``trainer.gpu_memory_gb``,
    with a warning naming the strategies that fit when the chosen one does not. ``world``: all ranks;
    ``context_parallel``: ranks per sample (the global batch is ``batch_size × world / context_parallel``)."""
    with torch.device("meta"):
        from ddm.models.mmdit import MMDiT

        built = sum(p.numel() for p in MMDiT(model_cfg).parameters())
    strategy = _budget_strategy(cfg)
    precision = _budget_precision(cfg.trainer.precision)
    checkpointing = bool(cfg.model.get("activation_checkpointing", False))
    device_gib = float(cfg.trainer.get("gpu_memory_gb") or 80)
    gib = 1024 ** 3

    def memory(strat: str, ckpt: bool) -> dict[str, int]:
        return expert_budget_lib.training_memory(
            model_cfg, strategy=strat, world_size=world, batch_size=batch_size, image_tokens=budget.image_tokens,
            text_tokens=g.text_tokens, precision=precision, activation_checkpointing=ckpt,
            context_parallel=cp)

    cp = int(context_parallel)
    on, off = memory(strategy, True), memory(strategy, False)
    chosen = on if checkpointing else off
    steps_per_epoch = int(cfg.data.samples_per_epoch) // batch_size
    lines = [
        f"dry run: {model_cfg.preset} ({model_cfg.layout} layout), stage {cfg.stage.name}",
        f"  parameters            {built:,} (meta-device build; analytic {budget.params:,})",
        f"  video                 {g.resolution}x{g.resolution} x {g.num_frames} frames -> latent "
        f"{g.latent_frames}x{g.latent_size}x{g.latent_size}",
        f"  tokens per sample     {budget.image_tokens:,} image + {g.text_tokens} text",
        f"  training FLOPs/sample {budget.flops_per_sample:.4e}",
        f"  strategy / world      {strategy} / {world} ranks; batch {batch_size} per rank ({batch_size * world // cp} "
        f"global); precision {precision}",
    ]
    if cp > 1:
        lines.append(f"  context parallel      {cp} ranks per sample ({world // cp} data-parallel groups); "
                     f"tokens per rank {tokens_per_rank(budget.image_tokens, g.text_tokens, cp):,} outside attention")
    if cfg.strategy.name == "deepspeed":
        lines.append(f"  deepspeed micro batch {deepspeed_config(cfg, batch_size)['train_micro_batch_size_per_gpu']} "
                     "per GPU (the resolved batch)")
    lines += [
        f"  memory per GPU (GiB)  activation checkpointing:   on{' (chosen)' if checkpointing else '':9s}"
        f"   off{'' if checkpointing else ' (chosen)'}",
    ]
    labels = {"params": "weights", "grads": "gradients", "optimizer": "AdamW moments", "ema": "EMA (fp32)",
              "master": "master weights (fp32)", "activations": "activations", "total": "total"}
    for key, label in labels.items():
        lines.append(f"    {label:26s}{on[key] / gib:12.2f}{'':10s}{off[key] / gib:12.2f}")
    lines.append(f"  device memory         {device_gib:g} GiB (trainer.gpu_memory_gb); closed form, excludes the "
                 "CUDA context and fragmentation (docs/bench/scale.md)")
    if chosen["total"] > device_gib * gib:
        fits = [f"{s} (activation checkpointing {'on' if c else 'off'})" for s in expert_budget_lib.STRATEGIES
                for c in (True, False) if memory(s, c)["total"] <= device_gib * gib]
        lines.append(f"  WARNING: {chosen['total'] / gib:.1f} GiB per GPU exceeds the {device_gib:g} GiB device with "
                     f"strategy {strategy} at {world} ranks, batch {batch_size}. "
                     + (f"Fits: {', '.join(fits)}." if fits else
                        "No strategy fits at this world size and batch: add GPUs or lower the batch."))
    else:
        lines.append(f"  fits: {chosen['total'] / gib:.1f} of {device_gib:g} GiB per GPU")
    lines += [
        f"  steps per epoch       {steps_per_epoch:,}; max steps {max_steps:,}",
        f"  run dir               {run_dir}",
    ]
    return "\n".join(lines)


# --- data ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardSet:
    root: Path
    num_samples: int
    manifest_hash: str
    expert_folders: list[int]


def check_shards(cfg: DictConfig, expert: int | str | list[int]) -> ShardSet:
    """The shard set exists and holds this expert (every expert for ``all``, each listed one for a list) —
    before any training."""
    root = Path(cfg.data.shards_dir)
    folders = available_experts(root)
    if isinstance(expert, (list, tuple)):  # a router over some of the pool's experts (retiring one by retraining)
        wanted = [int(k) for k in expert]
        absent = sorted(set(wanted) - set(folders))
        if absent:
            raise ValueError(f"expert(s) {absent} have no shard folder in {root} (it holds "
                             f"{', '.join(f'expert_{k}' for k in folders) or 'none'})")
    elif len(folders) != int(cfg.num_experts):
        raise ValueError(f"num_experts={cfg.num_experts} but {root} holds {len(folders)} expert shard folders "
                         f"({', '.join(f'expert_{k}' for k in folders) or 'none'})")
    else:
        wanted = folders if expert == "all" else [int(expert)]
    for k in wanted:
        if not list_shards(root, k, "train"):
            raise ValueError(f"expert {k} has no training shards in {root / f'expert_{k}'}")
    counts = expert_counts(root, "train")
    return ShardSet(root, sum(counts.get(k, 0) for k in wanted), file_sha256(index_path(root)), folders)


def check_geometry(cfg: DictConfig, shards: ShardSet, latent_channels: int | None):
    """The shards' recorded geometry (``data.geometry``); a ValueError naming both values when the recipe's
    stage (resolution, frames, fps), the latent shape it implies or the VAE disagrees with it."""
    from data.geometry import read_shard_geometry

    found = read_shard_geometry(shards.root)
    g = stage_geometry(cfg)
    latent = None
    if latent_channels is not None and not cfg.data.raw_frames:
        latent = (int(latent_channels), g.latent_frames, g.latent_size, g.latent_size)
    stage = cfg.stage.name
    keys = {"resolution": f"recipe.{stage}.resolution", "num_frames": f"recipe.{stage}.num_frames",
            "fps": f"recipe.{stage}.fps", "vae": "vae"}
    problems = found.mismatches(resolution=g.resolution, num_frames=g.num_frames, fps=cfg.stage.get("fps"),
                                latent_shape=latent, vae=OmegaConf.to_container(cfg.vae, resolve=True))
    if problems:
        lines = [f"{keys.get(name, name)}={_show(want)} but the shards hold {name}={_show(got)}"
                 for name, want, got in problems]
        raise ValueError(f"the recipe disagrees with the shards in {shards.root} (read from {found.source}):\n  "
                         + "\n  ".join(lines) + f"\nTrain with the geometry the shards were encoded at (e.g. "
                         f"recipe.{stage}.resolution={found.height}), or encode shards for this recipe "
                         "(python -m data.prepare).")
    return found


def _show(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def datamodule(cfg: DictConfig, experts: int | str, batch_size: int, balanced: bool, context_parallel: int = 1):
    from data.datamodule import ShardDataModule

    return ShardDataModule(
        cfg.data.shards_dir, experts, "train", batch_size=batch_size, num_workers=int(cfg.data.num_workers),
        samples_per_epoch=int(cfg.data.samples_per_epoch), seed=int(cfg.seed),
        text_pad_to=cfg.data.text_pad_to, raw_frames=bool(cfg.data.raw_frames),
        max_skip_fraction=float(cfg.data.max_skip_fraction), balanced=balanced, context_parallel=context_parallel)


def null_text(cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """CFG null tensors (encodings of ""), generated once beside the text encoders when absent."""
    from ddm.models.text import NULL_CLIP_FILE, NULL_T5_FILE, TextEncoders, load_null_tensors

    folder = Path(cfg.text.get("null_dir") or Path(cfg.text.t5_dir).parent)
    if (folder / NULL_T5_FILE).exists() and (folder / NULL_CLIP_FILE).exists():
        return load_null_tensors(folder)
    log.info("no null text tensors in %s: encoding the empty caption once with %s and %s",
             folder, cfg.text.t5_dir, cfg.text.clip_dir)
    return load_null_tensors(folder, TextEncoders.from_folder(cfg.text.t5_dir, cfg.text.clip_dir))


def build_training_vae(cfg: DictConfig):
    """The VAE, only when shards hold raw frames (encoding is then deferred to training)."""
    if not cfg.data.raw_frames:
        return None

    return build_vae(dict(cfg.vae))


# --- weights -------------------------------------------------------------------------------------------

def shape_mismatches(expected: dict[str, torch.Size], got: dict[str, torch.Tensor], limit: int = 8) -> list[str]:
    """Human-readable differences between a model's parameter shapes and a state dict."""
    out = [f"missing {k} {tuple(v)}" for k, v in expected.items() if k not in got]
    out += [f"unexpected {k} {tuple(v.shape)}" for k, v in got.items() if k not in expected]
    out += [f"{k}: model {tuple(expected[k])} vs file {tuple(v.shape)}" for k, v in got.items()
            if k in expected and tuple(v.shape) != tuple(expected[k])]
    return out[:limit]


def load_init_weights(plan: StartPlan, net_factory, transform=None) -> dict[str, torch.Tensor]:
    """Weights for a weights-only start; shapes are checked against a meta-device build first. ``transform``
    (lazy state dict, metadata) → state dict adapts them first (e.g. a router's head grown by one expert); it
    gets the lazy mapping, so one that changes nothing returns it and nothing is read at once."""
    # read tensor by tensor: under FSDP2 each rank keeps only its rows (no full copy per rank)
    sd, meta = LazyExport(plan.init_from), read_export_metadata(plan.init_from)
    if transform is not None:
        sd = transform(sd, meta)
    with torch.device("meta"):
        net = net_factory()
    expected = {k: v.shape for k, v in net.state_dict().items()}
    problems = shape_mismatches(expected, sd)
    if problems:
        hint = ""
        if hasattr(net, "layout"):
            found = detect_layout(sd)
            if found != net.layout:
                hint = (f" (the file is in the {found} layout, the model in the {net.layout} layout: convert it "
                        f"with ddm.models.layouts.convert_state_dict(sd, src='{found}', dst='{net.layout}'))")
        raise ValueError(f"init_from={plan.init_from} does not match the model{hint}; first mismatches:\n  "
                         + "\n  ".join(problems))
    log.info("weights-only start from %s (kind=%s, stage=%s, step=%s)", plan.init_from, meta.get("kind"),
             meta.get("stage"), meta.get("step"))
    return sd


def export_metadata(cfg: DictConfig, resolved: dict, kind: str, expert: int | str | None,
                    shards: ShardSet, model_config: dict, geometry=None) -> dict[str, Any]:
    """What every export of this job records; ``geometry`` (a ``data.geometry.ShardGeometry``) is the
    geometry actually trained on, read from the shards."""
    centroids = Path(cfg.paths.data_dir) / "centroids.safetensors"
    g = stage_geometry(cfg)
    typed = ExportMetadata(
        kind=kind, stage=cfg.stage.name, experiment=cfg.experiment_name, num_experts=int(cfg.num_experts),
        expert_id=expert, prediction=str(cfg.flow.get("prediction") or "velocity"),
        shards_index_hash=shards.manifest_hash, centroids_hash=file_sha256(centroids) if centroids.exists() else "",
        stage_spec=StageSpec(resolution=g.resolution, num_frames=g.num_frames, fps=cfg.stage.get("fps"),
                             vae_spatial_factor=g.spatial_factor, text_pad_to=cfg.recipe.get("text_pad_to"),
                             flow_shift=cfg.flow.get("shift")),
        vae=OmegaConf.to_container(cfg.vae, resolve=True), text=OmegaConf.to_container(cfg.text, resolve=True),
        geometry=geometry.to_dict() if geometry is not None else None)
    # the typed fields at the top level (ddm.export_metadata reads them); the whole resolved config for provenance
    return {**typed.fields(), "config": model_config, "train_config": resolved,
            "max_shard_bytes": int(cfg.checkpoint.export_max_shard_bytes),
            "export_dtype": str(cfg.checkpoint.get("export_dtype") or "fp32")}


# --- the fit -------------------------------------------------------------------------------------------

def fit(cfg: DictConfig, module, datamodule, plan: StartPlan, run_dir: Path, *, batch_size: int, max_steps: int,
        flops_per_sample: float, tokens_per_sample: int, role: str, extra_callbacks: list | None = None,
        context_parallel: int = 1) -> int:
    """Train with atomic checkpoints, signal handling and throughput logging; export EMA weights at the end.

    Returns the job's exit code: 0 when the stage is complete (or a USR1 stop was requeued), non-zero when a
    signal stopped it before ``max_steps`` (``train.run``'s module docstring lists the codes).
    ``context_parallel``: ranks per sample (``train.run.build_strategy``; throughput counts each sample once).
    ``role``: ``expert<k>``, ``monolith`` or ``router``, the wandb run's name (``train.run.wandb_run_names``)."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    from train.callbacks import SignalHandler, StepCheckpoint, ThroughputMonitor

    ckpt = StepCheckpoint(checkpoint_dir(run_dir), int(cfg.checkpoint.every_n_steps), int(cfg.checkpoint.keep_last))
    signals = SignalHandler(ckpt, requeue=bool(cfg.trainer.slurm_auto_requeue))
    callbacks = [
        ckpt,
        signals,
        ThroughputMonitor(flops_per_sample, tokens_per_sample, batch_size, cfg.trainer.peak_flops_per_device,
                          int(cfg.trainer.log_every_n_steps), skip_steps=int(cfg.trainer.get("throughput_skip_steps", 10)),
                          context_parallel=context_parallel),
        TQDMProgressBar(refresh_rate=max(1, int(cfg.trainer.log_every_n_steps))),
        *(extra_callbacks or []),
    ]
    trainer = build_trainer(cfg, run_dir, callbacks, build_loggers(cfg, run_dir, role), max_steps,
                            batch_size=batch_size, context_parallel=context_parallel)
    if is_rank_zero_process():
        merge_metrics(run_dir)  # the history so far, also when earlier segments were killed
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(plan.checkpoint) if plan.checkpoint else None)
    finally:
        if trainer.is_global_zero:
            merge_metrics(run_dir)
    if trainer.global_step < max_steps:
        code = signals.exit_code if signals.exit_code is not None else 1
        log.info("stopped at step %d of %d (%s): no export; exit code %d", trainer.global_step, max_steps,
                 "signal" if signals.exit_code is not None else "interrupted or stopped early", code)
        return code
    if cfg.checkpoint.export_on_end:
        # this stage's training compute, for the pool manifest (ddm.pool): every step since step 0, resumes
        # included; a step trains batch_size samples on each of world / context_parallel data-parallel ranks
        samples = trainer.global_step * batch_size * trainer.world_size // max(1, int(context_parallel))
        export_module(trainer, module, run_dir, train_flops=float(flops_per_sample) * samples)
    return 0


def export_module(trainer, module, run_dir: Path, train_flops: float | None = None) -> Path:
    """EMA weights → ``<run_dir>/export`` (gathered from every rank; rank 0 writes). ``train_flops``: the
    stage's training FLOPs, recorded in the metadata when given."""
    meta = dict(module.hparams["export_metadata"])
    sd = cast_for_export(gather_full_state_dict(module.ema_model), meta.get("export_dtype", "fp32"))
    out = export_dir(run_dir)
    if trainer.is_global_zero:
        meta["step"] = int(trainer.global_step)
        if train_flops is not None:
            meta["train_flops"] = float(train_flops)
        save_export(sd, out, meta, max_shard_bytes=int(meta.get("max_shard_bytes", 5 * 1024**3)))
        log.info("exported EMA weights at step %d → %s", trainer.global_step, out)
    trainer.strategy.barrier("ddm-export")
    return out

