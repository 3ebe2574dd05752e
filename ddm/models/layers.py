"""Small building blocks shared by the expert and the router.

The MM-DiT pieces follow the Flux / Open-Sora v2 parameter names (``in_layer``/``out_layer``,
``query_norm``/``key_norm`` with a ``scale``, ``lin``) so checkpoints load by name (DESIGN §5.1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of flow time ``t`` in [0, 1] (shape (B,)), Flux convention.

    ``t`` is multiplied by ``time_factor`` (1000) first, and the cosine half comes first, so the
    expert and the router see time on the same scale as Flux / Open-Sora v2 checkpoints.
    Computed and returned in float32 (callers cast to their weights' dtype).
    """
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class MLPEmbedder(nn.Module):
    """Linear → SiLU → Linear, used for the timestep, guidance and pooled-CLIP vectors."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim with a learned ``scale``, computed in float32.

    Float32 matters for QK-norm: in bf16 the mean of squares over a head loses enough precision to
    shift attention logits. The result is returned in the input dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.scale.float()).to(x.dtype)


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys (SD3 / Flux), parameters ``query_norm.scale``, ``key_norm.scale``."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q), self.key_norm(k)


class Modulation(nn.Module):
    """adaLN modulation: ``lin(silu(vec))`` split into ``num_chunks`` vectors of shape (B, 1, hidden).

    Chunks come in groups of (shift, scale, gate): 6 for a double-stream block, 3 for a single one.
    """

    def __init__(self, hidden_size: int, num_chunks: int):
        super().__init__()
        self.num_chunks = num_chunks
        self.lin = nn.Linear(hidden_size, num_chunks * hidden_size, bias=True)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.num_chunks, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``(1 + scale)·x + shift``."""
    return (1 + scale) * x + shift


def rope_angles(ids: torch.Tensor, axes_dim: tuple[int, ...] | list[int], theta: float) -> torch.Tensor:
    """Rotary angles for integer positions ``ids`` of shape (L, n_axes) → (L, head_dim / 2), float32.

    Axis ``i`` gets ``axes_dim[i] / 2`` frequencies ``theta^(-2j / axes_dim[i])``; the per-axis angle
    blocks are concatenated in axis order. Products are formed in float64 where the device supports it
    (as Flux does), because positions times low frequencies lose digits in float32 at 768².
    """
    if ids.ndim != 2 or ids.shape[1] != len(axes_dim):
        raise ValueError(f"ids must be (L, {len(axes_dim)}), got {tuple(ids.shape)}")
    wide = torch.float32 if ids.device.type == "mps" else torch.float64
    blocks = []
    for axis, dim in enumerate(axes_dim):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=wide, device=ids.device) / dim)
        blocks.append(ids[:, axis].to(wide)[:, None] * freqs[None])
    return torch.cat(blocks, dim=-1).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate ``x`` (B, heads, L, D) by ``angles`` (L, D/2), in float32, returned in ``x``'s dtype.

    ``interleaved=True`` (Flux/BFL): dims (2j, 2j+1) form pair j. ``interleaved=False`` (Open-Sora v2,
    rotate-half): dims (j, j + D/2) form pair j. Pair j is rotated by ``angles[:, j]`` either way, so the
    two conventions differ only by a fixed permutation of each head's dims.
    """
    cos, sin = angles.cos(), angles.sin()
    x32 = x.float()
    if interleaved:
        a, b = x32[..., 0::2], x32[..., 1::2]
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    else:
        half = x32.shape[-1] // 2
        a, b = x32[..., :half], x32[..., half:]
        out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.to(x.dtype)
