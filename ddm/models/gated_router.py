"""A grown pool's router that keeps the old routing exactly: the K-way router gated by a new-vs-old estimate.

When expert K+1 joins a pool, Bayes' rule splits the K+1-way routing posterior into two factors::

    P(k | x_t, c) = P(old | x_t, c) · P(k | x_t, c, old)      k = 1..K
    P(K+1 | x_t, c) = 1 − P(old | x_t, c)

The second factor of the first line is what the pool's K-way router was trained on (its data were the old
clusters), so it stays a correct estimate after the growth; only ``P(old | x_t, c)`` is new. ``GatedRouter``
takes it from a router trained over all K+1 clusters (the "gate": ``1 − softmax(gate)[K+1]``) and the
relative routing among the old experts from the old router (the "base"), unchanged. Where the gate is sure
that a sample is old, the old experts are mixed exactly as before the growth, so the old families' samples
are those of the K-expert pool; retraining the whole router instead moves every old decision a little.

``forward`` returns log-probabilities (B, K+1), which are valid logits (their softmax is the composed
posterior). ``base`` may itself be a ``GatedRouter`` (a pool grown twice). The routers' recorded
``prior_correction`` vectors are folded into their head biases when the composite is built
(:func:`fold_prior_correction`; adding c_k to logit k is adding it to the last bias), so the composite has
none of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ddm.models.context_parallel import ContextParallel
from ddm.models.router import Router, RouterConfig, head_output_keys

GATED = "gated"


@dataclass
class GatedRouterConfig:
    """A K-way ``base`` router config (plain or gated) and a K+1-way ``gate`` router config."""

    base: RouterConfig | GatedRouterConfig
    gate: RouterConfig

    def __post_init__(self) -> None:
        if self.gate.num_experts != self.base.num_experts + 1:
            raise ValueError(f"the gate router predicts {self.gate.num_experts} experts; a gate over a "
                             f"{self.base.num_experts}-way router must predict {self.base.num_experts + 1}")
        if self.gate.latent_channels != self.base.latent_channels:
            raise ValueError(f"the gate reads {self.gate.latent_channels} latent channels but the base router "
                             f"{self.base.latent_channels}")
        for name, what in (("text_dim", "pooled text"), ("t5_dim", "T5 states")):
            gate, base = getattr(self.gate, name), getattr(self.base, name)
            if None not in (gate, base) and gate != base:
                raise ValueError(f"the gate reads {what} of width {gate} but the base router {base}")

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    @property
    def latent_channels(self) -> int:
        return self.gate.latent_channels

    def _text_width(self, name: str) -> int | None:
        gate = getattr(self.gate, name)
        return gate if gate is not None else getattr(self.base, name)

    @property
    def text_dim(self) -> int | None:
        return self._text_width("text_dim")

    @property
    def t5_dim(self) -> int | None:
        return self._text_width("t5_dim")

    @property
    def reads_text(self) -> bool:
        return self.gate.reads_text or self.base.reads_text

    @property
    def preset(self) -> str:
        return GATED

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; ``num_experts``, ``latent_channels``, ``text_dim`` and ``t5_dim`` are repeated at the top
        level for the readers of export metadata that look only there (``ddm.pool verify``, ``list``)."""
        return {"type": GATED, "preset": GATED, "num_experts": self.num_experts,
                "latent_channels": self.latent_channels, "text_dim": self.text_dim, "t5_dim": self.t5_dim,
                "base": self.base.to_dict(), "gate": self.gate.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GatedRouterConfig:
        """Inverse of :meth:`to_dict`; the top-level repeats are checked against the parts."""
        if d.get("type") != GATED or not isinstance(d.get("base"), Mapping) or not isinstance(d.get("gate"), Mapping):
            raise ValueError(f"not a gated router config (needs type {GATED!r}, 'base' and 'gate'): keys {sorted(d)}")
        cfg = cls(router_config_from_dict(d["base"]), RouterConfig.from_dict(dict(d["gate"])))
        for key in ("num_experts", "latent_channels", "text_dim", "t5_dim"):
            if key in d and d[key] != getattr(cfg, key):
                raise ValueError(f"gated router config: {key}={d[key]!r} but its parts give {getattr(cfg, key)!r}")
        return cfg


def router_config_from_dict(d: Mapping[str, Any]) -> RouterConfig | GatedRouterConfig:
    """A router config from export metadata: a gated one when ``d['type'] == 'gated'``, else a plain one."""
    return GatedRouterConfig.from_dict(d) if d.get("type") == GATED else RouterConfig.from_dict(dict(d))


def build_router(cfg: RouterConfig | GatedRouterConfig) -> nn.Module:
    """The router module a config describes (weights initialised as the class does; use the meta device to skip)."""
    return GatedRouter(cfg) if isinstance(cfg, GatedRouterConfig) else Router(cfg)


class GatedRouter(nn.Module):
    """``forward(x, t, cond) -> (B, K+1)`` log-probabilities: the base router's posterior scaled by the gate's
    P(old), and the gate's P(K+1) (module docstring). Submodules ``base`` and ``gate`` name the weights."""

    def __init__(self, cfg: GatedRouterConfig):
        super().__init__()
        self.cfg = cfg
        self.base = build_router(cfg.base)
        self.gate = Router(cfg.gate)

    @property
    def config(self) -> GatedRouterConfig:
        return self.cfg

    def set_context_parallel(self, cp: ContextParallel | None) -> None:
        """Both parts split their sequence over ``cp`` (see ``Router.set_context_parallel``)."""
        self.base.set_context_parallel(cp)
        self.gate.set_context_parallel(cp)

    @property
    def context_parallel(self) -> int:
        return self.gate.context_parallel

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: dict[str, torch.Tensor] | None = None
                ) -> torch.Tensor:
        # a text-blind part ignores cond; a text-aware one checks it
        base, gate = self.base(x, t, cond), self.gate(x, t, cond)
        dtype = torch.promote_types(base.dtype, torch.float32)  # the log-softmaxes never in half precision
        base, gate = torch.log_softmax(base.to(dtype), dim=-1), torch.log_softmax(gate.to(dtype), dim=-1)
        log_old = torch.logsumexp(gate[:, :-1], dim=-1, keepdim=True)  # log P(old) = log Σ_{k<=K} gate_k
        return torch.cat([base + log_old, gate[:, -1:]], dim=-1)


def fold_prior_correction(state_dict: Mapping[str, torch.Tensor], prior_correction: Sequence[float] | None
                          ) -> dict[str, torch.Tensor]:
    """A plain router's weights with ``prior_correction`` (K,) added to its last head bias: the router then
    returns the corrected logits itself (exact: the sampler adds the same vector to the same logits)."""
    out = dict(state_dict)
    if prior_correction is None or not any(float(c) for c in prior_correction):
        return out
    key = head_output_keys(state_dict)[1]
    bias = state_dict[key]
    if bias.shape != (len(prior_correction),):
        raise ValueError(f"prior_correction has {len(prior_correction)} entries but the router's output layer "
                         f"{tuple(bias.shape)}")
    out[key] = bias + torch.as_tensor(list(prior_correction), dtype=bias.dtype)
    return out


def gated_state_dict(base: Mapping[str, torch.Tensor], gate: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The composite's weights: ``base.*`` and ``gate.*`` (the names ``GatedRouter`` gives its parts)."""
    return {**{f"base.{k}": v for k, v in base.items()}, **{f"gate.{k}": v for k, v in gate.items()}}
