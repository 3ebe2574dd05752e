"""The video VAE interface every package uses, and the lossless PixelVAE stand-in for tiny CPU runs.

Every VAE here maps pixels ``(B, 3, F, H, W)`` in [-1, 1] with ``F = 4k + 1`` to a *scaled* latent
``(B, C, 1 + (F - 1) / 4, H / s, W / s)`` and back, causally in time: latent frame 0 describes frame 0
alone and latent frame ``j >= 1`` describes frames ``4j - 3 .. 4j`` (DESIGN §5.3). Objects expose
``latent_channels``, ``temporal_factor``, ``spatial_factor``, ``scaling_factor``, ``encode``, ``decode``,
``latent_shape`` and ``frame_count`` (docs/architecture.md, "VAE interface").

:func:`build_vae` makes one from a config dict.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ddm.flow import latent_frames


class VideoLatentGeometry:
    """Shape rules and input checks shared by every video VAE (mixed into the nn.Module classes).

    Subclasses set ``latent_channels``, ``temporal_factor``, ``spatial_factor`` and ``scaling_factor``.
    """

    latent_channels: int
    temporal_factor: int
    spatial_factor: int
    scaling_factor: float
    in_channels: int = 3

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The latent ``(C, T, H, W)`` of a ``num_frames x height x width`` video; ValueError if not encodable."""
        t = latent_frames(num_frames, self.temporal_factor)
        s = self.spatial_factor
        if height < 1 or width < 1 or height % s or width % s:
            raise ValueError(f"height and width must be positive multiples of the spatial factor {s}, "
                             f"got {height}x{width}")
        return self.latent_channels, t, height // s, width // s

    def frame_count(self, latent_frames: int) -> int:
        """How many video frames ``latent_frames`` latent frames decode to: ``1 + 4 (T - 1)``."""
        if latent_frames < 1:
            raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
        return 1 + self.temporal_factor * (latent_frames - 1)

    def check_video(self, video: torch.Tensor) -> None:
        """Raise a ValueError naming the problem unless ``video`` is an encodable (B, 3, F, H, W) float tensor."""
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must be a (B, {self.in_channels}, F, H, W) tensor, got {shape}")
        if not video.is_floating_point():
            raise ValueError(f"video must be float in [-1, 1], got dtype {video.dtype}")
        if video.shape[1] != self.in_channels:
            raise ValueError(f"video must have {self.in_channels} channels at dim 1 (B, C, F, H, W), "
                             f"got shape {tuple(video.shape)}")
        self.latent_shape(*video.shape[2:])

    def check_latent(self, latent: torch.Tensor) -> None:
        """Raise a ValueError naming the problem unless ``latent`` is a decodable (B, C, T, H, W) float tensor."""
        if not isinstance(latent, torch.Tensor) or latent.dim() != 5:
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise ValueError(f"latent must be a (B, {self.latent_channels}, T, H, W) tensor, got {shape}")
        if not latent.is_floating_point():
            raise ValueError(f"latent must be a float tensor, got dtype {latent.dtype}")
        if latent.shape[1] != self.latent_channels:
            raise ValueError(f"latent must have {self.latent_channels} channels at dim 1 (B, C, T, H, W), "
                             f"got shape {tuple(latent.shape)}")


class PixelVAE(VideoLatentGeometry, nn.Module):
    """A lossless space-to-depth "VAE" with the real one's geometry, for tiny CPU runs and tests.

    Frame 0 is encoded alone: it is repeated ``temporal_factor - 1`` times in front, so the padded clip
    splits into groups of ``temporal_factor`` frames and group ``j`` is latent frame ``j`` (the same causal
    layout as HunyuanVideo's VAE). Each group's ``s x s`` pixel blocks become channels, ordered
    ``(c, dt, dy, dx)`` channel-major: ``channel = ((c * tf + dt) * s + dy) * s + dx``. Decoding inverts
    this exactly; of latent frame 0's ``tf`` copies of frame 0 it keeps the last (``dt = tf - 1``).
    ``scaling_factor`` is 1: latents are pixel values.
    """

    def __init__(self, spatial_factor: int = 2, temporal_factor: int = 4):
        super().__init__()
        if spatial_factor < 1 or temporal_factor < 1:
            raise ValueError(f"spatial_factor and temporal_factor must be >= 1, got {spatial_factor}, {temporal_factor}")
        self.spatial_factor = int(spatial_factor)
        self.temporal_factor = int(temporal_factor)
        self.latent_channels = self.in_channels * self.temporal_factor * self.spatial_factor ** 2
        self.scaling_factor = 1.0

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) -> (B, 3 * tf * s * s, 1 + (F - 1) / tf, H / s, W / s), exactly invertible."""
        self.check_video(video)
        b, c, _, h, w = video.shape
        tf, s = self.temporal_factor, self.spatial_factor
        padded = torch.cat([video[:, :, :1]] * (tf - 1) + [video], dim=2)
        t = padded.shape[2] // tf
        x = padded.reshape(b, c, t, tf, h // s, s, w // s, s)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (b, c, dt, dy, dx, t, h', w')
        return x.reshape(b, self.latent_channels, t, h // s, w // s)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`: (B, C, T, h, w) -> (B, 3, 1 + tf (T - 1), h s, w s)."""
        self.check_latent(latent)
        b, _, t, h, w = latent.shape
        tf, s = self.temporal_factor, self.spatial_factor
        x = latent.reshape(b, self.in_channels, tf, s, s, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (b, c, t, dt, h', dy, w', dx)
        x = x.reshape(b, self.in_channels, t * tf, h * s, w * s)
        return x[:, :, tf - 1:]


_VAE_TYPES = ("pixel",)


def build_vae(spec: Mapping[str, Any]) -> nn.Module:
    """Make a VAE from a config mapping.

    ``{"type": "pixel", "spatial_factor": 2, "temporal_factor": 4}`` -> :class:`PixelVAE`.
    """
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(f"a VAE spec must be a mapping with a 'type' in {_VAE_TYPES}, got {spec!r}")
    spec = dict(spec)
    kind = spec.pop("type")
    if kind == "pixel":
        _reject_unknown(spec, {"spatial_factor", "temporal_factor"}, kind)
        return PixelVAE(spatial_factor=int(spec.get("spatial_factor", 2)),
                        temporal_factor=int(spec.get("temporal_factor", 4)))
    raise ValueError(f"unknown VAE type {kind!r}; expected one of {_VAE_TYPES}")


def _reject_unknown(spec: Mapping[str, Any], allowed: set[str], kind: str) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in the {kind!r} VAE spec; allowed: {sorted(allowed)}")
