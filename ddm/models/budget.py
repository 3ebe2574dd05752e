"""Analytic budget of an expert: parameters, tokens, training FLOPs, and per-GPU memory for model state.

Used by the training dry-run (will it fit, how long will it take), by MFU logging and by the benchmarks.
Everything here is closed-form from an :class:`~ddm.models.presets.ExpertConfig`; the tests cross-check
it against a meta-device build and against ``torch.utils.flop_counter.FlopCounterMode``.
"""
from __future__ import annotations

import math

from ddm.flow import latent_frames
from ddm.models.presets import ExpertConfig

__all__ = ["count_parameters", "tokens_per_sample", "forward_flops", "training_flops_per_sample",
           "memory_per_gpu", "STRATEGIES"]

STRATEGIES = ("ddp", "zero2", "zero3", "fsdp")


def count_parameters(cfg: ExpertConfig) -> int:
    """Exact parameter count of ``MMDiT(cfg)`` (identical for both layouts: fusing does not change sizes).

    Per block (DESIGN §5.1, H hidden, M mlp hidden, D head dim, b qkv bias):
    double = 2·(10H² + 2HM + (8+3b)H + M + 2D), single = 7H² + 2HM + 7H + M + 2D.
    """
    h, m, d, b = cfg.hidden_size, cfg.mlp_hidden_dim, cfg.head_dim, int(cfg.qkv_bias)

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + n_out

    embed = linear(cfg.in_channels, h) + linear(cfg.context_in_dim, h)
    embed += linear(256, h) + linear(h, h)  # time_in
    embed += linear(cfg.vec_in_dim, h) + linear(h, h)  # vector_in
    if cfg.guidance_embed:
        embed += linear(256, h) + linear(h, h)
    if cfg.cond_embed:
        embed += linear(cfg.cond_features, h)
    double = 2 * (10 * h * h + 2 * h * m + (8 + 3 * b) * h + m + 2 * d)
    single = 7 * h * h + 2 * h * m + 7 * h + m + 2 * d
    final = linear(h, 2 * h) + linear(h, cfg.in_channels)
    return embed + cfg.depth * double + cfg.depth_single_blocks * single + final


def tokens_per_sample(cfg: ExpertConfig, height: int, width: int, num_frames: int, text_tokens: int = 512,
                      spatial_factor: int = 8, temporal_factor: int = 4) -> dict[str, int]:
    """Token counts for one video of ``num_frames`` (4k+1) pixel frames of ``height`` × ``width``.

    ``spatial_factor``/``temporal_factor`` are the VAE's (8/4 for HunyuanVideo; the tiny PixelVAE uses 2/4).
    256² × 129 frames → 8,448 image tokens; 768² × 129 → 76,032 (DESIGN §5.1).
    """
    _, ph, pw = cfg.patch_size
    for name, size in (("height", height), ("width", width)):
        if size % (spatial_factor * (ph if name == "height" else pw)):
            raise ValueError(f"{name} {size} must be divisible by spatial_factor × patch = "
                             f"{spatial_factor} × {ph if name == 'height' else pw}")
    frames = latent_frames(num_frames, temporal_factor)
    if frames % cfg.patch_size[0]:
        raise ValueError(f"{frames} latent frames are not divisible by the temporal patch {cfg.patch_size[0]}")
    per_frame = (height // spatial_factor // ph) * (width // spatial_factor // pw)
    return {
        "image_tokens": per_frame * frames // cfg.patch_size[0],
        "text_tokens": text_tokens,
        "tokens_per_frame": per_frame,
        "latent_frames": frames,
    }


def forward_flops(cfg: ExpertConfig, image_tokens: int, text_tokens: int,
                  with_i2v: bool | None = None) -> dict[str, int]:
    """Forward FLOPs of one sample: matmuls (2 per multiply-add) and attention, by part.

    * ``linear``: 2 × weights × tokens for every Linear, each applied to the tokens it sees (image-stream
      weights to image tokens, text-stream to text tokens, single blocks to both, the final layer to image
      tokens) plus the per-sample vector path (time/vector/guidance embedders, all modulations).
    * ``attention``: 4·L²·H per block (QKᵀ and attention × V, L = image + text tokens).
    Elementwise work (norms, RoPE, GELU, softmax, biases) is not counted, as is customary for MFU.
    ``with_i2v`` (default: ``cfg.cond_embed``) counts the ``cond_in`` matmul; without an i2v input the
    model adds only its bias.
    """
    h, m = cfg.hidden_size, cfg.mlp_hidden_dim
    n_img, n_txt = image_tokens, text_tokens
    n_all = n_img + n_txt
    with_i2v = cfg.cond_embed if with_i2v is None else with_i2v
    if with_i2v and not cfg.cond_embed:
        raise ValueError(f"preset {cfg.preset!r} has no cond_in; with_i2v must be False")

    vector_macs = 256 * h + h * h + cfg.vec_in_dim * h + h * h  # time_in, vector_in
    vector_macs += (256 * h + h * h) if cfg.guidance_embed else 0
    vector_macs += cfg.depth * 2 * 6 * h * h + cfg.depth_single_blocks * 3 * h * h + 2 * h * h  # modulations
    block_macs_per_token = 4 * h * h + 2 * h * m  # q, k, v, out (or linear1 + linear2) and the MLP
    token_macs = n_img * (cfg.in_channels * h + h * cfg.in_channels)  # img_in, final_layer.linear
    token_macs += n_img * cfg.cond_features * h if with_i2v else 0
    token_macs += n_txt * cfg.context_in_dim * h
    token_macs += cfg.depth * (n_img + n_txt) * block_macs_per_token
    token_macs += cfg.depth_single_blocks * n_all * block_macs_per_token
    linear = 2 * (vector_macs + token_macs)
    attention = (cfg.depth + cfg.depth_single_blocks) * 4 * n_all * n_all * h
    return {"linear": linear, "attention": attention, "total": linear + attention}


def training_flops_per_sample(cfg: ExpertConfig, height: int, width: int, num_frames: int, text_tokens: int = 512,
                              spatial_factor: int = 8, temporal_factor: int = 4,
                              with_i2v: bool | None = None) -> int:
    """3 × :func:`forward_flops` (backward ≈ 2 × forward) for one video; without activation recomputation.

    With activation checkpointing the hardware does one more forward (4×); MFU conventionally still
    uses 3×, so this function does not add it.
    """
    tokens = tokens_per_sample(cfg, height, width, num_frames, text_tokens, spatial_factor, temporal_factor)
    return 3 * forward_flops(cfg, tokens["image_tokens"], text_tokens, with_i2v)["total"]


def memory_per_gpu(params: int, strategy: str, world_size: int) -> dict[str, int]:
    """Bytes per GPU of model state for mixed-precision AdamW training (activations excluded).

    Counted per parameter, as in the ZeRO paper: bf16 weights (2 B), bf16 gradients (2 B), fp32 master
    weights (4 B) and AdamW's two fp32 moments (8 B) — 16 B in all. Sharding over ``world_size`` ranks:
    ``ddp`` replicates everything; ``zero2`` shards gradients, master weights and moments but keeps a full
    bf16 copy of the weights; ``zero3`` and ``fsdp`` (full sharding) shard all four. Temporary buffers
    (all-gathered layers, communication buckets), activations and the CUDA context are not included.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if world_size < 1 or params < 0:
        raise ValueError(f"world_size must be >= 1 and params >= 0, got {world_size}, {params}")

    def share(nbytes: int, sharded: bool) -> int:
        return math.ceil(nbytes / world_size) if sharded else nbytes

    sharded_weights = strategy in ("zero3", "fsdp")
    sharded_rest = strategy != "ddp"
    out = {
        "weights_bf16": share(2 * params, sharded_weights),
        "grads_bf16": share(2 * params, sharded_rest),
        "master_fp32": share(4 * params, sharded_rest),
        "adam_moments_fp32": share(8 * params, sharded_rest),
    }
    out["total"] = sum(out.values())
    return out
