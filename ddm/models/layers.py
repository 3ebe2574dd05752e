"""Small building blocks shared by the expert and the router."""
from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of flow time ``t`` in [0, 1] (shape (B,)), Flux convention.

    ``t`` is multiplied by ``time_factor`` (1000) first, and the cosine half comes first, so the
    expert and the router see time on the same scale as Flux / Open-Sora v2 checkpoints.
    Computed in float32 and returned in ``t``'s floating dtype.
    """
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
