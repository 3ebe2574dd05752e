"""Embed: one L2-normalised vector per manifest row → ``embeddings.parquet`` (``key``, ``embedding``).

Embedders (the ``embedder`` spec dict):

- ``{"type": "dinov2", "path": DIR}``: transformers ``Dinov2Model`` from a local folder, pooled CLS
  output, with the folder's image processor (what the DDM paper clustered on).
- ``{"type": "clip_vision", "path": DIR}``: CLIP image embeddings (``CLIPVisionModelWithProjection``;
  ``CLIPVisionModel``'s pooled output when the folder has no projection) from a local CLIP folder.
- ``{"type": "color_motion"}``: cheap, deterministic, CPU-only features for tiny runs and tests —
  a colour histogram, a coarse colour layout and frame-difference motion statistics (docs/data.md).

``frames="first"`` embeds the first frame; an int n embeds n evenly spaced frames and averages their
embeddings (then re-normalises).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from data.step import StepResult, completed_result, fingerprint, mark_step_done, write_parquet_atomic
from ddm.assets import require_path
from ddm.video_io import read_video

log = logging.getLogger(__name__)

STEP = "embed"
EMBEDDER_TYPES = ("dinov2", "clip_vision", "color_motion")
_ASSET_NAME = {"dinov2": "dinov2", "clip_vision": "clip"}


# --- the cheap embedder -------------------------------------------------------------------------------
COLOR_BINS = 4  # per channel → 64-bin joint RGB histogram
LAYOUT_GRID = 4  # 4×4 mean-colour thumbnail
WORK_SIZE = 32  # frames are area-resized to 32×32 first, so the cost does not grow with resolution
LAYOUT_WEIGHT, MOTION_WEIGHT = 0.5, 0.5
SPECTRUM_BAND = 8  # spatial frequencies 0..7 per axis (of the 32×32 work size) in the shape spectrum


def _motion_features(prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """[mean |Δ|, vx, vy]: how much changes between two frames, and a global Lucas-Kanade shift of the
    moving pixels (px per step at 32×32, squashed by tanh)."""
    a, b = prev.mean(-1), cur.mean(-1)  # grey, in [0, 1]
    it = b - a
    iy, ix = np.gradient(0.5 * (a + b))
    moving = np.abs(it) > 0.02  # only where something changed: the static background says nothing
    if moving.sum() < 3:
        return np.array([np.abs(it).mean(), 0.0, 0.0])
    ix, iy, it_m = ix[moving], iy[moving], it[moving]
    m = np.array([[ix @ ix, ix @ iy], [ix @ iy, iy @ iy]]) + 1e-6 * np.eye(2)
    vx, vy = np.linalg.solve(m, -np.array([ix @ it_m, iy @ it_m]))
    return np.array([np.abs(it).mean(), np.tanh(vx / 2), np.tanh(vy / 2)])


def _spectrum_features(grey: np.ndarray) -> np.ndarray:
    """Unit-norm magnitudes of the lowest 2-D spatial frequencies of grey frames (N, 32, 32), averaged over
    frames. A magnitude spectrum does not change when the picture is shifted (with wrap-around), so it
    describes *what* is drawn — the shape of a digit, a texture — and not where it is."""
    a = np.abs(np.fft.fft2(grey - grey.mean(axis=(1, 2), keepdims=True)))
    a = np.concatenate([a[:, :SPECTRUM_BAND, :SPECTRUM_BAND], a[:, -SPECTRUM_BAND + 1:, :SPECTRUM_BAND]], axis=1)
    v = a.mean(0).ravel()
    return v / max(float(np.linalg.norm(v)), 1e-12)


def color_motion_features(frames: np.ndarray, num_colour_frames: int, spectrum_weight: float = 0.0) -> np.ndarray:
    """Features of one clip: ``frames`` (F, H, W, 3) uint8; the first ``num_colour_frames`` give colour
    and layout, consecutive pairs of all frames give motion (zeros for a single frame).

    Returns a float64 vector: sqrt joint RGB histogram (64, unit norm), 4×4 RGB thumbnail (48, weight
    0.5), motion [mean |Δ|, vx, vy] (3, weight 0.5) — not yet normalised; with ``spectrum_weight`` > 0 also
    the shift-invariant shape spectrum of the colour frames (:func:`_spectrum_features`, 120 values, unit norm
    times the weight: for data whose clusters differ in shape, not colour, e.g. the moving digits).
    """
    small = np.stack([cv2.resize(f, (WORK_SIZE, WORK_SIZE), interpolation=cv2.INTER_AREA) for f in frames])
    small = small.astype(np.float64) / 255.0
    colour = small[:num_colour_frames]
    q = np.minimum((colour * COLOR_BINS).astype(np.int64), COLOR_BINS - 1)
    idx = (q[..., 0] * COLOR_BINS + q[..., 1]) * COLOR_BINS + q[..., 2]
    hist = np.bincount(idx.ravel(), minlength=COLOR_BINS**3) / idx.size
    cell = WORK_SIZE // LAYOUT_GRID
    layout = colour.mean(0).reshape(LAYOUT_GRID, cell, LAYOUT_GRID, cell, 3).mean((1, 3)).ravel()
    if len(small) > 1:
        motion = np.mean([_motion_features(a, b) for a, b in zip(small[:-1], small[1:])], axis=0)
    else:
        motion = np.zeros(3)
    parts = [np.sqrt(hist), LAYOUT_WEIGHT * layout / np.sqrt(layout.size), MOTION_WEIGHT * motion]
    if spectrum_weight > 0:
        parts.append(spectrum_weight * _spectrum_features(colour.mean(-1)))
    return np.concatenate(parts)


# --- frame selection ------------------------------------------------------------------------------------
def frame_indices(num_frames: int, frames: str | int) -> list[int]:
    """Indices to embed: ``[0]`` for "first", else ``n`` evenly spaced indices over the clip."""
    if frames == "first":
        return [0]
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be 'first' or a positive int, got {frames!r}")
    return np.linspace(0, max(num_frames - 1, 0), frames).round().astype(int).tolist()


def _read_for(embedder_type: str, path: str, num_frames: int, frames: str | int) -> tuple[np.ndarray, int]:
    """(decoded frames, how many of them are the selected frames)."""
    idx = frame_indices(num_frames, frames)
    if embedder_type == "color_motion" and frames == "first" and num_frames > 1:
        idx = [0, 1]  # motion needs a second frame; colour still comes from frame 0 only
        clip, _ = read_video(path, frame_indices=idx)
        return clip, 1
    clip, _ = read_video(path, frame_indices=idx)
    return clip, len(clip)


# --- model embedders ------------------------------------------------------------------------------------
class _HFImageEmbedder:
    """A transformers vision model + its image processor, embedding uint8 frames in batches."""

    def __init__(self, spec: dict, device: str):
        from transformers import AutoImageProcessor, CLIPVisionModel, CLIPVisionModelWithProjection, Dinov2Model

        folder = str(spec["path"])
        # the slow (PIL) processors: the fast ones need torchvision, which this project does not require
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, use_fast=False)
        if spec["type"] == "dinov2":
            self.model, self.output = Dinov2Model.from_pretrained(folder, local_files_only=True), "pooler_output"
        else:
            model, info = CLIPVisionModelWithProjection.from_pretrained(
                folder, local_files_only=True, output_loading_info=True)
            if any(k.startswith("visual_projection") for k in info["missing_keys"]):
                model, self.output = CLIPVisionModel.from_pretrained(folder, local_files_only=True), "pooler_output"
            else:
                self.output = "image_embeds"
            self.model = model
        self.device = device
        self.model.to(device).eval()

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        out = self.model(pixel_values=pixels)
        return getattr(out, self.output).float().cpu()


def check_embedder_spec(embedder: dict) -> dict:
    """Validate an embedder spec (type known, model folder present) without loading anything; returns a copy."""
    if not isinstance(embedder, dict) or embedder.get("type") not in EMBEDDER_TYPES:
        raise ValueError(f"embedder must be a dict with type in {EMBEDDER_TYPES}, got {embedder!r}")
    if embedder["type"] in _ASSET_NAME:
        if not embedder.get("path"):
            raise ValueError(f"embedder type '{embedder['type']}' needs a 'path' to a local model folder")
        require_path(embedder["path"], _ASSET_NAME[embedder["type"]])
    return dict(embedder)


def _l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def embed(manifest_path: str | Path, out_dir: str | Path, *, embedder: dict, frames: str | int = "first",
          batch_size: int = 32, device: str = "cpu", progress: bool = True) -> StepResult:
    """Embed every row of ``manifest_path`` into ``out_dir/embeddings.parquet``.

    Raises FileNotFoundError (naming where to get the weights) before any decoding when a model folder
    is missing. Skips the work when the same manifest, embedder and frames were already embedded.
    """
    t0 = time.perf_counter()
    spec = check_embedder_spec(embedder)
    frame_indices(1, frames)  # validate before heavy work
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    manifest_path, out = Path(manifest_path), Path(out_dir)
    if not manifest_path.is_file():
        raise FileNotFoundError(f"manifest not found: '{manifest_path}' (run ingest first)")
    manifest = pq.read_table(manifest_path, columns=["key", "path", "num_frames"]).to_pylist()
    if not manifest:
        raise ValueError(f"manifest '{manifest_path}' is empty: nothing to embed")
    config = {"stage": STEP,  # (key kept: it is part of the fingerprint)
               "embedder": spec, "frames": frames}
    fp = fingerprint(config, [manifest_path] + ([spec["path"]] if "path" in spec else []))
    if done := completed_result(out, STEP, fp):
        return done

    model = None if spec["type"] == "color_motion" else _HFImageEmbedder(spec, device)
    log.info("[embed] %d items with %s (frames=%s) on %s → %s", len(manifest), spec["type"], frames, device, out)
    vectors: list[torch.Tensor] = []
    for start in tqdm(range(0, len(manifest), batch_size), desc="embed", disable=not progress):
        rows = manifest[start:start + batch_size]
        clips = []
        for row in rows:
            try:
                clips.append(_read_for(spec["type"], row["path"], row["num_frames"], frames))
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(f"cannot read '{row['key']}' ({row['path']}) for embedding: {e}") from e
        if model is None:
            weight = float(spec.get("spectrum_weight", 0.0))
            batch = torch.from_numpy(np.stack([color_motion_features(c, n, weight) for c, n in clips])).float()
        else:
            per_frame = model([f for c, _ in clips for f in c])
            sizes = [len(c) for c, _ in clips]
            batch = torch.stack([_l2_normalise(e).mean(0) for e in per_frame.split(sizes)])
        vectors.append(_l2_normalise(batch))
    emb = torch.cat(vectors).numpy().astype(np.float32)
    dim = emb.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), dim)
    table = pa.table({"key": [r["key"] for r in manifest], "embedding": column})
    table = table.replace_schema_metadata({"embedder": json.dumps(spec, default=str), "frames": json.dumps(frames),
                                           "dim": str(dim)})
    out.mkdir(parents=True, exist_ok=True)
    path = write_parquet_atomic(table, out / "embeddings.parquet")
    result = StepResult(STEP, len(manifest), len(manifest), 0, time.perf_counter() - t0, [str(path)])
    mark_step_done(out, STEP, fp, result)
    log.info(result.summary_line())
    return result


def load_embeddings(path: str | Path) -> tuple[list[str], torch.Tensor]:
    """Read ``embeddings.parquet`` → (keys, float32 tensor (N, D))."""
    table = pq.read_table(path)
    if not {"key", "embedding"} <= set(table.column_names):
        raise ValueError(f"'{path}' is not an embeddings file (needs 'key' and 'embedding' columns)")
    col = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        raise ValueError(f"'{path}': 'embedding' must be a fixed-size list, got {col.type}")
    values = np.array(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)  # writable copy
    return table.column("key").to_pylist(), torch.from_numpy(values.reshape(len(table), col.type.list_size))


def make_tiny_dinov2(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-initialised real ``Dinov2Model`` + ``BitImageProcessor`` to ``folder`` (tests, demos)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = Path(folder)
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                          image_size=32, patch_size=8)
    Dinov2Model(config).save_pretrained(folder)
    # the real DINOv2 processor (resize shortest edge, centre crop, ImageNet normalisation), at 32 px
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder
