"""diffusers-format model folders and Paris 1.0's published layout, read and written without diffusers installed.

Parity with the diffusers classes themselves is in tests/test_interop_diffusers.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ddm.sampling_spec import Routing, SamplingSpec
from ddm.export_files import state_dict_sha256
from ddm.interop import (COND_IN_FILE, WEIGHTS_FILE, load_expert_diffusers, save_expert_diffusers)
from ddm.interop_export import export_diffusers
from ddm.pipeline import DDMPipeline
from tests.fixtures.paris1 import build_demo_folder, build_paris1_folder, demo_expert

PROMPTS = ["a red car drives along the coast", "a cat sleeps on a windowsill"]
SAMPLE = dict(spec=SamplingSpec(Routing("topk", k=2), num_steps=3, cfg_scale=3.0), seeds=[1, 2], progress=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_text_dir) -> Path:
    return build_demo_folder(tmp_path_factory.mktemp("demo") / "model", tiny_text_dir)


@pytest.fixture(scope="module")
def demo_diffusers(demo, tmp_path_factory) -> Path:
    return export_diffusers(demo, tmp_path_factory.mktemp("diff") / "model")


@pytest.mark.parametrize("preset", ["tiny", "tiny-flux"])
def test_expert_round_trip_through_diffusers_files_is_exact(tiny_text_dir, tmp_path, preset):
    model = demo_expert(tiny_text_dir, seed=1, preset=preset)
    folder = save_expert_diffusers(model.state_dict(), model.config, tmp_path / "e", metadata={"stage": "stage2"})
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "FluxTransformer2DModel" and config["in_channels"] == model.config.in_channels
    assert (folder / COND_IN_FILE).is_file() == model.config.cond_embed
    sd, cfg, meta = load_expert_diffusers(folder)
    assert cfg == model.config and meta["stage"] == "stage2"
    assert state_dict_sha256(sd) == state_dict_sha256(model.state_dict())  # bit for bit, layout and cond_in included


def test_sharded_expert_folder_round_trips(tiny_text_dir, tmp_path):
    from ddm.interop import WEIGHTS_INDEX

    model = demo_expert(tiny_text_dir, seed=4)
    folder = save_expert_diffusers(model.state_dict(), model.config, tmp_path / "e", max_shard_bytes=400_000)
    shards = sorted(p.name for p in folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 1 and (folder / WEIGHTS_INDEX).is_file() and not (folder / WEIGHTS_FILE).exists()
    index = json.loads((folder / WEIGHTS_INDEX).read_text())
    assert set(index["weight_map"].values()) == set(shards) and index["metadata"]["total_size"] > 0
    assert state_dict_sha256(load_expert_diffusers(folder)[0]) == state_dict_sha256(model.state_dict())
    (folder / shards[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing.*{shards[-1]}"):
        load_expert_diffusers(folder)


def test_bf16_export_and_tampered_file_is_refused(tiny_text_dir, tmp_path):
    model = demo_expert(tiny_text_dir, seed=2)
    folder = save_expert_diffusers(model.state_dict(), model.config, tmp_path / "e", dtype=torch.bfloat16)
    sd, _, _ = load_expert_diffusers(folder)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(str(folder / WEIGHTS_FILE))
    tensors["proj_out.bias"] = tensors["proj_out.bias"] + 1
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata=header)
    with pytest.raises(ValueError, match="proj_out.bias.*does not match its recorded sha256"):
        load_expert_diffusers(folder)


def test_diffusers_folder_reimports_and_samples_bit_identically(demo, demo_diffusers):
    index = json.loads((demo_diffusers / "model_index.json").read_text())
    assert index["checkpoint_format"] == "diffusers" and index["vae"] == "vae"
    assert (demo_diffusers / "expert3" / "stage2" / WEIGHTS_FILE).is_file()
    assert (demo_diffusers / "vae" / "config.json").is_file()
    assert (demo_diffusers / "scheduler" / "scheduler_config.json").is_file()
    original = DDMPipeline.from_pretrained(demo)
    again = DDMPipeline.from_pretrained(demo_diffusers)
    hashes = [state_dict_sha256(m.state_dict()) for m in (*original.experts, original.router, original.vae)]
    assert hashes == [state_dict_sha256(m.state_dict()) for m in (*again.experts, again.router, again.vae)]
    first, second = original.generate(PROMPTS, **SAMPLE), again.generate(PROMPTS, **SAMPLE)
    assert torch.equal(first.latents, second.latents)
    assert (first.videos == second.videos).all()


def test_pipeline_loaded_from_diffusers_saves_back_to_our_format(demo_diffusers, tmp_path):
    pipe = DDMPipeline.from_pretrained(demo_diffusers, load_text=False)
    saved = pipe.save_pretrained(tmp_path / "ours")
    assert (saved / "expert1" / "stage2" / "master.safetensors").is_file() and (saved / "vae" / "config.json").is_file()
    again = DDMPipeline.from_pretrained(saved, load_text=False)
    assert [state_dict_sha256(m.state_dict()) for m in (*pipe.experts, pipe.router, pipe.vae)] == \
        [state_dict_sha256(m.state_dict()) for m in (*again.experts, again.router, again.vae)]


def test_paris1_layout_loads(tiny_text_dir, tmp_path):
    folder = build_paris1_folder(tmp_path / "paris1", tiny_text_dir)
    pipe = DDMPipeline.from_pretrained(folder, load_text=False, stage=None)
    assert pipe.num_experts == 2 and pipe.router is not None
    expected = [load_expert_diffusers(folder / f"expert_{i}")[0] for i in (0, 1)]
    assert [state_dict_sha256(e.state_dict()) for e in pipe.experts] == [state_dict_sha256(sd) for sd in expected]
    # 1-based spellings of the same layout load the same weights
    one_based = build_paris1_folder(tmp_path / "paris1b", tiny_text_dir, zero_based=False)
    again = DDMPipeline.from_pretrained(one_based, load_text=False)
    assert [state_dict_sha256(e.state_dict()) for e in again.experts] == \
        [state_dict_sha256(e.state_dict()) for e in pipe.experts]


def _broken(folder: Path, dst: Path, *, drop: tuple[str, ...] = (), rename: dict[str, str] | None = None) -> Path:
    shutil.copytree(folder, dst)
    for name in drop:
        target = dst / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    for src, new in (rename or {}).items():
        (dst / src).rename(dst / new)
    return dst


def test_malformed_paris1_folders_name_the_path_and_the_problem(tiny_text_dir, tmp_path):
    good = build_paris1_folder(tmp_path / "good", tiny_text_dir, num_experts=3)
    cases = [
        # a gap in the 0-based ids: names the folders found
        (_broken(good, tmp_path / "gap", drop=("expert_1",)), ValueError, r"consecutive.*expert_0, expert_2"),
        # an expert folder without weights: names the folder and what it holds
        (_broken(good, tmp_path / "noweights", drop=("expert_2/diffusion_pytorch_model.safetensors",)),
         FileNotFoundError, r"expert_2.*holds no checkpoint.*found: config.json"),
        # no router for several experts
        (_broken(good, tmp_path / "norouter", drop=("router",)), FileNotFoundError, r"3 experts but no Router"),
        # no expert folder at all: lists what the folder holds
        (_broken(good, tmp_path / "noexperts", drop=("expert_0", "expert_1", "expert_2")), FileNotFoundError,
         r"no expert folders.*found: .*model_index.json.*router/"),
        # a damaged config.json
        (_broken(good, tmp_path / "badjson"), ValueError, r"expert_0.*config.json is not valid JSON"),
    ]
    (tmp_path / "badjson" / "expert_0" / "config.json").write_text("{not json")
    # an expert of another architecture (Paris 1.0's own DiT-XL/2 experts)
    foreign = _broken(good, tmp_path / "dit")
    config = json.loads((foreign / "expert_1" / "config.json").read_text())
    (foreign / "expert_1" / "config.json").write_text(json.dumps({**config, "_class_name": "DiTTransformer2DModel"}))
    cases.append((foreign, ValueError, r"expert_1/config.json' describes a 'DiTTransformer2DModel'.*another arch"))
    # a VAE folder of another class (Paris 1.0 ships sd-vae-ft-mse's AutoencoderKL)
    sd_vae = _broken(good, tmp_path / "sdvae")
    config = json.loads((sd_vae / "vae" / "config.json").read_text())
    (sd_vae / "vae" / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderKL"}))
    cases.append((sd_vae, ValueError, r"vae/config.json' describes a 'AutoencoderKL', not a AutoencoderKLHunyuanVideo"))
    for folder, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            DDMPipeline.from_pretrained(folder, load_text=False)


def test_export_cli_dtype_formats_and_diffusers(tiny_text_dir, tmp_path):
    from ddm.export_files import MASTER_FILE, SHARD_DIR, load_export
    from ddm.assemble import main
    from tests.fixtures.pipeline import build_runs_tree

    runs = tmp_path / "runs" / "tiny"
    hashes = build_runs_tree(runs, tiny_text_dir, monolith=False)
    main(["--runs", str(runs), "--out", str(tmp_path / "bf16"), "--dtype", "bf16", "--formats", "master",
          "--stages", "stage2"])
    stage = tmp_path / "bf16" / "expert1" / "stage2"
    assert (stage / MASTER_FILE).is_file() and not (stage / SHARD_DIR).exists()
    sd, meta = load_export(stage)  # verifies the sha256s recorded for the cast weights
    assert {v.dtype for v in sd.values()} == {torch.bfloat16} and meta["export_dtype"] == "bf16"
    main(["--runs", str(runs), "--out", str(tmp_path / "sharded"), "--formats", "sharded", "--stages", "stage2"])
    stage = tmp_path / "sharded" / "expert1" / "stage2"
    assert (stage / SHARD_DIR).is_dir() and not (stage / MASTER_FILE).exists()
    assert state_dict_sha256(load_export(stage)[0]) == hashes["expert1/stage2"]
    main(["--runs", str(runs), "--out", str(tmp_path / "diff"), "--format", "diffusers", "--stages", "stage2"])
    assert (tmp_path / "diff" / "expert3" / "stage2" / WEIGHTS_FILE).is_file()
    assert not list(tmp_path.glob(".diff*"))  # the intermediate folder is gone
    pipe = DDMPipeline.from_pretrained(tmp_path / "diff", load_text=False)
    assert state_dict_sha256(pipe.experts[0].state_dict()) == hashes["expert1/stage2"]
    with pytest.raises(SystemExit):
        main(["--runs", str(runs), "--out", str(tmp_path / "x"), "--formats", "zip"])
