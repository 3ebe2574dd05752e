"""Image-to-video conditioning through the expert's ``cond_in`` (Open-Sora v2 style).

A condition tensor is (B, 1 + C, T, H, W): channel 0 is a mask that is 1 on the latent frames whose
content is given, channels 1..C hold the given latent on those frames and zeros elsewhere. Training
and sampling build it with the same function, so what the expert learns is what it is given.

The causal VAE encodes frame 0 on its own, so the first latent frame of a stored video latent *is* the
image latent of the first frame; "last frame" conditioning uses the last latent frame of the clip (as
Open-Sora does), which also carries a little temporal context from the frames before it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

CONDITION_MODES: tuple[str, ...] = ("t2v", "first_frame", "last_frame", "both_ends")


def mode_frame_mask(mode: str, latent_frames: int) -> torch.Tensor:
    """Which latent frames a conditioning mode gives the model, as a (T,) bool tensor."""
    mask = torch.zeros(latent_frames, dtype=torch.bool)
    if mode == "t2v":
        return mask
    if mode in ("first_frame", "both_ends"):
        mask[0] = True
    if mode in ("last_frame", "both_ends"):
        mask[-1] = True
    if mode not in CONDITION_MODES:
        raise ValueError(f"unknown conditioning mode {mode!r}; expected one of {CONDITION_MODES}")
    return mask


def i2v_condition(reference: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Pack a conditioning tensor (B, 1+C, T, H, W) from a reference latent and a (B, T) frame mask.

    ``reference`` (B, C, T, H, W) must hold the known latents on the masked frames (other frames are
    ignored and zeroed).
    """
    if reference.ndim != 5:
        raise ValueError(f"reference latent must be (B, C, T, H, W), got shape {tuple(reference.shape)}")
    b, _, t, h, w = reference.shape
    if frame_mask.shape != (b, t):
        raise ValueError(f"frame mask must be (B, T) = {(b, t)}, got {tuple(frame_mask.shape)}")
    m = frame_mask.to(device=reference.device, dtype=reference.dtype)[:, None, :, None, None]
    return torch.cat([m.expand(b, 1, t, h, w), reference * m], dim=1)


def condition_frame_mask(cond: torch.Tensor) -> torch.Tensor:
    """The (B, T) bool frame mask stored in channel 0 of a condition tensor."""
    return cond[:, 0, :, 0, 0] > 0.5


def write_back_known_frames(x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Replace the conditioned latent frames of ``x`` by the given ones (sampling keeps them exact)."""
    m = cond[:, :1].to(x.dtype)
    return x * (1 - m) + cond[:, 1:].to(x.dtype) * m


def sample_condition_modes(batch_size: int, probabilities: Mapping[str, float],
                           generator: torch.Generator | None = None) -> list[str]:
    """Draw one conditioning mode per sample from ``{mode: probability}`` (normalised here)."""
    unknown = set(probabilities) - set(CONDITION_MODES)
    if unknown:
        raise ValueError(f"unknown conditioning modes {sorted(unknown)}; expected a subset of {CONDITION_MODES}")
    modes = [m for m in CONDITION_MODES if probabilities.get(m, 0.0) > 0]
    if not modes:
        raise ValueError("the conditioning mixture gives every mode probability 0")
    p = torch.tensor([float(probabilities[m]) for m in modes])
    idx = torch.multinomial(p / p.sum(), batch_size, replacement=True, generator=generator)
    return [modes[i] for i in idx.tolist()]


def batch_frame_mask(modes: Sequence[str], latent_frames: int) -> torch.Tensor:
    """Stack per-sample mode masks into a (B, T) bool tensor."""
    return torch.stack([mode_frame_mask(m, latent_frames) for m in modes])
