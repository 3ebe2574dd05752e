"""One resolved batch (issue 11): Lightning's DataLoader, DeepSpeed's ``train_micro_batch_size_per_gpu`` and
the compute ledger all use the batch the job actually trains with (expert, compute-matched monolith, router)."""
from __future__ import annotations

import re

import pytest

from tests.fixtures.train import compose_config, run_cli
from train.ledger import match_monolith
from train.run import build_strategy, deepspeed_config, resolve_batch


def test_monolith_batch_is_rounded_up_to_the_world_and_the_ledger_says_so():
    ledger = match_monolith(3, 1e9, 8, 100, 1e7, 16, 50)  # monolith global batch 24 + router share -> 25
    assert ledger.monolith_batch == 25
    batch, resolved_ledger = resolve_batch(8, 100, 4, ledger, by="batch")
    assert (batch.per_rank, batch.world, batch.global_batch, batch.max_steps) == (7, 4, 28, 100)
    assert resolved_ledger.monolith_batch == 28 and resolved_ledger.monolith >= resolved_ledger.ddm_total
    batch, same = resolve_batch(8, 100, 4, None)
    assert (batch.per_rank, batch.global_batch, same) == (8, 32, None)
    steps_ledger = match_monolith(3, 1e9, 32, 100, 1e7, 16, 50, by="steps")
    batch, _ = resolve_batch(8, 100, 4, steps_ledger, by="steps")
    assert (batch.per_rank, batch.max_steps) == (8, steps_ledger.monolith_steps)
    with pytest.raises(ValueError, match="compute_match_by"):
        resolve_batch(8, 100, 4, ledger, by="flops")


def test_deepspeed_reads_the_resolved_batch_not_the_stage_batch():
    cfg = compose_config("expert", ["strategy=deepspeed_zero3", "recipe.stage2.batch_size=8"])
    assert deepspeed_config(cfg, 5)["train_micro_batch_size_per_gpu"] == 5
    strategy = build_strategy(cfg, 5)  # GPU accelerator in the config: constructed, not started
    assert strategy.config["train_micro_batch_size_per_gpu"] == 5
    with pytest.raises(ValueError, match="resolved batch"):
        build_strategy(cfg)


def test_compute_matched_monolith_dry_run_prints_one_batch(tmp_path, tiny_overrides):
    """3 ranks: the ledger's monolith batch, the per-rank batch Lightning gets and DeepSpeed's micro batch agree."""
    proc = run_cli("train.expert", [*tiny_overrides, "expert=all", "compute_match=true", "dry_run=true",
                                    "trainer.devices=3", "strategy=deepspeed_zero2"])
    out = proc.stdout
    per_rank, global_batch = map(int, re.search(r"batch (\d+) per rank \((\d+) global\)", out).groups())
    assert global_batch == 3 * per_rank
    assert int(re.search(r"deepspeed micro batch (\d+) per GPU", out).group(1)) == per_rank
    assert int(re.search(r"^monolith\s+(\d+)\s", out, re.M).group(1)) == global_batch
    cfg = compose_config("expert", [*tiny_overrides, "expert=all"])
    assert global_batch >= cfg.num_experts * cfg.stage.batch_size * 3  # at least the K experts' samples
