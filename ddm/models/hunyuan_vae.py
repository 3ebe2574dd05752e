"""The HunyuanVideo causal 3D VAE network ("884-16c"), with the published checkpoint's parameter names.

Architecture (DESIGN §5.3; tencent/HunyuanVideo ``hyvideo/vae``): an encoder and a decoder of causal 3D
convolutions. A causal conv pads space symmetrically and time by ``k - 1`` frames in front only, both by
replicating the border, so output frame ``i`` sees input frames ``<= i``; its weights live under ``.conv``.

- Encoder: ``conv_in`` -> ``down_blocks`` (channels 128, 256, 512, 512; 2 resnets each; a stride (1,2,2)
  downsampler after block 0 and (2,2,2) after blocks 1 and 2) -> ``mid_block`` (resnet, single-head
  frame-causal self-attention, resnet) -> GroupNorm, SiLU, ``conv_out`` to 2 x 16 channels (mean, logvar).
- Decoder: mirror image, 3 resnets per block; upsampler ``j`` doubles space and, in the temporal ones,
  repeats every frame but frame 0 twice, so latent frame 0 decodes to one frame and each later one to 4.
- ``quant_conv`` (32 -> 32) and ``post_quant_conv`` (16 -> 16) are plain 1x1x1 Conv3d.

The default :class:`HunyuanVAEConfig` is the published one: 246,478,803 parameters in 248 tensors.
GroupNorm normalises over all frames of a clip, as the published model was trained; this makes encoder
and decoder causal only up to normalisation statistics. ``per_frame_norm=True`` normalises each frame on its
own instead, which makes the network strictly causal (useful to verify the causal structure; the
published weights expect the default).

This module is only the network; the user-facing interface (input checks, scaling, tiling, loading)
is :class:`ddm.models.vae.HunyuanVideoVAE`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HunyuanVAEConfig:
    """Geometry of the causal VAE; the defaults are HunyuanVideo's published "884-16c" VAE."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # resnets per encoder block; decoder blocks have one more
    norm_groups: int = 32
    norm_eps: float = 1e-6
    in_channels: int = 3
    latent_channels: int = 16
    temporal_compression: int = 4
    spatial_compression: int = 8
    scaling_factor: float = 0.476986
    mid_block_attention: bool = True
    per_frame_norm: bool = False  # see the module docstring

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        n = len(self.block_out_channels)
        for name, factor in (("spatial", self.spatial_compression), ("temporal", self.temporal_compression)):
            if factor < 1 or factor & (factor - 1) or math.log2(factor) > n - 1:
                raise ValueError(f"{name}_compression must be a power of two with at most {n - 1} halvings "
                                 f"for {n} blocks, got {factor}")
        bad = [c for c in self.block_out_channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"every block channel count must be divisible by norm_groups={self.norm_groups}, "
                             f"got {self.block_out_channels}")

    @classmethod
    def tiny(cls, **overrides) -> "HunyuanVAEConfig":
        """A ~340k-parameter version with the same structure and code paths, for tests and CPU demos."""
        return cls(**{"block_out_channels": (8, 16, 16, 16), "norm_groups": 4, **overrides})

    def to_dict(self) -> dict:
        """JSON-friendly dict (``HunyuanVAEConfig(**d)`` rebuilds it)."""
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    def strides(self) -> list[tuple[int, int, int]]:
        """Per encoder block (t, h, w) downsampling stride; (1, 1, 1) means no downsampler.

        Spatial halvings go to the first log2(spatial) blocks; temporal halvings to the last log2(temporal)
        blocks before the final one. 884: block 0 (1,2,2), blocks 1-2 (2,2,2), block 3 none.
        The decoder's up block ``i`` mirrors encoder block ``i`` (its upsample factors are these strides).
        """
        n = len(self.block_out_channels)
        spatial_steps = int(math.log2(self.spatial_compression))
        temporal_steps = int(math.log2(self.temporal_compression))
        out = []
        for i in range(n):
            hw = 2 if i < spatial_steps else 1
            t = 2 if (n - 1 - temporal_steps) <= i < n - 1 else 1
            out.append((t, hw, hw))
        return out


class VideoGroupNorm(nn.GroupNorm):
    """GroupNorm on (B, C, T, H, W): statistics over the whole clip, or per frame if ``per_frame``."""

    def __init__(self, num_groups: int, num_channels: int, eps: float, per_frame: bool = False):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.per_frame = per_frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_frame:
            return super().forward(x)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        out = F.group_norm(frames, self.num_groups, self.weight, self.bias, self.eps)
        return out.reshape(b, t, c, h, w).transpose(1, 2)


class CausalConv3d(nn.Module):
    """Conv3d whose output frame i depends only on input frames <= i (replicate padding, time front-only)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: tuple[int, int, int] | int = 1):
        super().__init__()
        k = kernel_size
        # F.pad order: (w_left, w_right, h_top, h_bottom, t_front, t_back)
        self.padding = (k // 2, k // 2, k // 2, k // 2, k - 1, 0)
        self.conv = nn.Conv3d(in_channels, out_channels, k, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding, mode="replicate"))


class ResnetBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a (1x1x1 conv) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, cfg: HunyuanVAEConfig):
        super().__init__()
        self.norm1 = VideoGroupNorm(cfg.norm_groups, in_channels, cfg.norm_eps, cfg.per_frame_norm)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = VideoGroupNorm(cfg.norm_groups, out_channels, cfg.norm_eps, cfg.per_frame_norm)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv_shortcut(x) if self.conv_shortcut is not None else x)


class CausalFrameAttention(nn.Module):
    """Single-head self-attention over all (t, h, w) tokens; a token of frame i sees frames <= i.

    Equivalent to dense attention with HunyuanVideo's block-causal mask; computed frame by frame over the
    growing key prefix so no (N x N) mask is built and fused attention kernels apply.
    """

    def __init__(self, channels: int, cfg: HunyuanVAEConfig):
        super().__init__()
        self.group_norm = VideoGroupNorm(cfg.norm_groups, channels, cfg.norm_eps, cfg.per_frame_norm)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # key "to_out.0", as published

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = self.group_norm(x).permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c)  # (t, h, w) order
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        hw = h * w
        out = torch.cat([
            F.scaled_dot_product_attention(q[:, i * hw:(i + 1) * hw], k[:, :(i + 1) * hw], v[:, :(i + 1) * hw])
            for i in range(t)
        ], dim=1)
        out = self.to_out[0](out).reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        return x + out


class MidBlock(nn.Module):
    """resnet -> causal attention -> resnet, at the lowest resolution."""

    def __init__(self, channels: int, cfg: HunyuanVAEConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, cfg), ResnetBlock(channels, channels, cfg)])
        self.attentions = nn.ModuleList([CausalFrameAttention(channels, cfg)] if cfg.mid_block_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """A strided causal 3x3x3 conv; with front-only time padding, T frames become 1 + (T - 1) / 2."""

    def __init__(self, channels: int, stride: tuple[int, int, int]):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling by ``factor`` (t, h, w), frame 0 spatially only, then a causal 3x3x3 conv."""

    def __init__(self, channels: int, factor: tuple[int, int, int]):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fh, fw = self.factor
        x = x.repeat_interleave(fh, dim=3).repeat_interleave(fw, dim=4)
        if ft > 1 and x.shape[2] > 1:
            # frame 0 stays one frame (it stands for video frame 0 alone); later frames are repeated
            x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(ft, dim=2)], dim=2)
        return self.conv(x)


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: tuple[int, int, int], cfg: HunyuanVAEConfig):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, cfg)
            for i in range(cfg.layers_per_block)
        ])
        self.downsamplers = nn.ModuleList([Downsample(out_channels, stride)] if stride != (1, 1, 1) else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, factor: tuple[int, int, int], cfg: HunyuanVAEConfig):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, cfg)
            for i in range(cfg.layers_per_block + 1)
        ])
        self.upsamplers = nn.ModuleList([Upsample(out_channels, factor)] if factor != (1, 1, 1) else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class Encoder(nn.Module):
    """(B, 3, F, H, W) -> (B, 2 * latent_channels, T, H / 8, W / 8): mean and log-variance."""

    def __init__(self, cfg: HunyuanVAEConfig):
        super().__init__()
        channels = cfg.block_out_channels
        self.conv_in = CausalConv3d(cfg.in_channels, channels[0])
        self.down_blocks = nn.ModuleList([
            DownBlock(channels[max(i - 1, 0)], channels[i], stride, cfg) for i, stride in enumerate(cfg.strides())
        ])
        self.mid_block = MidBlock(channels[-1], cfg)
        self.conv_norm_out = VideoGroupNorm(cfg.norm_groups, channels[-1], cfg.norm_eps, cfg.per_frame_norm)
        self.conv_out = CausalConv3d(channels[-1], 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, latent_channels, T, h, w) -> (B, 3, 1 + 4 (T - 1), 8 h, 8 w)."""

    def __init__(self, cfg: HunyuanVAEConfig):
        super().__init__()
        channels = list(reversed(cfg.block_out_channels))
        self.conv_in = CausalConv3d(cfg.latent_channels, channels[0])
        self.mid_block = MidBlock(channels[0], cfg)
        self.up_blocks = nn.ModuleList([
            UpBlock(channels[max(i - 1, 0)], channels[i], factor, cfg) for i, factor in enumerate(cfg.strides())
        ])
        self.conv_norm_out = VideoGroupNorm(cfg.norm_groups, channels[-1], cfg.norm_eps, cfg.per_frame_norm)
        self.conv_out = CausalConv3d(channels[-1], cfg.in_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class HunyuanVideoAutoencoder(nn.Module):
    """The bare network: ``encoder`` + ``quant_conv`` and ``post_quant_conv`` + ``decoder``, no scaling."""

    def __init__(self, config: HunyuanVAEConfig | None = None):
        super().__init__()
        self.config = config or HunyuanVAEConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        c = self.config.latent_channels
        self.quant_conv = nn.Conv3d(2 * c, 2 * c, 1)
        self.post_quant_conv = nn.Conv3d(c, c, 1)

    def moments(self, video: torch.Tensor) -> torch.Tensor:
        """Unscaled posterior (mean, logvar) stacked on channels: (B, 2C, T, h, w)."""
        return self.quant_conv(self.encoder(video))

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        """Decode an unscaled latent (B, C, T, h, w) to pixels."""
        return self.decoder(self.post_quant_conv(z))
