"""``data.geometry``: a shard set's geometry read back from its encode plan and first sample."""
from __future__ import annotations

import json

import pytest

from data.geometry import read_shard_geometry


def test_geometry_from_the_plan_and_the_first_sample(make_shards):
    shards, _ = make_shards({(1, "train"): [3], (2, "train"): [2]}, latent_shape=(4, 2, 3, 3), t5_dim=8, clip_dim=6)
    g = read_shard_geometry(shards)  # no encode_plan.json (another tool's shards): the sample alone
    assert (g.height, g.width, g.num_frames, g.fps) == (4, 4, 5, 8.0)
    assert (g.latent_shape, g.vae, g.t5_dim, g.clip_dim) == ((4, 2, 3, 3), None, 8, 6)
    assert g.mismatches(resolution=4, num_frames=5, fps=8, latent_shape=(4, 2, 3, 3), vae={"type": "x"}) == []
    assert g.mismatches(resolution=8, num_frames=9, fps=24, latent_shape=(4, 3, 3, 3)) == [
        ("resolution", 8, 4), ("num_frames", 9, 5), ("fps", 24.0, 8.0),
        ("latent shape (C, T, h, w)", [4, 3, 3, 3], [4, 2, 3, 3])]

    plan = {"plan_hash": "x", "config": {"size": [4, 4], "num_frames": 5, "fps": None,
                                         "vae": {"type": "pixel", "spatial_factor": 2, "path": "/a/vae.pt"}}}
    (shards / "encode_plan.json").write_text(json.dumps(plan))
    g = read_shard_geometry(shards)
    assert g.vae == {"type": "pixel", "spatial_factor": 2} and g.fps is None  # native rates: no single fps
    # where the weights sit or how they run does not change the latents; the spatial factor does
    assert g.mismatches(vae={"type": "pixel", "spatial_factor": 2, "path": "/b/vae.pt", "device": "cuda"}) == []
    assert g.mismatches(vae={"type": "pixel", "spatial_factor": 1}) == [
        ("vae", {"type": "pixel", "spatial_factor": 1}, {"type": "pixel", "spatial_factor": 2})]
    assert g.to_dict()["resolution"] == [4, 4]

    plan["config"]["size"] = [8, 8]
    (shards / "encode_plan.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"disagree on size \(\[8, 8\] vs \[4, 4\]\).*mixes two encodes"):
        read_shard_geometry(shards)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_shard_geometry(shards / "nowhere")
