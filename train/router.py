"""``python -m train.router [stage=stage2]`` — train the router as its own job, never loading an expert.

It reads every expert's shards (or those of ``router_experts``, e.g. the pool without a retired expert: output
i is then expert ``router_experts[i]``) with label = expert id − 1 at the natural cluster frequencies (or
uniformly with ``balanced_sampling=true``; the export then stores the log-prior correction the sampler
adds to the logits). The router is resolution-agnostic (positions are recomputed from the latent size),
so the router of one stage serves both; ``ddm.pipeline`` picks ``Router/<stage>/`` when a per-stage
router exists and ``Router/`` otherwise.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from train import job
from train.settings import RouterSettings
from train.run import context_parallel_size, lock_run_dir, plan_start, run_job, save_resolved_config, setup_logging
from ddm.shards import expert_counts
from ddm.models.router import Router
from ddm.models.context_parallel import tokens_per_rank

log = logging.getLogger("ddm.train")


def prior_correction(counts: dict[int, int], balanced: bool) -> list[float]:
    """Logit correction log π_k − log π_k^train (zero when the router trains at natural frequencies)."""
    total = sum(counts.values())
    k = len(counts)
    if not balanced:
        return [0.0] * k
    return [math.log(counts[e] / total) - math.log(1.0 / k) for e in sorted(counts)]


def train_router(cfg: DictConfig) -> int:
    """Run the router job from a composed config (what the CLI does; tests call it directly). Returns the
    exit code (see ``train.run``)."""
    run_dir = Path(cfg.run_dir)
    lock = None if cfg.dry_run else lock_run_dir(run_dir)  # one trainer per run dir
    try:
        return _train_router(cfg, run_dir)
    finally:
        if lock is not None:
            lock.release()


def _train_router(cfg: DictConfig, run_dir: Path) -> int:
    setup_logging(run_dir, "router")
    geometry = job.stage_geometry(cfg)
    router_cfg = job.router_config(cfg, cfg.num_experts)
    expert_cfg = job.expert_config(cfg)  # geometry only (and the text widths): the experts' patch for the shift
    router_cfg = replace(router_cfg, text_dim=expert_cfg.vec_in_dim if cfg.use_text else None,
                         t5_dim=expert_cfg.context_in_dim if cfg.use_t5 else None)
    r_flops = job.router_training_flops(router_cfg, geometry)
    e_flops = job.expert_budget(expert_cfg, geometry).flops_per_sample
    # Ulysses context parallelism for long sequences (768² × 129 frames: ~19k router tokens)
    cp = context_parallel_size(cfg, router_cfg.num_heads, group="router_model")
    if cfg.dry_run:
        with torch.device("meta"):
            params = sum(p.numel() for p in Router(router_cfg).parameters())
        tokens = job.router_tokens(router_cfg, geometry)
        print(f"dry run: router {router_cfg.preset}, {params:,} parameters, K={router_cfg.num_experts}; "
              f"training FLOPs/sample {r_flops:.4e} = {r_flops / e_flops:.3%} of one expert's; run dir {run_dir}")
        world = job.world_size(cfg)
        print(f"  tokens per sample {tokens:,}; context parallel {cp} ranks per sample "
              f"({world // cp} data-parallel groups); tokens per rank {tokens_per_rank(tokens, 0, cp):,}")
        return 0

    expert_ids = router_expert_ids(cfg)
    shards = job.check_shards(cfg, expert_ids if cfg.get("router_experts") else "all")
    if router_cfg.num_experts != len(expert_ids):
        raise ValueError(f"the router predicts {router_cfg.num_experts} experts but {shards.root} holds "
                         f"{len(shards.expert_folders)} expert shard folders")
    trained_geometry = job.check_geometry(cfg, shards, router_cfg.latent_channels)

    counts = {k: n for k, n in expert_counts(shards.root, split="train").items() if k in expert_ids}
    plan = plan_start(run_dir, resume=cfg.resume, init_from=cfg.init_from, previous_stage=None,
                      previous_export=None)
    log.info("train.router stage=%s %s; run dir %s; shards %s, expert counts %s", cfg.stage.name,
             plan.describe(), run_dir, shards.root, counts)
    resolved = save_resolved_config(cfg, run_dir)
    torch.manual_seed(int(cfg.seed))
    from train.router_module import RouterModule

    init_sd = job.load_init_weights(plan, lambda: Router(router_cfg), transform=_grown_head(router_cfg.num_experts)) \
        if plan.mode == "init" else None
    meta = job.export_metadata(cfg, resolved, kind="router", expert=None, shards=shards,
                               model_config=router_cfg.to_dict(), geometry=trained_geometry)
    meta.update({
        "num_experts": router_cfg.num_experts,
        "latent_geometry": {"channels": router_cfg.latent_channels, "frames": geometry.latent_frames,
                            "height": geometry.latent_size, "width": geometry.latent_size},
        "t_scale": 1000.0,
        "expert_counts": {str(k): int(v) for k, v in counts.items()},
        "balanced_sampling": bool(cfg.balanced_sampling),
        "prior_correction": prior_correction(counts, bool(cfg.balanced_sampling)),
        "uses_text": router_cfg.reads_text,
        "expert_ids": expert_ids,  # the training expert id of each output, in order
    })
    module = RouterModule(
        router_cfg=router_cfg.to_dict(),
        train=RouterSettings.from_config(cfg, int(cfg.max_steps), tuple(expert_cfg.patch_size), expert_ids),
        export_metadata=meta, init_state_dict=init_sd, vae=job.build_training_vae(cfg))
    datamodule = job.datamodule(cfg, experts=expert_ids if cfg.get("router_experts") else "all",
                                batch_size=int(cfg.batch_size),
                                balanced=bool(cfg.balanced_sampling), context_parallel=cp)
    return job.fit(cfg, module, datamodule, plan, run_dir, batch_size=int(cfg.batch_size),
                   max_steps=int(cfg.max_steps), flops_per_sample=r_flops,
                   tokens_per_sample=job.router_tokens(router_cfg, geometry), role="router",
                   context_parallel=cp)


def _grown_head(num_experts: int):
    """``init_from`` a router of fewer experts (the pool grew): its head gains rows (``ddm.pool.grow_router``)."""
    def transform(sd: Mapping[str, torch.Tensor], meta: dict) -> Mapping[str, torch.Tensor]:
        old = int(meta.get("num_experts") or (meta.get("config") or {}).get("num_experts") or num_experts)
        if old >= num_experts:
            return sd
        from ddm.pool import grow_router

        log.info("init_from a %d-expert router: its head grows to %d outputs (new rows = the mean of the old; "
                 "fine-tuning the grown pool's router)", old, num_experts)
        return grow_router(sd, num_experts)

    return transform


def router_expert_ids(cfg: DictConfig) -> list[int]:
    """The training expert ids the router's outputs stand for: ``router_experts`` (a subset of the pool, e.g.
    without a retired expert; ``num_experts`` must be its length) or 1..num_experts."""
    if not cfg.get("router_experts"):
        return list(range(1, int(cfg.num_experts) + 1))
    ids = sorted(int(k) for k in cfg.router_experts)  # outputs in ascending id order, like the pool slots
    if len(set(ids)) != len(ids) or min(ids) < 1:
        raise ValueError(f"router_experts must be distinct expert ids >= 1, got {ids}")
    if len(ids) != int(cfg.num_experts):
        raise ValueError(f"router_experts lists {len(ids)} experts {ids} but num_experts={cfg.num_experts}; "
                         f"set num_experts={len(ids)}")
    return ids


@hydra.main(version_base="1.3", config_path="../conf", config_name="router")
def main(cfg: DictConfig) -> None:
    run_job(train_router, cfg)


if __name__ == "__main__":
    main()
