"""The DDM router: a DiT-B-like classifier of the noisy latent that predicts its cluster (DESIGN §2, §5.5).

``Router(cfg)(x_t, t, cond) -> logits (B, K)``; softmax gives P(k | x_t), the weights the routed
sampler mixes the experts with. Architecture (Paris 1.0's DiT-B router, adapted to video):

* patchify the latent (B, C, T, H, W) with a Conv3d of kernel = stride = ``patch_size`` (coarser
  than the experts' 1×2×2, e.g. 1×4×4, to keep it cheap);
* add a fixed 3D sin-cos position embedding, **computed from the grid on every call**, and prepend a
  learnable CLS token;
* DiT blocks with adaLN-Zero conditioned on the timestep embedding (``timestep_embedding``, t×1000,
  the experts' scale), plus the pooled CLIP text when ``text_dim`` is set and the caption's T5 states
  averaged over its tokens when ``t5_dim`` is set (:func:`mean_over_tokens`);
* LayerNorm on the CLS token → MLP → K logits (last layer zero-initialised: the untrained router
  returns the uniform prior).

Resolution agnosticism: one router serves the 256² and 768² stages (the sampler uses the same one
for both), so it holds no learned or cached position table. The spatial positions are expressed on
``pos_ref_grid`` (the stage-2 patch grid for ``dit-b``): at the reference size they are the
integers 0..g−1 as in DiT, and at 3× the size the same field of view spans the same range in
thirds, instead of running into positions never seen in training. Time positions stay integers
(latent frames have the same spacing at both stages). ``pos_ref_grid=None`` gives plain integer
positions.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddm.models.context_parallel import ContextParallel, SequenceSplit
from ddm.models.layers import MLPEmbedder, Modulation, modulate, timestep_embedding

TIME_EMBED_DIM = 256


@dataclass
class RouterConfig:
    """Router hyper-parameters; ``to_dict``/``from_dict`` round-trip through JSON (export metadata)."""

    preset: str = "custom"
    num_experts: int = 3
    latent_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 4, 4)
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    text_dim: int | None = None  # pooled-CLIP width; None = the router never sees pooled CLIP
    t5_dim: int | None = None  # T5 width: the caption's T5 states averaged over its tokens; None = not read
    head_hidden: int | None = None  # width of the CLS head MLP; None = hidden_size
    pos_ref_grid: tuple[int, int] | None = None  # spatial patch grid the positions are expressed on

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        if self.pos_ref_grid is not None:
            self.pos_ref_grid = tuple(int(g) for g in self.pos_ref_grid)  # type: ignore[assignment]
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints (t, h, w), got {self.patch_size}")
        if self.pos_ref_grid is not None and (len(self.pos_ref_grid) != 2 or min(self.pos_ref_grid) < 1):
            raise ValueError(f"pos_ref_grid must be None or two positive ints (h, w), got {self.pos_ref_grid}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for name in ("text_dim", "t5_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be None or >= 1, got {getattr(self, name)}")

    @property
    def reads_text(self) -> bool:
        """Whether the router reads the caption at all (then it does not commute with CFG)."""
        return self.text_dim is not None or self.t5_dim is not None

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def head_width(self) -> int:
        return self.head_hidden or self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["pos_ref_grid"] = None if self.pos_ref_grid is None else list(self.pos_ref_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RouterConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RouterConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


ROUTER_PRESETS: dict[str, RouterConfig] = {
    # Paris 1.0's DiT-B router on 16-channel video latents: ~129.1M parameters at K=3.
    "dit-b": RouterConfig(preset="dit-b", pos_ref_grid=(8, 8)),  # 256² → 32×32 latent → 8×8 patches
    "tiny": RouterConfig(preset="tiny", latent_channels=16, hidden_size=64, depth=2, num_heads=2,
                         pos_ref_grid=(4, 4)),
    # for the CPU demo's PixelVAE (3 colours × 4 frames = 12 channels at spatial factor 1)
    "tiny-pixel": RouterConfig(preset="tiny-pixel", latent_channels=12, hidden_size=64, depth=2, num_heads=2,
                               pos_ref_grid=(4, 4)),
}


def get_router_config(name: str, **overrides: Any) -> RouterConfig:
    """A copy of preset ``name`` with ``overrides`` applied (e.g. ``num_experts=8``, ``text_dim=768``)."""
    if name not in ROUTER_PRESETS:
        raise ValueError(f"unknown router preset '{name}'; choose one of {sorted(ROUTER_PRESETS)}")
    return RouterConfig.from_dict({**ROUTER_PRESETS[name].to_dict(), **overrides})


def sincos_position_embedding_3d(grid: tuple[int, int, int], dim: int,
                                 ref_grid: tuple[int, int] | None = None,
                                 device: torch.device | str | None = None) -> torch.Tensor:
    """Fixed sin-cos embedding of a (T', H', W') patch grid → (T'·H'·W', dim) float32, t-major order.

    Each axis gets ``2·(dim // 6)`` channels (sines then cosines, DiT's frequencies
    ``10000^(-j / (d/2))``); the remainder, if any, is zero. Spatial positions are scaled by
    ``ref_grid / grid`` when ``ref_grid`` is given (see the module docstring).
    """
    per_axis = 2 * (dim // 6)
    if per_axis == 0:
        raise ValueError(f"dim must be >= 6 for a 3D sin-cos embedding, got {dim}")
    scales = (1.0, 1.0, 1.0) if ref_grid is None else (1.0, ref_grid[0] / grid[1], ref_grid[1] / grid[2])
    omega = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64, device=device) / (per_axis // 2))
    axes = [torch.arange(n, dtype=torch.float64, device=device) * s for n, s in zip(grid, scales)]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (N, 3)
    parts = []
    for a in range(3):
        angles = pos[:, a, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, dim - emb.shape[1])).float()


class RouterBlock(nn.Module):
    """DiT block with adaLN-Zero: modulation chunks (shift, scale, gate) for attention, then MLP."""

    def __init__(self, hidden: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden))
        self.modulation = Modulation(hidden, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor, split: SequenceSplit | None = None) -> torch.Tensor:
        """``x`` (B, n, hidden): all tokens, or this rank's slice under context parallelism (``split``)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)
        b, n, h = x.shape
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1))
        q, k, v = qkv.view(b, n, 3, self.num_heads, h // self.num_heads).permute(2, 0, 3, 1, 4)
        if split is None:
            attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h)
        else:  # Ulysses: every local query attends to all ranks' keys (no mask, positions are additive)
            attn = split.attention(q, k, v)
        x = x + gate1 * self.proj(attn)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class Router(nn.Module):
    """DiT-B-like router: ``forward(x, t, cond) -> logits (B, num_experts)`` (see the module docstring)."""

    def __init__(self, cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.patch_embed = nn.Conv3d(cfg.latent_channels, h, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, h))
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, h)
        self.vector_in = MLPEmbedder(cfg.text_dim, h) if cfg.text_dim is not None else None
        self.t5_in = MLPEmbedder(cfg.t5_dim, h) if cfg.t5_dim is not None else None
        self.blocks = nn.ModuleList(RouterBlock(h, cfg.num_heads, cfg.mlp_hidden) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(h, eps=1e-6)
        self.head = nn.Sequential(nn.Linear(h, cfg.head_width), nn.GELU(approximate="tanh"),
                                  nn.Linear(cfg.head_width, cfg.num_experts))
        self.activation_checkpointing = False
        self._context_parallel: ContextParallel | None = None
        self.reset_parameters()

    @property
    def config(self) -> RouterConfig:
        """The config (the name the expert uses too, so FSDP and context-parallel wiring serve both)."""
        return self.cfg

    def set_context_parallel(self, cp: ContextParallel | None) -> None:
        """Split the token sequence over ``cp``'s group in every forward (None or size 1: unsplit), as the
        expert does (:mod:`ddm.models.context_parallel`): each rank embeds and runs its contiguous slice of
        [CLS, patches]; attention gathers keys by an all-to-all over heads; the CLS token (on rank 0) goes
        through the head there and the logits are all-gathered, so every rank returns the same logits and
        every parameter's gradient is a per-rank share that sums to the unsplit one."""
        self._context_parallel = cp if cp is not None and cp.size > 1 else None

    @property
    def context_parallel(self) -> int:
        """The cp group size this router's forward splits over (1 = unsplit)."""
        return 1 if self._context_parallel is None else self._context_parallel.size

    def reset_parameters(self) -> None:
        """DiT initialisation: xavier linears, zero adaLN modulation (blocks start as identity), zero last
        head layer (the untrained router predicts the uniform prior). Skipped on the meta device, where
        weights are about to be assigned from a file."""
        if self.cls_token.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for embedder in (self.time_in, self.vector_in, self.t5_in):
            if embedder is not None:
                nn.init.normal_(embedder.in_layer.weight, std=0.02)
                nn.init.normal_(embedder.out_layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation.lin.weight)
            nn.init.zeros_(block.modulation.lin.bias)
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block in the backward pass (training only) to save activation memory."""
        self.activation_checkpointing = bool(enabled)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        cfg = self.cfg
        if x.ndim != 5:
            raise ValueError(f"router input must be a latent (B, C, T, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.latent_channels:
            raise ValueError(f"router expects {cfg.latent_channels} latent channels, got {x.shape[1]}")
        if any(n % p for n, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(f"latent size (T, H, W) = {tuple(x.shape[2:])} is not divisible by the router's "
                             f"patch size {cfg.patch_size}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
        return t

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: dict[str, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """Logits (B, num_experts) for noisy latents ``x`` (B, C, T, H, W) at flow times ``t`` (B,) in [0, 1].

        ``cond["clip"]`` (B, text_dim) is read only when ``cfg.text_dim`` is set and ``cond["t5"]``
        (B, L, t5_dim; zero rows are padding) only when ``cfg.t5_dim`` is set; a router that reads neither
        ignores ``cond`` entirely (it then commutes with CFG, DESIGN §2).
        """
        t = self._check_inputs(x, t)
        cond, b = cond or {}, x.shape[0]
        clip = t5 = None
        if self.vector_in is not None:
            clip = cond.get("clip")
            if clip is None or clip.shape != (b, self.cfg.text_dim):
                raise ValueError(f"this router is text-conditioned: cond['clip'] must be (B, {self.cfg.text_dim}), "
                                 f"got {None if clip is None else tuple(clip.shape)}")
        if self.t5_in is not None:
            t5 = cond.get("t5")
            if t5 is None or t5.ndim != 3 or t5.shape[0] != b or t5.shape[2] != self.cfg.t5_dim:
                raise ValueError(f"this router reads T5: cond['t5'] must be (B, L, {self.cfg.t5_dim}), "
                                 f"got {None if t5 is None else tuple(t5.shape)}")
            t5 = mean_over_tokens(t5)
        cp = self._context_parallel
        if cp is not None:
            cp.assert_same_inputs(x, t, clip, t5)
        dtype = self.patch_embed.weight.dtype
        tokens = self.patch_embed(x.to(dtype))  # (B, H, T', H', W')
        grid = tuple(tokens.shape[2:])
        tokens = tokens.flatten(2).transpose(1, 2)
        tokens = tokens + sincos_position_embedding_3d(grid, tokens.shape[-1], self.cfg.pos_ref_grid,
                                                       device=tokens.device).to(dtype)
        h = torch.cat([self.cls_token.to(dtype).expand(x.shape[0], -1, -1), tokens], dim=1)
        split = None
        if cp is not None:  # this rank's slice of [CLS, patches]; the CLS token is on rank 0
            split = cp.split(0, h.shape[1])
            h = cp.shard(h)
        c = self.time_in(timestep_embedding(t).to(dtype))
        if clip is not None:
            c = c + self.vector_in(clip.to(dtype))
        if t5 is not None:
            c = c + self.t5_in(t5.to(dtype))
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, split, use_reentrant=False)
            else:
                h = block(h, c, split)
        if cp is None:
            return self.head(self.final_norm(h[:, 0]))
        # the head runs only where the CLS token is (rank 0; the others hold an empty slice), so its
        # gradient is not counted cp times; the gather hands every rank the logits
        cls = h[:, :1] if cp.rank == 0 else h[:, :0]
        return cp.gather(self.head(self.final_norm(cls)), 1)[:, 0]


def mean_over_tokens(states: torch.Tensor) -> torch.Tensor:
    """(B, L, D) T5 states → (B, D): the mean over each caption's own tokens. Captions are zero-padded to a
    common L (training's collate and the pipeline's ``encode_prompts`` alike), and a real token's state is never
    all zeros (T5's final RMSNorm), so the zero rows are the padding: the result does not depend on L. A row of
    only padding gives zeros.

    Why a mean and not CLIP's pooled vector alone: averaged token states keep each word's contribution close to
    additive, so a router can key on the words that name a cluster; the tiny recipe's pooled CLIP put unseen
    captions of one family next to another's (docs/bench/grow.md)."""
    real = (states != 0).any(dim=-1, keepdim=True).to(states.dtype)
    return (states * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)


def head_output_keys(state_dict: Mapping[str, Any], prefix: str = "") -> tuple[str, str]:
    """The weight and bias keys of a plain router's output layer (``<prefix>head.<last>.weight`` / ``.bias``) in
    its state dict: the rows a pool grows, drops or shifts by a prior correction."""
    heads = sorted((int(m.group(1)), k) for k in state_dict
                   if (m := re.fullmatch(re.escape(prefix) + r"head\.(\d+)\.weight", k)))
    if not heads:
        raise ValueError(f"the router has no {prefix}head.<i>.weight: cannot find its output layer")
    weight_key = heads[-1][1]
    return weight_key, weight_key[:-len("weight")] + "bias"


def router_flops(cfg: RouterConfig, latent_shape: tuple[int, ...]) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward call on a latent of shape (B, C, T, H, W)
    (or (C, T, H, W) for one sample): patch embedding, embedders, attention (QKᵀ and AV included),
    MLPs, modulation and head. Norms and element-wise ops are not counted."""
    if len(latent_shape) == 4:
        latent_shape = (1, *latent_shape)
    if len(latent_shape) != 5:
        raise ValueError(f"latent_shape must be (B, C, T, H, W) or (C, T, H, W), got {latent_shape}")
    b, c, *size = latent_shape
    if any(n % p for n, p in zip(size, cfg.patch_size)):
        raise ValueError(f"latent size {tuple(size)} is not divisible by the patch size {cfg.patch_size}")
    patches = math.prod(n // p for n, p in zip(size, cfg.patch_size))
    n, h, m = patches + 1, cfg.hidden_size, cfg.mlp_hidden
    flops = 2 * patches * c * math.prod(cfg.patch_size) * h
    flops += 2 * (TIME_EMBED_DIM * h + h * h)
    for width in (cfg.text_dim, cfg.t5_dim):
        if width is not None:
            flops += 2 * (width * h + h * h)
    block = 2 * n * h * 3 * h + 4 * n * n * h + 2 * n * h * h + 4 * n * h * m + 2 * h * 6 * h
    flops += cfg.depth * block
    flops += 2 * (h * cfg.head_width + cfg.head_width * cfg.num_experts)
    return b * flops
