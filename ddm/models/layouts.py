"""Flux (BFL) ↔ Open-Sora v2 ↔ diffusers parameter layouts of the MM-DiT expert (DESIGN §5.1).

The two native layouts differ in two ways that must change together:

* fusion: Flux stores ``{img,txt}_attn.qkv`` and single-block ``linear1`` (rows q | k | v | mlp_in);
  Open-Sora stores ``q_proj``/``k_proj``/``v_proj`` and single-block ``q_proj``/``k_proj``/``v_mlp``
  (rows v | mlp_in). Converting is row slicing and concatenation.
* RoPE pairing: Flux rotates interleaved pairs (2j, 2j+1) of each head; Open-Sora rotates halves
  (j, j + D/2). With the same angle for pair j, a model is unchanged if each head's q and k output rows
  (weights and biases) and the q/k RMSNorm scales are permuted from one order to the other: attention
  scores are dot products, invariant under a common permutation of q and k dims, and RMSNorm's mean
  of squares does not depend on order. v is not rotated and is left alone.

Loading a checkpoint of the wrong layout would run without error and produce garbage, so
:func:`load_expert_state_dict` refuses it and names the converter.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ddm.models.presets import LAYOUTS

__all__ = ["detect_layout", "convert_state_dict", "from_diffusers", "to_diffusers", "load_expert_state_dict"]

StateDict = dict[str, torch.Tensor]

_FLUX_MARKERS = re.compile(r"^double_blocks\.\d+\.(img|txt)_attn\.qkv\.|^single_blocks\.\d+\.linear1\.")
_OPENSORA_MARKERS = re.compile(r"^double_blocks\.\d+\.(img|txt)_attn\.[qkv]_proj\.|^single_blocks\.\d+\.(q_proj|k_proj|v_mlp)\.")


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"flux"`` if the weights use fused qkv / linear1, ``"opensora"`` if unfused; ValueError otherwise."""
    flux = any(_FLUX_MARKERS.match(k) for k in state_dict)
    opensora = any(_OPENSORA_MARKERS.match(k) for k in state_dict)
    if flux and opensora:
        raise ValueError("state dict mixes Flux (fused qkv/linear1) and Open-Sora (q_proj/k_proj/v_proj/v_mlp) keys")
    if not (flux or opensora):
        sample = sorted(state_dict)[:5]
        raise ValueError(f"cannot tell the MM-DiT layout: no double_blocks.*_attn.qkv / q_proj or single_blocks "
                         f"linear1 / v_mlp keys (first keys: {sample}); is this an expert state dict, or does it "
                         "carry a prefix such as 'model.'?")
    return "flux" if flux else "opensora"


def _half_from_interleaved(head_dim: int) -> torch.Tensor:
    """Index map: half-split dim j takes interleaved dim ``perm[j]`` (j < D/2: 2j; else 2(j - D/2) + 1)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_heads(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Permute the dims of every head along dim 0 (weights (heads·D, in) or biases/scales (heads·D,))."""
    head_dim = perm.numel()
    rows = t.shape[0]
    if rows % head_dim:
        raise ValueError(f"tensor with {rows} rows is not a whole number of heads of dim {head_dim}")
    return t.reshape(rows // head_dim, head_dim, *t.shape[1:])[:, perm].reshape(t.shape)


def _block_ids(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def _infer_head_dim(sd: Mapping[str, torch.Tensor]) -> int:
    for key, value in sd.items():
        if key.endswith("norm.query_norm.scale"):
            return value.shape[0]
    raise ValueError("cannot infer head_dim: no '*.norm.query_norm.scale' key; pass head_dim=")


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], src: str, dst: str,
                       head_dim: int | None = None) -> StateDict:
    """Convert expert weights between the ``"flux"`` and ``"opensora"`` layouts (see module docstring).

    Sizes are read from the tensors themselves (``head_dim`` from the q-norm scales unless given), so no
    config is needed. Keys that do not depend on the layout (embedders, modulations, MLPs, ``cond_in``,
    ``guidance_in``, final layer) are passed through. Returns a new dict; the input is not modified.
    Round trips are exact (only slicing, concatenation and permutation).
    """
    for name, value in (("src", src), ("dst", dst)):
        if value not in LAYOUTS:
            raise ValueError(f"{name} must be one of {LAYOUTS}, got {value!r}")
    found = detect_layout(state_dict)
    if found != src:
        raise ValueError(f"convert_state_dict(src={src!r}) but the weights are in the {found!r} layout")
    out = dict(state_dict)
    if src == dst:
        return out
    head_dim = head_dim or _infer_head_dim(state_dict)
    to_half = _half_from_interleaved(head_dim)
    # flux → opensora maps interleaved → half-split; the reverse applies the inverse permutation
    perm = to_half if dst == "opensora" else torch.argsort(to_half)

    for i in _block_ids(state_dict, "double_blocks"):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}_attn"
            for suffix in ("weight", "bias"):
                if dst == "opensora":
                    if f"{p}.qkv.{suffix}" not in out:
                        continue
                    q, k, v = out.pop(f"{p}.qkv.{suffix}").chunk(3, dim=0)
                    out[f"{p}.q_proj.{suffix}"] = _permute_heads(q, perm)
                    out[f"{p}.k_proj.{suffix}"] = _permute_heads(k, perm)
                    out[f"{p}.v_proj.{suffix}"] = v
                else:
                    if f"{p}.q_proj.{suffix}" not in out:
                        continue
                    q = _permute_heads(out.pop(f"{p}.q_proj.{suffix}"), perm)
                    k = _permute_heads(out.pop(f"{p}.k_proj.{suffix}"), perm)
                    out[f"{p}.qkv.{suffix}"] = torch.cat([q, k, out.pop(f"{p}.v_proj.{suffix}")], dim=0)
            for norm in ("query_norm", "key_norm"):
                out[f"{p}.norm.{norm}.scale"] = _permute_heads(out[f"{p}.norm.{norm}.scale"], perm)

    for i in _block_ids(state_dict, "single_blocks"):
        p = f"single_blocks.{i}"
        for suffix in ("weight", "bias"):
            if dst == "opensora":
                fused = out.pop(f"{p}.linear1.{suffix}")
                hidden = out[f"{p}.linear2.weight"].shape[0]
                q, k, v_mlp = fused.split([hidden, hidden, fused.shape[0] - 2 * hidden], dim=0)
                out[f"{p}.q_proj.{suffix}"] = _permute_heads(q, perm)
                out[f"{p}.k_proj.{suffix}"] = _permute_heads(k, perm)
                out[f"{p}.v_mlp.{suffix}"] = v_mlp
            else:
                q = _permute_heads(out.pop(f"{p}.q_proj.{suffix}"), perm)
                k = _permute_heads(out.pop(f"{p}.k_proj.{suffix}"), perm)
                out[f"{p}.linear1.{suffix}"] = torch.cat([q, k, out.pop(f"{p}.v_mlp.{suffix}")], dim=0)
        for norm in ("query_norm", "key_norm"):
            out[f"{p}.norm.{norm}.scale"] = _permute_heads(out[f"{p}.norm.{norm}.scale"], perm)
    return out


# diffusers FluxTransformer2DModel name → BFL name, for the keys that are a plain rename
_DIFFUSERS_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
}
_DIFFUSERS_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_DIFFUSERS_SINGLE = {
    "norm.linear": "modulation.lin",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "proj_out": "linear2",
}


def from_diffusers(state_dict: Mapping[str, torch.Tensor], layout: str = "flux") -> StateDict:
    """Import a diffusers ``FluxTransformer2DModel`` state dict as BFL names, then convert to ``layout``.

    diffusers keeps Flux's interleaved RoPE, so the import is renames plus fusing
    ``attn.to_{q,k,v}`` → ``qkv`` (and ``add_{q,k,v}_proj`` for the text stream) and
    ``to_q|to_k|to_v|proj_mlp`` → ``linear1``. ``norm_out.linear`` is stored as (scale, shift) by
    diffusers' AdaLayerNormContinuous but as (shift, scale) by BFL, so its halves are swapped.
    Any key left unconsumed raises ValueError (nothing is silently dropped).
    """
    sd = dict(state_dict)
    out: StateDict = {}

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise ValueError(f"diffusers state dict is missing {name!r}")
        return sd.pop(name)

    def rename(src_prefix: str, dst_prefix: str) -> None:
        for key in [k for k in sd if k.startswith(src_prefix + ".")]:
            param = key[len(src_prefix) + 1:]
            if dst_prefix.endswith("_norm") and param == "weight":
                param = "scale"  # diffusers' RMSNorm calls its gain 'weight', BFL calls it 'scale'
            out[f"{dst_prefix}.{param}"] = sd.pop(key)

    for src, dst in _DIFFUSERS_TOP.items():
        rename(src, dst)
    for suffix in ("weight", "bias"):
        shift_scale = take(f"norm_out.linear.{suffix}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat([shift_scale[1], shift_scale[0]], dim=0)

    for i in _block_ids(sd, "transformer_blocks"):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for s, d in _DIFFUSERS_DOUBLE.items():
            rename(f"{src}.{s}", f"{dst}.{d}")
        for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for suffix in ("weight", "bias"):
                if f"{src}.attn.{names[0]}.{suffix}" in sd:
                    out[f"{dst}.{stream}_attn.qkv.{suffix}"] = torch.cat(
                        [take(f"{src}.attn.{n}.{suffix}") for n in names], dim=0)

    for i in _block_ids(sd, "single_transformer_blocks"):
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for s, d in _DIFFUSERS_SINGLE.items():
            rename(f"{src}.{s}", f"{dst}.{d}")
        for suffix in ("weight", "bias"):
            parts = [take(f"{src}.attn.{n}.{suffix}") for n in ("to_q", "to_k", "to_v")]
            out[f"{dst}.linear1.{suffix}"] = torch.cat([*parts, take(f"{src}.proj_mlp.{suffix}")], dim=0)

    if sd:
        raise ValueError(f"diffusers state dict has {len(sd)} keys this importer does not know, e.g. {sorted(sd)[:5]}")
    return convert_state_dict(out, src="flux", dst=layout)


def to_diffusers(state_dict: Mapping[str, torch.Tensor], layout: str | None = None) -> StateDict:
    """Export expert weights (either layout; ``cond_in`` excluded) as a diffusers ``FluxTransformer2DModel``
    state dict: the exact inverse of :func:`from_diffusers` (convert to Flux, split the fused ``qkv`` /
    ``linear1``, rename, swap ``norm_out``'s halves). ``cond_in.*`` must be removed first: diffusers' Flux
    has no such input (``ddm.interop`` saves it beside). Any key left unmapped raises ValueError.
    """
    layout = layout or detect_layout(state_dict)
    sd = convert_state_dict(state_dict, src=layout, dst="flux")
    out: StateDict = {}

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise ValueError(f"expert state dict is missing {name!r}")
        return sd.pop(name)

    def rename(src_prefix: str, dst_prefix: str) -> None:
        for key in [k for k in sd if k.startswith(src_prefix + ".")]:
            param = key[len(src_prefix) + 1:]
            if src_prefix.endswith("_norm") and param == "scale":
                param = "weight"
            out[f"{dst_prefix}.{param}"] = sd.pop(key)

    for dif, bfl in _DIFFUSERS_TOP.items():
        rename(bfl, dif)
    for suffix in ("weight", "bias"):
        shift, scale = take(f"final_layer.adaLN_modulation.1.{suffix}").chunk(2, dim=0)
        out[f"norm_out.linear.{suffix}"] = torch.cat([scale, shift], dim=0)

    for i in _block_ids(sd, "double_blocks"):
        src, dst = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for dif, bfl in _DIFFUSERS_DOUBLE.items():
            rename(f"{src}.{bfl}", f"{dst}.{dif}")
        for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for suffix in ("weight", "bias"):
                if f"{src}.{stream}_attn.qkv.{suffix}" in sd:
                    for n, part in zip(names, take(f"{src}.{stream}_attn.qkv.{suffix}").chunk(3, dim=0)):
                        out[f"{dst}.attn.{n}.{suffix}"] = part

    for i in _block_ids(sd, "single_blocks"):
        src, dst = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for dif, bfl in _DIFFUSERS_SINGLE.items():
            rename(f"{src}.{bfl}", f"{dst}.{dif}")
        hidden = out[f"{dst}.proj_out.weight"].shape[0]
        for suffix in ("weight", "bias"):
            fused = take(f"{src}.linear1.{suffix}")
            q, k, v, mlp = fused.split([hidden, hidden, hidden, fused.shape[0] - 3 * hidden], dim=0)
            out.update({f"{dst}.attn.to_q.{suffix}": q, f"{dst}.attn.to_k.{suffix}": k,
                        f"{dst}.attn.to_v.{suffix}": v, f"{dst}.proj_mlp.{suffix}": mlp})

    if sd:
        raise ValueError(f"{len(sd)} expert keys have no diffusers FluxTransformer2DModel name, e.g. {sorted(sd)[:5]}"
                         " (cond_in is saved beside the diffusers weights by ddm.interop)")
    return out


def load_expert_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strictly load ``state_dict`` into an :class:`~ddm.models.mmdit.MMDiT`, failing loudly and helpfully.

    If the weights are in the other layout, the ValueError names the converter call. Any other mismatch
    names the first missing and unexpected keys and shape mismatches. Dtypes are cast by ``load_state_dict``.
    """
    try:
        found = detect_layout(state_dict)
    except ValueError:
        found = None  # not recognisable: the key diff below says what is wrong
    if found is not None and found != model.layout:
        raise ValueError(
            f"checkpoint is in the {found!r} layout but the model is built with layout={model.layout!r}. "
            f"Convert it first: sd = ddm.models.layouts.convert_state_dict(sd, src={found!r}, dst={model.layout!r}) "
            f"(or build the model with layout={found!r}).")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches, e.g. {shapes[:3]}")
        preset = getattr(getattr(model, "config", None), "preset", "?")
        raise ValueError(f"expert checkpoint does not match the model (preset {preset!r}): " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
