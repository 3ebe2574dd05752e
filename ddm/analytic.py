"""Closed-form oracle: rectified flow on a Gaussian-mixture data set, in float64.

Data ``x0 ~ Σ_k π_k N(μ_k, Σ_k)``, noise ``ε ~ N(0, I)``, ``x_t = (1-t)·x0 + t·ε`` (t = 1 is noise).
Write ``a = 1 - t``. Given component k, ``(x0, x_t)`` is jointly Gaussian, so

    x_t | k           ~ N(a μ_k, C_k),   C_k = a² Σ_k + t² I
    Cov(x0, x_t | k)  = a Σ_k,           Cov(ε, x_t | k) = t I
    E[x0 | x_t=x, k]  = μ_k + a Σ_k C_k⁻¹ (x - a μ_k)
    E[ε  | x_t=x, k]  = t C_k⁻¹ (x - a μ_k)

and the velocity an expert trained only on component k learns is (DESIGN §2)

    u^(k)(x) = E[ε - x0 | x_t=x, k] = (t I - a Σ_k) C_k⁻¹ (x - a μ_k) - μ_k.

This form never divides by t or a, so it holds on the closed interval t ∈ [0, 1] as long as every Σ_k is
positive definite (C_k = Σ_k at t = 0, I at t = 1). The router's target is the posterior
``P(k | x_t=x) ∝ π_k N(x; a μ_k, C_k)``, computed with log-sum-exp.

The marginal velocity is computed by a second, independent route — Tweedie's formula on the score of the
marginal density ``p_t = Σ_k π_k N(a μ_k, C_k)`` (the score is taken by autograd of ``log p_t``, not from
the posterior or the component velocities):

    E[ε | x_t=x] = -t ∇log p_t(x),   a·E[x0 | x_t=x] = x + t² ∇log p_t(x)
    ⇒ u(x) = E[ε - x0 | x_t=x] = -(x + t ∇log p_t(x)) / (1 - t).

It is exact for t ∈ [0, 1); at t = 1 exactly, u(x) = x - E[x0] is used. Near t = 1 the numerator cancels,
so its relative accuracy is about 1e-16 / (1 - t) (≈ 1e-14 at t = 0.99). So the identity
``u = Σ_k P(k | x_t) u^(k)`` can be tested between two routes that share only the Gaussian log-density.

``expert_callables()`` and ``router_callable()`` expose the oracle with the model signature
``model(x, t, cond)`` of docs/architecture.md (x of shape (B, D) or any (B, ...) with D elements per
sample; t of shape (B,)), so the routed sampler and router training can be tested against it.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["GaussianMixture"]

ModelFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


def _matvec(mats: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
    """Per-component matrix-vector products: mats (K, D, D) shared by the batch or (B, K, D, D); vecs (B, K, D)."""
    return torch.einsum("kij,bkj->bki" if mats.ndim == 3 else "bkij,bkj->bki", mats, vecs)


class GaussianMixture:
    """A Gaussian mixture data distribution with exact rectified-flow quantities (float64).

    Args:
        weights: (K,) mixture priors π_k, positive, summing to 1 (within 1e-6; renormalised).
        means: (K, D) component means μ_k.
        covs: (K, D, D) full covariances, or (K, D) diagonal variances; each positive definite.
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor) -> None:
        weights = torch.as_tensor(weights, dtype=torch.float64)
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if weights.ndim != 1 or means.ndim != 2 or means.shape[0] != weights.shape[0]:
            raise ValueError(f"expected weights (K,) and means (K, D) with the same K, got {tuple(weights.shape)} "
                             f"and {tuple(means.shape)}")
        num, dim = means.shape
        if covs.shape == (num, dim):
            covs = torch.diag_embed(covs)
        if covs.shape != (num, dim, dim):
            raise ValueError(f"covs must be (K, D, D) = ({num}, {dim}, {dim}) or diagonal (K, D), "
                             f"got {tuple(covs.shape)}")
        if (weights <= 0).any() or abs(weights.sum().item() - 1.0) > 1e-6:
            raise ValueError(f"mixture weights must be positive and sum to 1, got {weights.tolist()}")
        weights = weights / weights.sum()  # exact in float64 even when given as float32
        if not torch.allclose(covs, covs.transpose(-1, -2)):
            raise ValueError("covariances must be symmetric")
        _, info = torch.linalg.cholesky_ex(covs)
        if (info != 0).any():
            bad = [k for k in range(num) if info[k] != 0]
            raise ValueError(f"covariances of components {bad} are not positive definite")
        self.weights, self.means, self.covs = weights, means, covs
        self.num_components, self.dim = num, dim
        self._cov_chol = torch.linalg.cholesky(covs)

    # --- the data distribution ---------------------------------------------------------------------------------
    def mean(self) -> torch.Tensor:
        """E[x0], shape (D,)."""
        return self.weights @ self.means

    def cov(self) -> torch.Tensor:
        """Cov[x0] = Σ_k π_k (Σ_k + μ_k μ_kᵀ) - E[x0] E[x0]ᵀ, shape (D, D)."""
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        m = self.mean()
        return second - torch.outer(m, m)

    def sample(self, n: int, generator: torch.Generator | None = None,
               return_components: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws of x0, shape (n, D), float64; with ``return_components`` also their component (n,) in 0..K-1."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x0 = self.means[comp] + torch.einsum("nij,nj->ni", self._cov_chol[comp], z)
        return (x0, comp) if return_components else x0

    # --- x_t given each component ------------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(x, dtype=torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
        if ((t < 0) | (t > 1)).any():
            raise ValueError("t must lie in [0, 1]")
        return x, t

    def _whitened(self, x: torch.Tensor, t: torch.Tensor, comps: slice = slice(None)
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the components ``comps`` (K' of them), with C_k = L_k L_kᵀ:

        ``L_k⁻¹ (x - a μ_k)`` (B, K', D), ``L_k⁻¹`` ((K', D, D) when the batch shares one t, else
        (B, K', D, D)), ``log det C_k`` (B, K') and ``a = 1 - t`` (B,). C_k is factored once per distinct t.
        """
        unique_t, inverse = torch.unique(t, return_inverse=True)
        eye = torch.eye(self.dim, dtype=torch.float64)
        c = (1 - unique_t)[:, None, None, None] ** 2 * self.covs[comps] + unique_t[:, None, None, None] ** 2 * eye
        chol = torch.linalg.cholesky(c)
        chol_inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)[inverse]
        chol_inv = chol_inv[0] if len(unique_t) == 1 else chol_inv[inverse]
        a = 1 - t
        resid = x[:, None, :] - a[:, None, None] * self.means[comps]
        return _matvec(chol_inv, resid), chol_inv, log_det, a

    def component_log_prob(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """log N(x; a μ_k, C_k) for every component, shape (B, K): the density of x_t given k."""
        x, t = self._prepare(x, t)
        white, _, log_det, _ = self._whitened(x, t)
        return -0.5 * ((white ** 2).sum(-1) + log_det + self.dim * math.log(2 * math.pi))

    def log_prob(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """log p_t(x) of the marginal mixture of x_t, shape (B,)."""
        return torch.logsumexp(torch.log(self.weights) + self.component_log_prob(x, t), dim=-1)

    def log_posterior(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """log P(k | x_t = x), shape (B, K) (normalised logits)."""
        joint = torch.log(self.weights) + self.component_log_prob(x, t)
        return joint - torch.logsumexp(joint, dim=-1, keepdim=True)

    def posterior(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """P(k | x_t = x), shape (B, K); rows sum to 1."""
        return self.log_posterior(x, t).exp()

    def component_velocity(self, k: int, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """E[ε - x0 | x_t = x, component k] = (t I - a Σ_k) C_k⁻¹ (x - a μ_k) - μ_k, shape (B, D); t ∈ [0, 1]."""
        if not 0 <= k < self.num_components:
            raise ValueError(f"component index must be in 0..{self.num_components - 1}, got {k}")
        x, t = self._prepare(x, t)
        white, chol_inv, _, a = self._whitened(x, t, slice(k, k + 1))
        c_inv_r = _matvec(chol_inv.transpose(-1, -2), white)[:, 0]  # C⁻¹ r = L⁻ᵀ (L⁻¹ r)
        sigma_term = a[:, None] * torch.einsum("ij,bj->bi", self.covs[k], c_inv_r)
        return t[:, None] * c_inv_r - sigma_term - self.means[k]

    # --- the marginal, by the independent score route ----------------------------------------------------------
    def score(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """∇_x log p_t(x), shape (B, D), by autograd of :meth:`log_prob` (independent of the posterior code)."""
        x, t = self._prepare(x, t)
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob(xg, t).sum(), xg)
        return grad

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The exact marginal velocity E[ε - x0 | x_t = x] = -(x + t·score) / (1 - t), shape (B, D).

        At t = 1 exactly it is x - E[x0]; accuracy degrades like 1e-16 / (1 - t) just below 1.
        """
        x, t = self._prepare(x, t)
        at_noise = t == 1
        a = torch.where(at_noise, torch.ones_like(t), 1 - t)
        v = -(x + t[:, None] * self.score(x, t)) / a[:, None]
        return torch.where(at_noise[:, None], x - self.mean(), v)

    # --- adapters with the model signature model(x, t, cond) ---------------------------------------------------
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"each sample must hold {self.dim} values, got shape {tuple(x.shape)}")
        return flat

    def expert_callables(self) -> list[ModelFn]:
        """One exact expert per component: ``f(x, t, cond) -> velocity`` shaped and typed like x (cond ignored)."""
        def expert(k: int) -> ModelFn:
            def fn(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
                return self.component_velocity(k, self._flat(x), t).reshape(x.shape).to(x.dtype)
            return fn
        return [expert(k) for k in range(self.num_components)]

    def router_callable(self) -> ModelFn:
        """The exact router: ``f(x, t, cond) -> log P(k | x_t = x)`` logits (B, K) in x's dtype (cond ignored)."""
        def fn(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
            return self.log_posterior(self._flat(x), t).to(x.dtype)
        return fn
