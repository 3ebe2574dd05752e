"""Rebuild the checked-in tiny shard set: ``python tests/testdata/make_test_shards.py``.

30 synthetic items (27 clips of 24×24 px, 12 frames at 8 fps, and 3 still images, three scene families)
go through the real ``data.prepare`` path — ingest, colour/motion embedding, balanced clustering into
K = 3 experts, encoding at 16×16 px, 9 frames, 8 fps with the lossless PixelVAE (latents (12, 3, 16, 16))
and the tiny T5 / CLIP (32 dims, seed 0) — with a 20% val split and 3 samples per shard.

What is kept, under ``tests/testdata/tiny/``: ``manifest.parquet``, ``assignments.parquet`` and
``shards/tiny/`` (tars, ``shards.parquet``, ``encode_rejected.parquet``): what the DataModule and the
audit read. The build runs in a fixed temporary folder so the paths recorded in the manifest and in
each sample's ``source`` are the same on every rebuild; the output is deterministic.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from data.prepare import compose_config, prepare
from data.synthetic import make_synthetic_dataset

HERE = Path(__file__).resolve().parent
OUT = HERE / "tiny"
STAGE = "tiny"
KEEP = ("manifest.parquet", "assignments.parquet", f"shards/{STAGE}")


def build(out: Path = OUT, work: Path | None = None) -> Path:
    """Build the set in ``work`` (default: a fixed folder in the system temp dir) and copy it to ``out``."""
    work = work or Path(tempfile.gettempdir()) / "ddm_make_test_shards"
    shutil.rmtree(work, ignore_errors=True)
    src = make_synthetic_dataset(work / "src", num_videos=27, num_images=3, seed=0, size=24, num_frames=12, fps=8,
                                 families=3, progress=False)
    overrides = [f"input={src}", f"paths.root_dir={work}", "vae=pixel", "text=tiny", "embedder=color_motion",
                 "num_experts=3", "cluster.fine_clusters=3", f"encode.stage={STAGE}", "encode.resolution=16",
                 "encode.num_frames=9", "encode.fps=8", "encode.val_fraction=0.2", "encode.samples_per_shard=3",
                 "ingest.workers=1", "progress=false"]
    cfg = compose_config(overrides)
    prepare(cfg)
    prep = Path(cfg.paths.data_dir)
    shutil.rmtree(out, ignore_errors=True)
    for rel in KEEP:
        src_path, dst = prep / rel, out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src_path.is_dir():
            shutil.copytree(src_path, dst, ignore=shutil.ignore_patterns("*.json"))  # markers hold timings
        else:
            shutil.copy2(src_path, dst)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"wrote the test shard set to {build()}")
