"""data.synthetic: real files, honest captions, determinism, and cluster structure k-means can find."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import pyarrow.parquet as pq

from data.cluster import cluster
from data.embed import embed
from data.ingest import ingest
from data.synthetic import FAMILIES, TEXTURE_WORDS, main, make_synthetic_dataset
from ddm.video_io import probe_video, read_video
from tests.test_cluster import adjusted_rand_index


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "synthetic.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_files_and_captions(tmp_path):
    out = make_synthetic_dataset(tmp_path / "syn", num_videos=6, num_images=2, num_frames=9, progress=False)
    rows = read_rows(out)
    assert [r["kind"] for r in rows] == ["video"] * 6 + ["image"] * 2
    assert [int(r["family"]) for r in rows] == [0, 1, 2, 0, 1, 2, 0, 1]  # round-robin over families
    for r in rows:
        media = out / r["path"]
        info = probe_video(media)
        assert (info["height"], info["width"]) == (64, 64)
        assert info["num_frames"] == (9 if r["kind"] == "video" else 1)
        caption = media.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert caption == r["text"]
        fam = FAMILIES[int(r["family"])]
        for word in [*r["shape"].split(), *r["colour"].split(), r["background"], TEXTURE_WORDS[fam.texture]]:
            assert word in caption
        assert all(s in fam.shapes for s in r["shape"].split())
        assert (r["motion"] in caption.split()) if r["kind"] == "video" else ("across" not in caption)


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", num_videos=3, num_frames=5, seed=7, progress=False)
    b = make_synthetic_dataset(tmp_path / "b", num_videos=3, num_frames=5, seed=7, progress=False)
    c = make_synthetic_dataset(tmp_path / "c", num_videos=3, num_frames=5, seed=8, progress=False)
    for i in range(3):
        name = f"clip_{i:05d}"
        assert (a / f"{name}.txt").read_bytes() == (b / f"{name}.txt").read_bytes()
        np.testing.assert_array_equal(read_video(a / f"{name}.mp4")[0], read_video(b / f"{name}.mp4")[0])
    assert [r["text"] for r in read_rows(a)] != [r["text"] for r in read_rows(c)]


def test_families_are_recovered_by_the_real_stages(tmp_path):
    """ingest → colour-motion embed → two-level balanced k-means finds the scene families."""
    families = 4
    out = make_synthetic_dataset(tmp_path / "syn", num_videos=64, num_frames=5, families=families, progress=False)
    prep = tmp_path / "prep"
    ingest(out, prep, progress=False)
    embed(prep / "manifest.parquet", prep, embedder={"type": "color_motion"}, progress=False)
    cluster(prep / "embeddings.parquet", prep, num_experts=families, fine_clusters=16, progress=False)
    family_of = {Path(r["path"]).stem: int(r["family"]) for r in read_rows(out)}
    rows = pq.read_table(prep / "assignments.parquet").to_pylist()
    assert adjusted_rand_index([family_of[r["key"]] for r in rows], [r["expert"] for r in rows]) >= 0.9


def test_cli_and_argument_checks(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--num-videos", "2", "--num-frames", "5", "--size", "32"])
    assert "wrote 2 clips" in capsys.readouterr().out
    assert probe_video(tmp_path / "cli" / "clip_00001.mp4")["width"] == 32
    with pytest.raises(ValueError, match="families"):
        make_synthetic_dataset(tmp_path / "x", num_videos=2, families=len(FAMILIES) + 1)
    with pytest.raises(ValueError, match="at least one"):
        make_synthetic_dataset(tmp_path / "x", num_videos=0)
