"""Parity with the diffusers classes (optional ``[interop]`` extra: ``pip install -e .[dev,interop]``).

Tolerances (fp32, CPU): expert velocity ≤ 1e-5 relative (L2) to ours; VAE decode/encode ≤ 1e-5 relative;
scheduler sigmas ≤ 1e-6 absolute, an Euler step ≤ 1e-6 relative.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e .[interop] "
                                                    "(the README's test command installs it)")

from ddm.sampling_spec import Routing, SamplingSpec
from ddm.flow import euler_schedule, euler_step  # noqa: E402
from ddm.interop import flux_inputs, flux_output, save_expert_diffusers, scheduler_sigmas  # noqa: E402
from ddm.interop_export import export_diffusers  # noqa: E402
from ddm.pipeline import DDMPipeline  # noqa: E402
from tests.fixtures.paris1 import build_demo_folder, demo_expert  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _inputs(model, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.latent_channels, 2, 4, 6, generator=gen)
    cond = {"t5": torch.randn(batch, 7, cfg.context_in_dim, generator=gen),
            "clip": torch.randn(batch, cfg.vec_in_dim, generator=gen)}
    if cfg.guidance_embed:
        cond["guidance"] = torch.full((batch,), 3.5)
    return x, torch.tensor([0.3, 0.8][:batch]), cond


@pytest.mark.parametrize("preset", ["tiny", "tiny-flux"])  # Open-Sora layout with cond_in; Flux layout + guidance
def test_expert_equals_flux_transformer_2d_model(tiny_text_dir, tmp_path, preset):
    model = demo_expert(tiny_text_dir, seed=3, preset=preset)
    save_expert_diffusers(model.state_dict(), model.config, tmp_path / "expert1" / "stage2")
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path, subfolder="expert1/stage2").eval()
    x, t, cond = _inputs(model)
    with torch.no_grad():
        ours = model(x, t, cond)
        (tokens,) = theirs(**flux_inputs(x, t, cond, model.config.patch_size))
    assert _rel(flux_output(tokens, x, model.config.patch_size), ours) <= 1e-5


def test_i2v_recipe_with_the_cond_in_side_file(tiny_text_dir, tmp_path):
    """docs/model_folder.md's i2v recipe: cond tokens @ cond_in.weight.T added after x_embedder."""
    from safetensors.torch import load_file

    from ddm.interop import COND_IN_FILE
    from ddm.models.mmdit import patchify

    model = demo_expert(tiny_text_dir, seed=5)
    save_expert_diffusers(model.state_dict(), model.config, tmp_path / "e")
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "e").eval()
    weight = load_file(str(tmp_path / "e" / COND_IN_FILE))["cond_in.weight"]
    x, t, cond = _inputs(model)
    i2v = torch.randn(x.shape[0], x.shape[1] + 1, *x.shape[2:], generator=torch.Generator().manual_seed(9))
    extra = patchify(i2v, model.config.patch_size) @ weight.T
    hook = theirs.x_embedder.register_forward_hook(lambda module, args, out: out + extra)
    try:
        with torch.no_grad():
            (tokens,) = theirs(**flux_inputs(x, t, cond))
            assert _rel(flux_output(tokens, x), model(x, t, {**cond, "i2v": i2v})) <= 1e-5
    finally:
        hook.remove()


def test_diffusers_loads_a_sharded_expert_folder(tiny_text_dir, tmp_path):
    model = demo_expert(tiny_text_dir, seed=4)
    save_expert_diffusers(model.state_dict(), model.config, tmp_path / "e", max_shard_bytes=400_000)
    assert len(list((tmp_path / "e").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "e").eval()
    x, t, cond = _inputs(model)
    with torch.no_grad():
        (tokens,) = theirs(**flux_inputs(x, t, cond))
        assert _rel(flux_output(tokens, x), model(x, t, cond)) <= 1e-5


def test_vae_equals_autoencoder_kl_hunyuan_video(tmp_path):
    from ddm.interop import save_vae_diffusers
    from ddm.models.vae import build_vae

    ours = build_vae({"type": "hunyuan-tiny", "seed": 0})
    save_vae_diffusers(ours, tmp_path / "vae")
    theirs = diffusers.AutoencoderKLHunyuanVideo.from_pretrained(tmp_path, subfolder="vae").eval()
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 5, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        latent = ours.encode(video)
        their_latent = theirs.encode(video).latent_dist.mode() * theirs.config.scaling_factor
        assert _rel(their_latent, latent) <= 1e-5
        decoded = ours.decode(latent)
        their_decoded = theirs.decode(latent / theirs.config.scaling_factor).sample
    assert their_decoded.shape == decoded.shape and _rel(their_decoded, decoded) <= 1e-5


def test_scheduler_reproduces_our_euler_schedule(tmp_path):
    from ddm.interop import save_scheduler

    alpha, steps = 2.3, 7
    save_scheduler(tmp_path / "scheduler", alpha, steps)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    scheduler.set_timesteps(sigmas=scheduler_sigmas(steps))
    ours = euler_schedule(steps, alpha)
    torch.testing.assert_close(scheduler.sigmas.float(), ours, rtol=0, atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 3, generator=gen), torch.randn(2, 4, 3, generator=gen)
    for i, t in enumerate(scheduler.timesteps[:3]):
        theirs = scheduler.step(v, t, x, return_dict=False)[0]
        assert _rel(theirs, euler_step(x, v, ours[i], ours[i + 1])) <= 1e-6
        x = theirs


def test_demo_ddm_exported_to_diffusers_runs_in_diffusers_and_reimports(tiny_text_dir, tmp_path):
    """Acceptance (issue 15): export → each expert in diffusers gives our velocity, diffusers' VAE decodes our
    latents, the scheduler is ours, and the re-imported folder samples bit-identically."""
    folder = build_demo_folder(tmp_path / "model", tiny_text_dir)
    out = export_diffusers(folder, tmp_path / "diffusers")
    pipe = DDMPipeline.from_pretrained(folder)
    x, t = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0.3, 0.8])
    cond = pipe.encode_prompts(["a red car", "a cat"])
    for k, expert in enumerate(pipe.experts, start=1):
        theirs = diffusers.FluxTransformer2DModel.from_pretrained(out, subfolder=f"expert{k}/stage2").eval()
        with torch.no_grad():
            (tokens,) = theirs(**flux_inputs(x, t, cond))
            assert _rel(flux_output(tokens, x), expert(x, t, cond)) <= 1e-5
    result = pipe.generate(["a red car"], SamplingSpec(Routing("topk", k=2), num_steps=3), seeds=[5], progress=False)
    vae = diffusers.AutoencoderKLHunyuanVideo.from_pretrained(out, subfolder="vae").eval()
    with torch.no_grad():
        pixels = vae.decode(result.latents / vae.config.scaling_factor).sample.clamp(-1, 1)
        ours = pipe.vae.decode(result.latents).clamp(-1, 1)
    assert _rel(pixels, ours) <= 1e-5
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    scheduler.set_timesteps(sigmas=scheduler_sigmas(3))
    alpha = pipe.shift_alpha(result.latents.shape[1:])
    torch.testing.assert_close(scheduler.sigmas.float(), euler_schedule(3, alpha), rtol=0, atol=1e-6)
    again = DDMPipeline.from_pretrained(out).generate(["a red car"], SamplingSpec(Routing("topk", k=2), num_steps=3), seeds=[5], progress=False)
    assert torch.equal(again.latents, result.latents)


def test_docs_snippet_runs(tiny_text_dir, tmp_path):
    """The diffusers recipe in docs/model_folder.md, executed as written (paths substituted)."""
    folder = build_demo_folder(tmp_path / "model", tiny_text_dir)
    export_diffusers(folder, tmp_path / "paris_diffusers")
    text = Path(__file__).resolve().parents[1].joinpath("docs", "model_folder.md").read_text()
    snippet = text.split("<!-- diffusers-snippet -->")[1].split("```python")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(snippet.replace('"paris_diffusers"', repr(str(tmp_path / "paris_diffusers"))), "snippet", "exec"),
         namespace)
    assert namespace["video"].shape == (1, 3, 5, 32, 32) and torch.isfinite(namespace["video"]).all()


@pytest.mark.parametrize("preset", ["opensora-v2-11b", "flux-dev"])
def test_real_scale_experts_map_onto_flux_transformer_2d_model(preset):
    """At 11B the exported names and shapes are exactly FluxTransformer2DModel's (built on the meta device)."""
    from ddm.interop import flux_config
    from ddm.models.layouts import to_diffusers
    from ddm.models.mmdit import MMDiT
    from ddm.models.presets import get_expert_config

    cfg = get_expert_config(preset)
    with torch.device("meta"):
        ours = MMDiT(cfg)
        theirs = diffusers.FluxTransformer2DModel(**{k: v for k, v in flux_config(cfg).items() if k[0] != "_"})
    exported = to_diffusers({k: v for k, v in ours.state_dict().items() if not k.startswith("cond_in.")}, cfg.layout)
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_published_vae_maps_onto_autoencoder_kl_hunyuan_video():
    """The published 884-16c VAE's names and shapes are AutoencoderKLHunyuanVideo's, config from vae_config."""
    from ddm.interop import vae_config
    from ddm.models.hunyuan_vae import HunyuanVAEConfig
    from ddm.models.vae import HunyuanVideoVAE

    with torch.device("meta"):
        ours = HunyuanVideoVAE(HunyuanVAEConfig())
        theirs = diffusers.AutoencoderKLHunyuanVideo(**{k: v for k, v in vae_config(ours.config).items()
                                                        if k[0] != "_"})
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
