"""Typed configuration and named presets for the video MM-DiT expert (DESIGN §5.1).

``opensora-v2-11b`` is the Paris 2.0 / Open-Sora 2.0 expert (11,891,390,528 parameters); ``flux-dev`` is
the FLUX.1-dev geometry (11,901,408,320); the ``tiny*`` presets run the same code on a laptop CPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["ExpertConfig", "EXPERT_PRESETS", "get_expert_config", "LAYOUTS"]

LAYOUTS = ("opensora", "flux")


@dataclass(frozen=True)
class ExpertConfig:
    """Geometry of one MM-DiT expert. Defaults are the 11B Open-Sora v2 expert.

    ``layout`` picks the parameter naming *and* the RoPE pairing that go with it:
    ``"opensora"`` = unfused q/k/v projections with half-split (rotate-half) RoPE,
    ``"flux"`` = fused ``qkv`` / ``linear1`` with interleaved-pair RoPE. Both compute the same function
    family; :mod:`ddm.models.layouts` converts weights between them exactly.
    """

    preset: str = "opensora-v2-11b"
    layout: str = "opensora"
    latent_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) in latent pixels
    vec_in_dim: int = 768  # pooled CLIP width
    context_in_dim: int = 4096  # T5 width
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, int, int] = (16, 56, 56)  # RoPE dims per (t, h, w) axis; sums to head_dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = False  # FLUX.1-dev distilled-guidance input (cond["guidance"])
    cond_embed: bool = True  # Open-Sora i2v projection cond_in (cond["i2v"])

    def __post_init__(self) -> None:
        # JSON round trips give lists; store tuples so configs compare and hash equal
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        self.validate()

    # ---- derived sizes ---------------------------------------------------------------------------
    @property
    def patch_volume(self) -> int:
        """Latent pixels per token: pt·ph·pw."""
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    @property
    def in_channels(self) -> int:
        """Features per image token: latent_channels·pt·ph·pw (64 at real scale)."""
        return self.latent_channels * self.patch_volume

    @property
    def cond_features(self) -> int:
        """Features per token of the i2v condition (mask + image latent): (C+1)·pt·ph·pw (68 at real scale)."""
        return (self.latent_channels + 1) * self.patch_volume

    @property
    def head_dim(self) -> int:
        """Per-head width (128 at real scale)."""
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        """Width of the MLP hidden layer: int(hidden_size · mlp_ratio)."""
        return int(self.hidden_size * self.mlp_ratio)

    # ---- checks and (de)serialisation ------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError if the geometry is inconsistent."""
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        positive = {k: getattr(self, k) for k in ("latent_channels", "vec_in_dim", "context_in_dim", "hidden_size",
                                                    "num_heads", "theta")}
        bad = [f"{k}={v}" for k, v in positive.items() if v <= 0]
        if bad or self.mlp_ratio <= 0 or self.depth < 0 or self.depth_single_blocks < 0:
            raise ValueError(f"invalid sizes in expert config: {bad or 'mlp_ratio/depth'}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints (t, h, w), got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if len(self.axes_dim) != 3 or any(a <= 0 or a % 2 for a in self.axes_dim):
            raise ValueError(f"axes_dim must be three positive even ints (t, h, w), got {self.axes_dim}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"sum(axes_dim) = {sum(self.axes_dim)} must equal head_dim = hidden_size / num_heads "
                             f"= {self.head_dim}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["axes_dim"] = list(self.axes_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpertConfig:
        """Inverse of :meth:`to_dict`. Lists or tuples are accepted; keys absent from ``d`` are taken from
        the preset ``d["preset"]`` names (if it is a known preset), else from the class defaults.
        Unknown keys raise ValueError (they would mean a different model than this code builds).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown expert config keys {unknown}; known keys: {sorted(names)}")
        base = EXPERT_PRESETS.get(d.get("preset", ""), cls())
        return dataclasses.replace(base, **d)


def _tiny(**kw: Any) -> ExpertConfig:
    """The tiny CPU geometry: T5 and CLIP widths 32 (the project's tiny text encoders), hidden 64, 2 heads."""
    base = dict(preset="tiny", layout="opensora", latent_channels=16, vec_in_dim=32, context_in_dim=32,
                hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(8, 12, 12))
    base.update(kw)
    return ExpertConfig(**base)


EXPERT_PRESETS: dict[str, ExpertConfig] = {
    "opensora-v2-11b": ExpertConfig(),
    "flux-dev": ExpertConfig(preset="flux-dev", layout="flux", guidance_embed=True, cond_embed=False),
    "tiny": _tiny(),
    # 12 latent channels = the PixelVAE stand-in with spatial factor 1: 3 colours × 4 frames. (At spatial
    # factor 2 a 1×2×2 patch would carry 192 numbers into a 64-wide model: too narrow a bottleneck to learn.)
    "tiny-pixel": _tiny(preset="tiny-pixel", latent_channels=12),
    "tiny-flux": _tiny(preset="tiny-flux", layout="flux", guidance_embed=True, cond_embed=False),
}


def get_expert_config(name: str, **overrides: Any) -> ExpertConfig:
    """The preset ``name`` with ``overrides`` applied (e.g. ``layout="flux"``, ``depth=4``); validated."""
    if name not in EXPERT_PRESETS:
        raise ValueError(f"unknown expert preset {name!r}; available: {sorted(EXPERT_PRESETS)}")
    names = {f.name for f in dataclasses.fields(ExpertConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown expert config fields {unknown}; known: {sorted(names)}")
    return dataclasses.replace(EXPERT_PRESETS[name], **overrides)
