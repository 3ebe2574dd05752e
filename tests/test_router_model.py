"""The DiT-B-like router: size, shapes, resolution agnosticism, text switch, FLOPs, and that it learns."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ddm.models.router import (
    ROUTER_PRESETS,
    Router,
    RouterConfig,
    get_router_config,
    mean_over_tokens,
    router_flops,
    sincos_position_embedding_3d,
)


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the adaLN-Zero / zero-head initialisation by random weights so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_dit_b_size_matches_the_closed_form_count():
    cfg = get_router_config("dit-b", num_experts=3)
    with torch.device("meta"):
        router = Router(cfg)
    n_params = sum(p.numel() for p in router.parameters())
    h, m, k, c = 768, 3072, 3, 16
    block = (3 * h * h + 3 * h) + (h * h + h) + (h * m + m + m * h + h) + (6 * h * h + 6 * h)
    expected = (c * 16 * h + h) + h + (256 * h + h + h * h + h) + 12 * block + 2 * h + (h * h + h + h * k + k)
    assert n_params == expected == 129_120_771
    assert 129e6 <= n_params <= 130e6


def test_output_shape_and_uniform_prior_at_init():
    router = Router(get_router_config("tiny", num_experts=4))
    logits = router(torch.randn(3, 16, 2, 8, 8), torch.rand(3), {})
    assert logits.shape == (3, 4) and logits.dtype == torch.float32
    assert torch.equal(logits, torch.zeros(3, 4))  # zero last head layer: the uniform prior


def test_same_weights_serve_two_resolutions():
    router = _randomize(Router(get_router_config("tiny")))
    t = torch.tensor([0.3, 0.8])
    small = router(torch.randn(2, 16, 1, 16, 16), t)
    large = router(torch.randn(2, 16, 3, 48, 48), t)
    assert small.shape == large.shape == (2, 3)
    assert torch.isfinite(small).all() and torch.isfinite(large).all()


def test_position_embedding_against_a_hand_computed_reference():
    dim = 20  # 6 channels per axis, 2 zero channels left over
    emb = sincos_position_embedding_3d((2, 3, 4), dim)
    assert emb.shape == (24, dim)
    omega = [1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)]
    token = 1 * 12 + 2 * 4 + 3  # t=1, h=2, w=3 in t-major order
    expected = []
    for pos in (1, 2, 3):
        expected += [math.sin(pos * w) for w in omega] + [math.cos(pos * w) for w in omega]
    expected += [0.0, 0.0]
    torch.testing.assert_close(emb[token], torch.tensor(expected), rtol=0, atol=1e-6)


def test_reference_grid_maps_a_larger_grid_onto_the_same_positions():
    base = sincos_position_embedding_3d((2, 4, 4), 48, ref_grid=(4, 4)).view(2, 4, 4, 48)
    triple = sincos_position_embedding_3d((2, 12, 12), 48, ref_grid=(4, 4)).view(2, 12, 12, 48)
    torch.testing.assert_close(triple[:, ::3, ::3], base, rtol=0, atol=1e-6)
    integer = sincos_position_embedding_3d((2, 4, 4), 48)
    torch.testing.assert_close(integer, base.reshape(-1, 48), rtol=0, atol=0)  # at the reference size: DiT's


def test_text_is_ignored_unless_text_dim_is_set():
    x, t = torch.randn(2, 16, 1, 8, 8), torch.rand(2)
    blind = _randomize(Router(get_router_config("tiny")))
    a = blind(x, t, {"clip": torch.randn(2, 32)})
    b = blind(x, t, {"clip": torch.randn(2, 32)})
    assert torch.equal(a, b) and torch.equal(a, blind(x, t, None))

    seeing = _randomize(Router(get_router_config("tiny", text_dim=32)))
    a = seeing(x, t, {"clip": torch.randn(2, 32)})
    b = seeing(x, t, {"clip": torch.randn(2, 32)})
    assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match=r"cond\['clip'\]"):
        seeing(x, t, {})


def test_mean_over_tokens_is_the_mean_of_each_captions_own_tokens():
    g = torch.Generator().manual_seed(0)
    lengths = [3, 7, 1]
    states = torch.zeros(3, 9, 5, dtype=torch.float64)
    for i, n in enumerate(lengths):
        states[i, :n] = torch.randn(n, 5, generator=g, dtype=torch.float64)
    expected = torch.stack([states[i, :n].sum(0) / n for i, n in enumerate(lengths)])  # float64 by hand
    torch.testing.assert_close(mean_over_tokens(states), expected, rtol=0, atol=1e-15)
    # a longer padding changes nothing; a row that is all padding gives zeros
    padded = torch.cat([states, torch.zeros(3, 11, 5, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(mean_over_tokens(padded), expected, rtol=0, atol=1e-15)
    assert torch.equal(mean_over_tokens(torch.zeros(1, 4, 5)), torch.zeros(1, 5))


def test_a_t5_reading_router_sees_the_words_and_not_the_padding():
    x, t = torch.randn(2, 16, 1, 8, 8), torch.rand(2)
    g = torch.Generator().manual_seed(1)
    t5 = torch.zeros(2, 6, 24)
    t5[0, :4], t5[1, :2] = torch.randn(4, 24, generator=g), torch.randn(2, 24, generator=g)
    router = _randomize(Router(get_router_config("tiny", t5_dim=24)))
    logits = router(x, t, {"t5": t5})
    longer = torch.cat([t5, torch.zeros(2, 10, 24)], dim=1)  # the pipeline pads to its own L
    torch.testing.assert_close(router(x, t, {"t5": longer}), logits, rtol=0, atol=1e-6)
    other = t5.clone()
    other[0, 1] = torch.randn(24, generator=g)  # one word of the first caption changed
    changed = router(x, t, {"t5": other})
    assert not torch.allclose(changed[0], logits[0], atol=1e-4) and torch.equal(changed[1], logits[1])
    with pytest.raises(ValueError, match=r"cond\['t5'\] must be \(B, L, 24\)"):
        router(x, t, {"clip": torch.randn(2, 32)})
    assert router.cfg.reads_text and not get_router_config("tiny").reads_text
    both = _randomize(Router(get_router_config("tiny", text_dim=32, t5_dim=24)))
    assert both(x, t, {"t5": t5, "clip": torch.randn(2, 32)}).shape == (2, 3)


def test_bad_inputs_raise_clear_errors():
    router = Router(get_router_config("tiny"))
    with pytest.raises(ValueError, match="16 latent channels"):
        router(torch.randn(1, 48, 1, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match="not divisible"):
        router(torch.randn(1, 16, 1, 10, 8), torch.rand(1))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        router(torch.randn(1, 16, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match=r"t must have shape"):
        router(torch.randn(2, 16, 1, 8, 8), torch.rand(3))


def test_config_round_trip_and_presets():
    cfg = get_router_config("tiny-pixel", num_experts=5, text_dim=32, t5_dim=24)
    assert cfg.latent_channels == 12 and cfg.num_experts == 5
    back = RouterConfig.from_dict(cfg.to_dict())
    assert back == cfg and isinstance(back.patch_size, tuple)
    older = {k: v for k, v in cfg.to_dict().items() if k != "t5_dim"}  # an export from before t5_dim existed
    assert RouterConfig.from_dict(older).t5_dim is None
    with pytest.raises(ValueError, match="unknown RouterConfig keys"):
        RouterConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown router preset"):
        get_router_config("dit-xxl")
    assert set(ROUTER_PRESETS) >= {"dit-b", "tiny", "tiny-pixel"}


@pytest.mark.parametrize("text_dim,t5_dim", [(None, None), (8, None), (8, 12)])
def test_flops_match_torch_flop_counter(text_dim, t5_dim):
    cfg = get_router_config("tiny", text_dim=text_dim, t5_dim=t5_dim, head_hidden=48)
    router = Router(cfg)
    x = torch.randn(2, 16, 2, 8, 12)
    cond = {"clip": torch.randn(2, 8)} if text_dim else {}
    if t5_dim:
        cond["t5"] = torch.randn(2, 5, t5_dim)
    counter = FlopCounterMode(display=False)
    # the math backend decomposes attention into matmuls the counter sees (the CPU fused kernel it does not)
    with sdpa_kernel(SDPBackend.MATH), counter:
        router(x, torch.rand(2), cond)
    assert router_flops(cfg, tuple(x.shape)) == counter.get_total_flops()
    assert router_flops(cfg, tuple(x.shape[1:])) * 2 == counter.get_total_flops()


def test_activation_checkpointing_gives_the_same_gradients():
    router = _randomize(Router(get_router_config("tiny")))
    x, t = torch.randn(2, 16, 1, 8, 8), torch.rand(2)
    grads = []
    for enabled in (False, True):
        router.zero_grad()
        router.set_activation_checkpointing(enabled)
        router(x, t).sum().backward()
        grads.append([p.grad.clone() for p in router.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_tiny_router_learns_a_separable_labelling():
    torch.manual_seed(0)
    router = Router(get_router_config("tiny", num_experts=2))
    opt = torch.optim.AdamW(router.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        labels = torch.randint(0, 2, (16,))
        x0 = (labels.float() * 2 - 1)[:, None, None, None, None] + 0.3 * torch.randn(16, 16, 1, 8, 8)
        t = torch.rand(16) * 0.5
        x_t = (1 - t)[:, None, None, None, None] * x0 + t[:, None, None, None, None] * torch.randn_like(x0)
        loss = F.cross_entropy(router(x_t, t), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # uniform prior at init
    assert sum(losses[-3:]) / 3 < 0.1
