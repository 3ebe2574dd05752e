"""The video MM-DiT expert: Flux double/single-stream blocks with Open-Sora 2.0's video geometry (DESIGN §5.1).

One class serves both parameter layouts, chosen by ``config.layout``:

* ``"opensora"``: unfused ``{img,txt}_attn.{q_proj,k_proj,v_proj}``, single blocks ``q_proj``, ``k_proj``,
  ``v_mlp`` (rows v | mlp_in), half-split (rotate-half) RoPE;
* ``"flux"``: fused ``{img,txt}_attn.qkv``, single blocks ``linear1`` (rows q | k | v | mlp_in),
  interleaved-pair RoPE.

Forward: the latent video (B, C, T, H, W) is cut into 1×2×2 patches (feature order c, ph, pw) → image
tokens; T5 states → text tokens; the conditioning vector is time_in(t) [+ guidance_in(g)] + vector_in(CLIP).
Text tokens come first ([txt; img]) in the sequence and in the 3-axis RoPE position ids (text ids are zero,
image ids are (t, h, w) in patch units, recomputed from the input size on every call so one set of weights
runs at any resolution). There is no attention mask: T5 padding takes part, as in Flux and Open-Sora.
i2v: ``cond["i2v"]`` (mask + image latent, C+1 channels) is patchified the same way and added to the image
tokens through the zero-initialised ``cond_in``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddm.models.context_parallel import ContextParallel, SequenceSplit
from ddm.models.layers import MLPEmbedder, Modulation, QKNorm, apply_rope, modulate, rope_angles, timestep_embedding
from ddm.models.presets import ExpertConfig

__all__ = ["MMDiT", "patchify", "unpatchify", "position_ids"]

_LN_EPS = 1e-6


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free LayerNorm (the adaLN modulation supplies scale and shift)."""
    return F.layer_norm(x, x.shape[-1:], eps=_LN_EPS)


def patchify(x: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) → (B, T'·H'·W', C·pt·ph·pw): tokens in (t, h, w) order, features channel-major (c, pt, ph, pw)."""
    b, c, t, h, w = x.shape
    pt, ph, pw = patch_size
    x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, patch_size: tuple[int, int, int], grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, T'·H'·W', C·pt·ph·pw) with token grid (T', H', W') → (B, C, T, H, W)."""
    b = tokens.shape[0]
    pt, ph, pw = patch_size
    gt, gh, gw = grid
    c = tokens.shape[-1] // (pt * ph * pw)
    x = tokens.reshape(b, gt, gh, gw, c, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, c, gt * pt, gh * ph, gw * pw)


def position_ids(grid: tuple[int, int, int], text_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE position ids (text_len + T'·H'·W', 3): zeros for the text tokens first, then (t, h, w) per image token."""
    axes = [torch.arange(n, device=device) for n in grid]
    img = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    txt = torch.zeros(text_len, 3, dtype=img.dtype, device=device)
    return torch.cat([txt, img], dim=0)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, heads·D) → (B, heads, L, D)."""
    b, length, width = x.shape
    # explicit head width: a context-parallel rank may hold zero tokens of a stream (then -1 is ambiguous)
    return x.view(b, length, num_heads, width // num_heads).transpose(1, 2)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: torch.Tensor,
               interleaved: bool, split: SequenceSplit | None = None) -> torch.Tensor:
    """RoPE on q and k, full (unmasked) attention, heads merged back: (B, heads, L, D) → (B, L, heads·D).

    With a context-parallel ``split`` the tokens are this rank's slice and attention spans every rank's.
    """
    q, k = apply_rope(q, angles, interleaved), apply_rope(k, angles, interleaved)
    if split is not None:
        return split.attention(q, k, v)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class StreamAttention(nn.Module):
    """One stream's q/k/v projections (fused ``qkv`` or ``q_proj``/``k_proj``/``v_proj``), QK-norm and ``proj``."""

    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool, fused: bool):
        super().__init__()
        self.num_heads = num_heads
        self.fused = fused
        if fused:
            self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
            self.k_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
            self.v_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.norm = QKNorm(hidden_size // num_heads)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, hidden) → normed q, normed k, v, each (B, heads, L, head_dim)."""
        if self.fused:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = (_heads(y, self.num_heads) for y in (q, k, v))
        q, k = self.norm(q, k)
        return q.to(v.dtype), k.to(v.dtype), v


def _mlp(hidden_size: int, mlp_hidden: int) -> nn.Sequential:
    """Linear → GELU(tanh) → Linear; indices 0 and 2 are the checkpoint names ``…_mlp.0`` / ``…_mlp.2``."""
    return nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                         nn.Linear(mlp_hidden, hidden_size))


class DoubleStreamBlock(nn.Module):
    """Separate weights for text and image tokens, one joint attention over [txt; img]."""

    def __init__(self, cfg: ExpertConfig):
        super().__init__()
        fused = cfg.layout == "flux"
        self.interleaved = fused  # the RoPE convention travels with the layout
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", Modulation(cfg.hidden_size, 6))
            self.add_module(f"{stream}_attn", StreamAttention(cfg.hidden_size, cfg.num_heads, cfg.qkv_bias, fused))
            self.add_module(f"{stream}_mlp", _mlp(cfg.hidden_size, cfg.mlp_hidden_dim))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, angles: torch.Tensor,
                split: SequenceSplit | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)  # (shift, scale, gate) × (attn, mlp)
        img_q, img_k, img_v = self.img_attn.project(modulate(_layer_norm(img), img_mod[0], img_mod[1]))
        txt_q, txt_k, txt_v = self.txt_attn.project(modulate(_layer_norm(txt), txt_mod[0], txt_mod[1]))
        joint = _attention(torch.cat([txt_q, img_q], dim=2), torch.cat([txt_k, img_k], dim=2),
                           torch.cat([txt_v, img_v], dim=2), angles, self.interleaved, split)
        txt_out, img_out = joint[:, :txt.shape[1]], joint[:, txt.shape[1]:]
        img = img + img_mod[2] * self.img_attn.proj(img_out)
        img = img + img_mod[5] * self.img_mlp(modulate(_layer_norm(img), img_mod[3], img_mod[4]))
        txt = txt + txt_mod[2] * self.txt_attn.proj(txt_out)
        txt = txt + txt_mod[5] * self.txt_mlp(modulate(_layer_norm(txt), txt_mod[3], txt_mod[4]))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Shared weights over the joint sequence; attention and MLP run in parallel (ViT-22B style)."""

    def __init__(self, cfg: ExpertConfig):
        super().__init__()
        hidden, mlp_hidden = cfg.hidden_size, cfg.mlp_hidden_dim
        self.num_heads, self.hidden_size, self.mlp_hidden = cfg.num_heads, hidden, mlp_hidden
        self.fused = cfg.layout == "flux"
        self.interleaved = self.fused
        if self.fused:
            self.linear1 = nn.Linear(hidden, 3 * hidden + mlp_hidden)  # rows q | k | v | mlp_in
        else:
            self.q_proj = nn.Linear(hidden, hidden)
            self.k_proj = nn.Linear(hidden, hidden)
            self.v_mlp = nn.Linear(hidden, hidden + mlp_hidden)  # rows v | mlp_in
        self.linear2 = nn.Linear(hidden + mlp_hidden, hidden)  # [attention out | mlp act] → hidden
        self.norm = QKNorm(cfg.head_dim)
        self.modulation = Modulation(hidden, 3)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, angles: torch.Tensor,
                split: SequenceSplit | None = None) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        h = modulate(_layer_norm(x), shift, scale)
        if self.fused:
            q, k, v, mlp_in = self.linear1(h).split([self.hidden_size] * 3 + [self.mlp_hidden], dim=-1)
        else:
            q, k = self.q_proj(h), self.k_proj(h)
            v, mlp_in = self.v_mlp(h).split([self.hidden_size, self.mlp_hidden], dim=-1)
        q, k, v = (_heads(y, self.num_heads) for y in (q, k, v))
        q, k = self.norm(q, k)
        attn = _attention(q.to(v.dtype), k.to(v.dtype), v, angles, self.interleaved, split)
        out = self.linear2(torch.cat([attn, F.gelu(mlp_in, approximate="tanh")], dim=-1))
        return x + gate * out


class LastLayer(nn.Module):
    """Final adaLN (chunks shift, scale) and projection back to patch features."""

    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, out_features)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(_layer_norm(x), shift, scale))


class MMDiT(nn.Module):
    """The expert: ``model(x, t, cond) -> velocity`` shaped like ``x`` (see module docstring).

    ``cond``: ``t5`` (B, L, context_in_dim) for any L, ``clip`` (B, vec_in_dim), optional ``i2v``
    (B, C+1, T, H, W) (presets with ``cond_embed``; absent = zeros = t2v), ``guidance`` (B,) (required
    by presets with ``guidance_embed``). Weights other than ``cond_in`` (zero) keep PyTorch's default init.
    """

    def __init__(self, config: ExpertConfig):
        super().__init__()
        config.validate()
        self.config = config
        hidden = config.hidden_size
        self.img_in = nn.Linear(config.in_channels, hidden)
        self.time_in = MLPEmbedder(256, hidden)
        self.vector_in = MLPEmbedder(config.vec_in_dim, hidden)
        if config.guidance_embed:
            self.guidance_in = MLPEmbedder(256, hidden)
        if config.cond_embed:
            self.cond_in = nn.Linear(config.cond_features, hidden)
            # zero: an i2v condition added to a pretrained t2v model starts as a no-op
            nn.init.zeros_(self.cond_in.weight)
            nn.init.zeros_(self.cond_in.bias)
        self.txt_in = nn.Linear(config.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.depth_single_blocks))
        self.final_layer = LastLayer(hidden, config.in_channels)
        self._checkpointing = False
        self._context_parallel: ContextParallel | None = None

    @property
    def layout(self) -> str:
        """``"opensora"`` or ``"flux"``: parameter names and RoPE convention of this model's weights."""
        return self.config.layout

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks (double then single), e.g. the units to wrap with FSDP."""
        return [*self.double_blocks, *self.single_blocks]

    def adaln_zero_modules(self) -> tuple[str, ...]:
        """The linears that DiT's adaLN-Zero initialisation zeroes: every block's modulation (so each block
        starts as the identity: gate 0) and the final layer's modulation and projection (the output starts at 0).
        """
        names = [name for name, m in self.named_modules() if isinstance(m, Modulation)]
        return tuple([f"{n}.lin" for n in names] + ["final_layer.adaLN_modulation.1", "final_layer.linear"])

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward (non-reentrant torch.utils.checkpoint)."""
        self._checkpointing = bool(enabled)

    def set_context_parallel(self, cp: ContextParallel | None) -> None:
        """Split the sequence over ``cp``'s group in every forward (None or size 1: unsplit); see
        :mod:`ddm.models.context_parallel`, whose ``apply_context_parallel`` is the usual way to call this."""
        self._context_parallel = cp if cp is not None and cp.size > 1 else None

    @property
    def context_parallel(self) -> int:
        """The cp group size this model's forward splits over (1 = unsplit)."""
        return 1 if self._context_parallel is None else self._context_parallel.size

    def _run_block(self, block: nn.Module, *args: torch.Tensor):
        if self._checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"x must be a latent video (B, C, T, H, W), got shape {tuple(x.shape)}")
        b, c, frames, h, w = x.shape
        if c != cfg.latent_channels:
            raise ValueError(f"x has {c} channels but preset {cfg.preset!r} expects {cfg.latent_channels} "
                             "latent channels")
        for name, size, p in (("T", frames, cfg.patch_size[0]), ("H", h, cfg.patch_size[1]),
                              ("W", w, cfg.patch_size[2])):
            if size % p:
                raise ValueError(f"latent {name} = {size} is not divisible by the patch size {p} "
                                 f"(patch_size {cfg.patch_size}); latent shape {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must have shape (B,) = ({b},), got {tuple(t.shape)}")
        missing = [k for k in ("t5", "clip") if k not in cond]
        if missing:
            raise ValueError(f"cond is missing {missing}; it needs 't5' (B, L, {cfg.context_in_dim}) and "
                             f"'clip' (B, {cfg.vec_in_dim})")
        t5, clip = cond["t5"], cond["clip"]
        if t5.ndim != 3 or t5.shape[0] != b or t5.shape[2] != cfg.context_in_dim:
            raise ValueError(f"cond['t5'] must be (B={b}, L, {cfg.context_in_dim}), got {tuple(t5.shape)}")
        if clip.shape != (b, cfg.vec_in_dim):
            raise ValueError(f"cond['clip'] must be (B={b}, {cfg.vec_in_dim}), got {tuple(clip.shape)}")
        i2v = cond.get("i2v")
        if i2v is not None:
            if not cfg.cond_embed:
                raise ValueError(f"preset {cfg.preset!r} has no cond_in (cond_embed=False): it cannot take cond['i2v']")
            if i2v.shape != (b, c + 1, frames, h, w):
                raise ValueError(f"cond['i2v'] must be (B, C+1, T, H, W) = {(b, c + 1, frames, h, w)}, "
                                 f"got {tuple(i2v.shape)}")
        if cfg.guidance_embed:
            g = cond.get("guidance")
            if g is None or torch.as_tensor(g).shape not in ((b,), ()):
                raise ValueError(f"preset {cfg.preset!r} has a guidance embedding: cond['guidance'] must be (B={b},)")
        return t

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity (B, C, T, H, W) for noisy latents ``x`` at flow times ``t`` (B,) in [0, 1]."""
        t = self._check_inputs(x, t, cond)
        cfg = self.config
        dtype = self.img_in.weight.dtype
        grid = tuple(n // p for n, p in zip(x.shape[2:], cfg.patch_size))

        cp = self._context_parallel
        img_tokens, t5 = patchify(x.to(dtype), cfg.patch_size), cond["t5"].to(dtype)
        i2v = cond.get("i2v") if cfg.cond_embed else None
        i2v_tokens = patchify(i2v.to(dtype), cfg.patch_size) if i2v is not None else None
        n_img, n_txt = img_tokens.shape[1], t5.shape[1]
        ids = position_ids(grid, n_txt, device=x.device)
        split = None
        if cp is not None:  # this rank's text and image slices, with their positions and i2v tokens
            cp.assert_same_inputs(x, t, t5, cond["clip"], i2v, cond.get("guidance"))
            split = cp.split(n_txt, n_img)
            img_tokens, t5 = cp.shard(img_tokens), cp.shard(t5)
            i2v_tokens = cp.shard(i2v_tokens) if i2v_tokens is not None else None
            ids = torch.cat([cp.shard(ids[:n_txt], dim=0), cp.shard(ids[n_txt:], dim=0)])
        img = self.img_in(img_tokens)
        if cfg.cond_embed:
            # an absent condition is all zeros, whose projection is just the bias
            img = img + (self.cond_in(i2v_tokens) if i2v_tokens is not None else self.cond_in.bias)
        txt = self.txt_in(t5)

        vec = self.time_in(timestep_embedding(t, 256).to(dtype))
        if cfg.guidance_embed:
            guidance = torch.as_tensor(cond["guidance"], device=x.device).float().expand(x.shape[0])
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        vec = vec + self.vector_in(cond["clip"].to(dtype))

        angles = rope_angles(ids, cfg.axes_dim, cfg.theta)
        for block in self.double_blocks:
            img, txt = self._run_block(block, img, txt, vec, angles, split)
        seq = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            seq = self._run_block(block, seq, vec, angles, split)
        img = self.final_layer(seq[:, txt.shape[1]:], vec)
        if cp is not None:
            img = cp.gather(img, n_img)
        return unpatchify(img, cfg.patch_size, grid).to(x.dtype)
