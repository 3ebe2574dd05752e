"""What ``ddm.evaluate`` samples: ``--model NAME=FOLDER[:STRATEGY,...]`` specs and the runs they make.

Strategy labels: ``top1``, ``topN`` (top-N renormalised), ``full``, ``threshold`` and ``oracle`` (each prompt
sampled by the expert of its true cluster, given per prompt with ``--oracle-ids``); a monolith folder runs
once, as ``single``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddm.sampling_spec import Routing

__all__ = ["DDM_DEFAULT_STRATEGIES", "MONOLITH_STRATEGY", "ModelSpec", "RunSpec", "parse_strategy", "parse_model_arg",
           "model_runs"]

DDM_DEFAULT_STRATEGIES = ("top1", "top2", "full")
MONOLITH_STRATEGY = "single"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_strategy(label: str) -> tuple[str, int]:
    """A strategy label → the sampler's ``(strategy, k)`` (:meth:`ddm.sampling_spec.Routing.parse`, the one
    vocabulary): ``top1``, ``topN`` → ``("topk", N)``, ``full``, ``threshold``, ``oracle``."""
    routing = Routing.parse(label)
    return routing.strategy, routing.k


@dataclass(frozen=True)
class ModelSpec:
    """One ``--model NAME=FOLDER[:STRATEGY,...]`` argument (``strategies`` None = the default set)."""

    name: str
    folder: Path
    strategies: tuple[str, ...] | None = None


def parse_model_arg(text: str) -> ModelSpec:
    """Parse ``NAME=FOLDER[:STRATEGY[,STRATEGY...]]`` (the part after the last ``:`` is read as strategies
    when it looks like a list of names)."""
    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise ValueError(f"--model expects NAME=FOLDER[:STRATEGY,...], got {text!r}")
    if not _NAME_RE.match(name):
        raise ValueError(f"model name {name!r} may only hold letters, digits, '_', '-' and '.' (it names a folder)")
    folder, strategies = rest, None
    head, colon, tail = rest.rpartition(":")
    if colon and head and re.fullmatch(r"[A-Za-z0-9_,.]+", tail):
        folder, strategies = head, tuple(s for s in tail.split(",") if s)
        for s in strategies:
            parse_strategy(s)
        if len(set(strategies)) != len(strategies):
            raise ValueError(f"model {name!r}: strategy listed twice in {tail!r}")
    return ModelSpec(name, Path(folder), strategies)


@dataclass(frozen=True)
class RunSpec:
    """One model folder sampled with one strategy."""

    model: str
    folder: Path
    strategy: str  # label: top1, top2, full, threshold, or "single" for a monolith
    num_experts: int

    @property
    def name(self) -> str:
        """``model/strategy``, or just ``model`` for a monolith."""
        return self.model if self.strategy == MONOLITH_STRATEGY else f"{self.model}/{self.strategy}"

    def routing(self, threshold: float) -> Routing:
        """How this run mixes the experts (a monolith: its one expert, whatever the strategy)."""
        if self.strategy == MONOLITH_STRATEGY:
            return Routing("top1")
        return Routing.parse(self.strategy, threshold=threshold)

    def sampler_args(self, threshold: float) -> dict[str, Any]:
        """The routing as recorded in the run's settings (``run.json``; a rerun with other settings is refused)."""
        r = self.routing(threshold)
        if r.strategy == "oracle":  # the per-prompt expert ids travel with the prompts (evaluate's oracle_ids)
            return {"strategy": "oracle"}
        return {"strategy": r.strategy, "k": r.k, **({"threshold": threshold} if r.strategy == "threshold" else {})}


def model_runs(spec: ModelSpec, num_experts: int) -> list[RunSpec]:
    """The runs of one model: its strategies (checked against its number of experts) or the default set."""
    if num_experts == 1:
        if spec.strategies:
            raise ValueError(f"model {spec.name!r} ({spec.folder}) has one expert (a monolith): routing strategies "
                             f"{list(spec.strategies)} do not apply; pass it as {spec.name}={spec.folder}")
        return [RunSpec(spec.name, spec.folder, MONOLITH_STRATEGY, 1)]
    runs = []
    for label in spec.strategies or DDM_DEFAULT_STRATEGIES:
        strategy, k = parse_strategy(label)
        if strategy == "topk" and k > num_experts:
            raise ValueError(f"model {spec.name!r}: strategy {label} keeps {k} experts but the folder has "
                             f"{num_experts}")
        runs.append(RunSpec(spec.name, spec.folder, label, num_experts))
    return runs


