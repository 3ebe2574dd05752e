"""diffusers-format checkpoints: MM-DiT experts as ``FluxTransformer2DModel`` folders, the HunyuanVideo VAE as an
``AutoencoderKLHunyuanVideo`` folder, the Euler schedule as a ``FlowMatchEulerDiscreteScheduler`` config.

Nothing here imports diffusers: the folders are written and read with safetensors and JSON, so a model folder in
diffusers format loads into :class:`ddm.pipeline.DDMPipeline` without it. Parity with the diffusers classes is
tested in tests/test_interop_diffusers.py (optional ``[interop]`` extra).

An expert folder (``FluxTransformer2DModel.from_pretrained(root, subfolder="expert1/stage2")``)::

    config.json                          the diffusers config; our ExpertConfig and export metadata under "_ddm"
    diffusion_pytorch_model.safetensors  diffusers names (ddm.models.layouts.to_diffusers); header "format": "pt"
                                         and "ddm_tensor_sha256" (checked on load)
    ddm_cond_in.safetensors              experts with i2v conditioning only: cond_in.weight, cond_in.bias and the
                                         original img_in.bias

diffusers' Flux has no i2v input. Our text-to-video forward adds ``cond_in.bias`` to every image token (an absent
condition is zeros), so the exported ``x_embedder.bias`` is ``img_in.bias + cond_in.bias``: diffusers then gives
our t2v velocity. For i2v, add ``tokens(cond) @ cond_in.weight.T`` to the image tokens after ``x_embedder``
(docs/model_folder.md). Import restores ``img_in.bias`` exactly from the side file.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ddm.export_files import build_model_from_export, load_export, read_export_metadata, tensor_hashes
from ddm.files import atomic_write
from ddm.models.layouts import from_diffusers, load_expert_state_dict, to_diffusers
from ddm.models.presets import ExpertConfig
from ddm.models.weights import load_state_dict_strict
from ddm.models.gated_router import build_router, router_config_from_dict

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "WEIGHTS_INDEX", "COND_IN_FILE", "DTYPES", "is_diffusers_dir",
           "flux_config", "expert_config_from_flux", "save_expert_diffusers", "load_expert_diffusers",
           "read_diffusers_metadata", "is_checkpoint_dir", "save_router_published",
           "read_checkpoint_metadata", "load_checkpoint", "build_checkpoint_model", "save_vae_diffusers", "load_vae_diffusers", "vae_config",
           "scheduler_config", "scheduler_sigmas", "save_scheduler", "flux_inputs", "flux_output"]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
COND_IN_FILE = "ddm_cond_in.safetensors"
SCHEDULER_FILE = "scheduler_config.json"
HASHES_KEY = "ddm_tensor_sha256"
DDM_KEY = "_ddm"
FLUX_CLASS, VAE_CLASS, SCHEDULER_CLASS = "FluxTransformer2DModel", "AutoencoderKLHunyuanVideo", \
    "FlowMatchEulerDiscreteScheduler"
DIFFUSERS_VERSION = "0.39.0"  # the version the exports are tested against (pyproject's [interop] extra)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- files -------------------------------------------------------------------------------------------------------
def is_diffusers_dir(path: str | Path) -> bool:
    """True when ``path`` holds a diffusers model: ``config.json`` and ``diffusion_pytorch_model*.safetensors``."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and any(p.glob("diffusion_pytorch_model*.safetensors"))


HF_WEIGHTS = ("pytorch_model.safetensors", "model.safetensors")  # Hugging Face single-file names (Paris 1.0's router)


def is_checkpoint_dir(path: str | Path) -> bool:
    """A diffusers folder, or ``config.json`` beside ``pytorch_model.safetensors`` / ``model.safetensors``."""
    p = Path(path)
    return is_diffusers_dir(p) or ((p / CONFIG_FILE).is_file() and any((p / n).is_file() for n in HF_WEIGHTS))


def _hf_weights(folder: Path) -> Path | None:
    return next((folder / n for n in HF_WEIGHTS if (folder / n).is_file()), None)


def save_router_published(state_dict: Mapping[str, torch.Tensor], folder: str | Path, metadata: Mapping[str, Any],
                          dtype: torch.dtype | None = None) -> Path:
    """A router as Paris 1.0 publishes it: ``config.json`` (our metadata, ``kind`` router) +
    ``pytorch_model.safetensors``. diffusers has no router class; ours reads this back."""
    folder = Path(folder)
    _write_safetensors(_cast(state_dict, dtype), folder / HF_WEIGHTS[0])
    meta = {k: v for k, v in metadata.items() if k not in ("tensor_sha256", "format", "_path")}
    _write_json(folder / CONFIG_FILE, {"_class_name": "DDMRouter", DDM_KEY: {"metadata": {**meta, "kind": "router"}}})
    return folder


def _cast(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return dict(state_dict)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def _write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Atomically write ``tensors`` with diffusers' header (``format: pt``) plus their sha256s."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    header = {"format": "pt", HASHES_KEY: json.dumps(tensor_hashes(tensors), sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def _write_weights(tensors: Mapping[str, torch.Tensor], folder: Path, max_shard_bytes: int | None) -> None:
    """``diffusion_pytorch_model.safetensors``, or shards + ``.index.json`` when larger than ``max_shard_bytes``.

    The split is huggingface_hub's ``split_torch_state_dict_into_shards`` (diffusers' own names and index);
    the index is written last (its commit point) and shards of an earlier export it does not name are removed.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(dict(tensors), filename_pattern="diffusion_pytorch_model{suffix}"
                                               ".safetensors", max_shard_size=max_shard_bytes or 10 * 1024**3)
    if not split.is_sharded:
        _write_safetensors(tensors, folder / WEIGHTS_FILE)
        (folder / WEIGHTS_INDEX).unlink(missing_ok=True)
        return
    for name, keys in split.filename_to_tensors.items():
        _write_safetensors({k: tensors[k] for k in keys}, folder / name)
    _write_json(folder / WEIGHTS_INDEX, {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
    (folder / WEIGHTS_FILE).unlink(missing_ok=True)
    for stale in folder.glob("diffusion_pytorch_model-*-of-*.safetensors"):
        if stale.name not in split.filename_to_tensors:
            stale.unlink()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, checking the sha256s it records (files without them load unchecked)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # SafetensorError / OSError: the library's message does not name the file
        raise ValueError(f"'{path}' is not a readable safetensors file ({type(err).__name__}: {err})") from err
    if HASHES_KEY in header:
        recorded = json.loads(header[HASHES_KEY])
        got = tensor_hashes(tensors)
        bad = [k for k in tensors if recorded.get(k) != got[k]]
        if bad:
            raise ValueError(f"'{path}': tensor '{bad[0]}' does not match its recorded sha256: the file was modified "
                             "or damaged after it was exported; export it again")
    return tensors


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """``diffusion_pytorch_model.safetensors``, or its shards through the ``.index.json``."""
    if (folder / WEIGHTS_FILE).is_file():
        return _read_safetensors(folder / WEIGHTS_FILE)
    index_path = folder / WEIGHTS_INDEX
    if not index_path.is_file():
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        raise FileNotFoundError(f"'{folder}' has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX} (found: {found or 'none'})")
    weight_map: dict[str, str] = json.loads(index_path.read_text()).get("weight_map") or {}
    missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
    if missing:
        raise FileNotFoundError(f"{index_path} names shard files that are missing: {missing}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(_read_safetensors(folder / shard))
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise ValueError(f"{index_path} lists tensors no shard holds: {absent[:10]}")
    return tensors


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"'{folder}' has no {CONFIG_FILE}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


# --- experts -------------------------------------------------------------------------------------------------------
def flux_config(cfg: ExpertConfig) -> dict[str, Any]:
    """The ``FluxTransformer2DModel`` config of an expert; a ValueError names what diffusers' Flux cannot hold.

    Tokens are patchified outside the model (``flux_inputs``), so diffusers sees ``patch_size=1`` and
    ``in_channels`` = features per token (C·pt·ph·pw).
    """
    problems = []
    if cfg.mlp_ratio != 4.0:
        problems.append(f"mlp_ratio={cfg.mlp_ratio} (diffusers' Flux blocks use 4)")
    if not cfg.qkv_bias:
        problems.append("qkv_bias=False (diffusers' Flux attention always has q/k/v biases)")
    if cfg.theta != 10_000:
        problems.append(f"theta={cfg.theta} (diffusers' Flux RoPE uses 10000)")
    if problems:
        raise ValueError(f"expert preset {cfg.preset!r} cannot be a FluxTransformer2DModel: " + "; ".join(problems))
    return {"_class_name": FLUX_CLASS, "_diffusers_version": DIFFUSERS_VERSION, "patch_size": 1,
            "in_channels": cfg.in_channels, "out_channels": None, "num_layers": cfg.depth,
            "num_single_layers": cfg.depth_single_blocks, "attention_head_dim": cfg.head_dim,
            "num_attention_heads": cfg.num_heads, "joint_attention_dim": cfg.context_in_dim,
            "pooled_projection_dim": cfg.vec_in_dim, "guidance_embeds": cfg.guidance_embed,
            "axes_dims_rope": list(cfg.axes_dim)}


def expert_config_from_flux(config: Mapping[str, Any], cond_embed: bool = False,
                            layout: str = "flux") -> ExpertConfig:
    """Our ExpertConfig from a diffusers config.json: the ``_ddm`` record when present, else the Flux fields
    (a foreign Flux-style folder: patch (1, 2, 2) assumed, so ``in_channels`` must be a multiple of 4)."""
    ddm = config.get(DDM_KEY) or {}
    if isinstance(ddm.get("config"), Mapping):
        return ExpertConfig.from_dict({**ddm["config"], "layout": layout})
    in_channels = int(config.get("in_channels", 64))
    if in_channels % 4 or int(config.get("patch_size", 1)) != 1:
        raise ValueError(f"config.json: in_channels={in_channels}, patch_size={config.get('patch_size')}: expected "
                         "patch_size 1 and tokens of 2x2 latent pixels (in_channels a multiple of 4)")
    heads, head_dim = int(config.get("num_attention_heads", 24)), int(config.get("attention_head_dim", 128))
    return ExpertConfig(preset="diffusers-flux", layout=layout, latent_channels=in_channels // 4,
                        patch_size=(1, 2, 2), vec_in_dim=int(config.get("pooled_projection_dim", 768)),
                        context_in_dim=int(config.get("joint_attention_dim", 4096)), hidden_size=heads * head_dim,
                        num_heads=heads, depth=int(config.get("num_layers", 19)),
                        depth_single_blocks=int(config.get("num_single_layers", 38)),
                        axes_dim=tuple(config.get("axes_dims_rope", (16, 56, 56))),
                        guidance_embed=bool(config.get("guidance_embeds", False)), cond_embed=cond_embed)


def save_expert_diffusers(state_dict: Mapping[str, torch.Tensor], config: ExpertConfig, folder: str | Path, *,
                          metadata: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None,
                          max_shard_bytes: int | None = None) -> Path:
    """Write one expert as a ``FluxTransformer2DModel`` folder (module docstring); returns the folder.

    ``metadata`` (the export metadata: stage, step, hashes of the training data ...) is kept under
    ``config.json["_ddm"]["metadata"]`` (diffusers ignores ``_``-prefixed keys); ``dtype`` casts the weights;
    weights above ``max_shard_bytes`` (default 10 GiB, as diffusers) are sharded with an index.
    """
    folder = Path(folder)
    diff_config = flux_config(config)
    sd = _cast(state_dict, dtype)
    cond = {k: sd.pop(k) for k in [k for k in sd if k.startswith("cond_in.")]}
    weights = to_diffusers(sd, config.layout)
    if cond:
        # our t2v forward adds cond_in.bias to every image token: fold it into x_embedder so diffusers agrees
        side = {"cond_in.weight": cond["cond_in.weight"], "cond_in.bias": cond["cond_in.bias"],
                "img_in.bias": weights["x_embedder.bias"]}
        weights["x_embedder.bias"] = weights["x_embedder.bias"] + cond["cond_in.bias"]
        _write_safetensors(side, folder / COND_IN_FILE)
    meta = {k: v for k, v in (metadata or {}).items() if k not in ("tensor_sha256", "format")}
    diff_config[DDM_KEY] = {"config": config.to_dict(), "metadata": {**meta, "kind": "expert"},
                            "cond_in": COND_IN_FILE if cond else None}
    _write_weights(weights, folder, max_shard_bytes)
    _write_json(folder / CONFIG_FILE, diff_config)  # last: a folder with config.json is complete
    return folder


def load_expert_diffusers(folder: str | Path, layout: str | None = None
                          ) -> tuple[dict[str, torch.Tensor], ExpertConfig, dict[str, Any]]:
    """``(state_dict, config, metadata)`` of a ``FluxTransformer2DModel`` folder, in ``layout`` (default: the
    layout recorded under ``_ddm``, else Flux). ``cond_in`` comes from ``ddm_cond_in.safetensors`` when present."""
    folder = Path(folder)
    config = _read_config(folder)
    if config.get("_class_name", FLUX_CLASS) != FLUX_CLASS:
        raise ValueError(f"'{folder / CONFIG_FILE}' describes a {config.get('_class_name')!r}, not a {FLUX_CLASS}: "
                         "this project's experts are video MM-DiTs in the Flux layout (Paris 1.0's DiT-XL/2 image "
                         "experts are another architecture and cannot be loaded)")
    ddm = config.get(DDM_KEY) or {}
    layout = layout or (ddm.get("config") or {}).get("layout") or "flux"
    weights = _read_weights(folder)
    side_path = folder / (ddm.get("cond_in") or COND_IN_FILE)
    side = _read_safetensors(side_path) if side_path.is_file() else None
    if side is not None:
        bias = side["cond_in.bias"]
        # exact when x_embedder is as exported; a bias changed outside (fine-tuned in diffusers) is unfolded
        if torch.equal(weights["x_embedder.bias"], side["img_in.bias"] + bias):
            weights["x_embedder.bias"] = side["img_in.bias"]
        else:
            log.warning("%s: x_embedder.bias changed since the export; img_in.bias = x_embedder.bias - cond_in.bias",
                        folder)
            weights["x_embedder.bias"] = weights["x_embedder.bias"] - bias
    sd = from_diffusers(weights, layout=layout)
    if side is not None:
        sd["cond_in.weight"], sd["cond_in.bias"] = side["cond_in.weight"], side["cond_in.bias"]
    cfg = expert_config_from_flux(config, cond_embed=side is not None, layout=layout)
    return sd, cfg, {**(ddm.get("metadata") or {}), "kind": "expert", "config": cfg.to_dict()}


def read_diffusers_metadata(folder: str | Path) -> dict[str, Any]:
    """The export metadata recorded in a diffusers folder's ``config.json`` (``kind``, ``config``, ``stage`` ...),
    without reading weights; a foreign folder gives ``kind`` and ``config`` only."""
    folder = Path(folder)
    config = _read_config(folder)
    ddm = config.get(DDM_KEY) or {}
    if config.get("_class_name") not in (None, FLUX_CLASS) and not ddm:
        return {"kind": None, "_class_name": config.get("_class_name")}
    meta = dict(ddm.get("metadata") or {})
    meta.setdefault("kind", "expert")
    if meta["kind"] == "expert":
        cfg = expert_config_from_flux(config, cond_embed=(folder / (ddm.get("cond_in") or COND_IN_FILE)).is_file(),
                                      layout=(ddm.get("config") or {}).get("layout") or "flux")
        meta["config"] = cfg.to_dict()
    return meta


# --- VAE -----------------------------------------------------------------------------------------------------------
def vae_config(cfg: Any) -> dict[str, Any]:
    """``AutoencoderKLHunyuanVideo`` config for a :class:`~ddm.models.hunyuan_vae.HunyuanVAEConfig` (same
    parameter names: the network was written after the published checkpoint, as diffusers' class was)."""
    if getattr(cfg, "per_frame_norm", False):
        raise ValueError("a per-frame-normalised VAE (per_frame_norm=True) has no diffusers equivalent")
    n = len(cfg.block_out_channels)
    return {"_class_name": VAE_CLASS, "_diffusers_version": DIFFUSERS_VERSION, "in_channels": cfg.in_channels,
            "out_channels": cfg.in_channels, "latent_channels": cfg.latent_channels,
            "down_block_types": ["HunyuanVideoDownBlock3D"] * n, "up_block_types": ["HunyuanVideoUpBlock3D"] * n,
            "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
            "act_fn": "silu", "norm_num_groups": cfg.norm_groups, "scaling_factor": cfg.scaling_factor,
            "spatial_compression_ratio": cfg.spatial_compression,
            "temporal_compression_ratio": cfg.temporal_compression,
            "mid_block_add_attention": cfg.mid_block_attention,
            DDM_KEY: {"config": cfg.to_dict()}}


def save_vae_diffusers(vae: torch.nn.Module, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a :class:`~ddm.models.vae.HunyuanVideoVAE` as an ``AutoencoderKLHunyuanVideo`` folder."""
    net = getattr(vae, "model", vae)
    if not hasattr(net, "encoder") or not hasattr(getattr(net, "config", None), "block_out_channels"):
        raise ValueError(f"only the HunyuanVideo VAE has a diffusers class; got {type(vae).__name__} (weight-free "
                         "VAEs stay a spec in model_index.json)")
    folder = Path(folder)
    _write_safetensors(_cast(net.state_dict(), dtype), folder / WEIGHTS_FILE)
    _write_json(folder / CONFIG_FILE, vae_config(net.config))
    return folder


def load_vae_diffusers(folder: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An ``AutoencoderKLHunyuanVideo`` folder as our :class:`~ddm.models.vae.HunyuanVideoVAE` (strict load)."""
    from ddm.models.hunyuan_vae import HunyuanVAEConfig
    from ddm.models.vae import HunyuanVideoVAE

    folder = Path(folder)
    config = _read_config(folder)
    if config.get("_class_name") != VAE_CLASS:
        raise ValueError(f"'{folder / CONFIG_FILE}' describes a {config.get('_class_name')!r}, not a {VAE_CLASS}")
    recorded = (config.get(DDM_KEY) or {}).get("config")
    cfg = HunyuanVAEConfig(**recorded) if recorded else HunyuanVAEConfig(
        block_out_channels=tuple(config.get("block_out_channels", (128, 256, 512, 512))),
        layers_per_block=int(config.get("layers_per_block", 2)), norm_groups=int(config.get("norm_num_groups", 32)),
        in_channels=int(config.get("in_channels", 3)), latent_channels=int(config.get("latent_channels", 16)),
        temporal_compression=int(config.get("temporal_compression_ratio", 4)),
        spatial_compression=int(config.get("spatial_compression_ratio", 8)),
        scaling_factor=float(config.get("scaling_factor", 0.476986)),
        mid_block_attention=bool(config.get("mid_block_add_attention", True)))
    with torch.device("meta"):  # no random init just to overwrite it
        vae = HunyuanVideoVAE(cfg)
    load_state_dict_strict(vae, _read_weights(folder), f"'{folder}'")
    return vae.to(device=device, dtype=dtype).eval()


# --- scheduler -----------------------------------------------------------------------------------------------------
def scheduler_config(shift_alpha: float) -> dict[str, Any]:
    """``FlowMatchEulerDiscreteScheduler`` config whose sigmas, set with ``set_timesteps(sigmas=
    scheduler_sigmas(N))``, are our ``euler_schedule(N, shift_alpha)`` (the final 0 appended by diffusers)."""
    return {"_class_name": SCHEDULER_CLASS, "_diffusers_version": DIFFUSERS_VERSION, "num_train_timesteps": 1000,
            "shift": float(shift_alpha), "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
            "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False, "shift_terminal": None,
            "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
            "time_shift_type": "exponential", "stochastic_sampling": False}


def scheduler_sigmas(num_steps: int) -> list[float]:
    """The unshifted sigmas to pass to ``set_timesteps(sigmas=...)``: ``linspace(1, 0, N + 1)[:-1]``."""
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1].tolist()


def save_scheduler(folder: str | Path, shift_alpha: float, num_steps: int) -> Path:
    """Write ``scheduler_config.json`` (with our ``num_steps`` default under ``_ddm``)."""
    folder = Path(folder)
    _write_json(folder / SCHEDULER_FILE, {**scheduler_config(shift_alpha),
                                          DDM_KEY: {"num_steps": num_steps, "sigmas": "scheduler_sigmas(num_steps)"}})
    return folder


# --- running an exported expert with diffusers -------------------------------------------------------------------
def flux_inputs(x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor],
                patch_size: tuple[int, int, int] = (1, 2, 2)) -> dict[str, torch.Tensor]:
    """``FluxTransformer2DModel.forward`` keyword arguments for our ``expert(x, t, cond)``: patchified tokens,
    the T5 states, pooled CLIP, ``timestep = t`` (diffusers scales by 1000 as we do), 3-axis (t, h, w) ids."""
    from ddm.models.mmdit import patchify, position_ids

    grid = tuple(n // p for n, p in zip(x.shape[2:], patch_size))
    ids = position_ids(grid, cond["t5"].shape[1], device=x.device)
    text_len = cond["t5"].shape[1]
    kwargs = {"hidden_states": patchify(x, patch_size), "encoder_hidden_states": cond["t5"],
              "pooled_projections": cond["clip"], "timestep": torch.as_tensor(t, device=x.device).expand(x.shape[0]),
              "img_ids": ids[text_len:].float(), "txt_ids": ids[:text_len].float(), "return_dict": False}
    if "guidance" in cond:
        kwargs["guidance"] = torch.as_tensor(cond["guidance"], device=x.device).float().expand(x.shape[0])
    return kwargs


def flux_output(tokens: torch.Tensor, like: torch.Tensor, patch_size: tuple[int, int, int] = (1, 2, 2)) -> torch.Tensor:
    """diffusers' output tokens back to a velocity shaped like the latent ``like`` (B, C, T, H, W)."""
    from ddm.models.mmdit import unpatchify

    grid = tuple(n // p for n, p in zip(like.shape[2:], patch_size))
    return unpatchify(tokens, patch_size, grid)


# --- either format: what the model-folder reader calls ---------------------------------------------------------------
def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """Export metadata of a checkpoint folder in our format (``master.safetensors`` / ``model/``) or diffusers'."""
    if is_diffusers_dir(path):
        return read_diffusers_metadata(path)
    if is_checkpoint_dir(path):
        return dict((_read_config(Path(path)).get(DDM_KEY) or {}).get("metadata") or {})
    return read_export_metadata(path)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, metadata)`` of a checkpoint in either format (diffusers experts come back in their layout)."""
    if is_diffusers_dir(path):
        sd, _, meta = load_expert_diffusers(path)
        return sd, meta
    if is_checkpoint_dir(path):
        return _read_safetensors(_hf_weights(Path(path))), read_checkpoint_metadata(path)
    return load_export(path)


def build_checkpoint_model(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model of a checkpoint folder in either format (``ddm.export_files.build_model_from_export`` for ours)."""
    if not is_checkpoint_dir(path):
        return build_model_from_export(path, device=device, dtype=dtype)
    if not is_diffusers_dir(path):
        return _build_router(Path(path), device, dtype)
    from ddm.models.mmdit import MMDiT

    sd, cfg, _ = load_expert_diffusers(path)
    sd = _cast(sd, dtype)
    with torch.device("meta"):
        model = MMDiT(cfg)
    float_dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    model = model.to(dtype=float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32).to_empty(device=device)
    load_expert_state_dict(model, {k: v.to(device) for k, v in sd.items()})
    return model.eval()


def _build_router(folder: Path, device: str, dtype: torch.dtype | None) -> torch.nn.Module:
    """A router from ``config.json`` (its metadata: ``kind`` router, ``config``) + ``pytorch_model.safetensors``."""
    meta = read_checkpoint_metadata(folder)
    if meta.get("kind") != "router" or not isinstance(meta.get("config"), Mapping):
        raise ValueError(f"'{folder / CONFIG_FILE}' does not describe a DDM router: its '_ddm' metadata needs kind "
                         f"'router' and the router 'config' (found kind {meta.get('kind')!r}); a Paris 1.0 DiT router "
                         "is another architecture and cannot be loaded by this project")
    with torch.device("meta"):
        model = build_router(router_config_from_dict(meta["config"]))
    sd = _cast(_read_safetensors(_hf_weights(folder)), dtype)
    load_state_dict_strict(model, {k: v.to(device) for k, v in sd.items()}, f"'{folder}'")
    return model.eval()
