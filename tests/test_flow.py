"""Rectified-flow math checked against closed forms (DESIGN §2, §5.2)."""
from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from ddm import flow


def test_interpolate_endpoints_and_moments():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 2, 5, 5, generator=gen)
    noise = torch.randn_like(x0)
    assert torch.equal(flow.interpolate(x0, noise, torch.zeros(4)), x0)
    assert torch.equal(flow.interpolate(x0, noise, torch.ones(4)), noise)
    # per-sample t broadcasts over all trailing dims: sample b is (1 - t_b) x0_b + t_b noise_b
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    xt = flow.interpolate(x0, noise, t)
    for b in range(4):
        assert torch.allclose(xt[b], (1 - t[b]) * x0[b] + t[b] * noise[b])
    # E[x_t] = (1 - t) x0 and Var[x_t] = t² for standard-normal noise
    n = 200_000
    x0_fixed = torch.full((n,), 2.0)
    eps = torch.randn(n, generator=gen)
    t_fixed = torch.full((n,), 0.3)
    samples = flow.interpolate(x0_fixed, eps, t_fixed)
    se = 0.3 / math.sqrt(n)
    assert abs(samples.mean().item() - 0.7 * 2.0) < 5 * se
    assert abs(samples.var().item() - 0.09) < 0.09 * 5 * math.sqrt(2 / n)


def test_velocity_is_the_path_derivative_and_euler_recovers_data_exactly():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 16, 3, 4, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn_like(x0)
    v = flow.velocity_target(x0, noise)
    t, h = torch.full((2,), 0.4, dtype=torch.float64), 1e-6
    fd = (flow.interpolate(x0, noise, t + h) - flow.interpolate(x0, noise, t - h)) / (2 * h)
    assert torch.allclose(fd, v, atol=1e-8)
    # the straight path has constant velocity, so Euler on any schedule lands on x0
    x = noise.clone()
    ts = flow.euler_schedule(7, alpha=3.0).double()
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x = flow.euler_step(x, v, t_cur, t_next)
    assert torch.allclose(x, x0, atol=1e-12)


def test_euler_step_per_sample_times():
    x = torch.ones(3, 2, 2)
    v = torch.full_like(x, 2.0)
    out = flow.euler_step(x, v, torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.5, 0.5, 0.0]))
    expected = torch.tensor([1 - 1.0, 1.0, 1 - 0.4])
    assert torch.allclose(out, expected.view(3, 1, 1).expand_as(x))
    with pytest.raises(ValueError, match="t_cur"):
        flow.euler_step(x, v, torch.ones(2), 0.0)


def test_logit_normal_median_and_quantiles():
    gen = torch.Generator().manual_seed(2)
    n = 100_000
    t = flow.sample_logit_normal(n, generator=gen, mean=0.5, std=1.5)
    assert t.dtype == torch.float32 and t.min() > 0 and t.max() < 1
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        expected = 1 / (1 + math.exp(-(0.5 + 1.5 * norm.ppf(q))))
        # the empirical quantile's standard error is sqrt(q(1-q)/n) / density; 0.01 is > 5 of them here
        assert abs(torch.quantile(t, q).item() - expected) < 0.01, q


def test_shift_fixes_endpoints_is_monotone_and_inverts():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for alpha in (0.5, 1.0, 3.0, 11.9):
        s = flow.shift_time(t, alpha)
        assert s[0] == 0 and s[-1] == 1
        assert torch.all(s[1:] > s[:-1])
        assert torch.allclose(flow.shift_time(s, 1 / alpha), t, atol=1e-12)
    assert torch.equal(flow.shift_time(t, 1.0), t)
    assert flow.shift_time(0.5, 3.0) == pytest.approx(0.75)  # 1.5 / 2
    with pytest.raises(ValueError):
        flow.shift_time(t, 0.0)


def test_training_t_median_is_shifted_half():
    gen = torch.Generator().manual_seed(3)
    alpha = 5.7
    t = flow.sample_training_t(100_000, alpha, generator=gen)
    # the shift is increasing, so the median maps through it: shift(0.5) = α / (1 + α)
    assert abs(t.median().item() - alpha / (1 + alpha)) < 0.005


def test_video_shift_alpha_matches_design_values():
    assert flow.video_shift_alpha(256, 33) == pytest.approx(math.sqrt(33))
    assert round(flow.video_shift_alpha(256, 33), 1) == 5.7
    assert round(flow.video_shift_alpha(2304, 33), 1) == 11.9
    assert flow.video_shift_alpha(4096, 1) == pytest.approx(3.0)
    # clamped below 256 tokens per frame (tiny configs): same as 256
    assert flow.video_shift_alpha(16, 9) == pytest.approx(3.0)


def test_euler_schedule_endpoints_and_shape():
    ts = flow.euler_schedule(50, alpha=5.7)
    assert ts.shape == (51,) and ts[0] == 1.0 and ts[-1] == 0.0
    assert torch.all(ts[1:] < ts[:-1])
    plain = torch.linspace(1, 0, 51, dtype=torch.float64)
    assert torch.allclose(ts.double(), 5.7 * plain / (1 + 4.7 * plain), atol=1e-7)
    with pytest.raises(ValueError):
        flow.euler_schedule(0)


def test_drop_text_rates_independence_and_null_fitting():
    gen = torch.Generator().manual_seed(4)
    n, L, d = 20_000, 6, 4
    t5 = torch.randn(n, L, d, generator=gen)
    clip = torch.randn(n, 3, generator=gen)
    null_t5 = torch.randn(1, 9, d, generator=gen)  # longer than L: truncated
    null_clip = torch.randn(1, 3, generator=gen)
    t5_out, clip_out, m5, mc = flow.drop_text(t5, clip, null_t5, null_clip, 0.316, 0.1, generator=gen)
    for mask, p in ((m5, 0.316), (mc, 0.1)):
        assert abs(mask.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    # independent: P(both) = p_t5 · p_clip within binomial error
    both = (m5 & mc).float().mean().item()
    assert abs(both - 0.0316) < 5 * math.sqrt(0.0316 * (1 - 0.0316) / n)
    assert torch.equal(t5_out[m5], null_t5[0, :L].expand(int(m5.sum()), L, d))
    assert torch.equal(t5_out[~m5], t5[~m5])
    assert torch.equal(clip_out[mc], null_clip.expand(int(mc.sum()), 3))
    assert torch.equal(clip_out[~mc], clip[~mc])
    # shorter null: zero-padded to L
    short = torch.randn(2, d, generator=gen)
    t5_all, _, _, _ = flow.drop_text(t5[:3], clip[:3], short, null_clip[0], 1.0, 0.0)
    assert torch.equal(t5_all[:, :2], short.expand(3, 2, d))
    assert torch.equal(t5_all[:, 2:], torch.zeros(3, L - 2, d))
    with pytest.raises(ValueError, match="feature dim"):
        flow.drop_text(t5, clip, torch.randn(1, 5, d + 1), null_clip, 0.5, 0.5)


def test_latent_frames():
    assert [flow.latent_frames(f) for f in (1, 5, 33, 129)] == [1, 2, 9, 33]
    for bad in (0, 2, 32, 128):
        with pytest.raises(ValueError, match="4k\\+1"):
            flow.latent_frames(bad)
