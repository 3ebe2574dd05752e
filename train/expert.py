"""``python -m train.expert expert=K stage=stage2|stage3`` — train one expert in complete isolation.

Each invocation is its own world: its own process group (or none), its own run directory
``runs/<experiment>/expert<k>/<stage>/``, its own shards. ``expert=all`` trains the monolithic baseline
with the same code over every shard (``compute_match=true`` sizes it to the DDM's FLOPs). Rerunning the
same command resumes; stage 3 starts weights-only from the same expert's stage-2 export.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from train import job
from train.settings import ExpertSettings
from train.run import (context_parallel_size, lock_run_dir, plan_start, resolve_batch, role_name, run_job,
                       save_resolved_config, setup_logging)

log = logging.getLogger("ddm.train")


def train_expert(cfg: DictConfig) -> int:
    """Run one expert job from a composed config (what the CLI does; tests call it directly). Returns the
    exit code (``train.run``: 0, or non-zero when a signal stopped the stage before its end)."""
    run_dir = Path(cfg.run_dir)
    expert = job.parse_expert(cfg.expert, cfg.num_experts)
    lock = None if cfg.dry_run else lock_run_dir(run_dir)  # one trainer per run dir
    try:
        return _train_expert(cfg, run_dir, expert)
    finally:
        if lock is not None:
            lock.release()


def _train_expert(cfg: DictConfig, run_dir: Path, expert: int | str) -> int:
    setup_logging(run_dir, "expert")
    job.apply_expert_overrides(cfg, expert)  # a heterogeneous pool: this expert's own size / prediction target
    geometry = job.stage_geometry(cfg)
    model_cfg = job.expert_config(cfg)
    # Ulysses context parallelism: cp ranks share each sample (checked: fsdp, divides heads and world)
    cp = context_parallel_size(cfg, model_cfg.num_heads)
    budget = job.expert_budget(model_cfg, geometry)
    batch_size, max_steps = int(cfg.stage.batch_size), int(cfg.stage.max_steps)
    world = job.world_size(cfg)
    data_world = world // cp  # data-parallel ranks: the global batch is batch_size x data_world

    ledger = job.compute_ledger(cfg, budget, data_world) if expert == "all" and cfg.compute_match else None
    # One resolved batch for Lightning, DeepSpeed's config and the ledger (train.run.resolve_batch).
    resolved_batch, ledger = resolve_batch(batch_size, max_steps, data_world, ledger, by=str(cfg.compute_match_by))
    batch_size, max_steps = resolved_batch.per_rank, resolved_batch.max_steps
    if ledger is not None:
        print(ledger.table(), flush=True)

    if cfg.dry_run:
        print(job.dry_run_report(cfg, model_cfg, budget, geometry, run_dir, batch_size, max_steps, world,
                                 context_parallel=cp), flush=True)
        return 0

    shards = job.check_shards(cfg, expert)  # clear error before any training
    trained_geometry = job.check_geometry(cfg, shards, model_cfg.latent_channels)
    previous = cfg.stage.previous
    previous_export = (Path(cfg.paths.runs_dir) / cfg.experiment_name / run_dir.parent.name / previous / "export"
                       if previous else None)
    plan = plan_start(run_dir, resume=cfg.resume, init_from=cfg.init_from, previous_stage=previous,
                      previous_export=previous_export)
    log.info("train.expert %s stage=%s %s", run_dir.parent.name, cfg.stage.name, plan.describe())
    log.info("run dir %s; shards %s (%d samples)", run_dir, shards.root, shards.num_samples)
    resolved = save_resolved_config(cfg, run_dir)
    # the same seed on every rank: the ranks of a cp group must draw the same noise, t and text dropout
    torch.manual_seed(int(cfg.seed) + (0 if expert == "all" else int(expert)))

    from ddm.models.mmdit import MMDiT

    init_sd = job.load_init_weights(plan, lambda: MMDiT(model_cfg)) if plan.mode == "init" else None
    null_t5, null_clip = job.null_text(cfg)
    from train.expert_module import ExpertModule

    module = ExpertModule(
        model_cfg=model_cfg.to_dict(),
        train=ExpertSettings.from_config(cfg, max_steps),
        null_t5=null_t5, null_clip=null_clip, init_state_dict=init_sd,
        vae=job.build_training_vae(cfg),
        export_metadata=job.export_metadata(cfg, resolved, kind="expert", expert=expert, shards=shards,
                                            model_config=model_cfg.to_dict(), geometry=trained_geometry),
    )
    datamodule = job.datamodule(cfg, experts=expert, batch_size=batch_size, balanced=False, context_parallel=cp)
    extra_callbacks = []
    if int(cfg.trainer.sample_every_n_steps) > 0:
        from train.callbacks import SampleVideos

        extra_callbacks.append(SampleVideos(int(cfg.trainer.sample_every_n_steps), run_dir / "samples",
                                            dict(cfg.vae), float(cfg.stage.fps or 8)))
    return job.fit(cfg, module, datamodule, plan, run_dir, batch_size=batch_size, max_steps=max_steps,
                   flops_per_sample=budget.flops_per_sample, tokens_per_sample=budget.tokens_per_sample,
                   role=role_name(expert), extra_callbacks=extra_callbacks, context_parallel=cp)


@hydra.main(version_base="1.3", config_path="../conf", config_name="expert")
def main(cfg: DictConfig) -> None:
    run_job(train_expert, cfg)


if __name__ == "__main__":
    main()
