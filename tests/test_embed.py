"""data.embed: the colour-motion features against hand-computed values, tiny DINOv2 and CLIP vision
loaded offline from local folders and checked against a direct transformers call, frame selection,
and errors before heavy work."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import (AutoImageProcessor, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel,
                          Dinov2Model)

import data.embed as embed_module
from data.embed import color_motion_features, embed, frame_indices, load_embeddings, make_tiny_dinov2
from ddm.models.text import make_tiny_clip
from ddm.video_io import read_video, write_video


def moving_square_clip(direction: int, num_frames: int = 9, size: int = 32) -> np.ndarray:
    """A white square on dark blue, moving 2 px/frame right (+1) or left (−1)."""
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    frames[:] = (10, 20, 120)
    for f in range(num_frames):
        x = 10 + direction * 2 * f
        frames[f, 12:20, x:x + 8] = 255
    return frames


@pytest.fixture
def manifest(tmp_path):
    """Three clips (square right, square left, static red) and a manifest that lists them."""
    clips = {"right": moving_square_clip(+1), "left": moving_square_clip(-1),
             "still": np.full((9, 32, 32, 3), (200, 10, 10), np.uint8)}
    rows = []
    for key, frames in clips.items():
        path = write_video(tmp_path / "videos" / f"{key}.mp4", frames, fps=8)
        rows.append({"key": key, "path": str(path), "caption": key, "kind": "video", "num_frames": 9,
                     "fps": 8.0, "height": 32, "width": 32})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    return tmp_path / "manifest.parquet"


def embeddings_by_key(path) -> dict[str, np.ndarray]:
    keys, x = load_embeddings(path)
    return dict(zip(keys, x.numpy()))


def test_colour_histogram_and_motion_direction():
    red = np.full((2, 32, 32, 3), (250, 5, 5), np.uint8)
    f = color_motion_features(red, 1)
    hist = f[:64] ** 2  # the block is sqrt(probabilities)
    assert hist.sum() == pytest.approx(1.0) and hist[3 * 16] == pytest.approx(1.0)  # bin (r=3, g=0, b=0)
    np.testing.assert_allclose(f[64:112].reshape(16, 3), np.tile([250, 5, 5], (16, 1)) / 255 * 0.5 / np.sqrt(48))
    assert np.all(f[112:] == 0)  # nothing moves
    right = color_motion_features(moving_square_clip(+1), 9)
    left = color_motion_features(moving_square_clip(-1), 9)
    assert right[112] > 0 and left[112] > 0  # something changes
    assert right[113] > 0.2 and left[113] < -0.2  # and the global shift has the right sign
    assert abs(right[114]) < 0.05 and abs(left[114]) < 0.05  # no vertical motion


def test_color_motion_stage(manifest, tmp_path):
    result = embed(manifest, tmp_path / "a", embedder={"type": "color_motion"}, progress=False)
    assert (result.n_input, result.n_output) == (3, 3)
    emb = embeddings_by_key(tmp_path / "a" / "embeddings.parquet")
    assert list(emb) == ["right", "left", "still"]
    for v in emb.values():
        assert v.shape == (115,) and v.dtype == np.float32 and np.linalg.norm(v) == pytest.approx(1.0, abs=1e-6)
    schema = pq.read_schema(tmp_path / "a" / "embeddings.parquet")
    assert pa.types.is_fixed_size_list(schema.field("embedding").type)
    # deterministic
    embed(manifest, tmp_path / "b", embedder={"type": "color_motion"}, progress=False)
    again = embeddings_by_key(tmp_path / "b" / "embeddings.parquet")
    assert all(np.array_equal(emb[k], again[k]) for k in emb)
    # first frame vs mean of 4: a static clip is the same either way, a moving one is not (but close)
    embed(manifest, tmp_path / "c", embedder={"type": "color_motion"}, frames=4, progress=False)
    mean4 = embeddings_by_key(tmp_path / "c" / "embeddings.parquet")
    assert np.allclose(mean4["still"], emb["still"], atol=1e-3)
    assert not np.allclose(mean4["right"], emb["right"], atol=1e-3)
    assert float(mean4["right"] @ emb["right"]) > 0.9


def reference_embedding(model, processor, frames: np.ndarray, output: str) -> np.ndarray:
    """Direct transformers call: per-frame outputs, L2-normalised, averaged, re-normalised."""
    with torch.no_grad():
        out = getattr(model(pixel_values=processor(images=list(frames), return_tensors="pt")["pixel_values"]), output)
    out = out / out.norm(dim=-1, keepdim=True)
    mean = out.mean(0)
    return (mean / mean.norm()).numpy()


def test_tiny_dinov2_offline_matches_direct_call(manifest, tmp_path):
    folder = make_tiny_dinov2(tmp_path / "dinov2", seed=0)
    embed(manifest, tmp_path / "out", embedder={"type": "dinov2", "path": str(folder)}, frames=3,
          batch_size=2, progress=False)
    emb = embeddings_by_key(tmp_path / "out" / "embeddings.parquet")
    model = Dinov2Model.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder, use_fast=False)
    frames, _ = read_video(tmp_path / "videos" / "right.mp4", frame_indices=frame_indices(9, 3))
    assert frame_indices(9, 3) == [0, 4, 8]
    np.testing.assert_allclose(emb["right"], reference_embedding(model, processor, frames, "pooler_output"),
                               atol=1e-5)
    assert emb["right"].shape == (32,)


def test_clip_vision_with_and_without_projection(manifest, tmp_path):
    full = make_tiny_clip(tmp_path / "clip")  # a whole CLIP repository: vision tower + visual projection
    embed(manifest, tmp_path / "out", embedder={"type": "clip_vision", "path": str(full)}, progress=False)
    emb = embeddings_by_key(tmp_path / "out" / "embeddings.parquet")
    clip = CLIPModel.from_pretrained(full).eval()
    processor = CLIPImageProcessor.from_pretrained(full)
    frames, _ = read_video(tmp_path / "videos" / "left.mp4", frame_indices=[0])
    with torch.no_grad():
        ref = clip.get_image_features(pixel_values=processor(images=list(frames), return_tensors="pt")["pixel_values"])
    np.testing.assert_allclose(emb["left"], (ref / ref.norm())[0].numpy(), atol=1e-5)

    # a vision-only folder (no projection) falls back to the pooled output
    torch.manual_seed(1)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8)).eval()
    tower.save_pretrained(tmp_path / "vision")
    processor.save_pretrained(tmp_path / "vision")
    embed(manifest, tmp_path / "out2", embedder={"type": "clip_vision", "path": str(tmp_path / "vision")},
          progress=False)
    emb2 = embeddings_by_key(tmp_path / "out2" / "embeddings.parquet")
    np.testing.assert_allclose(emb2["left"], reference_embedding(tower, processor, frames, "pooler_output"), atol=1e-5)


def test_errors_before_heavy_work(manifest, tmp_path, monkeypatch):
    def no_decoding(*a, **k):
        raise AssertionError("decoded before checking the embedder")

    monkeypatch.setattr(embed_module, "read_video", no_decoding)
    with pytest.raises(FileNotFoundError, match="DINOv2.*facebook/dinov2"):
        embed(manifest, tmp_path / "out", embedder={"type": "dinov2", "path": str(tmp_path / "no-model")})
    with pytest.raises(FileNotFoundError, match="CLIP ViT-L/14"):
        embed(manifest, tmp_path / "out", embedder={"type": "clip_vision", "path": str(tmp_path / "no-clip")})
    with pytest.raises(ValueError, match="type in"):
        embed(manifest, tmp_path / "out", embedder={"type": "resnet"})
    with pytest.raises(ValueError, match="frames"):
        embed(manifest, tmp_path / "out", embedder={"type": "color_motion"}, frames="last")
    with pytest.raises(FileNotFoundError, match="run ingest first"):
        embed(tmp_path / "nope.parquet", tmp_path / "out", embedder={"type": "color_motion"})
    monkeypatch.undo()
    first = embed(manifest, tmp_path / "ok", embedder={"type": "color_motion"}, progress=False)
    monkeypatch.setattr(embed_module, "read_video", no_decoding)
    again = embed(manifest, tmp_path / "ok", embedder={"type": "color_motion"}, progress=False)
    assert again.skipped and again.outputs == first.outputs  # rerun: nothing decoded
