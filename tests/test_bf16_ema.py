"""bf16 training on the CPU (issue 11): the EMA is an fp32 master copy whatever the training precision.

The expert and the router train a few steps with ``trainer.precision=bf16-mixed`` and ``bf16-true``,
checkpointing every step, then resume and export. From each pair of consecutive checkpoints the EMA's
step is predicted in fp64 from the previous EMA and the new weights (e ← e + (1 − d)(w − e)); the
stored EMA must move by that amount (relative error ≤ 1e-3), also across the resume. With an EMA in the
model's dtype (bf16 under ``bf16-true``) most of each update rounds away and this fails.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddm.export_files import load_export, read_export_metadata
from tests.fixtures.train import run_cli

DECAY = 0.99  # fixed (no warm-up) so the reference needs no step bookkeeping; (1-d)·Δw ≪ a bf16 ulp


def ema_step_errors(ckpt_dir: Path) -> list[float]:
    """Relative error of each stored EMA step against the fp64 reference, for consecutive checkpoints."""
    paths = sorted(ckpt_dir.glob("step-*.ckpt"))
    sds = [torch.load(p, map_location="cpu", weights_only=False)["state_dict"] for p in paths]
    errors = []
    for before, after in zip(sds, sds[1:]):
        num = den = 0.0
        for key, e0 in before.items():
            if not key.startswith("ema_model."):
                continue
            e0, e1 = e0.double(), after[key].double()
            w1 = after["model." + key[len("ema_model."):]].double()
            reference = e0 + (1 - DECAY) * (w1 - e0)
            num += float(((e1 - reference) ** 2).sum())
            den += float(((reference - e0) ** 2).sum())
        assert den > 0, "the weights did not move: nothing to check"
        errors.append((num / den) ** 0.5)
    return errors


def check_run(run: Path, precision: str, final_step: int) -> None:
    ckpt_dir = run / "checkpoints"
    steps = [int(p.stem.split("-")[1]) for p in sorted(ckpt_dir.glob("step-*.ckpt"))]
    assert steps == list(range(1, final_step + 1))
    last = torch.load(ckpt_dir / f"step-{final_step:08d}.ckpt", map_location="cpu", weights_only=False)
    model_dtypes = {v.dtype for k, v in last["state_dict"].items() if k.startswith("model.") and v.is_floating_point()}
    assert model_dtypes == ({torch.bfloat16} if precision == "bf16-true" else {torch.float32})
    errors = ema_step_errors(ckpt_dir)
    assert max(errors) <= 1e-3, f"EMA steps deviate from the fp64 reference: {errors}"
    assert {v.dtype for k, v in last["state_dict"].items() if k.startswith("ema_model.")} == {torch.float32}
    # the export holds the final EMA, in the export dtype (default fp32), bit for bit
    sd, meta = load_export(run / "export")
    assert meta["step"] == final_step and read_export_metadata(run / "export")["export_dtype"] == "fp32"
    for key, value in sd.items():
        assert value.dtype == torch.float32 and torch.equal(value, last["state_dict"]["ema_model." + key])


COMMON = ["trainer.log_every_n_steps=1", "checkpoint.every_n_steps=1", "checkpoint.keep_last=20",
          "optim.ema_warmup=false", f"optim.ema_decay={DECAY}"]


# bf16-true is the case a model-dtype EMA gets wrong: it also goes through a resume; bf16-mixed runs once.
CASES = [("bf16-true", True), ("bf16-mixed", False)]


@pytest.mark.slow
@pytest.mark.parametrize("precision, resume", CASES)
def test_expert_ema_moves_in_fp32_under_bf16(tmp_path, tiny_overrides, precision, resume):
    args = [*tiny_overrides, *COMMON, "expert=1", f"trainer.precision={precision}", "recipe.stage2.lr=1e-3",
            "recipe.stage2.warmup_steps=0"]
    if resume:
        run_cli("train.expert", [*args, "recipe.stage2.max_steps=3"])
    last = run_cli("train.expert", [*args, "recipe.stage2.max_steps=5"])
    assert ("mode=resume" in last.stdout) == resume
    check_run(tmp_path / "runs" / "tiny" / "expert1" / "stage2", precision, 5)


@pytest.mark.slow
@pytest.mark.parametrize("precision, resume", CASES)
def test_router_ema_moves_in_fp32_under_bf16(tmp_path, test_shards_dir, tiny_text_dir, precision, resume):
    args = ["experiment=tiny", f"paths.root_dir={tmp_path}", f"data.shards_dir={test_shards_dir}",
            f"text.folder={tiny_text_dir}", *COMMON, "recipe.router.batch_size=8", "recipe.router.lr=1e-3",
            "recipe.router.warmup_steps=0",
            f"trainer.precision={precision}"]
    if resume:
        run_cli("train.router", [*args, "recipe.router.max_steps=3"])
    last = run_cli("train.router", [*args, "recipe.router.max_steps=5"])
    assert ("mode=resume" in last.stdout) == resume
    check_run(tmp_path / "runs" / "tiny" / "router" / "stage2", precision, 5)
