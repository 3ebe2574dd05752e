"""Analytic budget of an expert: parameters, tokens, training FLOPs, and per-GPU training memory.

Used by the training dry-run (will it fit, how long will it take), by MFU logging and by the benchmarks.
Everything here is closed-form from an :class:`~ddm.models.presets.ExpertConfig`; the tests cross-check
it against a meta-device build and against ``torch.utils.flop_counter.FlopCounterMode``.
"""
from __future__ import annotations

import math

from ddm.flow import latent_frames
from ddm.models.presets import ExpertConfig

__all__ = ["count_parameters", "tokens_per_sample", "forward_flops", "training_flops_per_sample",
           "memory_per_gpu", "training_memory", "block_parameters", "STRATEGIES", "PRECISIONS"]

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


# --- training memory: model state + fp32 EMA + activations (the dry run's figure) ------------------------

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")

# Bytes per parameter of (weights, gradients, optimizer state, master weights) for each way of training;
# the EMA is always an fp32 copy (4 B, train/ema.py). Lightning's bf16-mixed keeps fp32 weights and
# autocasts the matmuls; bf16-true keeps everything in bf16 (AdamW's moments follow the weights' dtype);
# DeepSpeed's bf16 (either Lightning precision) keeps bf16 weights/grads and fp32 master + moments.
_STATE_BYTES = {
    "32-true": (4, 4, 8, 0),
    "bf16-mixed": (4, 4, 8, 0),
    "bf16-true": (2, 2, 4, 0),
    "deepspeed-bf16": (2, 2, 8, 4),
}

# Saved activations per token of one block, in bytes per hidden unit (a) and per MLP unit (b): the
# tensors autograd keeps for backward, counted from the code of ddm.models.mmdit. A double-stream block
# keeps ≈ 17 hidden-sized tensors per token (LayerNorm inputs and outputs, modulated inputs, q/k before
# and after QK-norm, q/k/v of the joint attention before and after RoPE, the attention output, the
# projection's input and output, the residual) and 2 MLP-sized ones (GELU input and output); a
# single-stream block ≈ 13 + 2. Under bf16 the matmul-side tensors halve but QK-norm and RoPE still keep
# fp32 copies, hence the coefficients below rather than a plain halving. Attention is a fused (flash)
# kernel: no L×L matrix is stored. tests/test_scale_memory.py checks these against autograd's saved
# tensors on a small model.
_ACT = {  # precision: ((a, b) double, (a, b) single, bytes of the residual stream, outside-block a)
    "32-true": ((69, 8), (53, 8), 4, 16),
    "bf16-true": ((43, 4), (35, 4), 2, 8),
    "bf16-mixed": ((54, 4), (42, 4), 2, 8),
}


def block_parameters(cfg: ExpertConfig) -> tuple[int, int]:
    """Parameters of one double-stream and one single-stream block (the formula of :func:`count_parameters`)."""
    h, m, d, b = cfg.hidden_size, cfg.mlp_hidden_dim, cfg.head_dim, int(cfg.qkv_bias)
    return 2 * (10 * h * h + 2 * h * m + (8 + 3 * b) * h + m + 2 * d), 7 * h * h + 2 * h * m + 7 * h + m + 2 * d


def training_memory(cfg: ExpertConfig, *, strategy: str, world_size: int, batch_size: int, image_tokens: int,
                    text_tokens: int, precision: str, activation_checkpointing: bool,
                    context_parallel: int = 1) -> dict[str, int]:
    """Bytes per GPU to train ``cfg`` with AdamW and an fp32 EMA: a closed form (docs/bench/scale.md).

    Keys: ``params``, ``grads``, ``optimizer``, ``ema``, ``master``, ``activations``, ``total``.

    * **Model state**, per parameter P (bytes of weights / grads / AdamW moments / master by precision:
      32-true and bf16-mixed 4/4/8/0, bf16-true 2/2/4/0, DeepSpeed bf16 2/2/8/4) + the EMA, always fp32
      (4). Sharded over ``world_size`` ranks: ``ddp`` nothing; ``fsdp`` (FSDP2) and ``zero3`` everything,
      the EMA included; ``zero2`` gradients, moments and master (weights and the frozen EMA replicated).
      Under ``fsdp``/``zero3`` ``params`` also holds the unsharded weights of two blocks (the one computing
      and the one prefetched).
    * **Activations**, per rank: ``batch_size`` × tokens (image + text, divided by ``context_parallel``) ×
      per-block coefficients (see ``_ACT``: ≈ 17 hidden-sized + 2 MLP-sized saved tensors per token in a
      double block, 13 + 2 in a single block) over all blocks, plus the embedders / final layer. With
      ``activation_checkpointing`` only each block's input (the residual stream) is kept, plus one
      double block's full activations while it is recomputed. Under ``bf16-mixed`` autocast keeps a bf16
      copy of every weight it casts for backward: 2 B × the block parameters (one block's with
      checkpointing), on every rank, sharded or not.

    Not counted: the CUDA context and allocator fragmentation (~1–3 GB on a GPU), communication buckets,
    and transient gradient buffers of one block's backward.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if world_size < 1 or batch_size < 1 or context_parallel < 1:
        raise ValueError(f"world_size, batch_size and context_parallel must be >= 1, got {world_size}, "
                         f"{batch_size}, {context_parallel}")
    params = count_parameters(cfg)
    deepspeed = strategy in ("zero2", "zero3")
    key = "deepspeed-bf16" if deepspeed and precision != "32-true" else precision
    w_b, g_b, o_b, m_b = _STATE_BYTES[key]

    def share(nbytes: int, sharded: bool) -> int:
        return math.ceil(nbytes / world_size) if sharded else nbytes

    full_shard = strategy in ("fsdp", "zero3")
    double_p, single_p = block_parameters(cfg)
    gathered = 2 * max(double_p, single_p) * w_b if full_shard and world_size > 1 else 0
    out = {
        "params": share(w_b * params, full_shard) + gathered,
        "grads": share(g_b * params, strategy != "ddp"),
        "optimizer": share(o_b * params, strategy != "ddp"),
        "ema": share(4 * params, full_shard),
        "master": share(m_b * params, strategy != "ddp"),
    }
    act_key = "bf16-true" if deepspeed and precision == "bf16-mixed" else precision  # DeepSpeed: bf16 weights
    (a_d, b_d), (a_s, b_s), resid, outside = _ACT[act_key]
    tokens = math.ceil((image_tokens + text_tokens) / context_parallel) * batch_size
    h, m = cfg.hidden_size, cfg.mlp_hidden_dim
    per_double, per_single = tokens * (a_d * h + b_d * m), tokens * (a_s * h + b_s * m)
    n_blocks = cfg.depth + cfg.depth_single_blocks
    autocast_copy = 2 if act_key == "bf16-mixed" else 0
    if activation_checkpointing:
        acts = n_blocks * tokens * h * resid + max(per_double if cfg.depth else 0, per_single)
        acts += autocast_copy * max(double_p, single_p)
    else:
        acts = cfg.depth * per_double + cfg.depth_single_blocks * per_single
        acts += autocast_copy * (cfg.depth * double_p + cfg.depth_single_blocks * single_p)
    out["activations"] = acts + tokens * outside * h
    out["total"] = sum(out.values())
    return out
