"""The Gaussian-mixture oracle against references that do not share its formulas.

References: scipy's multivariate normal density, Bayes' rule on it, a least-squares regression of
simulated (x_t, ε - x0) pairs (the definition of a conditional expectation of a jointly Gaussian pair),
one-dimensional quadrature of E[ε - x0 | x_t] straight from its definition, and the limits t = 0 and 1.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from tests.fixtures.analytic import GaussianMixture

WEIGHTS = [0.5, 0.3, 0.2]
MEANS = [[-2.0, 0.0, 0.5], [1.5, 1.5, -1.0], [1.0, -2.0, 0.0]]
COVS = [
    [[0.6, 0.2, 0.0], [0.2, 0.4, 0.1], [0.0, 0.1, 0.5]],
    [[0.3, -0.1, 0.05], [-0.1, 0.5, 0.0], [0.05, 0.0, 0.7]],
    [[0.8, 0.0, 0.3], [0.0, 0.25, 0.0], [0.3, 0.0, 0.9]],
]


@pytest.fixture
def mixture() -> GaussianMixture:
    return GaussianMixture(_f64(WEIGHTS), _f64(MEANS), _f64(COVS))


def _f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _points(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return 2 * torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("t", [0.0, 0.25, 0.7, 1.0])
def test_log_densities_and_posterior_match_scipy(mixture: GaussianMixture, t: float) -> None:
    x = _points(50, 3)
    a = 1 - t
    ref = np.stack([
        stats.multivariate_normal(a * np.array(m), a * a * np.array(c) + t * t * np.eye(3)).logpdf(x.numpy())
        for m, c in zip(MEANS, COVS)
    ], axis=1)
    np.testing.assert_allclose(mixture.component_log_prob(x, t).numpy(), ref, rtol=1e-10, atol=1e-10)
    joint = ref + np.log(WEIGHTS)
    log_marginal = np.log(np.exp(joint).sum(1))
    np.testing.assert_allclose(mixture.log_prob(x, t).numpy(), log_marginal, rtol=1e-10)
    np.testing.assert_allclose(mixture.posterior(x, t).numpy(), np.exp(joint - log_marginal[:, None]), atol=1e-12)


def test_per_sample_times(mixture: GaussianMixture) -> None:
    x = _points(6, 3)
    t = torch.tensor([0.0, 0.1, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    rows = torch.cat([mixture.log_posterior(x[i:i + 1], float(t[i])) for i in range(6)])
    torch.testing.assert_close(mixture.log_posterior(x, t), rows, rtol=1e-12, atol=1e-12)
    rows = torch.cat([mixture.component_velocity(1, x[i:i + 1], float(t[i])) for i in range(6)])
    torch.testing.assert_close(mixture.component_velocity(1, x, t), rows, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,t", [(0, 0.3), (2, 0.75)])
def test_component_velocity_is_the_regression_of_simulated_pairs(mixture: GaussianMixture, k: int, t: float) -> None:
    """E[ε - x0 | x_t] is affine for a Gaussian component: least squares on simulated pairs recovers it.

    The tolerance is 5 standard errors of the ordinary-least-squares coefficients (from the fit's residuals).
    """
    n, dim = 200_000, 3
    gen = torch.Generator().manual_seed(1)
    chol = torch.linalg.cholesky(_f64(COVS[k]))
    x0 = _f64(MEANS[k]) + torch.randn(n, dim, generator=gen, dtype=torch.float64) @ chol.T
    eps = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    xt = (1 - t) * x0 + t * eps
    design = torch.cat([xt, torch.ones(n, 1, dtype=torch.float64)], dim=1).numpy()
    target = (eps - x0).numpy()
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)  # (D + 1, D): rows = x coefficients, then intercept
    resid = target - design @ coef
    xtx_inv = np.linalg.inv(design.T @ design)
    se = np.sqrt(np.outer(np.diag(xtx_inv), resid.var(0)))

    basis = torch.cat([torch.zeros(1, dim), torch.eye(dim)]).double()  # v at 0 and at each unit vector
    v = mixture.component_velocity(k, basis, t).numpy()
    closed = np.concatenate([v[1:] - v[:1], v[:1]])  # A^T rows then the intercept b, as in `coef`
    assert np.all(np.abs(coef - closed) <= 5 * se), np.abs(coef - closed) / se


@pytest.mark.slow
def test_marginal_velocity_matches_quadrature_in_1d() -> None:
    """E[ε - x0 | x_t = x] straight from its definition, integrated numerically over x0 (ε = (x - a x0)/t)."""
    w, mu, var = [0.35, 0.65], [-1.5, 2.0], [0.3, 0.8]
    gm = GaussianMixture(_f64(w), _f64(mu)[:, None], _f64(var)[:, None])
    prior = lambda x0: sum(wk * stats.norm.pdf(x0, m, np.sqrt(v)) for wk, m, v in zip(w, mu, var))  # noqa: E731
    for t in (0.05, 0.4, 0.8, 0.97):
        a = 1 - t
        for x in (-2.0, 0.1, 1.7):
            like = lambda x0: prior(x0) * stats.norm.pdf(x, a * x0, t)  # noqa: E731
            opts = dict(epsabs=0, epsrel=1e-12, limit=400, points=[x / a, *mu])  # the peaks, so none is missed
            num = integrate.quad(lambda x0: ((x - a * x0) / t - x0) * like(x0), -30, 30, **opts)[0]
            den = integrate.quad(like, -30, 30, **opts)[0]
            xs = torch.tensor([[x]], dtype=torch.float64)
            assert gm.velocity(xs, t).item() == pytest.approx(num / den, rel=1e-7, abs=1e-9)
            mixed = sum(gm.posterior(xs, t)[0, k] * gm.component_velocity(k, xs, t)[0, 0] for k in range(2))
            assert mixed.item() == pytest.approx(num / den, rel=1e-7, abs=1e-9)


def test_limits_at_data_and_noise(mixture: GaussianMixture) -> None:
    """At t = 0, x_t = x0 and E[ε] = 0, so v = -x; at t = 1, x_t = ε is independent of x0, so v = x - E[x0|k]."""
    x = _points(20, 3)
    for k in range(3):
        torch.testing.assert_close(mixture.component_velocity(k, x, 0.0), -x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mixture.component_velocity(k, x, 1.0), x - _f64(MEANS[k]),
                                   rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mixture.velocity(x, 0.0), -x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mixture.velocity(x, 1.0), x - mixture.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mixture.posterior(x, 1.0), _f64(WEIGHTS).expand(20, 3), atol=1e-12,
                               rtol=0)


def test_moments_and_sampling(mixture: GaussianMixture) -> None:
    """mean/cov against the textbook mixture formulas; samples against both within 5 standard errors."""
    w, m, c = np.array(WEIGHTS), np.array(MEANS), np.array(COVS)
    mean = w @ m
    cov = sum(w[k] * (c[k] + np.outer(m[k] - mean, m[k] - mean)) for k in range(3))
    np.testing.assert_allclose(mixture.mean().numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(mixture.cov().numpy(), cov, rtol=1e-12, atol=1e-12)

    n = 100_000
    x0, comp = mixture.sample(n, torch.Generator().manual_seed(3), return_components=True)
    assert x0.shape == (n, 3) and x0.dtype == torch.float64
    assert np.all(np.abs(x0.mean(0).numpy() - mean) <= 5 * np.sqrt(np.diag(cov) / n))
    freq = np.bincount(comp.numpy(), minlength=3) / n
    assert np.all(np.abs(freq - w) <= 5 * np.sqrt(w * (1 - w) / n))
    for k in range(3):  # per-component covariance, entry-wise 5 SE of the sample covariance
        xk = x0[comp == k].numpy()
        r = xk - xk.mean(0)
        prod = r[:, :, None] * r[:, None, :]
        se = prod.std(0) / np.sqrt(len(xk))
        assert np.all(np.abs(prod.mean(0) - c[k]) <= 5 * se)


def test_diagonal_covariances_equal_full() -> None:
    diag = GaussianMixture(torch.tensor([0.4, 0.6]), torch.tensor([[0.0, 1.0], [2.0, -1.0]]),
                           torch.tensor([[0.5, 1.5], [1.0, 0.2]]))
    full = GaussianMixture(torch.tensor([0.4, 0.6]), torch.tensor([[0.0, 1.0], [2.0, -1.0]]),
                           torch.diag_embed(torch.tensor([[0.5, 1.5], [1.0, 0.2]])))
    x = _points(10, 2)
    torch.testing.assert_close(diag.velocity(x, 0.3), full.velocity(x, 0.3), rtol=1e-12, atol=1e-12)


def test_callable_adapters(mixture: GaussianMixture) -> None:
    """The model-signature adapters flatten (B, ...) inputs and keep shape and dtype."""
    x = torch.randn(4, 1, 3, 1, 1)  # (B, C, T, H, W) with C·T·H·W = D = 3, float32
    t = torch.full((4,), 0.4)
    experts, router = mixture.expert_callables(), mixture.router_callable()
    assert len(experts) == 3
    v = experts[2](x, t, {})
    assert v.shape == x.shape and v.dtype == torch.float32
    torch.testing.assert_close(v.reshape(4, 3).double(), mixture.component_velocity(2, x.reshape(4, 3), t),
                               rtol=1e-6, atol=1e-6)
    logits = router(x, t, {})
    assert logits.shape == (4, 3)
    torch.testing.assert_close(logits.exp().sum(1), torch.ones(4), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="3 values"):
        router(torch.randn(4, 5), t, {})


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(torch.tensor([0.5, 0.6]), torch.zeros(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.tensor([0.5, 0.5]), torch.zeros(2, 2), torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    with pytest.raises(ValueError, match="covs must be"):
        GaussianMixture(torch.tensor([0.5, 0.5]), torch.zeros(2, 2), torch.ones(2, 3))
    gm = GaussianMixture(torch.tensor([0.5, 0.5]), torch.zeros(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gm.velocity(torch.zeros(3, 2), 1.5)
    with pytest.raises(ValueError, match="component index"):
        gm.component_velocity(2, torch.zeros(3, 2), 0.5)
