"""Print how far diffusers' classes are from ours on the tiny configs (fp32, CPU); the tests assert the bounds.

    PYTHONPATH=. python tests/benchmarks/interop_parity.py      (needs the [interop] extra)
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import diffusers
import torch

from ddm.flow import euler_schedule
from ddm.interop import (flux_inputs, flux_output, save_expert_diffusers, save_scheduler, save_vae_diffusers,
                         scheduler_sigmas)
from ddm.models.text import make_tiny_text_encoders
from ddm.models.vae import build_vae
from tests.fixtures.paris1 import demo_expert
from tests.test_interop_diffusers import _inputs, _rel


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    make_tiny_text_encoders(tmp / "text", seed=0)
    for preset in ("tiny", "tiny-flux"):
        model = demo_expert(tmp / "text", 3, preset)
        save_expert_diffusers(model.state_dict(), model.config, tmp / preset)
        theirs = diffusers.FluxTransformer2DModel.from_pretrained(tmp / preset).eval()
        x, t, cond = _inputs(model)
        with torch.no_grad():
            rel = _rel(flux_output(theirs(**flux_inputs(x, t, cond))[0], x), model(x, t, cond))
        print(f"expert {preset} ({model.config.layout} layout): velocity relative L2 {rel:.2e}")
    vae = build_vae({"type": "hunyuan-tiny", "seed": 0})
    save_vae_diffusers(vae, tmp / "vae")
    theirs = diffusers.AutoencoderKLHunyuanVideo.from_pretrained(tmp / "vae").eval()
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(video)
        enc = _rel(theirs.encode(video).latent_dist.mode() * theirs.config.scaling_factor, z)
        dec = _rel(theirs.decode(z / theirs.config.scaling_factor).sample, vae.decode(z))
    print(f"VAE: encode relative L2 {enc:.2e}, decode {dec:.2e}")
    save_scheduler(tmp / "scheduler", 2.3, 50)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tmp / "scheduler")
    scheduler.set_timesteps(sigmas=scheduler_sigmas(50))
    err = float((scheduler.sigmas.float() - euler_schedule(50, 2.3)).abs().max())
    print(f"scheduler (50 steps, shift 2.3): sigmas max abs difference {err:.2e}")


if __name__ == "__main__":
    main()
