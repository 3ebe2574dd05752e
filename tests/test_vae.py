"""Tests for ddm.models.vae: the PixelVAE stand-in, build_vae, the HunyuanVideo VAE, its tiling and loader."""
from __future__ import annotations

import pytest
import torch

from ddm.models.vae import PixelVAE, build_vae


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
