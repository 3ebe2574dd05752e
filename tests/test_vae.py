"""Tests for ddm.models.vae: the PixelVAE stand-in, build_vae, the HunyuanVideo VAE, its tiling and loader."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ddm.models.hunyuan_vae import HunyuanVAEConfig
from ddm.models.vae import (HunyuanVideoVAE, PixelVAE, TilingConfig, blend_weights, build_vae, load_vae, tile_spans,
                            tiled_decode, tiled_encode)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs are dominated by intra-op threading overhead (~10x slower with 2 threads on a busy 2-core
    box); run this file's tests single-threaded and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _video(frames: int, height: int, width: int, batch: int = 2, seed: int = 0,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=g, dtype=dtype) * 2 - 1


# --- PixelVAE -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames", [1, 5, 9, 17])
@pytest.mark.parametrize("s", [1, 2, 4])
def test_pixel_vae_round_trip_is_bit_exact(frames, s):
    vae = PixelVAE(spatial_factor=s)
    x = _video(frames, 4 * s, 2 * s)
    z = vae.encode(x)
    assert z.shape == (2, 3 * 4 * s * s, 1 + (frames - 1) // 4, 4, 2)
    assert z.shape[1:] == vae.latent_shape(frames, 4 * s, 2 * s)
    assert vae.frame_count(z.shape[2]) == frames
    assert torch.equal(vae.decode(z), x)


def test_pixel_vae_channel_order_is_c_dt_dy_dx():
    """Independent reference: latent[b, ((c*4+dt)*2+dy)*2+dx, j, y, x] = padded[b, c, 4j+dt, 2y+dy, 2x+dx]."""
    vae = PixelVAE(spatial_factor=2)
    x = _video(9, 4, 6, batch=1)
    z = vae.encode(x)
    padded = torch.cat([x[:, :, :1]] * 3 + [x], dim=2)  # frame 0 repeated in front
    for c in range(3):
        for dt in range(4):
            for dy in range(2):
                for dx in range(2):
                    channel = ((c * 4 + dt) * 2 + dy) * 2 + dx
                    for j in range(3):
                        expected = padded[0, c, 4 * j + dt, dy::2, dx::2]
                        assert torch.equal(z[0, channel, j], expected)
    assert vae.latent_channels == 48 and vae.scaling_factor == 1.0


def test_pixel_vae_is_causal():
    vae = PixelVAE(spatial_factor=2)
    x = _video(17, 8, 8)
    z = vae.encode(x)
    for j in range(4):
        changed = x.clone()
        changed[:, :, 4 * j + 1:] = -changed[:, :, 4 * j + 1:]
        z2 = vae.encode(changed)
        assert torch.equal(z2[:, :, : j + 1], z[:, :, : j + 1])
        assert not torch.equal(z2[:, :, j + 1], z[:, :, j + 1])
    # latent frame 0 depends on frame 0 only
    assert torch.equal(vae.encode(x[:, :, :1]), z[:, :, :1])


@pytest.mark.parametrize("bad, message", [
    ((2, 3, 4, 8, 8), "4k\\+1"),
    ((2, 3, 5, 7, 8), "multiples of the spatial factor 2"),
    ((2, 4, 5, 8, 8), "3 channels"),
    ((3, 5, 8, 8), "\\(B, 3, F, H, W\\)"),
])
def test_pixel_vae_rejects_bad_video(bad, message):
    with pytest.raises(ValueError, match=message):
        PixelVAE(spatial_factor=2).encode(torch.zeros(bad))


def test_pixel_vae_rejects_bad_latent_and_integer_video():
    vae = PixelVAE(spatial_factor=2)
    with pytest.raises(ValueError, match="48 channels"):
        vae.decode(torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match="float"):
        vae.encode(torch.zeros(1, 3, 5, 8, 8, dtype=torch.uint8))


def test_build_vae_pixel_and_bad_specs():
    vae = build_vae({"type": "pixel", "spatial_factor": 4})
    assert isinstance(vae, PixelVAE) and vae.spatial_factor == 4 and vae.latent_channels == 192
    assert build_vae({"type": "pixel"}).spatial_factor == 2
    with pytest.raises(ValueError, match="unknown VAE type 'nope'"):
        build_vae({"type": "nope"})
    with pytest.raises(ValueError, match="unknown keys \\['spatial'\\]"):
        build_vae({"type": "pixel", "spatial": 2})
    with pytest.raises(ValueError, match="'type'"):
        build_vae({"spatial_factor": 2})


# --- HunyuanVideo VAE: the published structure ---------------------------------------------------------------

def _meta_vae() -> HunyuanVideoVAE:
    with torch.device("meta"):
        return HunyuanVideoVAE()


def test_published_parameter_and_tensor_counts():
    state = _meta_vae().state_dict()
    assert len(state) == 248
    assert sum(t.numel() for t in state.values()) == 246_478_803


def test_published_key_names_and_shapes():
    state = _meta_vae().state_dict()
    expected = {
        "encoder.conv_in.conv.weight": (128, 3, 3, 3, 3),
        "quant_conv.weight": (32, 32, 1, 1, 1),
        "post_quant_conv.weight": (16, 16, 1, 1, 1),
        "encoder.down_blocks.1.resnets.0.conv_shortcut.conv.weight": (256, 128, 1, 1, 1),
        "encoder.down_blocks.2.resnets.0.conv_shortcut.conv.weight": (512, 256, 1, 1, 1),
        "encoder.mid_block.attentions.0.group_norm.weight": (512,),
        "encoder.mid_block.attentions.0.to_q.weight": (512, 512),
        "encoder.mid_block.attentions.0.to_k.bias": (512,),
        "encoder.mid_block.attentions.0.to_v.weight": (512, 512),
        "encoder.mid_block.attentions.0.to_out.0.weight": (512, 512),
        "encoder.conv_norm_out.weight": (512,),
        "encoder.conv_out.conv.weight": (32, 512, 3, 3, 3),
        "decoder.conv_in.conv.weight": (512, 16, 3, 3, 3),
        "decoder.mid_block.attentions.0.to_out.0.bias": (512,),
        "decoder.up_blocks.2.resnets.0.conv_shortcut.conv.weight": (256, 512, 1, 1, 1),
        "decoder.up_blocks.3.resnets.0.conv_shortcut.conv.weight": (128, 256, 1, 1, 1),
        "decoder.conv_norm_out.bias": (128,),
        "decoder.conv_out.conv.weight": (3, 128, 3, 3, 3),
    }
    enc, dec = [128, 256, 512, 512], [512, 512, 256, 128]
    for i in range(4):
        for r in range(2):
            cin = enc[max(i - 1, 0)] if r == 0 else enc[i]
            p = f"encoder.down_blocks.{i}.resnets.{r}"
            expected.update({f"{p}.norm1.weight": (cin,), f"{p}.conv1.conv.weight": (enc[i], cin, 3, 3, 3),
                             f"{p}.norm2.bias": (enc[i],), f"{p}.conv2.conv.weight": (enc[i], enc[i], 3, 3, 3)})
        for r in range(3):
            cin = dec[max(i - 1, 0)] if r == 0 else dec[i]
            p = f"decoder.up_blocks.{i}.resnets.{r}"
            expected.update({f"{p}.norm1.weight": (cin,), f"{p}.conv1.conv.weight": (dec[i], cin, 3, 3, 3),
                             f"{p}.norm2.weight": (dec[i],), f"{p}.conv2.conv.bias": (dec[i],)})
    for i in range(3):
        expected[f"encoder.down_blocks.{i}.downsamplers.0.conv.conv.weight"] = (enc[i], enc[i], 3, 3, 3)
        expected[f"decoder.up_blocks.{i}.upsamplers.0.conv.conv.weight"] = (dec[i], dec[i], 3, 3, 3)
    for key, shape in expected.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    absent = ["encoder.down_blocks.3.downsamplers.0.conv.conv.weight",
              "decoder.up_blocks.3.upsamplers.0.conv.conv.weight",
              "encoder.down_blocks.0.resnets.0.conv_shortcut.conv.weight",
              "decoder.up_blocks.0.resnets.0.conv_shortcut.conv.weight",
              "decoder.up_blocks.1.resnets.0.conv_shortcut.conv.weight"]
    assert not set(absent) & set(state)
    vae = _meta_vae()
    assert [vae.encoder.down_blocks[i].downsamplers[0].conv.conv.stride for i in range(3)] == \
        [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert [vae.decoder.up_blocks[i].upsamplers[0].factor for i in range(3)] == [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert (vae.scaling_factor, vae.latent_channels, vae.temporal_factor, vae.spatial_factor) == (0.476986, 16, 4, 8)


def test_config_validation_and_round_trip():
    cfg = HunyuanVAEConfig.tiny()
    assert HunyuanVAEConfig(**cfg.to_dict()) == cfg
    assert HunyuanVAEConfig().strides() == [(1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 1)]
    with pytest.raises(ValueError, match="temporal_compression must be a power of two"):
        HunyuanVAEConfig(temporal_compression=3)
    with pytest.raises(ValueError, match="spatial_compression"):
        HunyuanVAEConfig(spatial_compression=16)  # 4 halvings need 5 blocks
    with pytest.raises(ValueError, match="spatial_compression"):
        HunyuanVAEConfig(spatial_compression=0)
    with pytest.raises(ValueError, match="divisible by norm_groups"):
        HunyuanVAEConfig(block_out_channels=(8, 16, 16, 20), norm_groups=8)


# --- HunyuanVideo VAE: behaviour (tiny random-init, same code paths) ----------------------------------------

def _tiny(seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> HunyuanVideoVAE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = HunyuanVideoVAE(HunyuanVAEConfig.tiny(**config))
        with torch.no_grad():  # non-trivial norm affines so every parameter matters
            for name, p in vae.named_parameters():
                if "norm" in name:
                    p.add_(0.2 * torch.randn_like(p))
    return vae.to(dtype).eval()


def test_mid_block_attention_matches_dense_masked_reference():
    """Frame-by-frame prefix attention == dense attention with HunyuanVideo's mask (0 where key frame <= query
    frame, -inf elsewhere), single head, softmax(q k^T / sqrt(C)), in float64."""
    vae = _tiny(dtype=torch.float64)
    attn = vae.encoder.mid_block.attentions[0]
    x = torch.randn(2, 16, 3, 2, 3, dtype=torch.float64)
    b, c, t, h, w = x.shape
    tokens = torch.nn.functional.group_norm(x, 4, attn.group_norm.weight, attn.group_norm.bias, 1e-6)
    tokens = tokens.permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c)
    q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
    frame = torch.arange(t).repeat_interleave(h * w)
    mask = torch.where(frame[None, :] <= frame[:, None], 0.0, float("-inf")).to(torch.float64)
    probs = torch.softmax(q @ k.transpose(1, 2) / c ** 0.5 + mask, dim=-1)
    out = attn.to_out[0](probs @ v).reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3) + x
    with torch.no_grad():
        assert torch.allclose(attn(x), out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_decode_shape_rule(frames):
    vae = _tiny()
    x = _video(frames, 8, 24)
    with torch.no_grad():
        z = vae.encode(x)
        assert z.shape == (2, 16, 1 + (frames - 1) // 4, 1, 3) == (2, *vae.latent_shape(frames, 8, 24))
        y = vae.decode(z)
    assert y.shape == x.shape and vae.frame_count(z.shape[2]) == frames
    assert z.dtype == y.dtype == torch.float32 and torch.isfinite(y).all()


def test_encoder_and_decoder_are_causal_with_per_frame_norm():
    """Changing frames after 4j leaves latent frames 0..j unchanged; changing latent frames after j leaves
    frames 0..4j unchanged. GroupNorm per frame, so this checks the causal convs, strides, up/downsampling of
    frame 0 and the attention mask. The unchanged part is computed from identical inputs, so it must be
    bit-identical (float32 is used because float64 conv3d is ~10x slower on CPU)."""
    vae = _tiny(per_frame_norm=True)
    x = _video(13, 8, 16, batch=1)
    with torch.no_grad():
        z = vae.encode(x)
        video = vae.decode(z)
        for j in range(3):
            changed = x.clone()
            changed[:, :, 4 * j + 1:] = _video(12 - 4 * j, 8, 16, batch=1, seed=j + 7)
            z2 = vae.encode(changed)
            assert torch.equal(z2[:, :, : j + 1], z[:, :, : j + 1])
            assert (z2[:, :, j + 1] - z[:, :, j + 1]).abs().max() > 1e-3
            latent = z.clone()
            latent[:, :, j + 1:] = torch.randn_like(latent[:, :, j + 1:])
            video2 = vae.decode(latent)
            assert torch.equal(video2[:, :, : 4 * j + 1], video[:, :, : 4 * j + 1])
            assert (video2[:, :, 4 * j + 1] - video[:, :, 4 * j + 1]).abs().max() > 1e-3


def test_published_norm_couples_frames_only_through_statistics():
    """The published GroupNorm spans the clip, so later frames reach latent frame 0 (a deviation from strict
    causality that the released weights were trained with); per-frame statistics remove it."""
    x = _video(9, 16, 16, batch=1)
    changed = x.clone()
    changed[:, :, 5:] = -changed[:, :, 5:]
    with torch.no_grad():
        clip = _tiny()
        assert (clip.encode(changed)[:, :, 0] - clip.encode(x)[:, :, 0]).abs().max() > 1e-4
        per_frame = _tiny(per_frame_norm=True)
        assert torch.equal(per_frame.encode(changed)[:, :, :2], per_frame.encode(x)[:, :, :2])


def test_encode_mean_and_sample_use_the_published_scaling():
    vae = _tiny()
    x = _video(5, 8, 16, batch=1)
    with torch.no_grad():
        mean, logvar = vae.moments(x).chunk(2, dim=1)
        assert torch.allclose(vae.encode(x), mean * 0.476986, rtol=1e-6, atol=1e-7)
        sampled = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(sampled, (mean + torch.exp(0.5 * logvar) * noise) * 0.476986, atol=1e-6)
        assert not torch.allclose(sampled, vae.encode(x), atol=1e-3)
        z = torch.randn(1, 16, 2, 2, 2)
        assert torch.allclose(vae.decode(z), vae.decoder(vae.post_quant_conv(z / 0.476986)), atol=1e-6)


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 8, 16, 16), "4k\\+1"),
    ((1, 3, 5, 20, 16), "multiples of the spatial factor 8"),
    ((1, 4, 5, 16, 16), "3 channels"),
])
def test_hunyuan_rejects_bad_video(shape, message):
    with pytest.raises(ValueError, match=message):
        _tiny().encode(torch.zeros(shape))


def test_hunyuan_rejects_bad_latent():
    with pytest.raises(ValueError, match="16 channels"):
        _tiny().decode(torch.zeros(1, 15, 2, 2, 2))


# --- loading -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, wrap", [
    ("flat.pt", lambda sd: sd),
    ("wrapped.pt", lambda sd: {"state_dict": sd}),
    ("prefixed.pth", lambda sd: {f"vae.{k}": v for k, v in sd.items()}),
    ("wrapped_prefixed.pt", lambda sd: {"state_dict": {f"vae.{k}": v for k, v in sd.items()}, "epoch": 3}),
    ("flat.safetensors", lambda sd: sd),
    ("prefixed.safetensors", lambda sd: {f"vae.{k}": v for k, v in sd.items()}),
])
def test_load_vae_accepts_every_wrapper(tmp_path: Path, name, wrap):
    source = _tiny(seed=5)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(wrap(state), str(path))
    else:
        torch.save(wrap(state), path)
    vae = load_vae(path, config=HunyuanVAEConfig.tiny())
    assert isinstance(vae, HunyuanVideoVAE) and not vae.training
    loaded = vae.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    x = _video(5, 8, 8, batch=1)
    with torch.no_grad():
        assert torch.equal(vae.encode(x), source.encode(x))


def test_load_vae_names_missing_unexpected_and_mismatched_keys(tmp_path: Path):
    state = _tiny().state_dict()
    state.pop("encoder.mid_block.attentions.0.to_q.weight")
    state["encoder.extra.weight"] = torch.zeros(1)
    state["decoder.conv_out.conv.bias"] = torch.zeros(4)
    torch.save(state, tmp_path / "vae.pt")
    with pytest.raises(ValueError) as err:
        load_vae(tmp_path / "vae.pt", config=HunyuanVAEConfig.tiny())
    text = str(err.value)
    assert "missing keys ['encoder.mid_block.attentions.0.to_q.weight']" in text
    assert "unexpected keys ['encoder.extra.weight']" in text
    assert "shape mismatches (file vs model) ['decoder.conv_out.conv.bias: (4,) vs (3,)']" in text
    # the tiny weights are not the published 884-16c VAE
    torch.save(_tiny().state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="shape mismatches"):
        load_vae(tmp_path / "tiny.pt")


def test_load_vae_rejects_files_that_are_not_state_dicts(tmp_path: Path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state dict of tensors"):
        load_vae(tmp_path / "list.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read VAE weights"):
        load_vae(tmp_path / "garbage.pt")


def test_missing_vae_file_says_where_it_comes_from(tmp_path: Path):
    missing = tmp_path / "models" / "vae.pt"
    with pytest.raises(FileNotFoundError) as err:
        load_vae(missing)
    assert str(missing) in str(err.value)
    assert "tencent/HunyuanVideo" in str(err.value) and "pytorch_model.pt" in str(err.value)
    with pytest.raises(FileNotFoundError, match="tencent/HunyuanVideo"):
        build_vae({"type": "hunyuan", "path": str(missing)})


def test_build_vae_hunyuan_specs(tmp_path: Path):
    torch.save({"state_dict": _tiny(seed=2).state_dict()}, tmp_path / "vae.pt")
    spec = {"type": "hunyuan", "path": str(tmp_path / "vae.pt"), "dtype": "bfloat16", "tiling": {"overlap": 0.5},
            "config": {"block_out_channels": [8, 16, 16, 16], "norm_groups": 4}}
    vae = build_vae(spec)
    assert next(vae.parameters()).dtype == torch.bfloat16
    assert vae.tiling == TilingConfig(256, 32, 16, 0.5)
    with torch.no_grad():
        z = vae.encode(_video(5, 16, 16, batch=1))
    assert z.dtype == torch.float32 and z.shape == (1, 16, 2, 2, 2)  # computed in bf16, returned like the input
    with pytest.raises(ValueError, match="needs 'path'"):
        build_vae({"type": "hunyuan"})
    # hunyuan-tiny: seeded, reproducible, and it leaves the global RNG alone
    torch.manual_seed(123)
    a = build_vae({"type": "hunyuan-tiny", "seed": 1, "tiling": True})
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)  # build_vae drew nothing from the global RNG
    b = build_vae({"type": "hunyuan-tiny", "seed": 1})
    assert a.tiling is not None and b.tiling is None
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_vae({"type": "hunyuan-tiny", "seed": 2})
    assert not torch.equal(a.encoder.conv_in.conv.weight, c.encoder.conv_in.conv.weight)


# --- tiling --------------------------------------------------------------------------------------------------

def test_tile_spans_and_blend_weights():
    assert tile_spans(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert tile_spans(5, 4, 2) == [(0, 4), (1, 5)]
    assert tile_spans(9, 4, 0) == [(0, 4), (4, 8), (5, 9)]  # the last tile ends at the border
    assert tile_spans(3, 4, 1) == [(0, 3)]
    with pytest.raises(ValueError, match="overlap"):
        tile_spans(10, 4, 4)
    spans = [(0, 4), (2, 6)]
    assert torch.allclose(blend_weights(spans, 0), torch.tensor([1, 1, 2 / 3, 1 / 3], dtype=torch.float64))
    assert torch.allclose(blend_weights(spans, 1), torch.tensor([1 / 3, 2 / 3, 1, 1], dtype=torch.float64))
    spans = tile_spans(10, 4, 2)
    total = torch.zeros(10, dtype=torch.float64)
    for k, (a, b) in enumerate(spans):
        assert (blend_weights(spans, k) > 0).all()
        total[a:b] += blend_weights(spans, k)
    assert torch.allclose(total, torch.ones(10, dtype=torch.float64))  # pairwise ramps partition unity


class _CountingCalls:
    """Wraps a function and records the shapes it was called with (to see that tiling happened)."""

    def __init__(self, fn):
        self.fn, self.shapes = fn, []

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        return self.fn(x)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_tiling_reproduces_a_local_causal_vae_exactly(overlap):
    """PixelVAE is local in space and causal in time with frame 0 alone, so any mistake in tile placement,
    causal context frames or blend normalisation shows; correct tiling reproduces it up to rounding."""
    vae = PixelVAE(spatial_factor=2)
    tiling = TilingConfig(tile_sample_min_size=8, tile_latent_min_size=4, tile_latent_min_frames=3,
                          overlap=overlap, progress=False)
    x = _video(25, 20, 28, batch=1)  # latent (7, 10, 14): several tiles on every axis
    z = vae.encode(x)
    encode = _CountingCalls(vae.encode)
    assert torch.allclose(tiled_encode(encode, x, tiling, 4, 2), z, rtol=0, atol=1e-6)
    assert len(encode.shapes) >= 3 * 3 * 4 and max(s[3] for s in encode.shapes) == 8
    decode = _CountingCalls(vae.decode)
    assert torch.allclose(tiled_decode(decode, z, tiling, 4, 2), x, rtol=0, atol=1e-6)
    assert len(decode.shapes) >= 3 * 3 * 4 and max(s[2] for s in decode.shapes) <= 4


def _ramp_down(n: int) -> torch.Tensor:
    """Weights of the earlier of two tiles sharing n positions: n/(n+1), ..., 1/(n+1)."""
    return torch.arange(n, 0, -1, dtype=torch.float32) / (n + 1)


def test_hunyuan_tiling_blends_the_published_tile_layout():
    """Tiled encode/decode == a hand-assembled blend of the network run on each tile.

    Layout (latent 3 frames x 3 rows x 2 cols, 2-latent-pixel tiles, half overlap, 2-latent-frame chunks):
    rows [0, 2) and [1, 3); chunk A = latent frames 0-1 from frames 0-4, chunk B = latent frames 1-2 from
    frames 0-8 with latent frame 0 (the causal context) dropped. Tiles see only their own GroupNorm statistics
    and attention context, so tiling is approximate; its accuracy guarantee is that every output lies between
    the tile outputs covering it (checked against the untiled result below). With random weights and 2x2
    latent tiles those differ from the untiled output by tens of percent; trained weights with 32x32 latent
    tiles are far more local.
    """
    vae = _tiny()
    sf = vae.scaling_factor
    x = _video(9, 24, 16, batch=1)
    with torch.no_grad():
        untiled_moments = vae.moments(x)
        z = vae.encode(x)
        y = vae.decode(z)
        vae.enable_tiling(16, overlap=0.5, tile_latent_min_frames=2, progress=False)
        calls = []
        hook = vae.encoder.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
        z_tiled = vae.encode(x)
        hook.remove()
        assert calls == [(1, 3, 5, 16, 16)] * 2 + [(1, 3, 9, 16, 16)] * 2

        # encode reference: weights per axis written out by hand
        wt = {"A": torch.tensor([1, 0.5]), "B": torch.tensor([0.5, 1])}
        wh = {0: torch.tensor([1, 0.5]), 1: torch.tensor([0.5, 1])}
        chunks = {"A": (slice(0, 5), 0, slice(0, 2)), "B": (slice(0, 9), 1, slice(1, 3))}
        rows = {0: (slice(0, 16), slice(0, 2)), 1: (slice(8, 24), slice(1, 3))}
        expected = torch.zeros_like(untiled_moments)
        pieces = []
        for c, (frames, drop, t_out) in chunks.items():
            for r, (pix, h_out) in rows.items():
                piece = vae.moments(x[:, :, frames, pix])[:, :, drop:]
                expected[:, :, t_out, h_out] += piece * wt[c][:, None, None] * wh[r][None, :, None]
                full = torch.full_like(untiled_moments, float("nan"))
                full[:, :, t_out, h_out] = piece
                pieces.append(full)
        assert torch.allclose(z_tiled, expected[:, :16] * sf, rtol=0, atol=1e-5)
        stack = torch.stack(pieces)
        low = torch.where(stack.isnan(), float("inf"), stack).amin(0)[:, :16] * sf
        high = torch.where(stack.isnan(), float("-inf"), stack).amax(0)[:, :16] * sf
        assert ((z_tiled >= low - 1e-5) & (z_tiled <= high + 1e-5)).all()
        assert (z_tiled - z).abs().max() <= torch.maximum((low - z).abs(), (high - z).abs()).max() + 1e-5

        # decode reference: chunk A -> frames 0-4, chunk B -> frames 1-8 (its first output frame dropped);
        # rows of latent tiles [0, 2) and [1, 3) -> pixel rows [0, 16) and [8, 24)
        y_tiled = vae.decode(z)
        unscaled = z / sf
        wt = {"A": torch.cat([torch.ones(1), _ramp_down(4)]), "B": torch.cat([_ramp_down(4).flip(0), torch.ones(4)])}
        wh = {0: torch.cat([torch.ones(8), _ramp_down(8)]), 1: torch.cat([_ramp_down(8).flip(0), torch.ones(8)])}
        chunks = {"A": (slice(0, 2), 0, slice(0, 5)), "B": (slice(0, 3), 1, slice(1, 9))}
        rows = {0: (slice(0, 2), slice(0, 16)), 1: (slice(1, 3), slice(8, 24))}
        expected = torch.zeros_like(y)
        for c, (latents, drop, t_out) in chunks.items():
            for r, (lat_rows, h_out) in rows.items():
                piece = vae.reconstruct(unscaled[:, :, latents, lat_rows])[:, :, drop:]
                expected[:, :, t_out, h_out] += piece * wt[c][:, None, None] * wh[r][None, :, None]
        assert torch.allclose(y_tiled, expected, rtol=0, atol=1e-5)
        assert y_tiled.shape == y.shape

        # inputs no larger than one tile are not cut: exactly the untiled result, one encoder call
        small = _video(5, 16, 16, batch=1)
        calls.clear()
        hook = vae.encoder.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
        tiled_small = vae.encode(small)
        hook.remove()
        vae.disable_tiling()
        assert calls == [(1, 3, 5, 16, 16)] and torch.equal(tiled_small, vae.encode(small))


def test_enable_tiling_rejects_bad_settings():
    vae = _tiny()
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.enable_tiling(100)
    with pytest.raises(ValueError, match="overlap"):
        vae.enable_tiling(64, overlap=1.0)
    vae.enable_tiling(64)
    assert vae.tiling == TilingConfig(64, 8, 16, 0.25)
