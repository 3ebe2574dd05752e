"""The gated router of a grown pool (ddm.models.gated_router, ddm.pool add --router gated): its posterior against
a float64 reference built from the two routers' own outputs, prior corrections folded exactly, the old routing
kept where the gate says "old", nesting, the export round trip and the refusals."""
from __future__ import annotations

import pytest
import torch

from ddm.export_files import build_model_from_export, save_export
from ddm.models.gated_router import (GatedRouter, GatedRouterConfig, fold_prior_correction, gated_state_dict,
                                     router_config_from_dict)
from ddm.models.router import Router, get_router_config
from ddm.pool import gate_router, retire_router
from ddm.sampler import routing_weights

TEXT = 8


def _router(k: int, seed: int, text: bool = True) -> Router:
    torch.manual_seed(seed)
    r = Router(get_router_config("tiny", latent_channels=4, num_experts=k, text_dim=TEXT if text else None))
    with torch.no_grad():  # random weights everywhere (the zero-initialised head would give the uniform prior)
        for p in r.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return r.double().eval()


def _inputs(b: int = 6):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, 4, 2, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64)
    return x, t, {"clip": torch.randn(b, TEXT, generator=g, dtype=torch.float64)}


def _reference(base_logits: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """P(k) = (1 - g) P_base(k) for the old experts, g for the new one: plain probabilities in float64."""
    pb, pg = base_logits.softmax(-1), gate_logits.softmax(-1)
    g = pg[:, -1:]
    return torch.cat([(1 - g) * pb, g], dim=-1)


def _gated(base: torch.nn.Module, gate: Router) -> GatedRouter:
    model = GatedRouter(GatedRouterConfig(base.cfg, gate.cfg)).double()
    model.load_state_dict(gated_state_dict(base.state_dict(), gate.state_dict()))
    return model.eval()


def test_posterior_matches_the_float64_composition_and_sums_to_one():
    base, gate = _router(3, 0), _router(4, 1)
    x, t, cond = _inputs()
    with torch.no_grad():
        out = _gated(base, gate)(x, t, cond)
        ref = _reference(base(x, t, cond), gate(x, t, cond))
    assert out.shape == (6, 4) and out.dtype == torch.float64
    torch.testing.assert_close(out.softmax(-1), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)


def test_the_old_routing_is_kept_exactly_where_the_gate_says_old():
    base, gate = _router(3, 0), _router(4, 1)
    x, t, cond = _inputs(16)
    with torch.no_grad():
        gate.head[-1].bias[-1] -= 40.0  # the gate is sure every sample is old
        out = _gated(base, gate)(x, t, cond)
        old = base(x, t, cond)
    # the old experts' relative weights are the old router's, to rounding, under every strategy
    torch.testing.assert_close(out[:, :3].softmax(-1), old.softmax(-1), rtol=0, atol=1e-12)
    for strategy in ("top1", "topk", "full"):
        w = routing_weights(out, strategy, 4)
        assert float(w[:, 3].max()) < 1e-12 if strategy == "full" else torch.equal(w[:, 3], torch.zeros(16, dtype=w.dtype))
        torch.testing.assert_close(w[:, :3], routing_weights(old, strategy, 3), rtol=0, atol=1e-9)
    # and where the gate is sure it is new, the new expert takes it
    with torch.no_grad():
        gate.head[-1].bias[-1] += 80.0
        assert torch.equal(routing_weights(_gated(base, gate)(x, t, cond), "top1", 4)[:, 3],
                           torch.ones(16, dtype=torch.float64))


def test_prior_corrections_fold_into_the_head_bias_exactly():
    r = _router(3, 2)
    x, t, cond = _inputs()
    c = [0.5, -1.25, 2.0]
    folded = _router(3, 2)
    folded.load_state_dict(fold_prior_correction(r.state_dict(), c))
    with torch.no_grad():
        torch.testing.assert_close(folded(x, t, cond), r(x, t, cond) + torch.tensor(c, dtype=torch.float64),
                                   rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="prior_correction has 2 entries"):
        fold_prior_correction(r.state_dict(), [0.1, 0.2])


def test_a_pool_grown_twice_nests_and_keeps_each_level():
    b3, g4, g5 = _router(3, 0), _router(4, 1), _router(5, 2, text=False)  # a text-blind gate mixes fine
    x, t, cond = _inputs()
    inner = _gated(b3, g4)
    cfg = GatedRouterConfig(inner.cfg, g5.cfg)
    outer = GatedRouter(cfg).double()
    outer.load_state_dict(gated_state_dict(inner.state_dict(), g5.state_dict()))
    back = router_config_from_dict(cfg.to_dict())
    assert isinstance(back, GatedRouterConfig) and back.to_dict() == cfg.to_dict() and back.num_experts == 5
    with torch.no_grad():
        ref = _reference(torch.log(_reference(b3(x, t, cond), g4(x, t, cond))), g5(x, t, cond))
        torch.testing.assert_close(outer.eval()(x, t, cond).softmax(-1), ref, rtol=0, atol=1e-12)


def test_export_round_trip_folds_the_recorded_corrections(tmp_path):
    base, gate = _router(3, 0).float(), _router(4, 1).float()
    cb, cg = [0.2, -0.4, 0.0], [0.0, 0.1, 0.0, -0.3]
    save_export(base.state_dict(), tmp_path / "base", {"kind": "router", "config": base.cfg.to_dict(),
                                                        "num_experts": 3, "expert_ids": [1, 2, 3],
                                                        "prior_correction": cb, "train_flops": 10.0})
    save_export(gate.state_dict(), tmp_path / "gate", {"kind": "router", "config": gate.cfg.to_dict(),
                                                        "num_experts": 4, "expert_ids": [1, 2, 3, 4],
                                                        "prior_correction": cg, "train_flops": 5.0})
    sd, meta = gate_router(tmp_path / "base", tmp_path / "gate")
    assert meta["prior_correction"] == [0.0] * 4 and meta["num_experts"] == 4 and meta["train_flops"] == 15.0
    assert meta["config"]["type"] == "gated" and meta["composition"]["base"]["path"].endswith("base")
    save_export(sd, tmp_path / "gated", meta)
    model = build_model_from_export(tmp_path / "gated")
    assert isinstance(model, GatedRouter)
    x, t, cond = _inputs()
    with torch.no_grad():
        got = model.double()(x, t, cond).softmax(-1)
        ref = _reference(base.double()(x, t, cond) + torch.tensor(cb, dtype=torch.float64),
                         gate.double()(x, t, cond) + torch.tensor(cg, dtype=torch.float64))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)  # the weights were stored in float32
    # a gated router refuses the zero-cost retire (its rows are not one head's)
    with pytest.raises(ValueError, match="retire by retraining"):
        retire_router(sd, meta, 2)


def test_a_gate_that_reads_t5_over_a_base_that_reads_clip():
    """The gate may read other text than the base (the grown pool's gate reads the caption's T5 tokens, the old
    router pooled CLIP): each part takes its own inputs from one cond, and the posterior is the same composition."""
    base = _router(3, 0)
    torch.manual_seed(3)
    gate = Router(get_router_config("tiny", latent_channels=4, num_experts=4, t5_dim=6))
    with torch.no_grad():
        for p in gate.parameters():
            p.add_(0.3 * torch.randn_like(p))
    gate = gate.double().eval()
    x, t, cond = _inputs()
    cond["t5"] = torch.randn(6, 5, 6, dtype=torch.float64)
    model = _gated(base, gate)
    assert model.cfg.reads_text and (model.cfg.text_dim, model.cfg.t5_dim) == (TEXT, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond).softmax(-1), _reference(base(x, t, cond), gate(x, t, cond)),
                                   rtol=0, atol=1e-12)
    assert router_config_from_dict(model.cfg.to_dict()).to_dict() == model.cfg.to_dict()
    with pytest.raises(ValueError, match="T5 states of width 6 but the base router 7"):
        GatedRouterConfig(get_router_config("tiny", latent_channels=4, t5_dim=7), gate.cfg)


def test_refusals(tmp_path):
    base, gate5, gate4 = _router(3, 0), _router(5, 1), _router(4, 2)
    with pytest.raises(ValueError, match="must predict 4"):
        GatedRouterConfig(base.cfg, gate5.cfg)
    other = get_router_config("tiny", latent_channels=6, num_experts=4)
    with pytest.raises(ValueError, match="latent channels"):
        GatedRouterConfig(base.cfg, other)
    save_export(base.float().state_dict(), tmp_path / "base", {"kind": "router", "config": base.cfg.to_dict(),
                                                                "expert_ids": [1, 2, 3]})
    save_export(gate4.float().state_dict(), tmp_path / "gate", {"kind": "router", "config": gate4.cfg.to_dict(),
                                                                 "expert_ids": [1, 2, 5, 4]})
    with pytest.raises(ValueError, match="first K outputs must be the base's experts"):
        gate_router(tmp_path / "base", tmp_path / "gate")
    with pytest.raises(ValueError, match="not a gated router config"):
        GatedRouterConfig.from_dict({"type": "gated", "base": base.cfg.to_dict()})
