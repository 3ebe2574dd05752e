"""What every training job shares: its run directory, how it starts, its loggers, strategy and trainer.

A job's run directory is deterministic (``runs/<experiment>/<role>/<stage>/``) so a requeued job finds
its own checkpoints. It starts in one of three named modes, logged at start:

* ``resume``  — continue from ``checkpoints/last.ckpt`` (model, optimizer, scheduler, step, data position);
* ``init``    — weights-only start from an export (fresh optimizer, warm-up, step 0), e.g. stage 3 from
  stage 2's export, or any ``init_from=PATH``;
* ``scratch`` — random initialisation.

One writer per run directory: rank 0 holds :class:`ddm.lock.DirLock` on it for the whole job, so a second
trainer started on the same run dir stops at once with the holder's host and PID.

Exit codes (docs/slurm.md): 0 = the stage finished (or USR1 stopped it and ``scontrol requeue``
succeeded: the requeued job carries on); :data:`EXIT_SIGTERM` (143) = stopped by SIGTERM after a
checkpoint; :data:`EXIT_NOT_REQUEUED` (138) = stopped by USR1 but not requeued (outside SLURM, requeue
off, or ``scontrol requeue`` failed); 1 = an error. Only 0 releases ``afterok`` dependencies.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ddm.files import atomic_write
from ddm.lock import DirLock
from train.metrics_log import next_segment
from ddm.models.context_parallel import check_context_parallel_size

EXIT_SIGTERM = 128 + signal.SIGTERM  # 143, what a shell reports for a process killed by SIGTERM
EXIT_NOT_REQUEUED = 128 + signal.SIGUSR1  # 138

log = logging.getLogger("ddm.train")


def role_name(expert: Any) -> str:
    """Folder name of a training role: ``expert<k>`` or ``monolith`` for ``expert=all``."""
    return "monolith" if str(expert) == "all" else f"expert{expert}"


# Used by the configs' run_dir: ${paths.runs_dir}/${experiment_name}/${role:${expert}}/${stage.name}
if not OmegaConf.has_resolver("role"):
    OmegaConf.register_new_resolver("role", role_name)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def export_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "export"


@dataclass(frozen=True)
class StartPlan:
    """How a job starts; see the module docstring."""

    mode: str  # "resume" | "init" | "scratch"
    checkpoint: Path | None = None
    init_from: Path | None = None

    def describe(self) -> str:
        if self.mode == "resume":
            return f"mode=resume from {self.checkpoint}"
        if self.mode == "init":
            return f"mode=init (weights only: fresh optimizer, warm-up, step 0) from {self.init_from}"
        return "mode=scratch (random initialisation)"


def is_rank_zero_process() -> bool:
    """False when the launcher's environment names another rank (torchrun ``RANK``, srun ``SLURM_PROCID``,
    the ``LOCAL_RANK``/``NODE_RANK`` of Lightning's spawned children); decided before any process group."""
    return all(int(os.environ.get(var) or 0) == 0 for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def lock_run_dir(run_dir: Path) -> DirLock | None:
    """Rank 0 takes the run dir's lock (``ddm.lock.DirLockedError`` naming the holder if another job has
    it); other ranks return None."""
    if not is_rank_zero_process():
        return None
    return DirLock(run_dir, "run dir").acquire()


_SCAFFOLDING = {"hydra", "logs", ".lock"}  # what a job creates before its first real output


def remove_unused_run_dir(run_dir: Path, runs_root: Path) -> bool:
    """After a job failed before training: remove ``run_dir`` when it holds only scaffolding (Hydra's output,
    empty logs, the lock), and the parents it leaves empty below ``runs_root``. True when removed."""
    run_dir, runs_root = Path(run_dir).resolve(), Path(runs_root).resolve()
    if not run_dir.is_dir() or any(p.name not in _SCAFFOLDING for p in run_dir.iterdir()):
        return False
    logs = run_dir / "logs"
    if logs.is_dir() and any(p.is_dir() or p.stat().st_size for p in logs.iterdir()):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    while parent != runs_root and runs_root in parent.parents and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
    return True


def run_job(job: Callable[[DictConfig], int | None], cfg: DictConfig) -> None:
    """The CLI wrapper of a training job: exit with its code (see the module docstring); on an error before
    training, leave no empty run folder behind (Hydra creates ``<run_dir>/hydra`` before the job starts)."""
    try:
        code = job(cfg)
    except BaseException:
        if is_rank_zero_process() and remove_unused_run_dir(Path(cfg.run_dir), Path(cfg.paths.runs_dir)):
            log.info("removed the unused run dir %s", cfg.run_dir)
        raise
    if code:
        sys.exit(int(code))


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None when it reads. A file is opened the
    way Lightning opens it (``torch.load``, memory-mapped: the zip directory and the pickle are read, the
    tensors are not); a sharded folder needs its metadata file."""
    if path.is_dir():
        if (path / ".metadata").exists() or (path / "latest").exists() or any(path.glob("*/mp_rank_*")):
            return None
        return "a folder without DCP '.metadata' or DeepSpeed 'latest'"
    try:
        import torch

        torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # zip, pickle or I/O errors: any of them means this file cannot resume
        return f"{type(err).__name__}: {err}"
    return None


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``last`` points at if it is complete and readable; else the newest readable step
    checkpoint, with a warning naming the damaged one(s). Raises when checkpoints exist but none can be read
    (starting over from scratch would silently throw the run away)."""
    ckpt_dir = checkpoint_dir(run_dir)
    last = ckpt_dir / "last.ckpt"
    candidates: list[Path] = []
    if last.is_symlink() or last.exists():
        target = last.resolve()
        if target.exists():
            candidates.append(target)
        else:
            log.warning("checkpoints/last.ckpt points at missing %s; looking for the newest step checkpoint",
                        target)
    steps = sorted((p for p in ckpt_dir.glob("step-*.ckpt") if not p.name.endswith(".partial")), reverse=True)
    candidates += [p.resolve() for p in steps if p.resolve() not in candidates]
    damaged = []
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if damaged:
                log.warning("resuming from %s: the newer checkpoint(s) %s cannot be read (%s)", ckpt,
                            ", ".join(p.name for p, _ in damaged), "; ".join(f"{p.name}: {w}" for p, w in damaged))
            return ckpt
        damaged.append((ckpt, problem))
    if damaged:
        raise RuntimeError(f"no readable checkpoint in {ckpt_dir}: " + "; ".join(f"{p.name}: {w}" for p, w in damaged)
                           + ". Restore one from a copy, or move the checkpoints away to start over (resume=false "
                           "keeps them and starts from scratch)")
    return None


def plan_start(run_dir: Path, *, resume: bool, init_from: str | Path | None,
               previous_stage: str | None, previous_export: Path | None) -> StartPlan:
    """Decide the start mode. Raises before any training if a required input is missing."""
    if resume:
        ckpt = find_resume_checkpoint(run_dir)
        if ckpt is not None:
            if init_from:
                log.info("a checkpoint exists in %s: resuming; init_from=%s is ignored (set resume=false to "
                         "start over from it)", run_dir, init_from)
            return StartPlan("resume", checkpoint=ckpt)
    if init_from:
        path = Path(str(init_from)).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"init_from={path} does not exist (expected an export folder, a "
                                    "master.safetensors file or a sharded model/ folder)")
        return StartPlan("init", init_from=path)
    if previous_stage:
        if previous_export is None or not previous_export.exists():
            raise FileNotFoundError(
                f"this stage starts from the {previous_stage} export, but {previous_export} does not exist. "
                f"Train {previous_stage} first (same expert, stage={previous_stage}) or pass init_from=PATH.")
        return StartPlan("init", init_from=previous_export)
    return StartPlan("scratch")


def persistent_wandb_id(run_dir: Path) -> str:
    """The wandb run id stored in the run dir, created once, so a requeued job continues the same run."""
    path = Path(run_dir) / "wandb_id"
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    atomic_write(path, lambda tmp: tmp.write_text(run_id))
    return run_id


def setup_logging(run_dir: Path, name: str) -> None:
    """Log to stdout and to ``<run_dir>/logs/<name>.log`` (appending across requeues)."""
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%H:%M:%S")
    root = logging.getLogger("ddm")
    root.setLevel(logging.INFO)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(logs / f"{name}.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> dict:
    """Write the fully resolved config beside the run and return it as a plain dict."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(resolved), Path(run_dir) / "resolved_config.yaml")
    return resolved  # type: ignore[return-value]


def wandb_run_names(cfg: DictConfig, role: str) -> dict[str, str]:
    """The wandb identity of a job: ``group`` = the experiment, ``job_type`` = the stage, ``name`` =
    ``<role>-<stage>`` (``role``: ``expert<k>``, ``monolith`` or ``router``), so the runs of one experiment sit
    together and each stage of each role is told apart."""
    stage = str(cfg.stage.name)
    return {"group": str(cfg.experiment_name), "job_type": stage, "name": f"{role}-{stage}"}


def build_loggers(cfg: DictConfig, run_dir: Path, role: str) -> list:
    """CSV always (``logs/csv/segment-NNN/``, one per start of the job; see ``train.metrics_log``); wandb
    when enabled (offline by default; the run id persists in the run dir; named by :func:`wandb_run_names`).
    ``role``: ``expert<k>``, ``monolith`` or ``router``."""
    from lightning.pytorch.loggers import CSVLogger

    # one folder per job segment (Lightning's CSV logger would delete an existing metrics.csv);
    # train.metrics_log merges them into logs/csv/metrics.csv
    segment = next_segment(run_dir, adopt_legacy=is_rank_zero_process())
    loggers: list = [CSVLogger(save_dir=str(run_dir), name="logs", version=f"csv/{segment}",
                               flush_logs_every_n_steps=max(1, int(cfg.trainer.log_every_n_steps)))]
    mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
    if cfg.logger.wandb and mode != "disabled":
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError as err:  # pragma: no cover - wandb is a declared dependency
            raise RuntimeError("logger=wandb needs the wandb package (pip install wandb)") from err
        os.environ.setdefault("WANDB_MODE", mode)
        loggers.append(WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity,
                                   id=persistent_wandb_id(run_dir), resume="allow", save_dir=str(run_dir),
                                   **wandb_run_names(cfg, role)))
    return loggers


def log_media(loggers: Sequence[Any], key: str, paths: Sequence[Path], step: int, *, kind: str = "image",
              captions: Sequence[str] | None = None) -> bool:
    """Send image (``kind="image"``: png) or video (``kind="video"``: gif/mp4) files already written to disk to
    every wandb logger among ``loggers`` as media under ``key``; a no-op without one. Returns whether any
    logger took them. Call it on rank 0 only (the files are rank 0's)."""
    from lightning.pytorch.loggers import WandbLogger

    targets = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    files = [str(p) for p in paths]
    extra: dict[str, Any] = {"caption": list(captions)} if captions is not None else {}
    for logger in targets:
        if kind == "image":
            logger.log_image(key=key, images=files, step=step, **extra)
        elif kind == "video":
            logger.log_video(key=key, videos=files, step=step, **extra)
        else:
            raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    return bool(targets)


ASSUMED_GPUS_PER_NODE = 8


def world_size(cfg: DictConfig) -> int:
    """Data-parallel world size implied by the trainer config (devices per node × nodes)."""
    devices = cfg.trainer.devices
    if devices in ("auto", -1, "-1"):
        import torch

        devices = torch.cuda.device_count() if cfg.trainer.accelerator == "gpu" else 1
        if cfg.trainer.accelerator == "gpu" and devices == 0:
            # e.g. a dry run on a login node: plan for a full node rather than for one GPU
            devices = ASSUMED_GPUS_PER_NODE
            log.info("trainer.devices=auto but no GPU is visible: assuming %d GPUs per node (set trainer.devices)",
                     devices)
    return max(1, int(devices)) * int(cfg.trainer.num_nodes)


@dataclass(frozen=True)
class ResolvedBatch:
    """The one batch a job trains with: Lightning's DataLoader, DeepSpeed's config and the ledger all read it."""

    per_rank: int
    world: int
    max_steps: int

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.world


def resolve_batch(per_rank: int, max_steps: int, world: int, ledger=None, by: str = "batch"):
    """``(ResolvedBatch, ledger)`` for a job of ``per_rank`` × ``world`` samples per step for ``max_steps``.

    With a compute-matched monolith ``ledger`` (:class:`train.ledger.ComputeLedger`), its global batch
    (``by="batch"``) is rounded up to a multiple of ``world`` or its steps are taken (``by="steps"``), and
    the returned ledger is rewritten with the batch actually trained, so its table states what runs.
    """
    if per_rank < 1 or world < 1:
        raise ValueError(f"batch per rank and world size must be >= 1, got {per_rank} and {world}")
    if ledger is None:
        return ResolvedBatch(int(per_rank), int(world), int(max_steps)), None
    from dataclasses import replace

    if by == "batch":
        per_rank = -(-int(ledger.monolith_batch) // world)  # ceil: the monolith never gets less compute
        if per_rank * world != ledger.monolith_batch:
            log.info("monolith global batch %d is not divisible by %d ranks: using %d per rank (%d in all)",
                     ledger.monolith_batch, world, per_rank, per_rank * world)
        ledger = replace(ledger, monolith_batch=per_rank * world)
        return ResolvedBatch(per_rank, int(world), int(ledger.monolith_steps)), ledger
    if by == "steps":
        if ledger.monolith_batch != per_rank * world:
            raise ValueError(f"ledger monolith batch {ledger.monolith_batch} != {per_rank} x {world} ranks")
        return ResolvedBatch(int(per_rank), int(world), int(ledger.monolith_steps)), ledger
    raise ValueError(f"compute_match_by must be 'batch' or 'steps', got {by!r}")


def context_parallel_size(cfg: DictConfig, num_heads: int, group: str = "model") -> int:
    """``cfg.<group>.context_parallel`` (Ulysses sequence split, ``ddm.models.context_parallel``; ``group`` is
    ``model`` for an expert, ``router_model`` for the router), checked before any training: it must divide the
    heads and the world size, and only ``strategy=fsdp`` carries it."""
    cp = int(cfg[group].get("context_parallel", 1))
    if cp != 1 and cfg.strategy.name != "fsdp":
        raise ValueError(f"{group}.context_parallel={cp} needs strategy=fsdp (FSDP2 over the data-parallel x "
                         f"context-parallel mesh); strategy={cfg.strategy.name} cannot split the sequence. "
                         f"Use strategy=fsdp or {group}.context_parallel=1")

    check_context_parallel_size(cp, int(num_heads), world_size(cfg), setting=f"{group}.context_parallel")
    return cp


def build_strategy(cfg: DictConfig, batch_size: int | None = None, context_parallel: int = 1):
    """A Lightning strategy from ``cfg.strategy``, or a clear error if the installation cannot provide it.

    ``batch_size``: the job's resolved batch per rank (DeepSpeed's ``train_micro_batch_size_per_gpu``).
    ``context_parallel``: the expert's cp size (:func:`context_parallel_size`); under ``fsdp`` the mesh is
    (world / cp) x cp, its ``tensor_parallel`` dimension being the cp group (``train.flow_module``)."""
    s = cfg.strategy
    accelerator = cfg.trainer.accelerator
    cp = int(context_parallel)
    if cp != 1 and s.name != "fsdp":
        raise ValueError(f"context_parallel={cp} needs strategy=fsdp, not strategy={s.name}")
    if s.name == "auto":
        return "auto"
    if s.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=bool(s.get("find_unused_parameters", False)),
                           process_group_backend="gloo" if accelerator == "cpu" else None)
    if s.name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        world = world_size(cfg)
        if cp < 1 or world % cp:
            raise ValueError(f"model.context_parallel={cp} must divide the world size {world}")
        return ModelParallelStrategy(data_parallel_size=world // cp, tensor_parallel_size=cp,
                                     save_distributed_checkpoint=bool(s.save_distributed_checkpoint))
    if s.name == "deepspeed":
        if accelerator == "cpu":
            raise ValueError("strategy=deepspeed needs GPUs (Lightning's DeepSpeedStrategy refuses the CPU "
                             "accelerator). On CPU use strategy=fsdp (FSDP2) or strategy=ddp.")
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise ValueError("strategy=deepspeed needs the deepspeed package: pip install -e '.[deepspeed]'") from err
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if batch_size is None:
            raise ValueError("strategy=deepspeed needs the job's resolved batch per rank (build_trainer(batch_size=))")
        return DeepSpeedStrategy(config=deepspeed_config(cfg, batch_size))
    raise ValueError(f"unknown strategy {s.name!r}: expected auto, ddp, fsdp or deepspeed (zero2/zero3 configs)")


def deepspeed_config(cfg: DictConfig, micro_batch_size: int) -> dict:
    """The DeepSpeed JSON config for ZeRO-2/3 from ``cfg.strategy`` (tested on CPU, run on GPUs).

    ``micro_batch_size`` is the job's resolved batch per rank (:func:`resolve_batch`): the stage's for an
    expert, the compute-matched monolith's, the router's — never read back from ``cfg.stage``."""
    s = cfg.strategy
    zero: dict[str, Any] = {
        "stage": int(s.stage),
        "contiguous_gradients": True,
        "overlap_comm": True,
        "allgather_bucket_size": int(s.allgather_bucket_size),
        "reduce_bucket_size": int(s.reduce_bucket_size),
    }
    if s.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if int(s.stage) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # exports consolidate offline instead
        if s.get("offload_parameters"):
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": str(cfg.trainer.precision).startswith("bf16")},
        "gradient_clipping": float(cfg.optim.grad_clip or 0.0),
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "zero_allow_untested_optimizer": True,
    }


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, loggers: list, max_steps: int,
                  batch_size: int | None = None, context_parallel: int = 1):
    """The Lightning Trainer for a job. Gradient clipping is the module's (or DeepSpeed's), not Lightning's.
    ``batch_size``: the resolved batch per rank (needed by DeepSpeed's config); ``context_parallel``: see
    :func:`build_strategy`."""
    import lightning as L
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    strategy = build_strategy(cfg, batch_size, context_parallel)
    plugins = []
    if SLURMEnvironment.detect():
        # We own requeue (train.callbacks.SignalHandler); Lightning must not requeue a second time.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(
        default_root_dir=str(run_dir),
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        precision=cfg.trainer.precision,
        strategy=strategy,
        plugins=plugins or None,
        max_steps=max_steps,
        max_epochs=-1,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        callbacks=callbacks,
        logger=loggers,
        enable_checkpointing=False,  # train.callbacks.StepCheckpoint writes atomic checkpoints
        limit_val_batches=0 if cfg.trainer.val_check_interval is None else None,
        val_check_interval=cfg.trainer.val_check_interval,
        check_val_every_n_epoch=None if cfg.trainer.val_check_interval is not None else 1,
        num_sanity_val_steps=0,
        deterministic=cfg.trainer.deterministic,
        use_distributed_sampler=False,  # the DataModule splits shards across ranks itself
        enable_model_summary=False,
    )


