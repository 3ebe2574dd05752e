"""Video VAEs behind one interface: HunyuanVideo's causal VAE (tiling, loader) and the PixelVAE stand-in.

Every VAE here maps pixels ``(B, 3, F, H, W)`` in [-1, 1] with ``F = 4k + 1`` to a *scaled* latent
``(B, C, 1 + (F - 1) / 4, H / s, W / s)`` and back, causally in time: latent frame 0 describes frame 0
alone and latent frame ``j >= 1`` describes frames ``4j - 3 .. 4j`` (DESIGN §5.3). Objects expose
``latent_channels``, ``temporal_factor``, ``spatial_factor``, ``scaling_factor``, ``encode``, ``decode``,
``latent_shape`` and ``frame_count`` (docs/architecture.md, "VAE interface").

- :class:`HunyuanVideoVAE`: the real one (network in :mod:`ddm.models.hunyuan_vae`), with spatial and
  temporal tiling for large inputs (:meth:`HunyuanVideoVAE.enable_tiling`); :func:`load_vae` reads the
  published ``vae.pt``.
- :class:`PixelVAE`: a lossless space-to-depth stand-in with the same causal layout, for tiny CPU runs.
- :func:`build_vae` makes either from a config dict.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ddm.assets import require_path
from ddm.models.weights import load_state_dict_strict
from ddm.flow import latent_frames
from ddm.models.hunyuan_vae import HunyuanVAEConfig, HunyuanVideoAutoencoder


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
        _check_5d(video, "video", self.in_channels, "(B, C, F, H, W)", "float in [-1, 1]")
        self.latent_shape(*video.shape[2:])

    def check_latent(self, latent: torch.Tensor) -> None:
        """Raise a ValueError naming the problem unless ``latent`` is a decodable (B, C, T, H, W) float tensor."""
        _check_5d(latent, "latent", self.latent_channels, "(B, C, T, H, W)", "a float tensor")


def _check_5d(x: torch.Tensor, name: str, channels: int, layout: str, kind: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a {layout.replace('C', str(channels), 1)} tensor, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be {kind}, got dtype {x.dtype}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels at dim 1 {layout}, got shape {tuple(x.shape)}")


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
            raise ValueError(f"spatial_factor and temporal_factor must be >= 1, "
                             f"got {spatial_factor}, {temporal_factor}")
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


# --- tiling -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TilingConfig:
    """How large inputs are cut into overlapping tiles (sizes in latent units unless named "sample").

    Spatial tiles are square: ``tile_sample_min_size`` pixels when encoding, ``tile_latent_min_size``
    latent pixels when decoding. Temporal tiles hold ``tile_latent_min_frames`` latent frames. Neighbouring
    tiles share ``overlap`` of a tile and are blended with linear ramps there.
    """

    tile_sample_min_size: int = 256
    tile_latent_min_size: int = 32
    tile_latent_min_frames: int = 16
    overlap: float = 0.25
    progress: bool = True  # a tqdm bar over tiles when there are several


class _AxisTile(NamedTuple):
    """One tile along one axis: which input slice it reads, which output span it fills after dropping
    ``drop`` leading outputs (the causal context frame of a later temporal tile)."""

    src: slice
    dst: tuple[int, int]
    drop: int


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Cover ``[0, length)`` with ``tile``-long spans ``overlap`` apart; the last one ends at ``length``."""
    if length <= tile:
        return [(0, length)]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    starts = list(range(0, length - tile, tile - overlap)) + [length - tile]
    return [(s, s + tile) for s in starts]


def blend_weights(spans: list[tuple[int, int]], k: int) -> torch.Tensor:
    """Weights of span ``k``: 1 inside, a linear ramp (never 0) where it overlaps its neighbours.

    Outputs are divided by the summed weights, so overlapping tiles blend into a convex combination.
    """
    start, end = spans[k]
    w = torch.ones(end - start, dtype=torch.float64)
    if k > 0 and (n := spans[k - 1][1] - start) > 0:
        w[:n] = torch.minimum(w[:n], torch.arange(1, n + 1, dtype=torch.float64) / (n + 1))
    if k + 1 < len(spans) and (n := end - spans[k + 1][0]) > 0:
        w[-n:] = torch.minimum(w[-n:], torch.arange(n, 0, -1, dtype=torch.float64) / (n + 1))
    return w


def _spatial_tiles(length: int, tile: int, overlap: float, scale_in: int, scale_out: int) -> list[_AxisTile]:
    spans = tile_spans(length, tile, round(overlap * tile))
    return [_AxisTile(slice(a * scale_in, b * scale_in), (a * scale_out, b * scale_out), 0) for a, b in spans]


def _temporal_tiles(num_latent_frames: int, tiling: TilingConfig, tf: int, encode: bool) -> list[_AxisTile]:
    """A later tile also reads the frame just before it (causal context) and drops what that frame gives."""
    tiles = []
    for a, b in tile_spans(num_latent_frames, tiling.tile_latent_min_frames,
                           round(tiling.overlap * tiling.tile_latent_min_frames)):
        ctx = 1 if a > 0 else 0
        if encode:  # pixel frames tf*(a-1) .. tf*(b-1) -> latent frames a .. b-1
            tiles.append(_AxisTile(slice(tf * (a - ctx), tf * (b - 1) + 1), (a, b), ctx))
        else:  # latent frames a-1 .. b-1 -> pixel frames tf*(a-1)+1 .. tf*(b-1)
            tiles.append(_AxisTile(slice(a - ctx, b), (tf * (a - 1) + 1 if ctx else 0, tf * (b - 1) + 1), ctx))
    return tiles


def _blend_tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, axes: list[list[_AxisTile]],
                 desc: str, progress: bool) -> torch.Tensor:
    """Run ``fn`` on every (t, h, w) tile of ``x`` and blend the outputs with :func:`blend_weights`."""
    if all(len(tiles) == 1 and tiles[0].drop == 0 for tiles in axes):
        return fn(x)
    weights = [[blend_weights([t.dst for t in tiles], k) for k in range(len(tiles))] for tiles in axes]
    out_size = [tiles[-1].dst[1] for tiles in axes]
    out = total = None
    grid = list(itertools.product(*(range(len(tiles)) for tiles in axes)))
    for it, ih, iw in tqdm(grid, desc=desc, disable=not progress or len(grid) < 2, leave=False):
        t, h, w = axes[0][it], axes[1][ih], axes[2][iw]
        piece = fn(x[:, :, t.src, h.src, w.src])[:, :, t.drop:]
        if out is None:
            acc = torch.promote_types(piece.dtype, torch.float32)
            out = piece.new_zeros((*piece.shape[:2], *out_size), dtype=acc)
            total = torch.zeros(out_size, dtype=acc, device=piece.device)
        wt = (weights[0][it][:, None, None] * weights[1][ih][None, :, None] * weights[2][iw][None, None, :])
        wt = wt.to(device=piece.device, dtype=out.dtype)
        region = (slice(*t.dst), slice(*h.dst), slice(*w.dst))
        out[(slice(None), slice(None), *region)] += piece * wt
        total[region] += wt
    return (out / total).to(piece.dtype)


def tiled_encode(encode_fn: Callable[[torch.Tensor], torch.Tensor], video: torch.Tensor, tiling: TilingConfig,
                 temporal_factor: int = 4, spatial_factor: int = 8) -> torch.Tensor:
    """Encode ``video`` (B, 3, F, H, W) tile by tile with ``encode_fn`` and blend the latents.

    Spatial tiles are ``tiling.tile_sample_min_size`` pixels; temporal tiles ``tile_latent_min_frames``
    latent frames, each after the first reading one extra frame in front as causal context. Inputs no
    larger than a tile along an axis are not cut along it.
    """
    size = tiling.tile_sample_min_size // spatial_factor
    axes = [
        _temporal_tiles(latent_frames(video.shape[2], temporal_factor), tiling, temporal_factor, encode=True),
        _spatial_tiles(video.shape[3] // spatial_factor, size, tiling.overlap, spatial_factor, 1),
        _spatial_tiles(video.shape[4] // spatial_factor, size, tiling.overlap, spatial_factor, 1),
    ]
    return _blend_tiles(encode_fn, video, axes, "VAE encode tiles", tiling.progress)


def tiled_decode(decode_fn: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, tiling: TilingConfig,
                 temporal_factor: int = 4, spatial_factor: int = 8) -> torch.Tensor:
    """Decode ``latent`` (B, C, T, h, w) tile by tile with ``decode_fn`` and blend the frames."""
    size = tiling.tile_latent_min_size
    axes = [
        _temporal_tiles(latent.shape[2], tiling, temporal_factor, encode=False),
        _spatial_tiles(latent.shape[3], size, tiling.overlap, 1, spatial_factor),
        _spatial_tiles(latent.shape[4], size, tiling.overlap, 1, spatial_factor),
    ]
    return _blend_tiles(decode_fn, latent, axes, "VAE decode tiles", tiling.progress)


# --- the real VAE -------------------------------------------------------------------------------------------

class HunyuanVideoVAE(VideoLatentGeometry, HunyuanVideoAutoencoder):
    """HunyuanVideo's causal 3D VAE behind the common interface (keys as in the published ``vae.pt``).

    ``encode`` returns the posterior mean (or a sample, with ``sample=True``) times ``scaling_factor``
    (0.476986; no shift); ``decode`` undoes the scaling. Computation runs in the parameters' device and
    dtype; results come back in the input's device and dtype. Decoded pixels are not clamped.
    """

    def __init__(self, config: HunyuanVAEConfig | None = None):
        super().__init__(config)
        cfg = self.config
        self.in_channels = cfg.in_channels
        self.latent_channels = cfg.latent_channels
        self.temporal_factor = cfg.temporal_compression
        self.spatial_factor = cfg.spatial_compression
        self.scaling_factor = cfg.scaling_factor
        self.tiling: TilingConfig | None = None

    def enable_tiling(self, tile_sample_min_size: int = 256, tile_latent_min_size: int | None = None,
                      overlap: float = 0.25, tile_latent_min_frames: int = 16, progress: bool = True) -> None:
        """Encode/decode inputs larger than a tile in overlapping, blended tiles (see :class:`TilingConfig`).

        ``tile_latent_min_size`` defaults to ``tile_sample_min_size / spatial_factor``. Tiling is approximate
        (GroupNorm statistics and attention see one tile); it bounds memory at 768² and long clips.
        """
        s = self.spatial_factor
        if tile_sample_min_size < s or tile_sample_min_size % s:
            raise ValueError(f"tile_sample_min_size must be a positive multiple of {s}, got {tile_sample_min_size}")
        latent_size = tile_sample_min_size // s if tile_latent_min_size is None else int(tile_latent_min_size)
        if latent_size < 1 or tile_latent_min_frames < 1:
            raise ValueError(f"tile sizes must be >= 1, got tile_latent_min_size={latent_size}, "
                             f"tile_latent_min_frames={tile_latent_min_frames}")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap is a fraction of a tile in [0, 1), got {overlap}")
        self.tiling = TilingConfig(tile_sample_min_size, latent_size, tile_latent_min_frames, overlap, progress)

    def disable_tiling(self) -> None:
        """Encode and decode whole inputs at once (exact, memory-hungry)."""
        self.tiling = None

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.parameters())
        return p.device, p.dtype

    def encode(self, video: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1], F = 4k + 1 -> scaled latent (B, 16, 1 + (F - 1) / 4, H / 8, W / 8)."""
        self.check_video(video)
        device, dtype = self._device_dtype()
        x = video.to(device=device, dtype=dtype)
        if self.tiling is None:
            moments = self.moments(x)
        else:
            moments = tiled_encode(self.moments, x, self.tiling, self.temporal_factor, self.spatial_factor)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (z * self.scaling_factor).to(device=video.device, dtype=video.dtype)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, 16, T, h, w) -> video (B, 3, 1 + 4 (T - 1), 8 h, 8 w), roughly in [-1, 1]."""
        self.check_latent(latent)
        device, dtype = self._device_dtype()
        z = latent.to(device=device, dtype=dtype) / self.scaling_factor
        if self.tiling is None:
            video = self.reconstruct(z)
        else:
            video = tiled_decode(self.reconstruct, z, self.tiling, self.temporal_factor, self.spatial_factor)
        return video.to(device=latent.device, dtype=latent.dtype)


# --- loading ------------------------------------------------------------------------------------------------

_PREFIX = "vae."


def read_vae_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a VAE state dict from ``.safetensors`` or a torch file (``.pt``/``.pth``, weights only).

    Accepts a flat dict or one wrapped as ``{"state_dict": ...}``; strips a ``vae.`` key prefix.
    """
    path = require_path(path, "vae")
    if path.suffix == ".safetensors":
        obj: Any = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors come in many types; say what was expected
            raise ValueError(f"could not read VAE weights from '{path}' as a torch state dict "
                             f"(.pt/.pth, loaded with weights_only=True) or .safetensors: {exc}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"'{path}' does not hold a state dict of tensors (flat or under 'state_dict'), "
                         f"got {type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if name in state:
            raise ValueError(f"'{path}' holds '{name}' both with and without the '{_PREFIX}' prefix")
        state[name] = value
    return state


def load_vae(path: str | Path, config: HunyuanVAEConfig | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype | str = torch.float32) -> HunyuanVideoVAE:
    """Load the HunyuanVideo VAE (``vae.pt``, or ``.safetensors``) strictly, in eval mode.

    A missing file raises the FileNotFoundError of :func:`ddm.assets.require_path` (where to fetch it);
    weights that do not fit ``config`` (default: the published 884-16c) raise a ValueError naming the
    missing and unexpected keys and shape mismatches (:func:`ddm.models.weights.load_state_dict_strict`).
    """
    state = read_vae_state_dict(path)
    with torch.device("meta"):  # no 246M-parameter random init just to overwrite it
        model = HunyuanVideoVAE(config)
    load_state_dict_strict(model, state, f"VAE weights '{path}' (block_out_channels="
                                         f"{list(model.config.block_out_channels)})")
    return model.to(device=device, dtype=_dtype(dtype)).eval()


def _dtype(name: torch.dtype | str) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown floating dtype {name!r}; use e.g. 'float32', 'bfloat16' or 'float16'")
    return dtype


# --- from config --------------------------------------------------------------------------------------------

_VAE_TYPES = ("hunyuan", "hunyuan-tiny", "pixel")


def vae_spatial_factor(spec: Mapping[str, Any]) -> int:
    """The spatial compression of the VAE a spec builds, without building it (the one source of this fact:
    the training geometry, the dry run and the export all read it from the VAE config)."""
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(f"a VAE spec must be a mapping with a 'type' in {_VAE_TYPES}, got {spec!r}")
    kind = spec["type"]
    if kind == "pixel":
        return int(spec.get("spatial_factor", 2))
    if kind in ("hunyuan", "hunyuan-tiny"):
        config = dict(spec.get("config") or {})
        return int(config.get("spatial_compression", HunyuanVAEConfig.spatial_compression))
    raise ValueError(f"unknown VAE type {kind!r}; expected one of {_VAE_TYPES}")


def build_vae(spec: Mapping[str, Any]) -> nn.Module:
    """Make a VAE from a config mapping (a plain dict or a Hydra DictConfig).

    - ``{"type": "hunyuan", "path": ".../vae.pt", "tiling": bool | {enable_tiling kwargs}, "dtype": "bfloat16",
      "device": "cpu", "config": {HunyuanVAEConfig fields}}`` -> :func:`load_vae`, optionally tiled.
    - ``{"type": "hunyuan-tiny", "seed": 0, "config": {...}, "tiling": ...}`` -> a random-init tiny
      :class:`HunyuanVideoVAE` (tests, demos); the seed does not touch the global RNG.
    - ``{"type": "pixel", "spatial_factor": 2, "temporal_factor": 4}`` -> :class:`PixelVAE`.
    """
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(f"a VAE spec must be a mapping with a 'type' in {_VAE_TYPES}, got {spec!r}")
    spec = dict(spec)
    kind = spec.pop("type")
    if kind == "pixel":
        _reject_unknown(spec, {"spatial_factor", "temporal_factor"}, kind)
        return PixelVAE(spatial_factor=int(spec.get("spatial_factor", 2)),
                        temporal_factor=int(spec.get("temporal_factor", 4)))
    if kind == "hunyuan":
        _reject_unknown(spec, {"path", "config", "tiling", "dtype", "device"}, kind)
        if not spec.get("path"):
            raise ValueError("a 'hunyuan' VAE spec needs 'path' (the vae.pt from tencent/HunyuanVideo)")
        config = HunyuanVAEConfig(**dict(spec["config"])) if spec.get("config") else None
        vae = load_vae(spec["path"], config, device=spec.get("device", "cpu"), dtype=spec.get("dtype", "float32"))
    elif kind == "hunyuan-tiny":
        _reject_unknown(spec, {"seed", "config", "tiling", "dtype", "device"}, kind)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(spec.get("seed", 0)))
            vae = HunyuanVideoVAE(HunyuanVAEConfig.tiny(**dict(spec.get("config") or {})))
        vae = vae.to(device=spec.get("device", "cpu"), dtype=_dtype(spec.get("dtype", "float32"))).eval()
    else:
        raise ValueError(f"unknown VAE type {kind!r}; expected one of {_VAE_TYPES}")
    tiling = spec.get("tiling", False)
    if tiling:
        vae.enable_tiling(**(dict(tiling) if isinstance(tiling, Mapping) else {}))
    return vae


def _reject_unknown(spec: Mapping[str, Any], allowed: set[str], kind: str) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in the {kind!r} VAE spec; allowed: {sorted(allowed)}")
