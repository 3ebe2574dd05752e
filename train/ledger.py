"""The compute ledger: FLOPs of K isolated experts (+ the router) against the monolithic baseline.

DDM's claim is made at matched compute: K experts at global batch B for N steps each cost K·f·B·N
training FLOPs (f = training FLOPs per sample), the router adds f_r·B_r·N_r and is charged to the DDM
side. ``compute_match=true`` sizes the monolith (same code, all shards) so that f·B_m·N_m equals that
total — by scaling its batch (default) or its steps. In a heterogeneous pool (experts of different sizes)
each expert is charged its own f_k: ``expert_flops_per_sample`` holds them, and the DDM side is
Σ_k f_k·B·N; the monolith keeps the base architecture's f.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ComputeLedger:
    """All quantities are global (summed over data-parallel ranks); FLOPs are training FLOPs."""

    num_experts: int
    flops_per_sample: float  # one expert / the monolith (same architecture)
    expert_batch: int
    expert_steps: int
    router_flops_per_sample: float
    router_batch: int
    router_steps: int
    monolith_batch: int
    monolith_steps: int
    include_router: bool = True
    expert_flops_per_sample: tuple[float, ...] | None = None  # per expert (heterogeneous pool); None: all f

    @property
    def expert_flops(self) -> tuple[float, ...]:
        """Training FLOPs per sample of each expert."""
        if self.expert_flops_per_sample is None:
            return (self.flops_per_sample,) * self.num_experts
        return tuple(self.expert_flops_per_sample)

    @property
    def heterogeneous(self) -> bool:
        return len(set(self.expert_flops)) > 1

    @property
    def per_expert(self) -> float:
        """One expert's training FLOPs (the mean over experts in a heterogeneous pool)."""
        return self.experts_total / self.num_experts

    @property
    def experts_total(self) -> float:
        return sum(self.expert_flops) * self.expert_batch * self.expert_steps

    @property
    def router(self) -> float:
        return self.router_flops_per_sample * self.router_batch * self.router_steps

    @property
    def ddm_total(self) -> float:
        return self.experts_total + (self.router if self.include_router else 0.0)

    @property
    def monolith(self) -> float:
        return self.flops_per_sample * self.monolith_batch * self.monolith_steps

    def table(self) -> str:
        """A printable ledger; the numbers are what tests and users compare against."""
        if self.heterogeneous:
            rows = [(f"expert {k}", self.expert_batch, self.expert_steps, f * self.expert_batch * self.expert_steps)
                    for k, f in enumerate(self.expert_flops, start=1)]
        else:
            rows = [("expert (each)", self.expert_batch, self.expert_steps, self.per_expert)]
        rows += [(f"experts (all {self.num_experts})", self.expert_batch, self.expert_steps, self.experts_total)]
        rows += [("router", self.router_batch, self.router_steps, self.router)]
        rows += [("DDM total" + ("" if self.include_router else " (router not charged)"), "", "", self.ddm_total)]
        rows += [("monolith", self.monolith_batch, self.monolith_steps, self.monolith)]
        lines = ["compute ledger (training FLOPs; batch is global)",
                 f"{'':24s} {'batch':>8s} {'steps':>9s} {'FLOPs':>12s}"]
        lines += [f"{name:24s} {b!s:>8s} {s!s:>9s} {f:12.4e}" for name, b, s, f in rows]
        lines.append(f"router share of DDM: {self.router / self.ddm_total:.3%}; "
                     f"monolith / DDM: {self.monolith / self.ddm_total:.4f}")
        return "\n".join(lines)


def match_monolith(num_experts: int, flops_per_sample: float, expert_batch: int, expert_steps: int,
                   router_flops_per_sample: float, router_batch: int, router_steps: int,
                   by: str = "batch", include_router: bool = True,
                   expert_flops_per_sample: Sequence[float] | None = None) -> ComputeLedger:
    """The ledger with the monolith's batch (or steps) chosen to match the DDM total as closely as
    integer sizes allow (rounded up, so the monolith never gets less compute). ``flops_per_sample`` is the
    monolith's (and every expert's unless ``expert_flops_per_sample`` gives each expert its own)."""
    per_expert = tuple(float(f) for f in expert_flops_per_sample) if expert_flops_per_sample is not None else None
    if per_expert is not None and len(per_expert) != num_experts:
        raise ValueError(f"expert_flops_per_sample has {len(per_expert)} entries for {num_experts} experts")
    target = sum(per_expert or (flops_per_sample,) * num_experts) * expert_batch * expert_steps
    if include_router:
        target += router_flops_per_sample * router_batch * router_steps
    if by == "batch":
        batch, steps = math.ceil(target / (flops_per_sample * expert_steps) - 1e-9), expert_steps
    elif by == "steps":
        batch, steps = expert_batch, math.ceil(target / (flops_per_sample * expert_batch) - 1e-9)
    else:
        raise ValueError(f"compute_match_by must be 'batch' or 'steps', got {by!r}")
    return ComputeLedger(num_experts, flops_per_sample, expert_batch, expert_steps, router_flops_per_sample,
                         router_batch, router_steps, batch, steps, include_router, per_expert)
