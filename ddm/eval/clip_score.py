"""CLIP text-video score: per-frame cosine between CLIP image and text embeddings, mean ± SE over videos.

Paris 2.0's table (DESIGN §5.8) uses CLIP ViT-L/14 (``openai/clip-vit-large-patch14``, a local folder
with ``CLIPModel`` weights and ``CLIPProcessor`` files). For each video: every ``frame_stride``-th frame
goes through the processor's own preprocessing (resize short side, centre crop, normalise with its
mean/std), the image embeddings (``get_image_features``) and the caption's text embedding
(``get_text_features``, truncated to CLIP's 77 tokens) are L2-normalised, their dot products are
averaged over frames, and the per-video values are reported as mean ± standard error, unscaled (0.2178,
not the ×100 "CLIPScore" convention).

:class:`ClipEmbedder` is shared with the aesthetic metric, so one loaded CLIP serves both.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, CLIPProcessor

from ddm.assets import require_path
from ddm.eval.stats import TINY_LABEL, MetricResult, mean_and_stderr
from ddm.eval.videos import count_videos, iter_videos

__all__ = ["ClipEmbedder", "clip_score"]

log = logging.getLogger(__name__)

_VIT_L14 = {"hidden_size": 1024, "num_hidden_layers": 24, "patch_size": 14, "image_size": 224}
_TINY_MAX_WIDTH = 256  # no released CLIP is this narrow; narrower vision towers are test stand-ins


class ClipEmbedder:
    """A local CLIP (model + processor) that embeds frames and captions, L2-normalised, in float32."""

    def __init__(self, model: CLIPModel, processor: CLIPProcessor, *, path: str = "",
                 device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.processor = processor
        self.path = path
        self.device = torch.device(device)
        vc = model.config.vision_config
        self.tiny = vc.hidden_size < _TINY_MAX_WIDTH
        if all(getattr(vc, k) == v for k, v in _VIT_L14.items()):
            self.name = "CLIP ViT-L/14"
        else:
            self.name = (f"CLIP ViT (width {vc.hidden_size}, {vc.num_hidden_layers} layers, patch {vc.patch_size}, "
                         f"{vc.image_size}px) - not ViT-L/14, not comparable with Paris 2.0")

    @classmethod
    def from_folder(cls, path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> "ClipEmbedder":
        """Load ``CLIPModel`` + ``CLIPProcessor`` from a local folder (nothing is downloaded)."""
        p = require_path(path, "clip")
        model = CLIPModel.from_pretrained(p, local_files_only=True, dtype=dtype)
        # The slow (PIL) image processor, stated explicitly: the fast one needs torchvision.
        processor = CLIPProcessor(image_processor=CLIPImageProcessor.from_pretrained(p, local_files_only=True),
                                  tokenizer=AutoTokenizer.from_pretrained(p, local_files_only=True))
        log.info("loaded CLIP from %s", p)
        return cls(model, processor, path=str(p), device=device)

    @property
    def projection_dim(self) -> int:
        """Width of the joint image/text embedding space."""
        return int(self.model.config.projection_dim)

    @property
    def max_text_tokens(self) -> int:
        """Caption length limit: the tokenizer's and the text tower's, whichever is smaller (77 for CLIP)."""
        return min(int(self.processor.tokenizer.model_max_length),
                   int(self.model.config.text_config.max_position_embeddings))

    def details(self) -> dict[str, Any]:
        """Backbone fields for ``MetricResult.details`` (tiny stand-ins carry the test-only label)."""
        crop = self.processor.image_processor.crop_size
        return {"backbone": TINY_LABEL if self.tiny else self.name, "backbone_path": self.path,
                "tiny_test_backbone": self.tiny, "image_size": [crop["height"], crop["width"]]}

    @torch.inference_mode()
    def image_embeddings(self, frames: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        """uint8 frames (F, H, W, 3) → L2-normalised image embeddings (F, D), float32 on the CPU."""
        out = []
        for i in range(0, len(frames), batch_size):
            pixels = self.processor(images=list(frames[i : i + batch_size]), return_tensors="pt")["pixel_values"]
            emb = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
            out.append(F.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Captions → L2-normalised text embeddings (B, D), float32 on the CPU (truncated to the token limit)."""
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.processor.tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True,
                                           max_length=self.max_text_tokens, return_tensors="pt")
            emb = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                               attention_mask=tok["attention_mask"].to(self.device))
            out.append(F.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out)

    def count_truncated(self, texts: Sequence[str]) -> int:
        """How many captions are longer than the token limit (their tail is ignored by CLIP)."""
        lengths = [len(ids) for ids in self.processor.tokenizer(list(texts), verbose=False)["input_ids"]]
        return sum(n > self.max_text_tokens for n in lengths)


def clip_score(videos: Any, captions: Sequence[str], embedder: ClipEmbedder, *, frame_stride: int = 1,
               batch_size: int = 32, progress: bool = True) -> MetricResult:
    """Mean over videos of the frame-averaged cosine(CLIP image, CLIP text); ± SE over videos.

    ``captions[i]`` belongs to the i-th video; the counts must match. Videos: see :mod:`ddm.eval.videos`.
    """
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise ValueError("captions must be a sequence of strings, one per video")
    if len(captions) == 0:
        raise ValueError("clip_score got an empty set (no captions)")
    if frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
    n_videos = count_videos(videos)
    if n_videos is not None and n_videos != len(captions):
        raise ValueError(f"got {n_videos} videos but {len(captions)} captions; they must pair up one to one")
    text = embedder.text_embeddings(captions)
    per_video: list[float] = []
    for i, video in enumerate(tqdm(iter_videos(videos), total=n_videos, desc="CLIP text-video score", unit="video",
                                   disable=not progress)):
        if i >= len(captions):
            raise ValueError(f"more videos than the {len(captions)} captions given")
        img = embedder.image_embeddings(video[::frame_stride], batch_size)
        per_video.append(float((img @ text[i]).mean()))
    if len(per_video) != len(captions):
        raise ValueError(f"got {len(per_video)} videos but {len(captions)} captions; they must pair up one to one")
    mean, se, n = mean_and_stderr(per_video)
    details = {**embedder.details(), "frame_stride": frame_stride, "scale": "unscaled cosine (not x100)",
               "captions_truncated": embedder.count_truncated(captions), "per_video": per_video}
    return MetricResult("clip_text_video", mean, se, n, details)
