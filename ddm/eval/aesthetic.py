"""LAION aesthetic score: the "improved aesthetic predictor" head on normalised CLIP image embeddings.

The released head (``sac+logos+ava1-l14-linearMSE.pth``, christophschuhmann/improved-aesthetic-predictor)
is a plain MLP 768→1024→128→64→16→1 with dropouts (0.2, 0.2, 0.1) and no activations, stored as an
``nn.Sequential`` named ``layers``: keys ``layers.{0,2,4,6,7}.{weight,bias}`` (1, 3, 5 are the dropouts).
It reads L2-normalised CLIP ViT-L/14 image embeddings. Per video: the head's score on every
``frame_stride``-th frame, averaged; reported as mean ± SE over videos (DESIGN §5.8).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ddm.assets import require_path
from ddm.files import atomic_save_torch
from ddm.models.weights import load_state_dict_strict
from ddm.eval.clip_score import ClipEmbedder
from ddm.eval.stats import MetricResult, mean_and_stderr
from ddm.eval.videos import count_videos, iter_videos

__all__ = ["AestheticHead", "load_aesthetic_head", "make_tiny_aesthetic_head", "aesthetic_score"]

log = logging.getLogger(__name__)

_HIDDEN = (1024, 128, 64, 16)
_DROPOUT = (0.2, 0.2, 0.1)


class AestheticHead(nn.Module):
    """The LAION head: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear (no activations)."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        h = _HIDDEN
        self.layers = nn.Sequential(
            nn.Linear(in_dim, h[0]), nn.Dropout(_DROPOUT[0]),
            nn.Linear(h[0], h[1]), nn.Dropout(_DROPOUT[1]),
            nn.Linear(h[1], h[2]), nn.Dropout(_DROPOUT[2]),
            nn.Linear(h[2], h[3]),
            nn.Linear(h[3], 1),
        )

    @property
    def in_dim(self) -> int:
        """The embedding width the head reads (768 for CLIP ViT-L/14)."""
        return int(self.layers[0].in_features)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores (N,) for L2-normalised image embeddings (N, in_dim)."""
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic_head(path: str | Path, device: str | torch.device = "cpu") -> AestheticHead:
    """Load a head state dict (the released ``.pth`` or a tiny one) strictly, in eval mode."""
    p = require_path(path, "aesthetic")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "layers.0.weight" not in state:
        raise ValueError(f"{p} is not an aesthetic-predictor state dict (no 'layers.0.weight' key)")
    head = AestheticHead(in_dim=int(state["layers.0.weight"].shape[1]))
    load_state_dict_strict(head, state, str(p))
    log.info("loaded aesthetic head from %s (input width %d)", p, head.in_dim)
    return head.eval().to(device)


def make_tiny_aesthetic_head(path: str | Path, in_dim: int, seed: int = 0) -> Path:
    """Save a random-init head for a tiny CLIP (input width ``in_dim``) under the released key names."""
    torch.manual_seed(seed)
    return atomic_save_torch(AestheticHead(in_dim).state_dict(), path)


@torch.inference_mode()
def aesthetic_score(videos: Any, embedder: ClipEmbedder, head: AestheticHead, *, frame_stride: int = 1,
                    batch_size: int = 32, progress: bool = True) -> MetricResult:
    """Mean over videos of the frame-averaged LAION aesthetic score; ± SE over videos.

    The result is labelled a tiny test backbone whenever the CLIP under it is one.
    """
    if head.in_dim != embedder.projection_dim:
        raise ValueError(f"the aesthetic head reads {head.in_dim}-d embeddings but the CLIP gives "
                         f"{embedder.projection_dim}-d ones (the released head needs CLIP ViT-L/14)")
    if frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
    head.eval()
    device = next(head.parameters()).device
    per_video: list[float] = []
    for video in tqdm(iter_videos(videos), total=count_videos(videos), desc="aesthetic score", unit="video",
                      disable=not progress):
        emb = embedder.image_embeddings(video[::frame_stride], batch_size)
        per_video.append(float(head(emb.to(device)).mean()))
    mean, se, n = mean_and_stderr(per_video)
    clip = embedder.details()
    details = {**clip, "backbone": f"LAION aesthetic head on {clip['backbone']}", "frame_stride": frame_stride,
               "per_video": per_video}
    return MetricResult("aesthetic", mean, se, n, details)
