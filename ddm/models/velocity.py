"""An expert trained on another prediction target, seen by the sampler as a velocity model.

A heterogeneous pool (Paris 1.0) mixes experts trained to predict the velocity, the noise ε or the data x0.
The routed sampler mixes velocities, so every non-velocity expert is wrapped once at load time and converted
at every call by :func:`ddm.flow.to_velocity`; velocity experts are used as they are (no wrapper, no cost).
"""
from __future__ import annotations

import torch
from torch import nn

from ddm.flow import PREDICTIONS, to_velocity

__all__ = ["VelocityModel", "as_velocity_model", "unwrap_velocity_model"]


class VelocityModel(nn.Module):
    """``model(x, t, cond)`` predicting ``prediction`` → the velocity at ``(x, t)``, in the output's dtype."""

    def __init__(self, inner: nn.Module, prediction: str) -> None:
        super().__init__()
        if prediction not in PREDICTIONS or prediction == "velocity":
            raise ValueError(f"VelocityModel converts 'epsilon' or 'x0' predictions, got {prediction!r}")
        self.inner = inner
        self.prediction = prediction

    @property
    def config(self):
        """The wrapped expert's config (the pipeline's compatibility checks read it)."""
        return self.inner.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        out = self.inner(x, t, cond)
        return to_velocity(self.prediction, out, x.to(out.dtype), t).to(out.dtype)


def as_velocity_model(model: nn.Module, prediction: str | None) -> nn.Module:
    """``model`` itself for a velocity expert (``prediction`` None or ``"velocity"``), else a :class:`VelocityModel`."""
    prediction = prediction or "velocity"
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction target {prediction!r}: expected one of {', '.join(PREDICTIONS)}")
    return model if prediction == "velocity" else VelocityModel(model, prediction)


def unwrap_velocity_model(model: nn.Module) -> nn.Module:
    """The trained network inside (what is saved): the inverse of :func:`as_velocity_model`."""
    return model.inner if isinstance(model, VelocityModel) else model
