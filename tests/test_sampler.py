"""The routed sampler against independent references.

- Exact experts + exact router of a Gaussian mixture (tests.fixtures.analytic) reproduce the exact marginal velocity,
  which the oracle computes by a different route (the score of the marginal density).
- A full-ensemble Euler sample matches the mixture's mean and covariance within sampling error.
- Grouped dispatch equals the naive "every expert on the whole batch" mix written out in the test.
- Routing weights equal a plain numpy reimplementation; placement and call counts are recorded by wrappers.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddm.sampling_spec import Routing, SamplingSpec
from tests.fixtures.analytic import GaussianMixture
from ddm.flow import euler_schedule
from ddm.sampler import ExpertPlacement, RoutingTrace, make_noise, routed_velocity, routing_weights, sample

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Many small tensor ops: one intra-op thread avoids OpenMP spin contention on a shared 2-core machine
    (measured here under load: the Euler test took 170 s with 2 threads, 12 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def _mixture_2d() -> GaussianMixture:
    return GaussianMixture(_f64([0.5, 0.3, 0.2]), _f64([[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]]),
                           _f64([[[0.6, 0.2], [0.2, 0.4]], [[0.3, -0.1], [-0.1, 0.5]], [[0.8, 0.0], [0.0, 0.25]]]))


def _mixture_4d() -> GaussianMixture:
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(3, 4, 4, generator=gen, dtype=F64)
    covs = a @ a.transpose(1, 2) * 0.2 + 0.1 * torch.eye(4, dtype=F64)
    return GaussianMixture(_f64([0.2, 0.45, 0.35]), 2 * torch.randn(3, 4, generator=gen, dtype=F64), covs)


def _w(col: torch.Tensor, ndim: int) -> torch.Tensor:
    return col.view(-1, *([1] * (ndim - 1)))


class LinearExpert:
    """A random affine velocity that depends on x, t, the pooled text and the mean T5 state (float64)."""

    def __init__(self, dim: int, seed: int, d_t5: int = 5, d_clip: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(dim, dim, generator=g, dtype=F64)
        self.b = torch.randn(dim, generator=g, dtype=F64)
        self.w = torch.randn(d_clip, dim, generator=g, dtype=F64)
        self.u = torch.randn(d_t5, dim, generator=g, dtype=F64)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        v = x.reshape(len(x), -1) @ self.a + t[:, None] * self.b
        if "clip" in cond:
            v = v + cond["clip"] @ self.w
        if "t5" in cond:
            v = v + cond["t5"].mean(1) @ self.u  # the mean over L, so padding / truncation matter
        return v.reshape(x.shape)


class Counting:
    """Wraps a callable and records the batch size of every call."""

    def __init__(self, fn) -> None:
        self.fn, self.batches = fn, []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        return self.fn(x, t, cond)


def _tie_router(dim: int, num: int = 3):
    """Text-blind logits rounded to integers (many ties), and rows 0, 3, 6, ... all-equal."""
    r = torch.randn(dim, num, generator=torch.Generator().manual_seed(11), dtype=F64)

    def router(x, t, cond):
        logits = torch.round(x.reshape(len(x), -1) @ r)
        logits[::3] = 0.0
        return logits
    return router


# --- the identity u = Σ_k P(k|x_t) u^(k) ------------------------------------------------------------------------
def test_exact_experts_and_router_give_the_exact_marginal_velocity() -> None:
    for gm, shape in ((_mixture_2d(), (400, 2)), (_mixture_4d(), (400, 1, 2, 1, 2))):
        gen = torch.Generator().manual_seed(0)
        x = 2.5 * torch.randn(shape, generator=gen, dtype=F64)
        for t in (torch.rand(shape[0], generator=gen, dtype=F64), torch.zeros(shape[0], dtype=F64),
                  torch.full((shape[0],), 0.99, dtype=F64), torch.ones(shape[0], dtype=F64)):
            v = routed_velocity(x, t, {}, gm.expert_callables(), gm.router_callable(), Routing("full"))
            exact = gm.velocity(x.reshape(shape[0], -1), t).reshape(shape)
            rel = (v - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)
            assert rel.max() <= 1e-5, rel.max()


def test_prior_correction_reweights_the_mixture() -> None:
    """Adding log π' - log π to an exact router's logits gives the exact velocity of the mixture with priors π'."""
    gm = _mixture_2d()
    new_prior = _f64([0.1, 0.3, 0.6])
    reweighted = GaussianMixture(new_prior, gm.means, gm.covs)
    x = 2 * torch.randn(200, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.full((200,), 0.6, dtype=F64)
    v = routed_velocity(x, t, {}, gm.expert_callables(), gm.router_callable(), Routing("full", prior_correction=torch.log(new_prior) - torch.log(gm.weights)))
    torch.testing.assert_close(v, reweighted.velocity(x, t), rtol=1e-9, atol=1e-9)


def test_full_ensemble_euler_sample_matches_mixture_moments() -> None:
    """20k points integrated with the exact routed velocity land on the mixture's mean and covariance.

    Tolerance: Euler is first order, so with the same noise the 100- and 200-step results differ by about
    the 200-step bias, and 2·s(200) - s(100) (Richardson) cancels it to second order. Each entry of the
    extrapolated mean / covariance must be within 4 standard errors (SE) of the truth, the standard errors being
    those of a sample mean / covariance of 20k exact draws (SE of a covariance entry = std of the centred
    products / √n, estimated on independent draws from the mixture). The plain 200-step result must be
    within 4 SE + |s(100) - s(200)| (its estimated Euler bias). (Measured: the extrapolated statistics are
    within 1.6 SE, the 200-step bias estimate is 0.8-1.6 SE on the covariance, ≤ 0.1 SE on the mean.)
    """
    gm = _mixture_2d()
    n = 20_000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    experts, router = gm.expert_callables(), gm.router_callable()
    coarse = sample(experts, router, noise, {}, SamplingSpec(Routing("full"), num_steps=100, cfg_scale=1.0))
    fine = sample(experts, router, noise, {}, SamplingSpec(Routing("full"), num_steps=200, cfg_scale=1.0))

    ref = gm.sample(n, torch.Generator().manual_seed(3))
    centred = ref - ref.mean(0)
    se_mean = ref.std(0) / n ** 0.5
    se_cov = (centred[:, :, None] * centred[:, None, :]).reshape(n, -1).std(0).reshape(2, 2) / n ** 0.5
    mean, cov = gm.mean(), gm.cov()

    stats = {"mean": (coarse.mean(0), fine.mean(0), mean, se_mean),
             "cov": (torch.cov(coarse.T), torch.cov(fine.T), cov, se_cov)}
    for name, (s_coarse, s_fine, truth, se) in stats.items():
        extrapolated = 2 * s_fine - s_coarse
        assert ((extrapolated - truth).abs() <= 4 * se).all(), (name, extrapolated - truth, se)
        bias = (s_coarse - s_fine).abs()
        assert ((s_fine - truth).abs() <= 4 * se + bias).all(), (name, s_fine - truth, se, bias)


# --- routing weights ----------------------------------------------------------------------------------------------
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def test_routing_weights_match_a_numpy_reference() -> None:
    logits = torch.randn(64, 5, generator=torch.Generator().manual_seed(4), dtype=F64) * 2
    z = logits.numpy()
    np.testing.assert_allclose(routing_weights(logits, "full", 5).numpy(), np.stack([_softmax(r) for r in z]))
    np.testing.assert_array_equal(routing_weights(logits, "top1", 5).numpy(), np.eye(5)[z.argmax(1)])
    for k in (1, 2, 3, 5):
        ref = np.zeros_like(z)
        for i, row in enumerate(z):
            keep = np.argsort(-row)[:k]
            ref[i, keep] = _softmax(row[keep])
        w = routing_weights(logits, "topk", 5, k=k)
        np.testing.assert_allclose(w.numpy(), ref, atol=1e-15)
        assert ((w > 0).sum(1) == k).all()
        np.testing.assert_allclose(w.sum(1).numpy(), 1.0)
    for thr in (0.0, 0.15, 0.9):
        ref = np.zeros_like(z)
        for i, row in enumerate(z):
            p = _softmax(row)
            keep = (p >= thr) | (np.arange(5) == p.argmax())
            ref[i] = np.where(keep, p, 0) / p[keep].sum()
        np.testing.assert_allclose(routing_weights(logits, "threshold", 5, threshold=thr).numpy(), ref, atol=1e-15)
    ids = [1, 5, 3, 3] * 16
    np.testing.assert_array_equal(routing_weights(logits, "oracle", 5, oracle_ids=ids).numpy(),
                                  np.eye(5)[np.array(ids) - 1])


def test_topk_with_ties_keeps_exactly_k() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 2.0, 2.0], [3.0, 3.0, 1.0, 1.0]])
    w = routing_weights(logits, "topk", 4, k=2)
    assert ((w > 0).sum(1) == 2).all()
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    assert w[1, 0] == 0 and w[2, 2] == 0 and w[2, 3] == 0  # strictly smaller logits are never kept over larger
    assert torch.equal(routing_weights(logits, "top1", 4).argmax(1), torch.tensor([0, 1, 0]))  # first on ties


# --- grouped dispatch ----------------------------------------------------------------------------------------------
def _text_cond(batch: int, length: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"t5": torch.randn(batch, length, 5, generator=g, dtype=F64),
            "clip": torch.randn(batch, 3, generator=g, dtype=F64)}


def _naive(x, t, cond, uncond, experts, weights, scale):
    """Every expert on the whole batch (conditional and unconditional separately), guided, then mixed."""
    out = torch.zeros_like(x)
    for j, expert in enumerate(experts):
        v = expert(x, t, cond)
        if uncond is not None:
            v_u = expert(x, t, uncond)
            v = v_u + scale * (v - v_u)
        out = out + _w(weights[:, j], x.ndim) * v
    return out


@pytest.mark.parametrize("null_length", [4, 9, None])
@pytest.mark.parametrize("strategy", ["top1", "topk", "full", "threshold", "oracle"])
def test_grouped_dispatch_equals_naive(strategy: str, null_length: int | None) -> None:
    batch, length = 13, 6
    x = torch.randn(batch, 2, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    t = torch.rand(batch, generator=torch.Generator().manual_seed(6), dtype=F64)
    experts = [LinearExpert(4, seed) for seed in (1, 2, 3)]
    router = _tie_router(4)
    cond = _text_cond(batch, length, 8)
    oracle_ids = [(i % 3) + 1 for i in range(batch)]
    if null_length is None:  # no guidance
        uncond, uncond_full, scale = None, None, 1.0
    else:  # a (1, L', D) null T5 and (1, D) null CLIP, as null_t5.pt / null_clip.pt hold
        null = _text_cond(1, null_length, 9)
        uncond, scale = null, 4.5
        fitted = null["t5"][:, :length] if null_length >= length else torch.cat(
            [null["t5"], torch.zeros(1, length - null_length, 5, dtype=F64)], dim=1)  # training's rule
        uncond_full = {"t5": fitted.expand(batch, -1, -1), "clip": null["clip"].expand(batch, -1)}

    v, weights = routed_velocity(x, t, cond, experts, router, Routing(strategy, k=2, threshold=0.3), oracle_ids=oracle_ids, cfg_scale=scale, uncond=uncond, return_weights=True)
    reference_weights = routing_weights(router(x, t, cond), strategy, 3, k=2, threshold=0.3, oracle_ids=oracle_ids)
    torch.testing.assert_close(weights, reference_weights, rtol=0, atol=0)
    torch.testing.assert_close(v, _naive(x, t, cond, uncond_full, experts, weights, scale), rtol=1e-12, atol=1e-12)


def test_real_tiny_experts_and_router_grouped_equals_naive() -> None:
    """The tiny MM-DiT experts and tiny router through the same path: top-2, CFG with the null tensors, i2v."""
    from ddm.conditioning import i2v_condition
    from ddm.models.mmdit import MMDiT
    from ddm.models.presets import get_expert_config
    from ddm.models.router import Router, get_router_config

    torch.manual_seed(0)
    cfg = get_expert_config("tiny")
    experts = [MMDiT(cfg).eval() for _ in range(3)]
    router = Router(get_router_config("tiny", num_experts=3)).eval()
    batch, length = 5, 7
    x = torch.randn(batch, cfg.latent_channels, 2, 8, 8)
    t = torch.rand(batch)
    mask = torch.zeros(batch, 2, dtype=torch.bool)
    mask[:, 0] = True
    cond = {"t5": torch.randn(batch, length, cfg.context_in_dim), "clip": torch.randn(batch, cfg.vec_in_dim),
            "i2v": i2v_condition(torch.randn_like(x), mask)}
    null = {"t5": torch.randn(1, 12, cfg.context_in_dim), "clip": torch.randn(1, cfg.vec_in_dim)}
    uncond_full = {"t5": null["t5"][:, :length].expand(batch, -1, -1), "clip": null["clip"].expand(batch, -1),
                   "i2v": cond["i2v"]}  # the image condition is shared by both branches
    with torch.no_grad():
        v, weights = routed_velocity(x, t, cond, experts, router, Routing("topk", k=2), cfg_scale=5.0, uncond=null, return_weights=True)
        assert ((weights > 0).sum(1) == 2).all()
        torch.testing.assert_close(v, _naive(x, t, cond, uncond_full, experts, weights, 5.0), rtol=1e-4, atol=1e-5)
        out = sample(experts, router, (batch, cfg.latent_channels, 2, 8, 8), {k: cond[k] for k in ("t5", "clip")}, SamplingSpec(num_steps=2), uncond=null, seeds=list(range(batch)), i2v={"latent": cond["i2v"][:, 1:], "mask": mask})
    assert torch.equal(out[:, :, 0], cond["i2v"][:, 1:, 0])


def test_negative_prompts_of_another_length_are_padded() -> None:
    """A per-sample unconditional batch with a longer T5 pads cond's T5 with zeros to the same L."""
    batch = 5
    x = torch.randn(batch, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    t = torch.full((batch,), 0.5, dtype=F64)
    experts = [LinearExpert(4, seed) for seed in (1, 2, 3)]
    cond, negative = _text_cond(batch, 3, 1), _text_cond(batch, 7, 2)
    v, weights = routed_velocity(x, t, cond, experts, _tie_router(4), Routing("topk", k=2), cfg_scale=3.0, uncond=negative, return_weights=True)
    padded = dict(cond, t5=torch.cat([cond["t5"], torch.zeros(batch, 4, 5, dtype=F64)], dim=1))
    torch.testing.assert_close(v, _naive(x, t, padded, negative, experts, weights, 3.0), rtol=1e-12, atol=1e-12)


def test_mixing_then_guiding_equals_guiding_then_mixing_for_a_text_blind_router() -> None:
    batch = 16
    gm = _mixture_4d()
    x = torch.randn(batch, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    t = torch.full((batch,), 0.4, dtype=F64)
    experts = [LinearExpert(4, seed) for seed in (4, 5, 6)]
    cond, uncond = _text_cond(batch, 6, 1), _text_cond(batch, 6, 2)
    for strategy in ("full", "topk", "top1"):
        routing = Routing(strategy, k=2)
        guided = routed_velocity(x, t, cond, experts, gm.router_callable(), routing, cfg_scale=6.0, uncond=uncond)
        v_c = routed_velocity(x, t, cond, experts, gm.router_callable(), routing)
        v_u = routed_velocity(x, t, uncond, experts, gm.router_callable(), routing)
        torch.testing.assert_close(guided, v_u + 6.0 * (v_c - v_u), rtol=1e-10, atol=1e-10)


def test_experts_nobody_selected_never_run() -> None:
    batch, steps = 6, 4
    experts = [Counting(LinearExpert(4, seed)) for seed in (1, 2, 3)]

    def router(x, t, cond):  # expert 1 first, expert 3 second, expert 2 never
        return torch.tensor([2.0, -5.0, 1.0], dtype=x.dtype).expand(len(x), 3)

    noise = torch.randn(batch, 4, dtype=F64)
    cond, null = _text_cond(batch, 3, 1), _text_cond(1, 3, 2)
    _, trace = sample(experts, router, noise, cond, SamplingSpec(Routing("top1"), num_steps=steps, cfg_scale=2.0), uncond=null, trace=True)
    assert [len(e.batches) for e in experts] == [steps, 0, 0]  # one call per step, CFG twins in the same call
    assert experts[0].batches == [2 * batch] * steps
    sample(experts, router, noise, cond, SamplingSpec(Routing("topk", k=2), num_steps=steps, cfg_scale=2.0), uncond=null)
    assert [len(e.batches) for e in experts] == [2 * steps, 0, steps]
    assert trace.samples_per_expert.tolist() == [[batch, 0, 0]] * steps
    assert trace.experts_run.tolist() == [1] * steps


def test_trace_counts_match_the_calls_and_round_trip(tmp_path) -> None:
    gm = _mixture_4d()
    experts = [Counting(f) for f in gm.expert_callables()]
    batch, steps = 9, 6
    x, trace = sample(experts, gm.router_callable(), (batch, 4), {}, SamplingSpec(Routing("topk", k=2), num_steps=steps, cfg_scale=1.0), shift_alpha=2.0, seeds=list(range(batch)), dtype=F64, trace=True)
    assert trace.weights.shape == (steps, batch, 3)
    torch.testing.assert_close(trace.weights.sum(-1), torch.ones(steps, batch, dtype=F64))
    assert trace.t == pytest.approx(euler_schedule(steps, 2.0)[:-1].tolist())
    # what ran, per step, as the counting wrappers saw it (an expert that got no samples has no call that step)
    ran = np.zeros((steps, 3), dtype=int)
    for j, e in enumerate(experts):
        used = trace.samples_per_expert[:, j] > 0
        assert len(e.batches) == int(used.sum())
        ran[used.numpy(), j] = e.batches
    np.testing.assert_array_equal(trace.samples_per_expert.numpy(), ran)
    assert (trace.samples_per_expert.sum(1) <= 2 * batch).all()

    path = trace.to_json(tmp_path / "trace" / "routing.json")
    data = json.loads(path.read_text())
    assert data["samples_per_expert"] == ran.tolist() and data["experts_run"] == (ran > 0).sum(1).tolist()
    assert data["strategy"] == "topk"
    again = RoutingTrace.from_json(path)
    torch.testing.assert_close(again.weights, trace.weights, rtol=0, atol=0)
    np.testing.assert_allclose(np.array(data["mean_weights"]), trace.weights.mean(1).numpy())
    png = trace.plot(tmp_path / "trace" / "routing.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


# --- sampling: seeds, i2v, oracle ----------------------------------------------------------------------------------
def test_sample_is_the_same_alone_or_in_a_batch() -> None:
    gm = _mixture_4d()
    shape = (1, 2, 1, 2)
    kw = dict(spec=SamplingSpec(Routing("top1"), num_steps=12, cfg_scale=1.0), dtype=F64)
    batch = sample(gm.expert_callables(), gm.router_callable(), (4, *shape), {}, seeds=[10, 11, 12, 13], **kw)
    alone = sample(gm.expert_callables(), gm.router_callable(), (1, *shape), {}, seeds=[12], **kw)
    other = sample(gm.expert_callables(), gm.router_callable(), (2, *shape), {}, seeds=[99, 12], **kw)
    torch.testing.assert_close(alone[0], batch[2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(other[1], batch[2], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(batch[0], batch[1])
    assert torch.equal(make_noise((2, 3), [5, 6])[1], make_noise((1, 3), [6])[0])


def test_i2v_keeps_the_conditioning_frames() -> None:
    gm = _mixture_4d()  # samples (B, C=1, T=2, H=1, W=2): 4 values each
    seen = []

    def recording(expert):
        def fn(x, t, cond):
            seen.append(cond["i2v"].clone())
            return expert(x, t, cond)
        return fn

    experts = [recording(e) for e in gm.expert_callables()]
    batch = 3
    latent = torch.randn(batch, 1, 2, 1, 2, generator=torch.Generator().manual_seed(1))
    out = sample(experts, gm.router_callable(), (batch, 1, 2, 1, 2), {}, SamplingSpec(num_steps=5, cfg_scale=1.0), seeds=[1, 2, 3], i2v={"latent": latent})  # default: the first latent frame is given
    assert torch.equal(out[:, :, 0], latent[:, :, 0])
    assert not torch.equal(out[:, :, 1], latent[:, :, 1])
    for c in seen:  # the packed condition: mask channel, then the image latent on the given frame only
        assert (c[:, 0, 0] == 1).all() and (c[:, 0, 1] == 0).all()
    last = sample(experts, gm.router_callable(), (batch, 1, 2, 1, 2), {}, SamplingSpec(num_steps=3, cfg_scale=1.0), seeds=[1, 2, 3], i2v={"latent": latent, "mask": torch.tensor([False, True])})
    assert torch.equal(last[:, :, 1], latent[:, :, 1])


def test_oracle_reproduces_the_chosen_expert_alone() -> None:
    gm = _mixture_4d()
    experts = gm.expert_callables()
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    kw: dict = {}
    spec = SamplingSpec(num_steps=10, cfg_scale=1.0)
    oracle = spec.replace(routing=Routing("oracle"))
    routed = sample(experts, gm.router_callable(), noise, {}, oracle, oracle_ids=[2, 2, 2], **kw)
    assert torch.equal(routed, sample([experts[1]], None, noise, {}, spec, **kw))
    mixed = sample(experts, None, noise, {}, oracle, oracle_ids=[3, 1, 2], **kw)
    for i, expert_id in enumerate([3, 1, 2]):
        alone = sample([experts[expert_id - 1]], None, noise[i:i + 1], {}, spec, **kw)
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-12, atol=1e-12)


# --- placement -----------------------------------------------------------------------------------------------------
class RecordingExpert(torch.nn.Module):
    """A real module whose .to() calls and forward calls go into a shared log."""

    def __init__(self, j: int, log: list) -> None:
        super().__init__()
        self.j, self.log = j, log
        self.lin = torch.nn.Linear(4, 4, dtype=F64)
        gen = torch.Generator().manual_seed(j)
        torch.nn.init.normal_(self.lin.weight, generator=gen)
        torch.nn.init.normal_(self.lin.bias, generator=gen)

    def to(self, *args, **kwargs):
        self.log.append(("to", self.j, str(args[0])))
        return super().to(*args, **kwargs)

    def forward(self, x, t, cond):
        self.log.append(("call", self.j, str(x.device)))
        return self.lin(x) * t[:, None]


def _step_router(x, t, cond):
    """Expert by time: t > 2/3 → expert 3, t > 1/3 → expert 2, else expert 1 (as logits)."""
    choice = (t * 3 - 1e-3).clamp(min=0).long()  # the margin keeps t = 2/3 in float32 on the lower side
    return torch.nn.functional.one_hot(choice, 3).to(x.dtype) * 10


def test_offload_moves_each_expert_in_only_while_selected() -> None:
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    log: list = []
    reference = sample([RecordingExpert(j, []) for j in range(3)], _step_router, noise, {}, SamplingSpec(num_steps=6, cfg_scale=1.0))
    experts = [RecordingExpert(j, log) for j in range(3)]
    compute = torch.device("cpu", 0)  # a name distinct from storage "cpu", so the log shows which move is which
    out = sample(experts, _step_router, noise, {}, SamplingSpec(num_steps=6, cfg_scale=1.0), placement=ExpertPlacement(experts, "offload", [compute], max_resident=0))
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    moves = [("to", j, "cpu") for j in range(3)]  # every expert starts on storage
    for j in (2, 2, 1, 1, 0, 0):  # t = 1, 5/6 → expert 3; 4/6, 3/6 → expert 2; 2/6, 1/6 → expert 1
        moves += [("to", j, "cpu:0"), ("call", j, "cpu"), ("to", j, "cpu")]
    assert log == moves

    log.clear()
    out = sample(experts, _step_router, noise, {}, SamplingSpec(num_steps=6, cfg_scale=1.0), placement=ExpertPlacement(experts, "offload", [compute], max_resident=1))
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert log == [("to", j, "cpu") for j in range(3)] + [
        ("to", 2, "cpu:0"), ("call", 2, "cpu"), ("call", 2, "cpu"),
        ("to", 2, "cpu"), ("to", 1, "cpu:0"), ("call", 1, "cpu"), ("call", 1, "cpu"),
        ("to", 1, "cpu"), ("to", 0, "cpu:0"), ("call", 0, "cpu"), ("call", 0, "cpu"),
        ("to", 0, "cpu"),  # released at the end
    ]


def test_spread_places_expert_j_on_device_j_mod_n() -> None:
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    log: list = []
    experts = [RecordingExpert(j, log) for j in range(3)]
    reference = sample([RecordingExpert(j, []) for j in range(3)], _step_router, noise, {}, SamplingSpec(num_steps=3, cfg_scale=1.0))
    out = sample(experts, _step_router, noise, {}, SamplingSpec(num_steps=3, cfg_scale=1.0, placement="spread"), devices=["cpu", torch.device("cpu", 0)])
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert log[:3] == [("to", 0, "cpu"), ("to", 1, "cpu:0"), ("to", 2, "cpu")]
    assert [entry[1] for entry in log[3:]] == [2, 1, 0]  # one call per step, no further moves


# --- errors --------------------------------------------------------------------------------------------------------
def test_bad_routing_requests_raise_clear_errors() -> None:
    gm = _mixture_2d()
    experts, router = gm.expert_callables(), gm.router_callable()
    x, t = torch.zeros(2, 2, dtype=F64), torch.full((2,), 0.5, dtype=F64)
    with pytest.raises(ValueError, match="unknown routing strategy 'best'"):
        routed_velocity(x, t, {}, experts, router, Routing("best"))
    with pytest.raises(ValueError, match="k=4"):
        routed_velocity(x, t, {}, experts, router, Routing("topk", k=4))
    with pytest.raises(ValueError, match="needs oracle_ids"):
        routed_velocity(x, t, {}, experts, router, Routing("oracle"))
    for ids in ([0, 1], [1, 4]):
        with pytest.raises(ValueError, match=r"1\.\.3"):
            routed_velocity(x, t, {}, experts, router, Routing("oracle"), oracle_ids=ids)
    with pytest.raises(ValueError, match="router predicts 4 experts but 3 are loaded"):
        routed_velocity(x, t, {}, experts, lambda x, t, c: torch.zeros(2, 4))
    with pytest.raises(ValueError, match="needs uncond"):
        routed_velocity(x, t, {}, experts, router, cfg_scale=5.0)
    with pytest.raises(ValueError, match="needs a router"):
        routed_velocity(x, t, {}, experts, None)
    with pytest.raises(ValueError, match="batch-first"):
        routed_velocity(x, t, {"clip": torch.zeros(3, 4)}, experts, router)
    with pytest.raises(ValueError, match="needs a list of devices"):
        ExpertPlacement(experts, "offload")
    with pytest.raises(ValueError, match="not a module"):
        ExpertPlacement(experts, "spread", ["cpu"])
    with pytest.raises(ValueError, match="unknown placement"):
        ExpertPlacement(experts, "everywhere")
    with pytest.raises(ValueError, match="either a noise tensor or seeds"):
        sample(experts, router, x, {}, SamplingSpec(cfg_scale=1.0), seeds=[1, 2])
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        sample(experts, router, (2, 2), {}, SamplingSpec(cfg_scale=1.0), seeds=[1, 2, 3])
