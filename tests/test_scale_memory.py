"""The dry run's closed-form training memory (ddm.models.budget.training_memory) against a measured run.

A small expert trains one real AdamW step on the CPU with its fp32 EMA twin, in fp32, bf16-true and
bf16-mixed (autocast), with and without activation checkpointing. Measured: the bytes of every weight,
gradient, optimizer state and EMA tensor, and the activations autograd keeps for backward (a
saved-tensor hook, each storage counted once, the weights themselves excluded); with checkpointing the
kept block inputs plus one double block's activations, measured the same way while it is recomputed.
The closed form must be within 25% of the measurement, per part and in total.
"""
from __future__ import annotations

import re

import pytest
import torch

from ddm.models.budget import training_memory
from ddm.models.mmdit import MMDiT
from ddm.models.presets import ExpertConfig, get_expert_config
from train.ema import make_ema_twin

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class SavedTensors:
    """Bytes of the tensors autograd saves for backward (one count per storage, weights excluded)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.storages = exclude, {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in self.exclude:
            self.storages[st.data_ptr()] = st.nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def measure_training_memory(cfg: ExpertConfig, precision: str, checkpointing: bool, batch: int,
                            latent: tuple[int, int, int], text_tokens: int, seed: int = 0) -> dict[str, int]:
    """One AdamW step of ``MMDiT(cfg)`` + EMA on the CPU; bytes by part, as ``training_memory`` reports them."""
    torch.manual_seed(seed)
    model = MMDiT(cfg)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    ema = make_ema_twin(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t, h, w = latent
    x = torch.randn(batch, cfg.latent_channels, t, h, w)
    cond = {"t5": torch.randn(batch, text_tokens, cfg.context_in_dim), "clip": torch.randn(batch, cfg.vec_in_dim)}
    if cfg.cond_embed:  # as in training: an i2v input (here a first-frame condition) reaches cond_in
        cond["i2v"] = torch.cat([torch.ones_like(x[:, :1]), x], dim=1)
    model.set_activation_checkpointing(checkpointing)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = SavedTensors(weights)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with autocast, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda s: s):
        loss = (model(x, torch.rand(batch), cond).float() - x).pow(2).mean()
    acts = saved.nbytes
    if checkpointing:  # + one double block's activations, alive while it is recomputed in backward
        block = model.double_blocks[0]
        recompute = SavedTensors(weights)
        captured = {}
        handle = block.register_forward_pre_hook(lambda m, args: captured.setdefault("args", args))
        with torch.no_grad(), autocast:
            model(x, torch.rand(batch), cond)
        handle.remove()
        args = [a.detach().requires_grad_(a.is_floating_point() and a.ndim == 3) if isinstance(a, torch.Tensor)
                else a for a in captured["args"]]
        with autocast, torch.autograd.graph.saved_tensors_hooks(recompute.pack, lambda s: s):
            block(*args)
        acts += recompute.nbytes
    loss.backward()
    opt.step()

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    state = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    out = {"params": nbytes(model.parameters()), "grads": nbytes(p.grad for p in model.parameters()),
           "optimizer": nbytes(state), "ema": nbytes(ema.parameters()), "master": 0, "activations": acts}
    out["total"] = sum(out.values())
    return out


SMALL = dict(hidden_size=128, num_heads=2, axes_dim=(16, 24, 24), depth=2, depth_single_blocks=2)


@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "bf16-mixed"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_memory_closed_form_matches_a_measured_step(precision, checkpointing):
    cfg = get_expert_config("tiny", **SMALL)
    batch, latent, text = 2, (4, 24, 24), 32  # 4·12·12 = 576 image tokens
    measured = measure_training_memory(cfg, precision, checkpointing, batch, latent, text)
    predicted = training_memory(cfg, strategy="ddp", world_size=1, batch_size=batch, image_tokens=576,
                                text_tokens=text, precision=precision, activation_checkpointing=checkpointing)
    for key in ("params", "grads", "optimizer", "ema", "master"):
        assert predicted[key] == pytest.approx(measured[key], rel=1e-3, abs=1), key
    assert predicted["activations"] == pytest.approx(measured["activations"], rel=0.25), (predicted, measured)
    assert predicted["total"] == pytest.approx(measured["total"], rel=0.25)


def test_training_memory_shards_by_strategy():
    cfg = get_expert_config("opensora-v2-11b")
    kw = dict(batch_size=1, image_tokens=8448, text_tokens=512, precision="bf16-mixed", activation_checkpointing=True)
    ddp = training_memory(cfg, strategy="ddp", world_size=8, **kw)
    fsdp = training_memory(cfg, strategy="fsdp", world_size=8, **kw)
    z2 = training_memory(cfg, strategy="zero2", world_size=8, **kw)
    z3 = training_memory(cfg, strategy="zero3", world_size=8, **kw)
    p = 11_891_390_528
    assert ddp["ema"] == 4 * p and fsdp["ema"] == 4 * p // 8 + (4 * p % 8 > 0)  # the fp32 EMA, sharded by FSDP2
    assert ddp["optimizer"] == 8 * p and fsdp["optimizer"] == z3["optimizer"] == z2["optimizer"]
    assert z2["params"] == 2 * p and z2["master"] == z3["master"] > 0 and fsdp["master"] == 0
    assert ddp["total"] > 80 * 2**30 > fsdp["total"]
    half = training_memory(cfg, strategy="fsdp", world_size=8, **{**kw, "context_parallel": 2})
    assert half["activations"] < fsdp["activations"]
    with pytest.raises(ValueError, match="strategy must be one of"):
        training_memory(cfg, strategy="zero1", world_size=8, **kw)


def test_dry_run_prints_the_breakdown_and_fits_8x80_by_default(tmp_path):
    from tests.fixtures.train import run_cli

    out = run_cli("train.expert", ["expert=1", "dry_run=true", f"paths.root_dir={tmp_path}"]).stdout
    assert "fsdp / 8 ranks" in out  # no GPU visible: a node of 8 is assumed; FSDP2 is the default
    for label in ("weights", "gradients", "AdamW moments", "EMA (fp32)", "master weights (fp32)", "activations"):
        assert label in out
    assert "fits:" in out and "WARNING" not in out
    ddp = run_cli("train.expert", ["expert=1", "dry_run=true", "strategy=ddp", f"paths.root_dir={tmp_path}"]).stdout
    assert re.search(r"WARNING: .* exceeds the 80 GiB device with strategy ddp at 8 ranks.*Fits: .*fsdp", ddp)
    assert not list(tmp_path.glob("runs/**/*.ckpt"))
