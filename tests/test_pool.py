"""``ddm.pool``: pool.json written by ``ddm.assemble``, ``python -m ddm.pool list|verify|retire``.

The runs tree is the tiny one of tests/fixtures/pipeline.py (real tiny experts and router, no training),
its exports' metadata pointing at a copy of the checked-in test shards (``geometry.shards_dir``, the real
``manifest_hash``) so the export records shard hashes; the router was trained "balanced", so its
``prior_correction`` is not zero and retiring must carry it over.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ddm.sampling_spec import Routing, SamplingSpec
from ddm.export_files import MASTER_FILE, read_export_metadata, save_export
from ddm.files import file_sha256
from ddm.assemble import main as export_main
from ddm.interop import build_checkpoint_model
from ddm.pipeline import DDMPipeline
from ddm.pool import POOL_FILE, main as pool_main, read_pool
from ddm.sampler import routing_weights
from ddm.shards import expert_counts
from tests.fixtures.pipeline import (STAGES, expert_metadata, router_metadata, tiny_expert, tiny_router,
                                     train_config, weight_hashes)

K = 3


def _geometry(shards: Path, stage: str) -> dict:
    res, frames, fps = STAGES[stage]
    return {"shards_dir": str(shards), "height": res, "width": res, "num_frames": frames, "fps": float(fps)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, test_shards_dir) -> Path:
    copy = tmp_path_factory.mktemp("shards") / "tiny"
    shutil.copytree(test_shards_dir, copy)
    return copy


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_text_dir, shards) -> Path:
    """A K=3 model folder exported by ``ddm.assemble`` (experts in stage2 and stage3, one balanced router)."""
    runs = tmp_path_factory.mktemp("runs") / "tiny"
    config = train_config(tiny_text_dir, K)
    manifest = file_sha256(shards / "shards.parquet")
    for k in range(1, K + 1):
        for i, stage in enumerate(STAGES):
            model = tiny_expert(tiny_text_dir, seed=1000 + 10 * k + i)
            meta = {**expert_metadata(model, stage, k, config), "manifest_hash": manifest,
                    "geometry": _geometry(shards, stage)}
            save_export(model.state_dict(), runs / f"expert{k}" / stage / "export", meta,
                        max_shard_bytes=meta["max_shard_bytes"])
    counts = expert_counts(shards)
    total = sum(counts.values())
    prior = [math.log(counts[e] / total) - math.log(1 / K) for e in sorted(counts)]
    router = tiny_router(K, seed=50)
    meta = {**router_metadata(router, "stage2", config, prior_correction=prior), "manifest_hash": manifest,
            "geometry": _geometry(shards, "stage2"), "expert_counts": {str(e): n for e, n in counts.items()}}
    save_export(router.state_dict(), runs / "router" / "stage2" / "export", meta,
                max_shard_bytes=meta["max_shard_bytes"])
    out = tmp_path_factory.mktemp("model") / "pool"
    export_main(["--runs", str(runs), "--out", str(out)])
    return out


def _copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    return copy


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = pool_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_records_the_pool_and_verify_passes(folder, shards, capsys):
    pool = read_pool(folder)
    assert pool["num_experts"] == K and [e["expert_id"] for e in pool["experts"]] == [1, 2, 3]
    assert pool["history"][0]["op"] == "export"
    for entry in pool["experts"]:
        k = entry["expert_id"]
        assert entry["preset"] == "tiny" and entry["params"] > 0
        assert sorted(entry["stages"]) == ["stage2", "stage3"]
        record = entry["stages"]["stage2"]
        assert record["step"] == 10 and record["manifest_hash"] == file_sha256(shards / "shards.parquet")
        # the cluster's own shards (train and val), relative to the shards dir, hashed independently here
        expected = sorted(str(p.relative_to(shards)) for p in (shards / f"expert_{k}").glob("*.tar"))
        assert sorted(record["shards"]) == expected and len(expected) >= 2
        assert all(record["shards"][r] == file_sha256(shards / r) for r in expected)
        master = f"expert{k}/stage3/{MASTER_FILE}"
        assert entry["files"][master] == file_sha256(folder / master)
        assert any(f.startswith(f"expert{k}/stage2/model/") for f in entry["files"])
    router = pool["router"]
    assert router["num_experts"] == K and router["uses_text"] is False
    assert len(router["stages"]["stage2"]["shards"]) == len(list(shards.glob("expert_*/*.tar")))
    assert f"Router/{MASTER_FILE}" in router["files"]

    code, out, _ = _run(capsys, "verify", folder)
    assert code == 0 and out.strip().splitlines()[-1].startswith("OK:") and len(out.strip().splitlines()) == 1
    code, out, _ = _run(capsys, "list", folder)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["slot", "expert_id", "preset", "params"]
    assert lines[2].split()[:3] == ["2", "2", "tiny"] and "stage2:10" in lines[2]
    assert lines[-1].startswith("router: K=3, text-aware: no")


def test_verify_names_a_tampered_shard(folder, shards, tmp_path, capsys):
    moved = tmp_path / "moved_shards"
    shutil.copytree(shards, moved)
    victim = moved / "expert_2" / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    code, _, err = _run(capsys, "verify", folder, "--shards", moved)
    assert code == 1
    assert "expert slot 2" in err and "expert_2/train-000001.tar' does not match its recorded sha256" in err
    assert "expert slot 1" not in err and "expert slot 3" not in err  # only the owners of that shard fail
    assert "router" in err  # the router read every cluster's shards


def test_verify_catches_a_swapped_expert_export(folder, tmp_path, capsys):
    copy = _copy(folder, tmp_path)
    shutil.rmtree(copy / "expert1")
    shutil.copytree(copy / "expert2", copy / "expert1")  # expert2's files in slot 1
    code, _, err = _run(capsys, "verify", copy)
    assert code == 1
    assert "expert slot 1: 'expert1/stage2' holds the export of expert_id 2" in err and "swapped" in err
    assert "'expert1/stage2/master.safetensors' does not match its recorded sha256" in err


def test_verify_catches_a_router_of_the_wrong_k(folder, tmp_path, tiny_text_dir, capsys):
    copy = _copy(folder, tmp_path)
    shutil.rmtree(copy / "Router")
    router = tiny_router(4, seed=3)
    save_export(router.state_dict(), copy / "Router", router_metadata(router, "stage2", train_config(tiny_text_dir, 3)))
    code, _, err = _run(capsys, "verify", copy)
    assert code == 1
    assert "router 'Router': its config predicts 4 experts but the folder holds 3" in err
    assert "Router/master.safetensors' does not match its recorded sha256" in err


def test_retire_keeps_the_other_experts_and_renormalises_the_router(folder, tmp_path, capsys):
    new = tmp_path / "retired"
    code, out, err = _run(capsys, "retire", folder, "--expert", 2, "--out", new)
    assert code == 0, err
    assert _run(capsys, "verify", new)[0] == 0
    pool = read_pool(new)
    assert [e["expert_id"] for e in pool["experts"]] == [1, 3] and pool["num_experts"] == 2
    assert pool["router"]["num_experts"] == 2 and pool["router"]["retired"][0]["expert_id"] == 2
    assert [h["op"] for h in pool["history"]] == ["export", "retire"]
    # expert3's files are expert2's now: hard links of the very same bytes
    assert (new / "expert2" / "stage2" / MASTER_FILE).samefile(folder / "expert3" / "stage2" / MASTER_FILE)
    index = json.loads((new / "model_index.json").read_text())
    assert index["num_experts"] == 2 and index["experts"] == ["expert1", "expert2"]
    assert not (new / "expert3").exists()

    original = DDMPipeline.from_pretrained(folder, stage="stage2", load_text=False)
    pipe = DDMPipeline.from_pretrained(new, stage="stage2")
    assert weight_hashes(pipe)[:2] == [weight_hashes(original)[i] for i in (0, 2)]
    meta = read_export_metadata(new / "Router")
    old_meta = read_export_metadata(folder / "Router")
    assert meta["prior_correction"] == [old_meta["prior_correction"][i] for i in (0, 2)]
    assert meta["expert_counts"] == {"1": old_meta["expert_counts"]["1"], "2": old_meta["expert_counts"]["3"]}

    # router probabilities: the original's, renormalised over experts 1 and 3 (float64 reference)
    gen = torch.Generator().manual_seed(0)
    c = pipe.router.cfg.latent_channels
    x, t = torch.randn(6, c, 2, 8, 8, generator=gen), torch.rand(6, generator=gen)
    with torch.no_grad():
        old_logits = build_checkpoint_model(folder / "Router")(x, t).double()
        new_logits = pipe.router(x, t)
    corrected = old_logits + torch.tensor(old_meta["prior_correction"], dtype=torch.float64)
    full = corrected.softmax(-1)
    reference = full[:, [0, 2]] / full[:, [0, 2]].sum(-1, keepdim=True)
    weights = routing_weights(new_logits + torch.tensor(pipe.prior_correction), "full", 2)
    assert full[:, 1].mean() > 0.1  # the retired expert had real mass to hand on
    torch.testing.assert_close(weights.double(), reference, atol=1e-6, rtol=0)

    result = pipe.generate(["a red car"], SamplingSpec(Routing("full"), num_steps=2), seeds=0, progress=False)
    assert result.videos.shape[0] == 1 and result.latents.isfinite().all()

    code, out, _ = _run(capsys, "list", new)
    assert "K=2" in out.splitlines()[-1] and "retired: expert_id 2" in out


def test_retire_errors(folder, tmp_path, capsys):
    code, _, err = _run(capsys, "retire", folder, "--expert", 4, "--out", tmp_path / "x")
    assert code == 2 and "expert 4 is out of range" in err and not (tmp_path / "x").exists()
    (tmp_path / "taken").mkdir()
    code, _, err = _run(capsys, "retire", folder, "--expert", 1, "--out", tmp_path / "taken")
    assert code == 2 and "already exists" in err
    two = tmp_path / "two"
    one = tmp_path / "one"
    assert _run(capsys, "retire", folder, "--expert", 1, "--out", two)[0] == 0
    assert _run(capsys, "retire", two, "--expert", 2, "--out", one)[0] == 0
    assert [e["expert_id"] for e in read_pool(one)["experts"]] == [2] and _run(capsys, "verify", one)[0] == 0
    code, _, err = _run(capsys, "retire", one, "--expert", 1, "--out", tmp_path / "none")
    assert code == 2 and "retiring the last expert" in err and not (tmp_path / "none").exists()
    assert (one / POOL_FILE).is_file()
