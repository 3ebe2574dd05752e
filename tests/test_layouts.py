"""Flux ↔ Open-Sora ↔ diffusers layouts: conversions preserve the function, loading fails loudly."""
from __future__ import annotations

import pytest
import torch

from ddm.models.layouts import convert_state_dict, detect_layout, from_diffusers, load_expert_state_dict
from ddm.models.mmdit import MMDiT
from ddm.models.presets import get_expert_config
from tests.fixtures.models import build_seeded_expert, make_expert_inputs

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _perturbed(cfg_name: str, **overrides) -> MMDiT:
    """A seeded expert with every parameter (cond_in and norm scales included) moved off its init."""
    model = build_seeded_expert(get_expert_config(cfg_name, **overrides), seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _outputs(model: MMDiT, cfg_name: str) -> torch.Tensor:
    x, t, cond = make_expert_inputs(get_expert_config(cfg_name), height=6, width=8, text_len=5,
                                    i2v=model.config.cond_embed)
    with torch.no_grad():
        return model(x, t, cond)


@pytest.mark.parametrize("name, src, dst", [("tiny", "opensora", "flux"), ("tiny-flux", "flux", "opensora")])
def test_conversion_preserves_outputs_and_round_trips(name, src, dst):
    model = _perturbed(name)
    sd = model.state_dict()
    assert detect_layout(sd) == src
    converted = convert_state_dict(sd, src=src, dst=dst)
    assert detect_layout(converted) == dst
    other = MMDiT(get_expert_config(name, layout=dst))
    load_expert_state_dict(other, converted)
    ref, out = _outputs(model, name), _outputs(other, name)
    assert ref.abs().max() > 0.1
    assert (out - ref).abs().max() <= 1e-5
    back = convert_state_dict(converted, src=dst, dst=src)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())  # input untouched


def test_fusing_without_the_rope_permutation_changes_outputs():
    """The equality above is not vacuous: a plain fuse (no per-head permutation) breaks the model."""
    model = _perturbed("tiny")
    sd = dict(model.state_dict())
    naive = {}
    for key, value in sd.items():
        for proj in ("q_proj", "k_proj", "v_proj"):
            if f"_attn.{proj}." in key:
                break
        else:
            if ".q_proj." not in key and ".k_proj." not in key and ".v_mlp." not in key:
                naive[key] = value
    for i in range(2):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_attn"
            for suf in ("weight", "bias"):
                naive[f"{p}.qkv.{suf}"] = torch.cat([sd[f"{p}.{n}.{suf}"] for n in ("q_proj", "k_proj", "v_proj")])
        p = f"single_blocks.{i}"
        for suf in ("weight", "bias"):
            naive[f"{p}.linear1.{suf}"] = torch.cat([sd[f"{p}.{n}.{suf}"] for n in ("q_proj", "k_proj", "v_mlp")])
    flux = MMDiT(get_expert_config("tiny", layout="flux"))
    load_expert_state_dict(flux, naive)
    assert (_outputs(flux, "tiny") - _outputs(model, "tiny")).abs().max() > 1e-3


def test_11b_conversion_gives_the_other_layouts_keys_and_shapes():
    with torch.device("meta"):
        opensora = MMDiT(get_expert_config("opensora-v2-11b"))
        flux_with_cond = MMDiT(get_expert_config("opensora-v2-11b", layout="flux"))
    converted = convert_state_dict(opensora.state_dict(), src="opensora", dst="flux")
    expected = {k: v.shape for k, v in flux_with_cond.state_dict().items()}
    assert {k: v.shape for k, v in converted.items()} == expected


def _to_diffusers(sd: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """BFL → diffusers FluxTransformer2DModel names, written out independently of the importer."""
    out = {}
    top = {"img_in": "x_embedder", "txt_in": "context_embedder",
           "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
           "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
           "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
           "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
           "final_layer.linear": "proj_out"}
    for suf in ("weight", "bias"):
        for bfl, dif in top.items():
            out[f"{dif}.{suf}"] = sd[f"{bfl}.{suf}"]
        shift, scale = sd[f"final_layer.adaLN_modulation.1.{suf}"].chunk(2)
        out[f"norm_out.linear.{suf}"] = torch.cat([scale, shift])
    for i in range(2):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for suf in ("weight", "bias"):
            out[f"{d}.norm1.linear.{suf}"] = sd[f"{b}.img_mod.lin.{suf}"]
            out[f"{d}.norm1_context.linear.{suf}"] = sd[f"{b}.txt_mod.lin.{suf}"]
            q, k, v = sd[f"{b}.img_attn.qkv.{suf}"].chunk(3)
            out.update({f"{d}.attn.to_q.{suf}": q, f"{d}.attn.to_k.{suf}": k, f"{d}.attn.to_v.{suf}": v})
            q, k, v = sd[f"{b}.txt_attn.qkv.{suf}"].chunk(3)
            out.update({f"{d}.attn.add_q_proj.{suf}": q, f"{d}.attn.add_k_proj.{suf}": k,
                        f"{d}.attn.add_v_proj.{suf}": v})
            out[f"{d}.attn.to_out.0.{suf}"] = sd[f"{b}.img_attn.proj.{suf}"]
            out[f"{d}.attn.to_add_out.{suf}"] = sd[f"{b}.txt_attn.proj.{suf}"]
            out[f"{d}.ff.net.0.proj.{suf}"] = sd[f"{b}.img_mlp.0.{suf}"]
            out[f"{d}.ff.net.2.{suf}"] = sd[f"{b}.img_mlp.2.{suf}"]
            out[f"{d}.ff_context.net.0.proj.{suf}"] = sd[f"{b}.txt_mlp.0.{suf}"]
            out[f"{d}.ff_context.net.2.{suf}"] = sd[f"{b}.txt_mlp.2.{suf}"]
        out[f"{d}.attn.norm_q.weight"] = sd[f"{b}.img_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{b}.img_attn.norm.key_norm.scale"]
        out[f"{d}.attn.norm_added_q.weight"] = sd[f"{b}.txt_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_added_k.weight"] = sd[f"{b}.txt_attn.norm.key_norm.scale"]
    for i in range(2):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for suf in ("weight", "bias"):
            out[f"{d}.norm.linear.{suf}"] = sd[f"{b}.modulation.lin.{suf}"]
            q, k, v, mlp = sd[f"{b}.linear1.{suf}"].split([hidden, hidden, hidden, 4 * hidden])
            out.update({f"{d}.attn.to_q.{suf}": q, f"{d}.attn.to_k.{suf}": k, f"{d}.attn.to_v.{suf}": v,
                        f"{d}.proj_mlp.{suf}": mlp})
            out[f"{d}.proj_out.{suf}"] = sd[f"{b}.linear2.{suf}"]
        out[f"{d}.attn.norm_q.weight"] = sd[f"{b}.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{b}.norm.key_norm.scale"]
    return out


def test_diffusers_import_matches_the_bfl_weights():
    model = _perturbed("tiny-flux")
    sd = model.state_dict()
    diffusers_sd = _to_diffusers(sd, hidden=64)
    assert sum(v.numel() for v in diffusers_sd.values()) == sum(v.numel() for v in sd.values())
    imported = from_diffusers(diffusers_sd)
    assert imported.keys() == sd.keys() and all(torch.equal(imported[k], sd[k]) for k in sd)
    # and straight into the Open-Sora layout, same function
    as_opensora = from_diffusers(diffusers_sd, layout="opensora")
    other = MMDiT(get_expert_config("tiny-flux", layout="opensora"))
    load_expert_state_dict(other, as_opensora)
    assert (_outputs(other, "tiny-flux") - _outputs(model, "tiny-flux")).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="does not know"):
        from_diffusers(dict(diffusers_sd, **{"pos_embed.freqs": torch.zeros(3)}))
    with pytest.raises(ValueError, match="missing"):
        from_diffusers({k: v for k, v in diffusers_sd.items() if k != "norm_out.linear.bias"})


def test_loading_fails_loudly_and_names_the_fix():
    opensora = build_seeded_expert(get_expert_config("tiny"))
    flux_sd = convert_state_dict(opensora.state_dict(), src="opensora", dst="flux")
    with pytest.raises(ValueError, match=r"convert_state_dict\(sd, src='flux', dst='opensora'\)"):
        load_expert_state_dict(opensora, flux_sd)
    sd = dict(opensora.state_dict())
    missing = {k: v for k, v in sd.items() if k != "cond_in.weight"}
    with pytest.raises(ValueError, match=r"1 missing keys, e.g. \['cond_in.weight'\]"):
        load_expert_state_dict(opensora, missing)
    with pytest.raises(ValueError, match=r"unexpected keys, e.g. \['guidance_in.in_layer.weight'\]"):
        load_expert_state_dict(opensora, dict(sd, **{"guidance_in.in_layer.weight": torch.zeros(64, 256)}))
    with pytest.raises(ValueError, match="shape mismatches.*img_in.weight"):
        load_expert_state_dict(opensora, dict(sd, **{"img_in.weight": torch.zeros(64, 192)}))
    with pytest.raises(ValueError, match="prefix"):
        detect_layout({f"model.{k}": v for k, v in sd.items()})
    with pytest.raises(ValueError, match="mixes"):
        detect_layout(dict(sd, **flux_sd))
    with pytest.raises(ValueError, match="weights are in the 'opensora' layout"):
        convert_state_dict(sd, src="flux", dst="opensora")
    # a good load really copies the weights
    fresh = MMDiT(get_expert_config("tiny"))
    load_expert_state_dict(fresh, sd)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())
