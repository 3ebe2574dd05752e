"""Rectified-flow math shared by expert training, router training and the sampler.

Convention (DESIGN §2, §5.2): ``x_t = (1 - t)·x0 + t·noise``; t = 1 is pure noise, t = 0 is data; the
model predicts the velocity ``v = noise - x0`` — or, for a heterogeneous pool (Paris 1.0), the noise ε or the
data x0, converted to a velocity at sampling (:func:`to_velocity`). Training draws t from a logit-normal and shifts it
towards noise for large inputs; sampling integrates with Euler on a shifted ``linspace(1, 0, N+1)``.

Every function here is pure tensor math with no model or framework dependency.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "interpolate",
    "velocity_target",
    "PREDICTIONS",
    "check_prediction",
    "training_target",
    "to_velocity",
    "sample_logit_normal",
    "shift_time",
    "video_shift_alpha",
    "sample_training_t",
    "euler_schedule",
    "euler_step",
    "drop_text",
    "latent_frames",
]


def _per_sample(t: torch.Tensor | float, x: torch.Tensor, name: str = "t") -> torch.Tensor | float:
    """Reshape a per-sample time of shape (B,) to (B, 1, ..., 1) so it broadcasts over ``x``.

    Floats and 0-d tensors are returned as they are (they broadcast already).
    """
    if not isinstance(t, torch.Tensor) or t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must have shape (B,) = ({x.shape[0]},) to match x of shape {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}")
    return t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The noisy sample ``x_t = (1 - t)·x0 + t·noise``; ``t`` of shape (B,) (or a scalar)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    tb = _per_sample(t, x0)
    return (1 - tb) * x0 + tb * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow regression target ``noise - x0`` (d x_t / d t, constant along the path)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    return noise - x0


PREDICTIONS: tuple[str, ...] = ("velocity", "epsilon", "x0")
# The conversions divide by 1 - t (epsilon) or t (x0); clamping the divisor keeps them finite at the ends of
# the path, where the prediction carries no information about the velocity (epsilon at t = 1: x_t is the noise;
# x0 at t = 0: x_t is the data). Euler never evaluates t = 0; it does evaluate t = 1 at its first step.
PREDICTION_MIN_GAP = 1e-3


def check_prediction(prediction: str) -> None:
    """A clear error for a prediction target other than :data:`PREDICTIONS`."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction target {prediction!r}: expected one of {', '.join(PREDICTIONS)}")


def training_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target of an expert trained to predict ``prediction``: the velocity ``noise - x0``,
    the noise ε (``epsilon``) or the data (``x0``)."""
    check_prediction(prediction)
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    return {"velocity": lambda: noise - x0, "epsilon": lambda: noise, "x0": lambda: x0}[prediction]()


def to_velocity(prediction: str, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The velocity implied by a model's ``output`` at ``(x_t, t)`` for its prediction target.

    From ``x_t = (1 - t)·x0 + t·ε`` and ``v = ε - x0``: an ε prediction gives ``v = (ε̂ - x_t) / (1 - t)``, an
    x0 prediction ``v = (x_t - x̂0) / t``; the divisors are clamped at :data:`PREDICTION_MIN_GAP`. A velocity
    is returned as it is (same object).
    """
    check_prediction(prediction)
    if prediction == "velocity":
        return output
    if output.shape != x_t.shape:
        raise ValueError(f"output {tuple(output.shape)} and x_t {tuple(x_t.shape)} must have the same shape")
    tb = _per_sample(t, x_t)
    tb = tb if isinstance(tb, torch.Tensor) else torch.tensor(tb, dtype=x_t.dtype, device=x_t.device)
    if prediction == "epsilon":
        return (output - x_t) / (1 - tb).clamp_min(PREDICTION_MIN_GAP)
    return (x_t - output) / tb.clamp_min(PREDICTION_MIN_GAP)


def sample_logit_normal(n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None,
                        mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """``n`` times ``sigmoid(N(mean, std²))`` in (0, 1), float32 (SD3 / Open-Sora training density)."""
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    if device is None and generator is not None:
        device = generator.device
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(mean + std * z)


def shift_time(t: torch.Tensor | float, alpha: float) -> torch.Tensor | float:
    """Resolution shift ``α·t / (1 + (α-1)·t)``: α > 1 moves time towards noise (t = 1).

    It fixes 0 and 1, is increasing for α > 0, and ``shift_time(·, 1/α)`` is its inverse.
    """
    if alpha <= 0:
        raise ValueError(f"shift alpha must be positive, got {alpha}")
    return alpha * t / (1 + (alpha - 1) * t)


def video_shift_alpha(tokens_per_frame: int, latent_frames: int, base_tokens: int = 256, max_tokens: int = 4096,
                      base_shift: float = 1.0, max_shift: float = 3.0) -> float:
    """Open-Sora 2.0's shift for video: ``lin(tokens_per_frame) × √latent_frames``.

    ``lin`` is the straight line through (base_tokens, base_shift) and (max_tokens, max_shift), i.e.
    256 → 1 and 4096 → 3 image tokens per latent frame. DESIGN §5.2: 256² × 129 frames (256 tokens, T=33)
    ≈ 5.7; 768² × 129 frames (2304 tokens, T=33) ≈ 11.9. The total video token count must not be fed to
    the line (it would explode); the frame count enters only through √T.

    Below ``base_tokens`` (tiny CPU configs with a few dozen tokens per frame) the line is clamped at
    ``base_shift``: the line was fit between 256 and 4096 tokens, and extrapolating down would shift
    *towards data* (α < √T), which no published recipe does. Clamping keeps a tiny run's time
    distribution equal to stage 2's at the same frame count, so tiny runs remain a faithful miniature.
    Above ``max_tokens`` the line is extended unclamped, as in Flux and Open-Sora.
    """
    if tokens_per_frame <= 0 or latent_frames <= 0:
        raise ValueError(f"tokens_per_frame and latent_frames must be positive, got {tokens_per_frame}, "
                         f"{latent_frames}")
    if max_tokens <= base_tokens:
        raise ValueError(f"max_tokens ({max_tokens}) must exceed base_tokens ({base_tokens})")
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    per_frame = base_shift + slope * (max(tokens_per_frame, base_tokens) - base_tokens)
    return per_frame * math.sqrt(latent_frames)


def sample_training_t(n: int, alpha: float, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Training times: logit-normal N(0, 1) then :func:`shift_time` by ``alpha``; shape (n,), float32."""
    return shift_time(sample_logit_normal(n, generator=generator, device=device), alpha)


def euler_schedule(num_steps: int, alpha: float = 1.0) -> torch.Tensor:
    """The sampling times ``shift(linspace(1, 0, num_steps + 1), alpha)``: from 1 (noise) to 0 (data)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), alpha).float()


def euler_step(x: torch.Tensor, v: torch.Tensor, t_cur: torch.Tensor | float,
               t_next: torch.Tensor | float) -> torch.Tensor:
    """One Euler step ``x + (t_next - t_cur)·v``; times are scalars or per-sample (B,) tensors."""
    if x.shape != v.shape:
        raise ValueError(f"x {tuple(x.shape)} and velocity {tuple(v.shape)} must have the same shape")
    dt = _per_sample(t_next, x, "t_next") - _per_sample(t_cur, x, "t_cur")
    return x + dt * v


def _fit_null(null: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """Broadcast a null tensor to one sample of ``like`` ((L, D) or (D,)); T5 nulls are padded/truncated in L."""
    null = null.to(dtype=like.dtype, device=like.device)
    sample_shape = like.shape[1:]
    if null.ndim == like.ndim:  # stored with a leading batch dim of 1, as null_t5.pt / null_clip.pt are
        if null.shape[0] != 1:
            raise ValueError(f"{name} must have a leading batch dimension of 1, got {tuple(null.shape)}")
        null = null[0]
    if null.shape[-1] != sample_shape[-1]:
        raise ValueError(f"{name} feature dim {null.shape[-1]} does not match the batch's {sample_shape[-1]}")
    if null.ndim == 2:  # T5 token states: make the token count match the batch's L
        length = sample_shape[0]
        if null.shape[0] >= length:
            null = null[:length]
        else:
            pad = torch.zeros(length - null.shape[0], null.shape[1], dtype=null.dtype, device=null.device)
            null = torch.cat([null, pad], dim=0)
    if null.shape != sample_shape:
        raise ValueError(f"{name} of shape {tuple(null.shape)} cannot stand in for samples of shape "
                         f"{tuple(sample_shape)}")
    return null


def drop_text(t5: torch.Tensor, clip: torch.Tensor, null_t5: torch.Tensor, null_clip: torch.Tensor,
              p_t5: float, p_clip: float, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classifier-free-guidance text dropout: replace each sample's T5 / CLIP by the null encoding.

    The two encoders are dropped independently, per sample, with probabilities ``p_t5`` and ``p_clip``
    (Open-Sora uses ≈ 0.316 each). ``t5`` is (B, L, D), ``clip`` is (B, D_clip); ``null_t5`` is (1, L', D)
    or (L', D) and ``null_clip`` (1, D_clip) or (D_clip,). When L' ≠ L the null is truncated to its first
    L tokens, or padded with zeros up to L — zeros, because batches pad T5 states with zeros too
    (``ddm.models.text.pad_tokens``), so a dropped sample looks like a null caption padded as any other.

    Returns ``(t5, clip, dropped_t5, dropped_clip)``; the masks are bool (B,). Inputs are not modified.
    """
    if t5.ndim != 3 or clip.ndim != 2 or t5.shape[0] != clip.shape[0]:
        raise ValueError(f"expected t5 (B, L, D) and clip (B, D) with the same B, got {tuple(t5.shape)} and "
                         f"{tuple(clip.shape)}")
    for name, p in (("p_t5", p_t5), ("p_clip", p_clip)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    batch = t5.shape[0]
    device = generator.device if generator is not None else t5.device
    dropped_t5 = (torch.rand(batch, generator=generator, device=device) < p_t5).to(t5.device)
    dropped_clip = (torch.rand(batch, generator=generator, device=device) < p_clip).to(t5.device)
    null_t5 = _fit_null(null_t5, t5, "null_t5")
    null_clip = _fit_null(null_clip, clip, "null_clip")
    t5 = torch.where(dropped_t5[:, None, None], null_t5.expand_as(t5), t5)
    clip = torch.where(dropped_clip[:, None], null_clip.expand_as(clip), clip)
    return t5, clip, dropped_t5, dropped_clip


def latent_frames(num_frames: int, temporal_factor: int = 4) -> int:
    """Latent frame count ``1 + (F - 1) / 4`` of a causal video VAE; F must be 4k + 1 (1, 5, ..., 129)."""
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        raise ValueError(f"num_frames must be {temporal_factor}k+1 (e.g. 1, {1 + temporal_factor}, 33, 129) for a "
                         f"causal VAE with temporal factor {temporal_factor}, got {num_frames}")
    return 1 + (num_frames - 1) // temporal_factor
