"""The result record every metric returns, and the mean ± standard error over videos.

Paris 2.0 reports per-video metrics as ``mean ± SE`` over the evaluated videos (DESIGN §5.8), with
``SE = std(ddof=1) / sqrt(N)``. With a single video the spread is unknown, so the SE is NaN rather
than a misleading 0. FVD is a distance between two feature distributions, not a mean of per-video
values, so it has no SE at all: its ``stderr`` is ``None`` and only values at equal N are comparable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

__all__ = ["MetricResult", "mean_and_stderr", "TINY_LABEL"]

# Every result computed with a random-init stand-in network carries this label (in ``details`` and in
# its printed form), so a test number can never pass for a real one.
TINY_LABEL = "tiny-random (test only)"


def mean_and_stderr(values: Iterable[float]) -> tuple[float, float, int]:
    """``(mean, standard error, N)`` of per-video values; SE = std(ddof=1)/√N, NaN when N = 1.

    Raises ValueError on an empty input or on non-finite values (a NaN score means a broken video or
    model, and averaging it away would hide that).
    """
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("mean_and_stderr needs at least one value, got an empty set")
    if not np.all(np.isfinite(x)):
        bad = np.flatnonzero(~np.isfinite(x))[:5].tolist()
        raise ValueError(f"mean_and_stderr got non-finite values at positions {bad}")
    n = int(x.size)
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return float(x.mean()), se, n


@dataclass
class MetricResult:
    """One metric over one set of videos.

    ``stderr`` is the standard error over videos (NaN when ``n == 1``) or ``None`` for metrics that have
    no per-video decomposition (FVD). ``details`` records how the number was made: ``backbone`` (name),
    ``tiny_test_backbone`` (True for random-init stand-ins), resolution, frame stride, and so on.
    """

    name: str
    value: float
    stderr: float | None
    n: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def is_tiny(self) -> bool:
        """True when a random-init test backbone produced this number."""
        return bool(self.details.get("tiny_test_backbone", False))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN becomes None, since JSON has no NaN)."""

        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            if isinstance(v, np.generic):
                return clean(v.item())
            return v

        return clean({"name": self.name, "value": self.value, "stderr": self.stderr, "n": self.n,
                      "details": self.details})

    def __str__(self) -> str:
        if self.stderr is None:
            body = f"{self.value:.4f} (N={self.n}, no SE: compare only at equal N)"
        else:
            body = f"{self.value:.4f} ± {self.stderr:.4f} (N={self.n})"
        backbone = str(self.details.get("backbone") or "")
        label = f" [{TINY_LABEL}]" if self.is_tiny and TINY_LABEL not in backbone else ""
        return f"{self.name} = {body}" + (f" with {backbone}" if backbone else "") + label
