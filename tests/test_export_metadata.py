"""``ddm.export_metadata``: the typed export metadata, new (top-level fields) and legacy (inside train_config).

``tests/testdata/legacy_export`` was written before the typed fields existed (its metadata holds the
geometry, VAE, text encoders and flow shift only inside ``train_config``); it must keep loading.
"""
from __future__ import annotations

from pathlib import Path

from ddm.export_files import read_export_metadata
from ddm.assemble import _shared_fields
from ddm.export_metadata import ExportMetadata, StageSpec
from ddm.interop import build_checkpoint_model
from ddm.model_folder import stage_geometry_from_metadata
from ddm.pool_manifest import shards_dir_of

LEGACY = Path(__file__).parent / "testdata" / "legacy_export"


def test_a_legacy_export_reads_into_the_typed_fields_and_loads():
    meta = read_export_metadata(LEGACY)
    assert "stage_spec" not in meta and "vae" not in meta  # really the old layout
    typed = ExportMetadata.from_dict(meta)
    assert typed.stage_spec == StageSpec(resolution=8, num_frames=5, fps=8, vae_spatial_factor=1, text_pad_to=64,
                                         flow_shift=None)
    assert typed.vae == {"type": "pixel", "spatial_factor": 1} and typed.latent_space == typed.vae
    assert typed.text["t5_dir"] == "/old/tiny_text/t5" and typed.num_experts == 3 and typed.expert_id == 2
    assert typed.prediction == "velocity" and typed.experiment == "legacy"
    assert typed.shards_index_hash == "0" * 64 and shards_dir_of(meta) == "/old/prep/shards/stage2"
    geometry = stage_geometry_from_metadata(meta, "stage3")  # the recipe held every stage
    assert (geometry.resolution, geometry.num_frames, geometry.spatial_factor) == (16, 5, 1)
    model = build_checkpoint_model(LEGACY)
    assert model.config.hidden_size == 16


def test_new_and_legacy_metadata_of_the_same_run_agree():
    legacy = read_export_metadata(LEGACY)
    typed = ExportMetadata.from_dict(legacy)
    new = {**typed.fields(), "config": legacy["config"], "train_config": {"seed": 0}}  # no recipe/vae/text inside
    again = ExportMetadata.from_dict(new)
    assert again == typed  # raw is not compared
    assert _shared_fields(new, "stage2") == _shared_fields(legacy, "stage2")
    assert stage_geometry_from_metadata(new, "stage2").to_dict() == stage_geometry_from_metadata(legacy, "stage2").to_dict()
    assert "prediction" in new and "prediction" not in ExportMetadata(kind="router").fields()


def test_runtime_vae_fields_do_not_change_the_latent_space():
    a = ExportMetadata.from_dict({"vae": {"type": "hunyuan", "path": "/a/vae.pt", "dtype": "bfloat16"}})
    b = ExportMetadata.from_dict({"vae": {"type": "hunyuan", "path": "/b/vae.pt", "tiling": True}})
    assert a.latent_space == b.latent_space == {"type": "hunyuan"}
    assert StageSpec.from_dict({"resolution": [16, 24]}).resolution == (16, 24)
    assert StageSpec.from_dict(StageSpec(resolution=(16, 24)).to_dict()).resolution == (16, 24)
