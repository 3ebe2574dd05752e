"""``python -m ddm.assemble`` (runs tree → model folder) and ``python -m ddm.generate`` (folder → mp4/gif).

The runs tree is written once per module with the metadata training writes (tests/fixtures/pipeline.py);
the exporter runs through its real ``main``; the last test generates a video end to end in a subprocess.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ddm.sampling_spec import Routing, SamplingSpec
from ddm.export_files import MASTER_FILE, SHARD_DIR, load_export, save_export
from ddm.assemble import main as export_main
from ddm.pipeline import DDMPipeline
from ddm.sampler import RoutingTrace
from ddm.video_io import probe_video, read_video
from tests.fixtures.pipeline import (STAGES, VAE_SPEC, build_runs_tree, latent_channels, router_metadata,
                                     tiny_router, train_config, weight_hashes)
from tests.fixtures.train import run_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_text_dir: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("runs") / "tiny"
    return root, build_runs_tree(root, tiny_text_dir)


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "model"
    export_main(["--runs", str(runs[0]), "--out", str(out)])
    return out


def test_export_writes_the_paris_layout_from_the_runs_metadata(runs, exported):
    _, hashes = runs
    for k in (1, 2, 3):
        for stage in STAGES:
            assert (exported / f"expert{k}" / stage / MASTER_FILE).is_file()
            assert (exported / f"expert{k}" / stage / SHARD_DIR / "model.safetensors.index.json").is_file()
    for name in ("t5/model.safetensors", "clip/config.json", "null_t5.pt", "null_clip.pt"):
        assert (exported / name).is_file(), name
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "DDMPipeline" and index["num_experts"] == 3
    assert index["experts"] == ["expert1", "expert2", "expert3"] and index["default_stage"] == "stage3"
    assert index["router"] == {"stage2": "Router/stage2", "stage3": "Router/stage3"}  # one router per stage
    assert index["vae"] == VAE_SPEC and index["expert_architecture"] == "opensora-v2-mmdit"
    for stage, (res, frames, fps) in STAGES.items():
        assert index["stages"][stage] == {"resolution": res, "num_frames": frames, "fps": fps,
                                          "latent_channels": latent_channels(),
                                          "spatial_factor": VAE_SPEC["spatial_factor"]}
    # each stage loads the runs' weights, and its own router
    for stage in STAGES:
        p = DDMPipeline.from_pretrained(exported, stage=stage, load_text=False)
        assert weight_hashes(p) == [hashes[f"expert{k}/{stage}"] for k in (1, 2, 3)] + [hashes[f"router/{stage}"]]
    # the metadata travels with the weights
    assert load_export(exported / "expert2" / "stage2")[1]["expert_id"] == 2


def test_export_options_stages_no_sharded_and_monolith(runs, tmp_path):
    root, hashes = runs
    out = tmp_path / "s2"
    export_main(["--runs", str(root), "--out", str(out), "--stages", "stage2", "--no-sharded", "--cfg-scale", "3",
                 "--num-steps", "12"])
    scheduler = json.loads((out / "model_index.json").read_text())["scheduler"]
    assert (scheduler["cfg_scale"], scheduler["num_steps"]) == (3.0, 12)
    assert not (out / "expert1" / "stage3").exists()
    assert (out / "expert1" / "stage2" / MASTER_FILE).is_file()
    assert not (out / "expert1" / "stage2" / SHARD_DIR).exists()
    index = json.loads((out / "model_index.json").read_text())
    assert index["router"] == "Router" and index["default_stage"] == "stage2"
    assert weight_hashes(DDMPipeline.from_pretrained(out, load_text=False))[-1] == hashes["router/stage2"]

    mono = tmp_path / "mono"
    export_main(["--runs", str(root), "--out", str(mono), "--monolith"])
    assert not (mono / "Router").exists() and not (mono / "expert2").exists()
    p = DDMPipeline.from_pretrained(mono, stage="stage2", load_text=False)
    assert p.num_experts == 1 and p.router is None
    assert weight_hashes(p) == [hashes["monolith/stage2"]]

    with pytest.raises(FileExistsError, match="--overwrite"):
        export_main(["--runs", str(root), "--out", str(mono), "--monolith"])
    export_main(["--runs", str(root), "--out", str(mono), "--overwrite"])  # replaced by the DDM folder
    assert json.loads((mono / "model_index.json").read_text())["num_experts"] == 3


def _broken_runs(runs: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name / "tiny"
    shutil.copytree(runs, copy)
    return copy


def _rewrite_meta(export: Path, **changes) -> None:
    sd, meta = load_export(export)
    save_export(sd, export, {**meta, **changes}, max_shard_bytes=int(meta["max_shard_bytes"]))


def test_export_errors_name_the_problem(runs, tmp_path, tiny_text_dir):
    root, _ = runs

    def expect(error, match, runs_dir, *extra):
        with pytest.raises(error, match=match):
            export_main(["--runs", str(runs_dir), "--out", str(tmp_path / "out"), *extra])

    missing_stage = _broken_runs(root, tmp_path, "stage")
    shutil.rmtree(missing_stage / "expert2" / "stage3" / "export")
    expect(FileNotFoundError, "expert 2 has no stage3 export", missing_stage)

    missing_expert = _broken_runs(root, tmp_path, "expert")
    shutil.rmtree(missing_expert / "expert2")
    expect(FileNotFoundError, r"lacks the run of expert \[2\]", missing_expert)

    no_router = _broken_runs(root, tmp_path, "router")
    shutil.rmtree(no_router / "router")
    expect(FileNotFoundError, "no router export", no_router)

    other_clusters = _broken_runs(root, tmp_path, "clusters")
    _rewrite_meta(other_clusters / "expert3" / "stage2" / "export", centroids_hash="d" * 64)
    expect(ValueError, "disagree on centroids_hash", other_clusters)

    other_shards = _broken_runs(root, tmp_path, "shards")
    _rewrite_meta(other_shards / "expert1" / "stage3" / "export", manifest_hash="another")
    expect(ValueError, "disagree on stage3:manifest_hash", other_shards)

    other_vae = _broken_runs(root, tmp_path, "vae")
    export = other_vae / "expert2" / "stage2" / "export"
    config = load_export(export)[1]["train_config"]
    _rewrite_meta(export, train_config={**config, "vae": {**config["vae"], "spatial_factor": 2}})
    expect(ValueError, "disagree on vae", other_vae)

    other_k = _broken_runs(root, tmp_path, "k")
    for stage in ("stage2", "stage3"):
        shutil.rmtree(other_k / "router" / stage)
        router = tiny_router(4, seed=3)
        meta = router_metadata(router, stage, train_config(tiny_text_dir, 3))
        save_export(router.state_dict(), other_k / "router" / stage / "export", meta)
    expect(ValueError, "the router predicts 4 experts but 3 experts are exported", other_k)

    trained_k = _broken_runs(root, tmp_path, "trained_k")
    shutil.rmtree(trained_k / "expert3")
    expect(ValueError, "trained with num_experts=3 but .* holds 2 expert runs", trained_k)


def _tree_digest(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_overwrite_never_loses_the_existing_folder(runs, exported, tmp_path):
    """--overwrite validates the runs first and assembles the new folder beside the old one: the old folder
    survives a bad --runs, a run missing one expert's stage-3 export, and a failure half-way through writing."""
    root, _ = runs
    existing = tmp_path / "existing"
    shutil.copytree(exported, existing)
    before = _tree_digest(existing)
    missing_stage = _broken_runs(root, tmp_path, "stage")
    shutil.rmtree(missing_stage / "expert3" / "stage3" / "export")
    for error, match, extra in (
            (FileNotFoundError, "no expert runs", ["--runs", "/no/such/runs"]),
            (FileNotFoundError, "expert 3 has no stage3 export", ["--runs", str(missing_stage)]),
            # validation passes; the write fails after the first files are staged
            (FileNotFoundError, "t5", ["--runs", str(root), "--text-from", str(tmp_path / "no-text")])):
        with pytest.raises(error, match=match):
            export_main([*extra, "--out", str(existing), "--overwrite"])
        assert _tree_digest(existing) == before
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left
    export_main(["--runs", str(root), "--out", str(existing), "--overwrite", "--stages", "stage2"])
    assert json.loads((existing / "model_index.json").read_text())["default_stage"] == "stage2"
    assert not (existing / "expert1" / "stage3").exists()  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_tampered_export_and_a_nan_expert_are_named(exported, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(exported, folder)
    # NaN weights in expert 3, written as a consistent export: the sampler names expert 3 at its first call,
    # not the router one step later
    export = folder / "expert3" / "stage2"
    sd, meta = load_export(export)
    save_export({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in sd.items()},
                export, meta, max_shard_bytes=int(meta["max_shard_bytes"]))
    pipe = DDMPipeline.from_pretrained(folder, stage="stage2")
    with pytest.raises(FloatingPointError, match="expert 3 returned a non-finite velocity"):
        pipe.generate(["a cat"], SamplingSpec(Routing("full"), num_steps=2, cfg_scale=1.0), seeds=0, progress=False)
    # one flipped bit inside expert 2's weights: refused on load, naming the file
    master = folder / "expert2" / "stage2" / MASTER_FILE
    data = bytearray(master.read_bytes())
    data[-1] ^= 0x01
    master.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"'{master}': tensor .* does not match its recorded sha256"):
        DDMPipeline.from_pretrained(folder, stage="stage2", load_text=False)


def test_generate_checks_its_arguments_before_loading_anything(exported, tmp_path):
    """Bad numbers, a missing image or an unwritable --out stop ddm.generate before any expert is loaded: the
    folder here holds only model_index.json, so loading would fail with another error."""
    from ddm.generate import main as generate_main

    folder = tmp_path / "index-only"
    folder.mkdir()
    shutil.copy(exported / "model_index.json", folder)
    base = ["--model", str(folder), "--prompt", "a cat", "--out", str(tmp_path / "out")]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for extra, match in ((["--k", "0"], "--k must be >= 1"), (["--k", "4"], "--k 4 is more than the 3 experts"),
                         (["--num-steps", "0"], "--num-steps must be >= 1"), (["--num-frames", "6"], r"4k\+1"),
                         (["--image", str(tmp_path / "none.png")], "--image file.* not found"),
                         (["--out", str(blocker / "samples")], "--out .*a-file/samples is not writable")):
        with pytest.raises(SystemExit, match=match):
            generate_main([*base, *extra])
    with pytest.raises(FileNotFoundError, match="expert"):  # valid arguments: now the loading fails
        generate_main(base)


@pytest.mark.slow
def test_cli_generates_a_video_end_to_end(exported, tmp_path):
    out = tmp_path / "samples"
    proc = run_cli("ddm.generate", ["--model", str(exported), "--prompt", "a red car on a coastal road",
                                    "a cat asleep", "--num-steps", "2", "--seed", "5", "--stage", "stage3",
                                    "--strategy", "top1", "--out", str(out), "--trace", "--batch-size", "1"],
                   timeout=240)
    res, frames, fps = STAGES["stage3"]
    videos = sorted(out.glob("*.mp4"))
    assert [v.name for v in videos] == ["000_a-red-car-on-a-coastal-road.mp4", "001_a-cat-asleep.mp4"]
    assert str(videos[0]) in proc.stdout
    for video in videos:
        frames_read, fps_read = read_video(video)
        assert frames_read.shape == (frames, res, res, 3) and fps_read == pytest.approx(fps)
        assert probe_video(video.with_suffix(".gif"))["num_frames"] == frames
    record = json.loads((out / "samples.json").read_text())
    assert [s["seed"] for s in record["samples"]] == [5, 6]
    assert record["settings"]["num_steps"] == 2 and record["settings"]["stage"] == "stage3"
    trace = RoutingTrace.from_json(out / "routing_trace.json")
    assert trace.weights.shape == (2, 2, 3)  # (steps, samples, experts)
    assert (trace.experts_run >= 1).all() and ((trace.weights > 0).sum(-1) == 1).all()  # top-1
    assert (out / "routing_trace.png").stat().st_size > 0
