"""``data.prepare mode=extend`` (issue 16 item 1, data side): new clips become expert K+1 without touching the pool.

A real tiny prep folder (3 synthetic families, colour-motion embedder, pixel VAE, tiny text encoders) is
extended with clips of a fourth family mixed with clips of a known one: the new family forms expert 4, the
known clips are reported against their existing expert, and nothing in the original prep folder changes.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from data.cluster import assign_new
from data.embed import load_embeddings
from data.extend import EXTEND_FILE, decide, extension_dir
from data.geometry import read_shard_geometry
from data.prepare import compose_config, prepare
from data.synthetic import make_synthetic_dataset
from ddm.sampling_spec import Routing, SamplingSpec
from ddm.export_files import build_model_from_export, read_export_metadata
from ddm.files import file_sha256
from ddm.eval.routing import T_GRID, compare_folders, main as routing_main
from ddm.assemble import main as export_main
from ddm.pipeline import DDMPipeline
from ddm.pool import main as pool_main, read_pool, retire_expert
from ddm.shards import available_experts, read_index
from tests.fixtures.data import TINY_PREP_OVERRIDES
from tests.fixtures.train import run_cli

CLIP = dict(size=24, num_frames=12, fps=8, progress=False)


def _hashes(folder):
    return {p.relative_to(folder): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock" and "extend" not in p.relative_to(folder).parts
            and "logs" not in p.relative_to(folder).parts}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_text_dir):
    root = tmp_path_factory.mktemp("extend")
    src = make_synthetic_dataset(root / "src", 18, seed=0, **CLIP)
    args = [f"paths.root_dir={root}", *TINY_PREP_OVERRIDES, f"text.folder={tiny_text_dir}"]
    prepare(compose_config([*args, f"input={src}"]))
    # new data: 6 clips of a fourth family (dusk: purple backgrounds) and 3 of a known one (ocean), new seed
    new = root / "new"
    make_synthetic_dataset(new / "dusk", 6, seed=7, families=1, first_family=3, **CLIP)
    make_synthetic_dataset(new / "ocean", 3, seed=8, families=1, first_family=0, **CLIP)
    return root, args, new


def test_new_family_becomes_expert_k_plus_1_and_the_pool_is_untouched(base):
    root, args, new = base
    prep = root / "prep"
    before = _hashes(prep)
    result = prepare(compose_config([*args, "mode=extend", f"input={new}"]))["extend"]
    assert _hashes(prep) == before  # not one byte of the original prep folder changed
    record = result.info
    work = extension_dir(prep, 4)
    assert record["new_expert"] == 4 and record["experts_before"] == 3 and record["new_clips"] == 9
    new_rows = pq.read_table(work / "new_assignments.parquet").to_pylist()
    assert sorted(r["key"].split("-", 1)[1].split("__")[0] for r in new_rows) == ["dusk"] * 6
    existing = pq.read_table(work / "existing.parquet").to_pylist()
    assert len(existing) == 3 and all(r["key"].startswith("x4-ocean__") for r in existing)
    ocean_expert = {r["expert"] for r in existing}
    assert len(ocean_expert) == 1  # the known family goes to one existing expert, and it is the ocean one
    old_assign = pq.read_table(prep / "assignments.parquet").to_pylist()
    # the pool's shards: old experts linked unchanged, expert 4 added, one merged index
    pool = work / "shards" / "stage2"
    base_shards = prep / "shards" / "stage2"
    assert available_experts(pool) == [1, 2, 3, 4]
    for tar in base_shards.rglob("*.tar"):
        assert file_sha256(pool / tar.relative_to(base_shards)) == file_sha256(tar)
    old_index, pool_index = read_index(base_shards).to_pylist(), read_index(pool).to_pylist()
    assert [r for r in pool_index if r["expert"] != 4] == old_index
    assert sum(r["expert"] == 4 for r in pool_index) == record["encoded"] > 0
    assert read_shard_geometry(pool).latent_shape == read_shard_geometry(base_shards).latent_shape
    # the extended clustering sends the new family to 4 and every old clip to the expert it had
    keys, x_new = load_embeddings(work / "embeddings.parquet")
    labels, _ = assign_new(x_new, work / "centroids.safetensors")
    dusk = torch.tensor(["dusk" in k for k in keys])
    assert (labels[dusk] == 4).all() and (labels[~dusk] != 4).all()
    old_keys, x_old = load_embeddings(prep / "embeddings.parquet")
    old_labels, _ = assign_new(x_old, work / "centroids.safetensors")
    expected = {r["key"]: r["expert"] for r in old_assign}
    assert old_labels.tolist() == [expected[k] for k in old_keys]
    assert pq.read_table(work / "assignments.parquet").num_rows == len(old_assign) + 6
    assert (work / EXTEND_FILE).is_file()


def test_declared_rule_takes_every_clip_and_a_near_threshold_takes_none(base, tmp_path):
    root, args, new = base
    copy = tmp_path / "root"
    shutil.copytree(root / "prep", copy / "prep", ignore=shutil.ignore_patterns("extend", ".lock"))
    moved = [f"paths.root_dir={copy}", *args[1:]]
    result = prepare(compose_config([*moved, "mode=extend", f"input={new}", "extend.rule=declared"]))["extend"]
    assert result.info["to_new_expert"] == 9 and result.info["threshold"] is None
    shutil.rmtree(copy / "prep" / "extend")
    with pytest.raises(ValueError, match="none of the 9 new clips is farther than 1e\\+06.*extend.rule=declared"):
        prepare(compose_config([*moved, "mode=extend", f"input={new}", "extend.threshold=1e6"]))


def test_the_rule_itself():
    import numpy as np

    old = np.linspace(0.0, 1.0, 101)
    is_new, threshold = decide(np.array([0.5, 0.995, 2.0]), old, "distance", None, 0.99)
    assert threshold == pytest.approx(0.99) and is_new.tolist() == [False, True, True]
    assert decide(np.array([0.1]), old, "declared", None, 0.99)[0].tolist() == [True]
    with pytest.raises(ValueError, match="extend.rule"):
        decide(np.array([0.1]), old, "nearest", None, 0.99)


# --- the whole lifecycle: 3 experts → extend → train only expert 4 and the router → ddm.pool add -------------------
def _train(root, prep, text_dir, experiment, module, *extra):
    run_cli(module, ["experiment=tiny", f"paths.root_dir={root}", f"paths.data_dir={prep}", f"text.folder={text_dir}",
                     f"experiment_name={experiment}", "recipe.stage2.max_steps=2", "recipe.router.max_steps=2",
                     "recipe.stage2.batch_size=2", "recipe.router.batch_size=2", *extra])


@pytest.mark.slow
def test_grow_the_pool_from_3_to_4_experts_without_touching_the_old_ones(base, tiny_text_dir, tmp_path, capsys):
    root, args, new = base
    prep = root / "prep"
    for k in (1, 2, 3):
        _train(root, prep, tiny_text_dir, "base", "train.expert", f"expert={k}")
    _train(root, prep, tiny_text_dir, "base", "train.router")
    three = tmp_path / "three"
    export_main(["--runs", str(root / "runs" / "base"), "--out", str(three)])
    before = {p.relative_to(three): file_sha256(p) for p in three.rglob("*") if p.is_file()}
    work = Path(prepare(compose_config([*args, "mode=extend", f"input={new}"]))["extend"].info["shards"]["stage2"])
    work = work.parents[1]
    # only the new expert and the K+1 router train, on the extended folder
    _train(root, work, tiny_text_dir, "grow", "train.expert", "expert=4", "num_experts=4")
    _train(root, work, tiny_text_dir, "grow", "train.router", "num_experts=4")
    # the other way to get the 4-way router: fine-tune the 3-way one, its head grown by a row
    _train(root, work, tiny_text_dir, "grow-ft", "train.router", "num_experts=4",
           f"init_from={root / 'runs' / 'base' / 'router' / 'stage2' / 'export'}")
    assert "head grows to 4 outputs" in (root / "runs" / "grow-ft" / "router" / "stage2" / "logs" / "router.log").read_text()
    assert read_export_metadata(root / "runs" / "grow-ft" / "router" / "stage2" / "export")["num_experts"] == 4
    four = tmp_path / "four"
    assert pool_main(["add", str(three), "--runs", str(root / "runs" / "grow"), "--expert", "4", "--out", str(four)]) == 0
    assert {p.relative_to(three): file_sha256(p) for p in three.rglob("*") if p.is_file()} == before
    for k in (1, 2, 3):  # the old experts' exports, byte for byte
        for p in (three / f"expert{k}").rglob("*"):
            if p.is_file():
                assert file_sha256(four / p.relative_to(three)) == before[p.relative_to(three)]
    pool = read_pool(four)
    assert pool["num_experts"] == 4 and [e["expert_id"] for e in pool["experts"]] == [1, 2, 3, 4]
    assert pool["router"]["num_experts"] == 4 and pool["history"][-1]["op"] == "add"
    assert pool_main(["verify", str(four)]) == 0
    pipe = DDMPipeline.from_pretrained(four)
    result = pipe.generate(["a circle moves left on a purple gradient background"], SamplingSpec(Routing("full"), num_steps=2), seeds=[0], progress=False)
    assert result.videos.shape[0] == 1 and pipe.num_experts == 4
    # the gated way: the 3-way router kept, the 4-way one only tells new from old; its posterior from the two exports
    gated = tmp_path / "four-gated"
    assert pool_main(["add", str(three), "--runs", str(root / "runs" / "grow"), "--expert", "4", "--out", str(gated),
                      "--router", "gated"]) == 0
    assert pool_main(["verify", str(gated)]) == 0 and read_pool(gated)["history"][-1]["router"] == "gated"
    composite, old, new = (build_model_from_export(p) for p in (gated / "Router", three / "Router",
                                                              root / "runs" / "grow" / "router" / "stage2" / "export"))
    x, t = torch.randn(3, old.cfg.latent_channels, 3, 16, 16), torch.tensor([0.1, 0.5, 0.9])
    cond = {"clip": torch.randn(3, composite.cfg.text_dim or 1), "t5": torch.randn(3, 5, composite.cfg.t5_dim or 1)}
    assert composite.cfg.reads_text  # the tiny recipe's routers read the caption: the text must reach both parts
    with torch.no_grad():
        g = new(x, t, cond).softmax(-1)[:, -1:]
        want = torch.cat([(1 - g) * old(x, t, cond).softmax(-1), g], dim=-1)
        torch.testing.assert_close(composite(x, t, cond).softmax(-1), want, rtol=0, atol=1e-6)
    pipe = DDMPipeline.from_pretrained(gated)
    assert pipe.generate(["a circle moves left on a purple gradient background"], SamplingSpec(num_steps=2), seeds=[0],
                         progress=False).videos.shape[0] == 1
    assert pool_main(["retire", str(gated), "--expert", "2", "--out", str(tmp_path / "x")]) == 2
    assert "retire by retraining" in capsys.readouterr().err
    # refusals: the old 3-way router, an id the pool holds, an existing --out
    capsys.readouterr()
    assert pool_main(["add", str(three), "--runs", str(root / "runs" / "base"), "--expert", "3",
                      "--out", str(tmp_path / "x")]) == 2
    assert "expert_id 3 is already in" in capsys.readouterr().err
    shutil.copytree(root / "runs" / "grow" / "expert4", root / "runs" / "base" / "expert4")
    assert pool_main(["add", str(three), "--runs", str(root / "runs" / "base"), "--expert", "4",
                      "--out", str(tmp_path / "x")]) == 2
    assert "predicts 3 experts but the grown pool has 4" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    # retire expert 4 again, both ways: its row dropped (zero-cost) and a router retrained on experts 1-3 only
    dropped, retrained = tmp_path / "dropped", tmp_path / "retrained"
    assert pool_main(["retire", str(four), "--expert", "4", "--out", str(dropped)]) == 0
    _train(root, work, tiny_text_dir, "retire", "train.router", "router_experts=[1,2,3]", "num_experts=3")
    meta = read_export_metadata(root / "runs" / "retire" / "router" / "stage2" / "export")
    assert meta["expert_ids"] == [1, 2, 3] and meta["num_experts"] == 3 and sorted(meta["expert_counts"]) == ["1", "2", "3"]
    assert pool_main(["retire", str(four), "--expert", "4", "--router-runs", str(root / "runs" / "retire"),
                      "--out", str(retrained)]) == 0
    assert read_pool(retrained)["history"][-1]["router"] == "retrained"
    assert pool_main(["verify", str(retrained)]) == 0 and pool_main(["verify", str(dropped)]) == 0
    assert file_sha256(retrained / "Router" / "master.safetensors") != file_sha256(dropped / "Router" / "master.safetensors")
    # the evaluation that compares them: the same held-out samples of clusters 1-3 (4's are left out), per t
    results = compare_folders([dropped, retrained, four], work / "shards" / "stage2", split="train", max_per_expert=4)
    for folder in (dropped, retrained):
        r = results[str(folder)]
        assert r["n"] == 12 and r["left_out"] == 4 and len(r["per_t"]) == len(T_GRID)
        assert all(0.0 <= row["accuracy"] <= 1.0 for row in r["per_t"])
    assert results[str(four)]["n"] == 16 and results[str(four)]["left_out"] == 0
    capsys.readouterr()
    assert routing_main([str(dropped), str(retrained), "--shards", str(work / "shards" / "stage2"), "--split", "train",
                         "--samples", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3  # header + one row per folder
    # a retrained router for the wrong experts is refused
    with pytest.raises(ValueError, match="trained for experts \\[1, 2, 3\\] but the pool without it holds \\[1, 2, 4\\]"):
        retire_expert(four, 3, tmp_path / "y", router_runs=root / "runs" / "retire")


def test_a_joining_expert_must_share_the_latent_space_and_text_widths():
    from ddm.pool import check_joining_expert

    pool = {"kind": "expert", "config": {"latent_channels": 3, "context_in_dim": 32, "vec_in_dim": 32},
            "geometry": {"height": 16, "width": 16, "num_frames": 9, "t5_dim": 32},
            "train_config": {"vae": {"type": "pixel", "spatial_factor": 1, "path": "/a"}}}
    same = {**pool, "train_config": {"vae": {"type": "pixel", "spatial_factor": 1, "path": "/elsewhere"}}}
    check_joining_expert(pool, same, "stage2", "new")  # where the VAE sits does not matter
    for change, message in ((("config", "context_in_dim", 64), "config.context_in_dim is 64"),
                            (("geometry", "height", 32), "geometry.height is 32"),
                            (("train_config", "vae", {"type": "pixel", "spatial_factor": 2}), "its vae is")):
        group, key, value = change
        other = {**pool, group: {**pool[group], key: value}}
        with pytest.raises(ValueError, match=message):
            check_joining_expert(pool, other, "stage2", "new")
    with pytest.raises(ValueError, match="'router' export, not an expert"):
        check_joining_expert(pool, {**pool, "kind": "router"}, "stage2", "new")
