"""The MM-DiT expert: published sizes and key names, conventions against hand-written references, training."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ddm import flow
from ddm.models.layers import RMSNorm, apply_rope, rope_angles, timestep_embedding
from ddm.models.mmdit import MMDiT, patchify, position_ids, unpatchify
from ddm.models.presets import EXPERT_PRESETS, ExpertConfig, get_expert_config
from tests.fixtures.models import build_seeded_expert, make_expert_inputs

pytestmark = pytest.mark.usefixtures("torch_single_thread")

H, M = 3072, 12288


def _meta_model(name: str, **overrides) -> MMDiT:
    with torch.device("meta"):
        return MMDiT(get_expert_config(name, **overrides))


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- published sizes and names (DESIGN §5.1) ---------------------------------------------------------

def test_11b_parameter_counts_and_block_formulas():
    opensora, flux = _meta_model("opensora-v2-11b"), _meta_model("flux-dev")
    assert _numel(opensora) == 11_891_390_528
    assert _numel(flux) == 11_901_408_320
    for model in (opensora, flux):
        assert len(model.double_blocks) == 19 and len(model.single_blocks) == 38
        assert _numel(model.double_blocks[0]) == 339_831_296
        assert _numel(model.single_blocks[0]) == 141_591_808
    # the DESIGN per-block formulas with D = 128, b = 1
    assert 2 * (10 * H * H + 2 * H * M + 11 * H + M + 256) == 339_831_296
    assert 7 * H * H + 2 * H * M + 7 * H + M + 256 == 141_591_808


COMMON_KEYS = ["img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "time_in.out_layer.bias",
               "vector_in.in_layer.weight", "vector_in.out_layer.weight", "double_blocks.18.img_mod.lin.weight",
               "double_blocks.0.txt_mod.lin.bias", "double_blocks.0.img_attn.norm.query_norm.scale",
               "double_blocks.0.txt_attn.norm.key_norm.scale", "double_blocks.0.img_attn.proj.weight",
               "double_blocks.0.txt_mlp.0.weight", "double_blocks.0.img_mlp.2.bias",
               "single_blocks.37.norm.query_norm.scale", "single_blocks.0.norm.key_norm.scale",
               "single_blocks.0.modulation.lin.weight", "single_blocks.0.linear2.weight",
               "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"]


def test_11b_key_names_and_shapes_per_layout():
    opensora = {k: tuple(v.shape) for k, v in _meta_model("opensora-v2-11b").state_dict().items()}
    flux = {k: tuple(v.shape) for k, v in _meta_model("flux-dev").state_dict().items()}
    for sd in (opensora, flux):
        assert set(COMMON_KEYS) <= set(sd)
        assert sd["img_in.weight"] == (H, 64) and sd["txt_in.weight"] == (H, 4096)
        assert sd["vector_in.in_layer.weight"] == (H, 768) and sd["time_in.in_layer.weight"] == (H, 256)
        assert sd["final_layer.linear.weight"] == (64, H) and sd["final_layer.adaLN_modulation.1.weight"] == (2 * H, H)
        assert sd["double_blocks.0.img_mod.lin.weight"] == (6 * H, H)
        assert sd["single_blocks.0.modulation.lin.weight"] == (3 * H, H)
        assert sd["single_blocks.0.linear2.weight"] == (H, H + M)
        # LayerNorms have no parameters and RoPE has none: every norm parameter is a QK-norm scale
        assert all(k.endswith(("query_norm.scale", "key_norm.scale")) for k in sd if "norm" in k)
        assert sd["single_blocks.0.norm.query_norm.scale"] == (128,)
        assert not any("rope" in k or "pe_embedder" in k for k in sd)
    for i in (0, 18):
        for s in ("img", "txt"):
            for p in ("q_proj", "k_proj", "v_proj"):
                assert opensora[f"double_blocks.{i}.{s}_attn.{p}.weight"] == (H, H)
                assert f"double_blocks.{i}.{s}_attn.{p}.bias" in opensora
            assert flux[f"double_blocks.{i}.{s}_attn.qkv.weight"] == (3 * H, H)
            assert not any(f"double_blocks.{i}.{s}_attn.qkv" in k for k in opensora)
    assert opensora["single_blocks.0.q_proj.weight"] == (H, H)
    assert opensora["single_blocks.0.k_proj.weight"] == (H, H)
    assert opensora["single_blocks.0.v_mlp.weight"] == (H + M, H)
    assert flux["single_blocks.0.linear1.weight"] == (3 * H + M, H)
    assert opensora["cond_in.weight"] == (H, 68) and not any(k.startswith("guidance_in") for k in opensora)
    assert flux["guidance_in.in_layer.weight"] == (H, 256) and not any(k.startswith("cond_in") for k in flux)


# ---- conventions checked against hand-written references ---------------------------------------------

def test_timestep_embedding_matches_hand_formula():
    t = torch.tensor([0.0, 0.25, 0.999, 1.0])
    emb = timestep_embedding(t, 256)
    assert emb.shape == (4, 256) and emb.dtype == torch.float32
    for b, tb in enumerate(t.tolist()):
        for i in (0, 1, 17, 127):
            freq = math.exp(-math.log(10000.0) * i / 128)
            assert emb[b, i].item() == pytest.approx(math.cos(1000 * tb * freq), abs=2e-4)  # cos first
            assert emb[b, 128 + i].item() == pytest.approx(math.sin(1000 * tb * freq), abs=2e-4)
    odd = timestep_embedding(t, 7)
    assert odd.shape == (4, 7) and torch.all(odd[:, -1] == 0)


def test_patchify_is_channel_major_and_round_trips():
    x = torch.randn(2, 3, 4, 6, 8)
    patch = (1, 2, 2)
    tokens = patchify(x, patch)
    gt, gh, gw = 4, 3, 4
    assert tokens.shape == (2, gt * gh * gw, 3 * 4)
    for b in range(2):
        for ti in range(gt):
            for hi in range(gh):
                for wi in range(gw):
                    n = (ti * gh + hi) * gw + wi
                    for c in range(3):
                        for dh in range(2):
                            for dw in range(2):
                                f = c * 4 + dh * 2 + dw  # (c, ph, pw), channel-major
                                assert tokens[b, n, f] == x[b, c, ti, hi * 2 + dh, wi * 2 + dw]
    assert torch.equal(unpatchify(tokens, patch, (gt, gh, gw)), x)
    # a temporal patch round-trips too
    assert torch.equal(unpatchify(patchify(x, (2, 2, 2)), (2, 2, 2), (2, 3, 4)), x)


def test_position_ids_text_first_and_zero():
    ids = position_ids((2, 3, 4), text_len=5)
    assert ids.shape == (5 + 24, 3)
    assert torch.all(ids[:5] == 0)
    expected = [(t, h, w) for t in range(2) for h in range(3) for w in range(4)]
    assert [tuple(r) for r in ids[5:].tolist()] == expected


def test_rope_rotates_pairs_like_complex_multiplication():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 32, generator=gen)  # (B, heads, L, D)
    ids = torch.randint(0, 9, (6, 3), generator=gen)
    angles = rope_angles(ids, (8, 12, 12), 10_000)
    assert angles.shape == (6, 16)
    # reference: axis-by-axis frequencies written out in float64
    ref = torch.zeros(6, 16, dtype=torch.float64)
    col = 0
    for axis, dim in enumerate((8, 12, 12)):
        for j in range(dim // 2):
            ref[:, col] = ids[:, axis].double() * 10_000 ** (-2 * j / dim)
            col += 1
    assert torch.allclose(angles.double(), ref, atol=1e-5)
    rot = torch.polar(torch.ones_like(ref), ref)
    inter = torch.view_as_complex(x.double().reshape(2, 3, 6, 16, 2).contiguous()) * rot
    assert torch.allclose(apply_rope(x, angles, interleaved=True).double(),
                          torch.view_as_real(inter).reshape(x.shape), atol=1e-5)
    half = torch.complex(x.double()[..., :16], x.double()[..., 16:]) * rot
    assert torch.allclose(apply_rope(x, angles, interleaved=False).double(),
                          torch.cat([half.real, half.imag], dim=-1), atol=1e-5)
    # zero positions (text tokens) are the identity
    assert torch.equal(apply_rope(x, torch.zeros(6, 16), interleaved=False), x)


def test_qk_rmsnorm_is_float32_and_matches_float64():
    norm = RMSNorm(32)
    with torch.no_grad():
        norm.scale.copy_(torch.linspace(0.5, 2.0, 32))
    x = torch.randn(4, 32) * 50
    ref = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.scale.double()
    assert torch.allclose(norm(x).double(), ref, rtol=1e-5, atol=1e-5)
    out_bf16 = norm(x.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    assert torch.allclose(out_bf16.double(), ref, rtol=1e-2, atol=1e-2)


def test_forward_puts_text_first_and_uses_the_input_grid(tiny_expert, tiny_expert_config):
    x, t, cond = make_expert_inputs(tiny_expert_config, latent_frames=2, height=6, width=8, text_len=5)
    seen = {}
    tiny_expert.double_blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("angles", args[3]))
    tiny_expert.double_blocks[-1].register_forward_hook(lambda m, args, out: seen.__setitem__("txt", out[1]))
    tiny_expert.single_blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("seq", args[0]))
    out = tiny_expert(x, t, cond)
    assert out.shape == x.shape
    expected = rope_angles(position_ids((2, 3, 4), 5), tiny_expert_config.axes_dim, tiny_expert_config.theta)
    assert torch.equal(seen["angles"], expected) and torch.all(seen["angles"][:5] == 0)
    assert torch.equal(seen["seq"][:, :5], seen["txt"])  # [txt; img]
    # no stored position buffers: the same weights run at another size
    assert not list(tiny_expert.buffers())
    assert tiny_expert(*make_expert_inputs(tiny_expert_config, latent_frames=1, height=12, width=4)).shape == \
        (2, 16, 1, 12, 4)


def test_i2v_cond_in_is_zero_initialised_then_active(tiny_expert, tiny_expert_config):
    x, t, cond = make_expert_inputs(tiny_expert_config, i2v=True)
    t2v = {k: v for k, v in cond.items() if k != "i2v"}
    with torch.no_grad():
        assert torch.equal(tiny_expert(x, t, cond), tiny_expert(x, t, t2v))
        torch.nn.init.normal_(tiny_expert.cond_in.weight, std=0.5)
        torch.nn.init.normal_(tiny_expert.cond_in.bias, std=0.5)
        assert (tiny_expert(x, t, cond) - tiny_expert(x, t, t2v)).abs().max() > 1e-2
        # an absent condition means zeros, also once cond_in is trained
        zeros = dict(t2v, i2v=torch.zeros_like(cond["i2v"]))
        assert torch.allclose(tiny_expert(x, t, zeros), tiny_expert(x, t, t2v), atol=1e-6)


def test_guidance_embedding_changes_flux_dev_output():
    cfg = get_expert_config("tiny-flux")
    model = build_seeded_expert(cfg)
    x, t, cond = make_expert_inputs(cfg)
    with torch.no_grad():
        a = model(x, t, cond)
        b = model(x, t, dict(cond, guidance=torch.full((2,), 1.0)))
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="guidance"):
        model(x, t, {k: v for k, v in cond.items() if k != "guidance"})


def test_activation_checkpointing_gives_the_same_gradients(tiny_expert, tiny_expert_config):
    x, t, cond = make_expert_inputs(tiny_expert_config, i2v=True)
    assert len(tiny_expert.blocks()) == 4 and tiny_expert.layout == "opensora"

    def grads() -> list[torch.Tensor]:
        tiny_expert.zero_grad()
        tiny_expert(x, t, cond).square().mean().backward()
        return [p.grad.clone() for p in tiny_expert.parameters()]

    plain = grads()
    tiny_expert.set_activation_checkpointing(True)
    ckpt = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt))


def test_bf16_weights_follow_the_float32_model(tiny_expert, tiny_expert_config):
    x, t, cond = make_expert_inputs(tiny_expert_config)
    with torch.no_grad():
        ref = tiny_expert(x, t, cond)
        out = tiny_expert.to(torch.bfloat16)(x, t, cond)
    assert out.dtype == torch.float32  # returned in the input's dtype
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_tiny_expert_overfits_one_batch(tiny_expert_config):
    """Flow-matching loss on one fixed batch falls by ≥ 90%: forward, backward and the target agree."""
    model = build_seeded_expert(tiny_expert_config)
    x0, _, cond = make_expert_inputs(tiny_expert_config, latent_frames=2, height=8, width=8, text_len=5)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0.3, 0.8])
    xt, target = flow.interpolate(x0, noise, t), flow.velocity_target(x0, noise)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(80):
        loss = (model(xt, t, cond) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.1 * losses[0], (losses[0], losses[-1])


# ---- configuration ------------------------------------------------------------------------------------

def test_config_round_trips_through_json_and_validates():
    for cfg in EXPERT_PRESETS.values():
        again = ExpertConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg and isinstance(again.patch_size, tuple)
    tiny = get_expert_config("tiny")
    assert (tiny.in_channels, tiny.cond_features, tiny.head_dim) == (64, 68, 32)
    real = get_expert_config("opensora-v2-11b")
    assert (real.in_channels, real.cond_features, real.head_dim, real.mlp_hidden_dim) == (64, 68, 128, 12288)
    assert get_expert_config("tiny-pixel").in_channels == 12 * 4
    # missing keys come from the named preset
    assert ExpertConfig.from_dict({"preset": "tiny", "depth": 3}) == get_expert_config("tiny", depth=3)
    with pytest.raises(ValueError, match="unknown expert config keys"):
        ExpertConfig.from_dict({"preset": "tiny", "hidden": 3})
    with pytest.raises(ValueError, match="unknown expert preset"):
        get_expert_config("flux-pro")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        get_expert_config("tiny", num_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        get_expert_config("tiny", axes_dim=(8, 8, 8))
    with pytest.raises(ValueError, match="layout"):
        get_expert_config("tiny", layout="diffusers")


# ---- bad inputs ---------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(tiny_expert, tiny_expert_config):
    x, t, cond = make_expert_inputs(tiny_expert_config)
    with pytest.raises(ValueError, match="16 latent channels"):
        tiny_expert(torch.randn(2, 3, 2, 8, 8), t, cond)
    with pytest.raises(ValueError, match="latent W = 7 is not divisible"):
        tiny_expert(torch.randn(2, 16, 2, 8, 7), t, cond)
    with pytest.raises(ValueError, match="latent H = 5"):
        tiny_expert(torch.randn(2, 16, 2, 5, 8), t, cond)
    with pytest.raises(ValueError, match="t5"):
        tiny_expert(x, t, dict(cond, t5=torch.randn(2, 7, 33)))
    with pytest.raises(ValueError, match="clip"):
        tiny_expert(x, t, dict(cond, clip=torch.randn(2, 768)))
    with pytest.raises(ValueError, match="t5"):  # batch mismatch
        tiny_expert(x, t, dict(cond, t5=torch.randn(3, 7, 32)))
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        tiny_expert(x, torch.rand(3), cond)
    with pytest.raises(ValueError, match="missing"):
        tiny_expert(x, t, {"t5": cond["t5"]})
    with pytest.raises(ValueError, match="i2v"):
        tiny_expert(x, t, dict(cond, i2v=torch.zeros(2, 16, 2, 8, 8)))
    flux_cfg = get_expert_config("tiny-flux")
    flux_model = build_seeded_expert(flux_cfg)
    fx, ft, fcond = make_expert_inputs(flux_cfg)
    with pytest.raises(ValueError, match="no cond_in"):
        flux_model(fx, ft, dict(fcond, i2v=torch.zeros(2, 17, 2, 8, 8)))
    with pytest.raises(ValueError, match="4k\\+1"):
        flow.latent_frames(32)
