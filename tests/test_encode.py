"""Encode: frame resampling, resizing, splits, shard contents, rejects, plan safety (data/encode.py)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.encode import (encode, plan_shards, sample_frame_indices, shards_dir_for, split_of,
                         target_size)
from data.ingest import ingest
from ddm.shards import decode_sample, iter_shard, read_index
from data.synthetic import make_synthetic_dataset
from ddm.models.text import TextEncoders
from ddm.models.vae import build_vae
from ddm.video_io import resize_center_crop, write_video

PIXEL = {"type": "pixel", "spatial_factor": 2}


def test_frame_indices_resample_to_the_target_rate_centred():
    # 30 frames at 24 fps → 9 frames at 8 fps: every 3rd frame, a span of 25 frames centred in the clip
    assert sample_frame_indices(30, 24.0, 9, 8.0) == [2, 5, 8, 11, 14, 17, 20, 23, 26]
    assert sample_frame_indices(9, 8.0, 9, None) == list(range(9))  # native rate, exact fit
    assert sample_frame_indices(12, 8.0, 9, 8.0) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert sample_frame_indices(24, 24.0, 9, 8.0) is None  # needs 25 frames
    assert sample_frame_indices(5, 4.0, 9, 8.0) == [0, 1, 1, 2, 2, 3, 3, 4, 4]  # upsampling repeats frames


def test_resize_center_crop_on_colour_blocks():
    # 16 x 48: three 16-px vertical bands. To 16 x 16: scale 1 (short side already 16), crop the middle band.
    frame = np.zeros((16, 48, 3), np.uint8)
    frame[:, :16, 0], frame[:, 16:32, 1], frame[:, 32:, 2] = 255, 255, 255
    out = resize_center_crop(frame[None], (16, 16))
    assert out.shape == (1, 16, 16, 3) and (out[0, :, :, 1] == 255).all() and not out[0, :, :, [0, 2]].any()
    # 32 x 96 → 8 x 8: area-halved twice to 8 x 24, the middle third stays pure green
    big = np.repeat(np.repeat(frame, 2, axis=0), 2, axis=1)
    small = resize_center_crop(big[None], (8, 8))
    assert (small[0, :, :, 1] == 255).all() and not small[0, :, :, [0, 2]].any()
    # upscaling to a non-square target covers it: 16 x 48 → (32, 64) scales by 2 → 32 x 96, crop 16 px a side
    up = resize_center_crop(frame[None], (32, 64))
    assert up.shape == (1, 32, 64, 3)
    assert (up[0, :, 20:44, 1] == 255).all() and (up[0, :, :12, 0] == 255).all() and (up[0, :, 52:, 2] == 255).all()
    assert target_size(256) == (256, 256) and target_size([16, 32]) == (16, 32)
    with pytest.raises(ValueError, match="resolution"):
        target_size("big")


def test_split_by_key_hash_is_stable_and_close_to_the_fraction():
    keys = [f"clip_{i:05d}" for i in range(20000)]
    splits = [split_of(k, 0.05) for k in keys]
    assert splits == [split_of(k, 0.05) for k in keys]
    frac = splits.count("val") / len(keys)
    assert abs(frac - 0.05) < 5 * np.sqrt(0.05 * 0.95 / len(keys))
    assert {split_of(k, 0.0) for k in keys[:100]} == {"train"}


def test_plan_is_deterministic_and_cut_per_expert_and_split():
    manifest = [{"key": f"k{i:02d}", "path": f"/v/{i}.mp4", "caption": "c", "kind": "video", "num_frames": 20,
                 "fps": 8.0} for i in range(20)]
    experts = {f"k{i:02d}": 1 + i % 2 for i in range(19)}  # k19 has no assignment
    args = {"num_frames": 9, "fps": 8.0, "val_fraction": 0.0, "samples_per_shard": 4, "image_mode": "repeat"}
    shards, rejected = plan_shards(manifest, experts, **args)
    again, _ = plan_shards(list(reversed(manifest)), experts, **args)
    assert shards == again
    assert rejected == [{"key": "k19", "reason": "no cluster assignment"}]
    assert [(s.rel, len(s.samples)) for s in shards] == [
        ("expert_1/train-000000.tar", 4), ("expert_1/train-000001.tar", 4), ("expert_1/train-000002.tar", 2),
        ("expert_2/train-000000.tar", 4), ("expert_2/train-000001.tar", 4), ("expert_2/train-000002.tar", 1)]
    assert [s.key for s in shards[0].samples] == ["k00", "k02", "k04", "k06"]


@pytest.fixture
def clip_set(tmp_path):
    """8 synthetic items (6 clips 24x24 @ 8 fps x 12 frames, 2 stills), a 24 fps grey ramp and a too-short
    clip, ingested; experts assigned round-robin."""
    src = make_synthetic_dataset(tmp_path / "src", 6, size=24, num_frames=12, fps=8, num_images=2, progress=False)
    ramp = np.repeat(np.arange(30, dtype=np.uint8)[:, None, None, None] * 8, 24, 1).repeat(24, 2).repeat(3, 3)
    write_video(src / "ramp.mp4", ramp, 24)
    (src / "ramp.txt").write_text("a grey ramp")
    write_video(src / "short.mp4", ramp[:5], 8)
    (src / "short.txt").write_text("too short")
    prep = tmp_path / "prep"
    ingest(src, prep, progress=False)
    keys = pq.read_table(prep / "manifest.parquet", columns=["key"]).column("key").to_pylist()
    pq.write_table(pa.table({"key": keys, "expert": [1 + i % 2 for i in range(len(keys))],
                             "distance": [0.0] * len(keys)}), prep / "assignments.parquet")
    return prep


def _run(prep, text_dirs, **kw):
    args = {"stage": "t", "resolution": 16, "num_frames": 9, "fps": 8.0, "vae": PIXEL, "text": text_dirs,
            "val_fraction": 0.3, "samples_per_shard": 2, "batch_size": 3, "progress": False} | kw
    return encode(prep / "manifest.parquet", prep / "assignments.parquet", prep, **args)


def _samples(shards_dir):
    return {k: decode_sample(k, m) for tar in sorted(shards_dir.glob("expert_*/*.tar")) for k, m in iter_shard(tar)}


@pytest.fixture
def text_dirs(tiny_text_dir):
    return {"t5_dir": str(tiny_text_dir / "t5"), "clip_dir": str(tiny_text_dir / "clip")}


def test_encoded_shards_hold_the_right_latents_text_and_metadata(clip_set, text_dirs, tiny_text_encoders):
    result = _run(clip_set, text_dirs)
    shards_dir = shards_dir_for(clip_set, "t")
    manifest = {r["key"]: r for r in pq.read_table(clip_set / "manifest.parquet").to_pylist()}
    rejected = dict(zip(*pq.read_table(shards_dir / "encode_rejected.parquet").to_pydict().values()))
    assert set(rejected) == {"short"} and "too short: 5 frames at 8 fps" in rejected["short"]
    samples = _samples(shards_dir)
    assert set(samples) == set(manifest) - {"short"} and result.n_output == len(samples) == 9
    vae = build_vae(PIXEL)
    assignments = dict(zip(*pq.read_table(clip_set / "assignments.parquet", columns=["key", "expert"]).to_pydict()
                           .values()))
    index = {r["key"]: r for r in read_index(shards_dir).to_pylist()}
    for tar in shards_dir.glob("expert_*/*.tar"):  # each sample's content hash, computed here independently
        for key, members in iter_shard(tar):
            h = hashlib.sha256()
            for name in sorted(members):
                h.update(name.encode() + b"\0" + len(members[name]).to_bytes(8, "little") + members[name])
            assert index[key]["sha256"] == h.hexdigest()
    keys = sorted(samples)
    t5_refs, clip_refs = tiny_text_encoders.encode([samples[k]["caption"] for k in keys])
    for key, t5_ref, clip_ref in zip(keys, t5_refs, clip_refs):
        s = samples[key]
        meta = s["meta"]
        assert s["latent"].shape == (48, 3, 8, 8) and s["latent"].dtype == np.float16
        assert (meta["expert"], meta["split"]) == (assignments[key], split_of(key, 0.3)) == (
            index[key]["expert"], index[key]["split"])
        assert meta["caption"] == s["caption"] == manifest[key]["caption"] and meta["source"] == manifest[key]["path"]
        assert (meta["num_frames"], meta["height"], meta["width"], meta["fps"]) == (9, 16, 16, 8.0)
        # T5 at true length and pooled CLIP, as the encoders give them for this caption
        assert s["t5"].shape == tuple(t5_ref.shape)
        assert np.allclose(s["t5"].astype(np.float32), t5_ref.half().float().numpy(), atol=1e-3)
        assert np.allclose(s["clip"], clip_ref.numpy(), atol=1e-5)
        frames = ((vae.decode(torch.from_numpy(s["latent"].astype(np.float32))[None]) + 1) * 127.5).round()
        if manifest[key]["kind"] == "image":  # a static clip
            assert (frames[0, :, 1:] == frames[0, :, :1]).all()
    # the 24 fps ramp, resampled to 8 fps: frames 2, 5, ..., 26, whose grey level is 8 x index (±codec error)
    ramp = ((vae.decode(torch.from_numpy(samples["ramp"]["latent"].astype(np.float32))[None]) + 1) * 127.5)
    grey = ramp[0].mean(dim=(0, 2, 3)).numpy()
    assert np.allclose(grey, 8 * np.arange(2, 27, 3), atol=4), grey


def test_raw_frames_mode_stores_the_resized_frames(clip_set, text_dirs):
    _run(clip_set, text_dirs, vae=None, stage="raw")
    samples = _samples(shards_dir_for(clip_set, "raw"))
    assert all("frames" in s and "latent" not in s for s in samples.values())
    ramp = samples["ramp"]["frames"]
    assert ramp.shape == (9, 16, 16, 3) and ramp.dtype == np.uint8
    assert np.allclose(ramp.mean(axis=(1, 2, 3)), 8 * np.arange(2, 27, 3), atol=4)


def test_images_can_be_skipped_and_bad_settings_are_refused(clip_set, text_dirs):
    _run(clip_set, text_dirs, image_mode="skip", stage="noimg")
    rejected = pq.read_table(shards_dir_for(clip_set, "noimg") / "encode_rejected.parquet").to_pylist()
    assert sorted(r["key"] for r in rejected if "image" in r["reason"]) == ["img_00000", "img_00001"]
    with pytest.raises(ValueError, match="4k\\+1"):
        _run(clip_set, text_dirs, num_frames=10)
    with pytest.raises(ValueError, match="multiples of the spatial factor 2"):
        _run(clip_set, text_dirs, resolution=15, stage="odd")
    with pytest.raises(ValueError, match="image_mode"):
        _run(clip_set, text_dirs, image_mode="loop")


def test_rerun_is_a_no_op_and_another_plan_is_refused(clip_set, text_dirs):
    _run(clip_set, text_dirs)
    shards_dir = shards_dir_for(clip_set, "t")
    stamps = {p: p.stat().st_mtime_ns for p in shards_dir.rglob("*")}
    again = _run(clip_set, text_dirs)
    assert again.skipped and {p: p.stat().st_mtime_ns for p in shards_dir.rglob("*")} == stamps
    with pytest.raises(ValueError, match="different encode plan"):
        _run(clip_set, text_dirs, samples_per_shard=3)
    assert json.loads((shards_dir / "encode_plan.json").read_text())["config"]["samples_per_shard"] == 2


def test_a_deleted_tar_is_rewritten_identically_on_resume(clip_set, text_dirs):
    _run(clip_set, text_dirs)
    shards_dir = shards_dir_for(clip_set, "t")
    victim = sorted(shards_dir.glob("expert_2/train-*.tar"))[0]
    before = victim.read_bytes()
    others = {p: p.stat().st_mtime_ns for p in shards_dir.glob("expert_*/*.tar") if p != victim}
    victim.unlink()
    (shards_dir / "encode.done.json").unlink()  # as if the run had died before finishing
    _run(clip_set, text_dirs)
    assert victim.read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in others} == others  # complete tars are not rewritten
