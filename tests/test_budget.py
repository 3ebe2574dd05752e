"""Parameters, tokens, FLOPs and memory budget, each against an independent count."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ddm.models import budget
from ddm.models.mmdit import MMDiT
from ddm.models.presets import EXPERT_PRESETS, get_expert_config
from tests.fixtures.models import build_seeded_expert, make_expert_inputs

pytestmark = pytest.mark.usefixtures("torch_single_thread")

P11B = 11_891_390_528


def _meta(cfg) -> MMDiT:
    with torch.device("meta"):
        return MMDiT(cfg)


@pytest.mark.parametrize("cfg", [*EXPERT_PRESETS.values(),
                                 get_expert_config("tiny", qkv_bias=False, layout="flux"),
                                 get_expert_config("tiny", patch_size=(2, 2, 2), mlp_ratio=3.0, depth=3),
                                 get_expert_config("flux-dev", cond_embed=True, guidance_embed=False)],
                         ids=lambda c: c.preset)
def test_count_parameters_matches_a_meta_build(cfg):
    assert budget.count_parameters(cfg) == sum(p.numel() for p in _meta(cfg).parameters())


def test_tokens_per_sample_matches_design():
    cfg = get_expert_config("opensora-v2-11b")
    assert budget.tokens_per_sample(cfg, 256, 256, 129) == {
        "image_tokens": 8448, "text_tokens": 512, "tokens_per_frame": 256, "latent_frames": 33}
    assert budget.tokens_per_sample(cfg, 768, 768, 129)["image_tokens"] == 76_032
    assert budget.tokens_per_sample(cfg, 768, 768, 129)["tokens_per_frame"] == 2304
    tiny = budget.tokens_per_sample(get_expert_config("tiny-pixel"), 32, 48, 9, text_tokens=8, spatial_factor=2)
    assert tiny == {"image_tokens": 3 * 8 * 12, "text_tokens": 8, "tokens_per_frame": 96, "latent_frames": 3}
    with pytest.raises(ValueError, match="4k\\+1"):
        budget.tokens_per_sample(cfg, 256, 256, 128)
    with pytest.raises(ValueError, match="width 260"):
        budget.tokens_per_sample(cfg, 256, 260, 129)


def _tokens_seen(name: str, n_img: int, n_txt: int) -> int:
    """How many rows each Linear of the expert multiplies, decided from its name (second implementation)."""
    if name.endswith(("_mod.lin", "modulation.lin", "adaLN_modulation.1")) or name.startswith(
            ("time_in", "vector_in", "guidance_in")):
        return 1  # the per-sample vector path: embedders and modulations
    if name.startswith(("img_in", "cond_in", "final_layer.linear")) or ".img_" in name:
        return n_img
    if name.startswith("txt_in") or ".txt_" in name:
        return n_txt
    assert name.startswith("single_blocks"), name
    return n_img + n_txt


@pytest.mark.parametrize("name", ["opensora-v2-11b", "flux-dev", "tiny"])
def test_linear_flops_equal_a_per_module_count(name):
    cfg = get_expert_config(name)
    model = _meta(cfg)
    n_img, n_txt = 8448, 512
    per_module = sum(2 * m.weight.numel() * _tokens_seen(n, n_img, n_txt)
                     for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    flops = budget.forward_flops(cfg, n_img, n_txt)
    assert flops["linear"] == per_module
    assert flops["attention"] == (cfg.depth + cfg.depth_single_blocks) * 4 * (n_img + n_txt) ** 2 * cfg.hidden_size


@pytest.mark.parametrize("name", ["tiny", "tiny-flux"])
def test_training_flops_match_torch_flop_counter(name):
    """FlopCounterMode over a real forward + backward.

    The math SDPA backend is used because the counter has no formula for the CPU fused attention kernel
    (it would count attention as 0). The counter then sees exactly our 3× forward minus one term:
    autograd computes no input gradient for the first Linear on each input (img_in, cond_in, txt_in,
    time_in/guidance_in/vector_in.in_layer), since the inputs do not require grad.
    """
    cfg = get_expert_config(name)
    model = build_seeded_expert(cfg)
    batch, frames, size, text_len = 2, 17, 32, 12  # pixels: 17 frames at 32² → latent (5, 16, 16)
    x, t, cond = make_expert_inputs(cfg, batch=batch, latent_frames=5, height=16, width=16, text_len=text_len,
                                    i2v=cfg.cond_embed)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(x, t, cond).square().mean().backward()
    measured = counter.get_total_flops()
    predicted = batch * budget.training_flops_per_sample(cfg, size, size, frames, text_tokens=text_len,
                                                         spatial_factor=2)
    n_img = 5 * 8 * 8
    h = cfg.hidden_size
    first_layer_macs = n_img * cfg.in_channels * h + text_len * cfg.context_in_dim * h + 256 * h + cfg.vec_in_dim * h
    first_layer_macs += n_img * cfg.cond_features * h if cfg.cond_embed else 0
    first_layer_macs += 256 * h if cfg.guidance_embed else 0
    assert measured == predicted - batch * 2 * first_layer_macs
    assert measured == pytest.approx(predicted, rel=0.01)


def test_memory_per_gpu_accounting():
    ddp = budget.memory_per_gpu(P11B, "ddp", 8)
    assert ddp == {"weights_bf16": 2 * P11B, "grads_bf16": 2 * P11B, "master_fp32": 4 * P11B,
                   "adam_moments_fp32": 8 * P11B, "total": 16 * P11B}
    for n in (8, 64):
        zero2 = budget.memory_per_gpu(P11B, "zero2", n)
        assert zero2["weights_bf16"] == 2 * P11B
        assert zero2["total"] == pytest.approx(2 * P11B + 14 * P11B / n, abs=4)
        zero3 = budget.memory_per_gpu(P11B, "zero3", n)
        assert zero3 == budget.memory_per_gpu(P11B, "fsdp", n)
        assert zero3["total"] == pytest.approx(16 * P11B / n, abs=4)
    assert budget.memory_per_gpu(P11B, "zero3", 8)["total"] / 2**30 == pytest.approx(22.15, abs=0.01)
    with pytest.raises(ValueError, match="strategy"):
        budget.memory_per_gpu(P11B, "zero1", 8)
    with pytest.raises(ValueError, match="world_size"):
        budget.memory_per_gpu(P11B, "ddp", 0)
