"""How to sample, as one object: :class:`Routing` (how the experts are mixed) inside :class:`SamplingSpec`.

The sampler (:func:`ddm.sampler.sample`, :func:`ddm.sampler.routed_velocity`), the pipeline
(:meth:`ddm.pipeline.DDMPipeline.generate`), ``python -m ddm.generate`` and ``python -m ddm.evaluate`` all take
these instead of loose keyword arguments, and share one vocabulary of routing labels:

==============  =================================================================  ==========================
label           mixing weights from the router's logits                            ``Routing``
==============  =================================================================  ==========================
``top1``        one-hot of the arg-max (Paris's default)                           ``Routing("top1")``
``topN``        softmax over the N largest logits (``top2``: Paris 1.0's best)     ``Routing("topk", k=N)``
``full``        softmax over every expert (the full ensemble)                      ``Routing("full")``
``threshold``   softmax, experts below ``threshold`` dropped, renormalised          ``Routing("threshold")``
``oracle``      one given expert per sample (``oracle_ids``, no router call)       ``Routing("oracle")``
==============  =================================================================  ==========================

``prior_correction`` (K,) is added to the logits first (log π_k − log π_k^train, for a router trained on
balanced batches). Per-sample data — seeds, oracle ids, images — are not settings and travel beside the spec.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["STRATEGIES", "PLACEMENTS", "Routing", "SamplingSpec"]

STRATEGIES: tuple[str, ...] = ("top1", "topk", "full", "oracle", "threshold")
PLACEMENTS: tuple[str, ...] = ("same", "spread", "offload")
_LABEL = re.compile(r"^(top(\d+)|topk|full|threshold|oracle)$")


@dataclass(frozen=True)
class Routing:
    """How the experts' velocities are mixed at every step (module docstring for the strategies)."""

    strategy: str = "top1"
    k: int = 1
    threshold: float = 0.1
    prior_correction: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown routing strategy {self.strategy!r}; expected one of {STRATEGIES} "
                             "(labels: top1, topN, full, threshold, oracle)")
        if int(self.k) < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0.0 <= float(self.threshold) < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.prior_correction is not None:
            object.__setattr__(self, "prior_correction", tuple(float(v) for v in self.prior_correction))

    @classmethod
    def parse(cls, label: str, *, k: int | None = None, threshold: float = 0.1,
              prior_correction: Sequence[float] | None = None) -> Routing:
        """A label (``top1``, ``topN``, ``full``, ``threshold``, ``oracle``; ``topk`` with ``k``) → Routing."""
        m = _LABEL.match(str(label))
        if not m or m.group(2) == "0":
            raise ValueError(f"unknown routing strategy {label!r}: expected top1, topN (N >= 2, e.g. top2), full, "
                             "threshold or oracle")
        if m.group(2) is not None:
            n = int(m.group(2))
            if k is not None and k != n:
                raise ValueError(f"routing {label!r} keeps {n} experts but k={k} was given")
            strategy, k = ("top1", 1) if n == 1 else ("topk", n)
        elif label == "topk":
            strategy, k = "topk", 2 if k is None else k
        else:
            strategy, k = label, 1
        return cls(strategy, int(k), threshold, tuple(prior_correction) if prior_correction is not None else None)

    @property
    def label(self) -> str:
        """The label :meth:`parse` reads back (``topk`` with k=2 → ``top2``)."""
        return f"top{self.k}" if self.strategy == "topk" else self.strategy

    def with_prior(self, prior_correction: Sequence[float] | None) -> Routing:
        """This routing with the folder's prior correction (kept when one is set already)."""
        if self.prior_correction is not None or prior_correction is None:
            return self
        return dataclasses.replace(self, prior_correction=tuple(prior_correction))


@dataclass(frozen=True)
class SamplingSpec:
    """Every sampling setting: routing, Euler steps, guidance, the schedule's shift and expert placement.

    Every field left None takes the caller's default: ``routing`` top-2 in the pipeline (top-1 in the bare
    sampler); ``num_steps``, ``cfg_scale`` and ``shift`` the model folder's scheduler (the pipeline) or 50
    steps, CFG 7.5, no shift (the sampler); ``placement`` the pipeline's (chosen when it was loaded), else
    ``"same"``. ``shift`` is a number or ``"video"``.
    """

    routing: Routing | None = None
    num_steps: int | None = None
    cfg_scale: float | None = None
    shift: float | str | None = None
    placement: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.routing, str):
            object.__setattr__(self, "routing", Routing.parse(self.routing))
        if self.num_steps is not None and int(self.num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.placement is not None and self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")

    def replace(self, **changes) -> SamplingSpec:
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)
