"""Where third-party weights come from, and the one error users see when one is missing.

Nothing in this project downloads anything. Real weights come from local paths; when a path does
not exist, :func:`require_path` raises a :class:`FileNotFoundError` that names the file, where it
belongs in the Paris model folder, and the upstream repository to fetch it from (DESIGN §5.6, §5.8).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Component:
    """A third-party component the user fetches and places themselves."""

    name: str
    upstream: str  # repository the user fetches it from
    files: str  # which file(s) in that repository
    placed_at: str  # where it goes, relative to the model folder (or the path given in config)
    license: str


COMPONENTS: dict[str, Component] = {
    "vae": Component(
        "HunyuanVideo VAE", "tencent/HunyuanVideo", "hunyuan-video-t2v-720p/vae/pytorch_model.pt",
        "./vae.pt", "Tencent Hunyuan Community License",
    ),
    "t5": Component(
        "T5-v1.1-XXL encoder (fp16, encoder-only)", "comfyanonymous/flux_text_encoders",
        "t5xxl_fp16.safetensors", "./t5/model.safetensors", "Apache 2.0",
    ),
    "t5_tokenizer": Component(
        "T5 tokenizer + config", "google/t5-v1_1-xxl",
        "config.json spiece.model special_tokens_map.json tokenizer_config.json", "./t5/", "Apache 2.0",
    ),
    "clip": Component(
        "CLIP ViT-L/14", "openai/clip-vit-large-patch14", "the whole repository", "./clip/", "MIT",
    ),
    "dinov2": Component(
        "DINOv2 (for clustering embeddings)", "facebook/dinov2-base (or -large/-giant)", "the whole repository",
        "the path given as embedder.path", "Apache 2.0",
    ),
    "i3d": Component(
        "I3D Kinetics-400 TorchScript (FVD)", "the StyleGAN-V / stylegan2-ada FVD release",
        "i3d_torchscript.pt", "the path given as --i3d", "Apache 2.0",
    ),
    "aesthetic": Component(
        "LAION improved aesthetic predictor head", "christophschuhmann/improved-aesthetic-predictor",
        "sac+logos+ava1-l14-linearMSE.pth", "the path given as --aesthetic", "Apache 2.0",
    ),
    "null_text": Component(
        "CFG null text tensors", "generated locally (python -m ddm.models.text --make-null <folder>)",
        "null_t5.pt null_clip.pt", "./null_t5.pt ./null_clip.pt", "derived from the encoders above",
    ),
}


def missing_component_message(path: str | Path, component: str) -> str:
    """A one-paragraph explanation of where a missing third-party file comes from."""
    c = COMPONENTS[component]
    return (
        f"{c.name} not found at '{path}'. It belongs at {c.placed_at} (relative to the model folder, "
        f"or wherever your config points). Fetch {c.files} from {c.upstream} ({c.license}) and place it "
        "there; nothing is downloaded automatically."
    )


def require_path(path: str | Path, component: str) -> Path:
    """Return ``path`` as a Path if it exists, else raise a FileNotFoundError saying where to get it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(missing_component_message(p, component))
    return p
