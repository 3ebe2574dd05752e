"""Heterogeneous expert pools (issue 16 item 3): experts of different sizes and prediction targets in one folder.

Paris 1.0 mixes experts trained on different objectives by converting each to a velocity. Here: the conversion
math against float64 closed forms, a three-expert folder (a base expert, a wider and deeper one, an ε-objective
one) exported by ``ddm.assemble`` and sampled by the same pipeline, its mixed velocity checked against a float64
reference computed independently from the raw expert outputs, and the training side (per-expert overrides,
the export's ``prediction``, a ledger charging each expert its own FLOPs); and a router's head grown by an
expert for fine-tuning a grown pool's router.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from ddm.sampling_spec import Routing, SamplingSpec
from ddm import flow
from ddm.export_files import read_export_metadata, save_export
from ddm.assemble import main as export_main
from ddm.models.mmdit import MMDiT
from ddm.models.presets import get_expert_config
from ddm.models.router import Router, get_router_config
from ddm.models.velocity import VelocityModel, as_velocity_model, unwrap_velocity_model
from ddm.pipeline import DDMPipeline
from ddm.pool import main as pool_main
from ddm.sampler import routed_velocity
from tests.fixtures.pipeline import (SHARD_BYTES, STAGES, expert_metadata, latent_channels, perturbed, router_metadata,
                                     text_dims, train_config)
from tests.fixtures.train import compose_config, run_cli
from train import job

K = 3
# expert 2 is twice as wide (same head width) and deeper; expert 3 regresses the noise ε
SIZES = {1: {}, 2: {"hidden_size": 128, "num_heads": 4, "depth": 3}, 3: {}}
PREDICTIONS = {1: "velocity", 2: "velocity", 3: "epsilon"}


# --- the conversion, float64 closed forms ------------------------------------------------------------------
@pytest.mark.parametrize("prediction", flow.PREDICTIONS)
def test_to_velocity_inverts_the_training_target(prediction):
    """A perfect predictor of each target gives back the true velocity ε − x0 at every interior t."""
    gen = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(5, 3, 2, 4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0.02, 0.3, 0.5, 0.8, 0.97], dtype=torch.float64)
    x_t = flow.interpolate(x0, eps, t)
    target = flow.training_target(prediction, x0, eps)
    expected = {"velocity": eps - x0, "epsilon": eps, "x0": x0}[prediction]
    assert torch.equal(target, expected)
    torch.testing.assert_close(flow.to_velocity(prediction, target, x_t, t), eps - x0, rtol=1e-12, atol=1e-12)


def test_conversions_are_finite_at_the_ends_of_the_path_and_reject_unknown_targets():
    x = torch.randn(2, 3, 1, 2, 2, dtype=torch.float64)
    out = torch.randn_like(x)
    ones, zeros = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    gap = flow.PREDICTION_MIN_GAP
    torch.testing.assert_close(flow.to_velocity("epsilon", out, x, ones), (out - x) / gap)
    torch.testing.assert_close(flow.to_velocity("x0", out, x, zeros), (x - out) / gap)
    assert flow.to_velocity("velocity", out, x, ones) is out
    with pytest.raises(ValueError, match="unknown prediction target 'score'.*velocity, epsilon, x0"):
        flow.training_target("score", x, out)
    with pytest.raises(ValueError, match="unknown prediction target"):
        as_velocity_model(torch.nn.Identity(), "v")


# --- a heterogeneous folder through ddm.assemble and the pipeline ----------------------------------------------
def _expert(text_dir, k: int, seed: int) -> MMDiT:
    t5_dim, clip_dim = text_dims(text_dir)
    cfg = get_expert_config("tiny", latent_channels=latent_channels(), context_in_dim=t5_dim, vec_in_dim=clip_dim,
                            **SIZES[k])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return perturbed(MMDiT(cfg), seed)


def _router(seed: int) -> Router:
    """A router whose weights are mixed, not one-hot (so every expert counts in the full mixture)."""
    cfg = get_router_config("tiny", latent_channels=latent_channels(), num_experts=K)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return perturbed(Router(cfg), seed, scale=0.02)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_text_dir):
    runs = tmp_path_factory.mktemp("runs") / "tiny"
    config = train_config(tiny_text_dir, K)
    for k in range(1, K + 1):
        for i, stage in enumerate(STAGES):
            model = _expert(tiny_text_dir, k, seed=300 + 10 * k + i)
            meta = {**expert_metadata(model, stage, k, config), "prediction": PREDICTIONS[k]}
            save_export(model.state_dict(), runs / f"expert{k}" / stage / "export", meta, max_shard_bytes=SHARD_BYTES)
    router = _router(seed=31)
    save_export(router.state_dict(), runs / "router" / "stage2" / "export",
                router_metadata(router, "stage2", config, prior_correction=[0.1, -0.2, 0.1]),
                max_shard_bytes=SHARD_BYTES)
    out = tmp_path_factory.mktemp("model") / "hetero"
    export_main(["--runs", str(runs), "--out", str(out)])
    return out


def _cond(batch: int, text_dir, dtype=torch.float32) -> dict:
    t5_dim, clip_dim = text_dims(text_dir)
    gen = torch.Generator().manual_seed(5)
    return {"t5": torch.randn(batch, 6, t5_dim, generator=gen, dtype=dtype),
            "clip": torch.randn(batch, clip_dim, generator=gen, dtype=dtype)}


def test_heterogeneous_folder_loads_each_expert_at_its_own_size_and_target(folder):
    pipe = DDMPipeline.from_pretrained(folder, load_text=False)
    nets = [unwrap_velocity_model(e) for e in pipe.experts]
    assert [n.config.hidden_size for n in nets] == [64, 128, 64]
    assert [n.config.depth for n in nets] == [get_expert_config("tiny").depth, 3, get_expert_config("tiny").depth]
    assert [type(e) is VelocityModel for e in pipe.experts] == [False, False, True]
    assert pipe.experts[2].prediction == "epsilon"
    params = [sum(p.numel() for p in n.parameters()) for n in nets]
    assert params[1] > 2 * params[0]  # really a different size, not a relabelled copy


@pytest.mark.parametrize("strategy", ["full", "top1"])
def test_mixed_velocity_matches_a_float64_reference(folder, tiny_text_dir, strategy):
    """The sampler's mixed (and guided) velocity of the heterogeneous pool, float32, against float64 computed
    from the raw networks: v_k = raw (velocity experts), (ε̂ − x) / (1 − t) (the ε expert), weighted by the
    router's softmax (prior-corrected; top-1 keeps the arg-max)."""
    pipe = DDMPipeline.from_pretrained(folder, load_text=False)
    batch = 4
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(batch, latent_channels(), 2, 8, 8, generator=gen)
    t = torch.tensor([0.95, 0.7, 0.4, 0.1])
    cond, uncond = _cond(batch, tiny_text_dir), {k: v * 0 for k, v in _cond(batch, tiny_text_dir).items()}
    got = routed_velocity(x, t, cond, pipe.experts, pipe.router, Routing(strategy, k=2, prior_correction=pipe.prior_correction), cfg_scale=2.0, uncond=uncond)

    x64, t64 = x.double(), t.double()
    cond64 = {k: v.double() for k, v in cond.items()}
    uncond64 = {k: v.double() for k, v in uncond.items()}
    tb = t64.view(-1, 1, 1, 1, 1)

    def velocity(k: int, c: dict) -> torch.Tensor:
        net = copy.deepcopy(unwrap_velocity_model(pipe.experts[k])).double()
        raw = net(x64, t64, c)
        return (raw - x64) / (1 - tb) if PREDICTIONS[k + 1] == "epsilon" else raw

    logits = copy.deepcopy(pipe.router).double()(x64, t64, cond64) + torch.tensor(pipe.prior_correction,
                                                                                 dtype=torch.float64)
    weights = torch.softmax(logits, dim=-1)
    if strategy == "top1":
        weights = torch.nn.functional.one_hot(logits.argmax(-1), K).double()
    guided = [velocity(k, uncond64) + 2.0 * (velocity(k, cond64) - velocity(k, uncond64)) for k in range(K)]
    ref = sum(weights[:, k].view(-1, 1, 1, 1, 1) * guided[k] for k in range(K))
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
    if strategy == "full":
        assert (weights[:, 2] > 0.01).all()  # the ε expert really takes part in the mixture


def test_heterogeneous_pool_samples_saves_and_lists(folder, tmp_path, capsys):
    pipe = DDMPipeline.from_pretrained(folder)
    result = pipe.generate(["a red square moves left", "a blue circle"], SamplingSpec(Routing("full"), num_steps=3, cfg_scale=2.0), seeds=[1, 2], progress=False)
    assert result.videos.shape[0] == 2 and torch.isfinite(torch.as_tensor(result.videos)).all()
    saved = pipe.save_pretrained(tmp_path / "saved")
    assert read_export_metadata(saved / "expert3" / "stage2")["prediction"] == "epsilon"
    again = DDMPipeline.from_pretrained(saved, load_text=False)
    assert isinstance(again.experts[2], VelocityModel)
    assert json.loads((saved / "model_index.json").read_text())["num_experts"] == K
    assert pool_main(["list", str(folder)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["slot", "expert_id", "preset", "params", "target"]
    assert [row.split()[4] for row in table[1:4]] == ["velocity", "velocity", "epsilon"]


# --- the training side ---------------------------------------------------------------------------------------
HETERO = "expert_overrides={2:{model:{hidden_size:128,num_heads:4}},3:{prediction:epsilon}}"


def test_the_ledger_charges_each_expert_its_own_flops():
    base = compose_config("expert", ["experiment=tiny", "expert=all", "compute_match=true"])
    hetero = compose_config("expert", ["experiment=tiny", "expert=all", "compute_match=true", HETERO])
    g = job.stage_geometry(base)
    f = [job.expert_budget(job.member_config(hetero, k)[0], g).flops_per_sample for k in (1, 2, 3)]
    assert f[0] == f[2] < f[1]  # expert 3 differs only in its target, expert 2 in its width
    budget = job.expert_budget(job.expert_config(base), g)
    same, mixed = job.compute_ledger(base, budget, 1), job.compute_ledger(hetero, budget, 1)
    assert mixed.expert_flops == tuple(f) and not same.heterogeneous and mixed.heterogeneous
    b, n = mixed.expert_batch, mixed.expert_steps
    assert mixed.experts_total == pytest.approx(sum(f) * b * n, rel=1e-12)
    assert mixed.ddm_total - same.ddm_total == pytest.approx((f[1] - f[0]) * b * n, rel=1e-9)
    assert mixed.monolith >= mixed.ddm_total and mixed.monolith_batch > same.monolith_batch
    assert "expert 2" in mixed.table() and "expert (each)" in same.table()
    with pytest.raises(ValueError, match="unknown keys"):
        job.expert_overrides(compose_config("expert", ["experiment=tiny", "expert_overrides={2:{lr:1}}"]))
    with pytest.raises(ValueError, match="outside 1..3"):
        job.expert_overrides(compose_config("expert", ["experiment=tiny", "expert_overrides={4:{prediction:x0}}"]))
    with pytest.raises(ValueError, match="unknown prediction target"):
        job.expert_overrides(compose_config("expert", ["experiment=tiny", "expert_overrides={1:{prediction:v}}"]))


@pytest.mark.slow
def test_train_expert_applies_its_own_overrides(tiny_overrides, tmp_path):
    """Real runs: expert 2 trains at its own width, expert 3 on the ε target; the exports say so."""
    for k, width, prediction in ((2, 128, "velocity"), (3, 64, "epsilon")):
        run_cli("train.expert", [*tiny_overrides, f"expert={k}", HETERO, "recipe.stage2.max_steps=2"])
        meta = read_export_metadata(tmp_path / "runs" / "tiny" / f"expert{k}" / "stage2" / "export")
        assert meta["config"]["hidden_size"] == width and meta["prediction"] == prediction
        assert meta["train_config"]["flow"]["prediction"] == prediction


def test_diffusers_export_refuses_an_epsilon_expert(folder, tmp_path):
    """diffusers' Flux pipelines read a transformer's output as a velocity: exporting the ε expert would sample
    wrongly there, so the export stops, names the expert and leaves nothing behind."""
    pytest.importorskip("diffusers")
    from ddm.interop_export import export_diffusers

    with pytest.raises(ValueError, match="expert 3 .* predicts 'epsilon'"):
        export_diffusers(folder, tmp_path / "diffusers")
    assert not (tmp_path / "diffusers").exists()


def test_grow_router_keeps_every_old_logit_and_starts_the_new_one_at_their_mean():
    """Fine-tuning the grown pool's router from the K-way one: the old outputs are exactly the old router's,
    the new output starts at the mean of the old logits (closed form of the mean row), float64."""
    from ddm.pool import grow_router

    router = _router(seed=3).double()
    grown = Router(dataclasses.replace(router.cfg, num_experts=K + 2)).double()
    grown.load_state_dict(grow_router(router.state_dict(), K + 2))
    x = torch.randn(3, latent_channels(), 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    old, new = router(x, t, {}), grown(x, t, {})
    assert new.shape == (3, K + 2)
    torch.testing.assert_close(new[:, :K], old, rtol=0, atol=1e-12)
    torch.testing.assert_close(new[:, K], old.mean(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new[:, K + 1], old.mean(-1), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="would drop outputs"):
        grow_router(router.state_dict(), K - 1)


def test_router_init_reads_lazily_unless_its_head_grows(tmp_path):
    """``init_from`` a router export: the grown-head transform receives the lazy export (one tensor read at a
    time, as an FSDP2 start needs) and hands it back untouched when nothing grows; when the pool grew it
    returns the grown weights, which fit the K+1 router."""
    from ddm.export_files import save_export
    from train.job import load_init_weights
    from train.router import _grown_head
    from train.run import StartPlan
    from train.sharding import LazyExport

    router = _router(seed=4)
    save_export(router.state_dict(), tmp_path / "export", {"kind": "router", "num_experts": K})
    plan = StartPlan("init", init_from=tmp_path / "export")
    same = load_init_weights(plan, lambda: Router(router.cfg), transform=_grown_head(K))
    assert isinstance(same, LazyExport)
    torch.testing.assert_close(same["head.2.weight"], router.state_dict()["head.2.weight"], rtol=0, atol=0)
    grown_cfg = dataclasses.replace(router.cfg, num_experts=K + 1)
    grown = load_init_weights(plan, lambda: Router(grown_cfg), transform=_grown_head(K + 1))
    assert not isinstance(grown, LazyExport) and grown["head.2.weight"].shape[0] == K + 1
    Router(grown_cfg).load_state_dict(dict(grown))  # strict: every key and shape fits
