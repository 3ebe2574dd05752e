"""``python -m ddm.evaluate`` and ``ddm.eval.report``: the comparison arithmetic, the report and plots against
``metrics.json``, the metric plumbing, resumable generation through real tiny model folders, and bad inputs."""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ddm.eval.report import (CLASSIC_METRICS, METRICS, compare_runs, paired_difference, relative_improvement, render_markdown,
                             write_report)
from ddm.eval.stats import TINY_LABEL
from ddm.evaluate import (Backbones, ModelSpec, RunSpec, SharedImageEmbeddings, build_tiny_backbones, compute_metrics,
                          evaluate, load_backbones, main, model_runs, parse_model_arg, parse_strategy,
                          read_prompt_file, shard_captions)
from ddm.video_io import read_video, write_video
from tests.fixtures.pipeline import build_model_folder

PROMPTS = ["a red ball bounces on a wooden floor", "waves roll onto a sandy beach", "a city street at night"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def moving_videos(n: int, frames: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """uint8 (F, H, W, 3) videos: a random texture shifting by 1 px per frame (real motion for Farneback)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        out.append(np.stack([np.roll(base, j, axis=1) for j in range(frames)]))
    return out


def write_videos(folder: Path, videos: list[np.ndarray]) -> list[Path]:
    return [write_video(folder / f"v{i}.mp4", v, 8.0) for i, v in enumerate(videos)]


# --- fixtures: tiny backbones and tiny model folders written through DDMPipeline.save_pretrained -------------------

@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_backbones")
    build_tiny_backbones(folder)
    return folder


@pytest.fixture(scope="module")
def backbones(backbone_dir) -> Backbones:
    return load_backbones(list(METRICS), i3d=backbone_dir / "i3d_tiny.pt", clip=backbone_dir / "clip",
                          aesthetic=backbone_dir / "aesthetic_tiny.pth")


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory, tiny_text_dir) -> dict[str, Path]:
    """Paris folders written by tests/fixtures/pipeline.py: a 2-expert DDM and a monolith (stage2 = 8x8 px by
    default), and a monolith copy whose default stage is stage3 (16x16 px)."""
    root = tmp_path_factory.mktemp("models")
    build_model_folder(root / "ddm", tiny_text_dir, num_experts=2)
    build_model_folder(root / "mono", tiny_text_dir, num_experts=1, router=False)
    shutil.copytree(root / "mono", root / "mono16")
    index = json.loads((root / "mono16" / "model_index.json").read_text())
    (root / "mono16" / "model_index.json").write_text(json.dumps({**index, "default_stage": "stage3"}))
    return {name: root / name for name in ("ddm", "mono", "mono16")}


# --- parsing ---------------------------------------------------------------------------------------------------

def test_model_arguments_and_strategies_parse_and_validate():
    spec = parse_model_arg("ddm=/models/paris:top1,top2,full")
    assert spec == ModelSpec("ddm", Path("/models/paris"), ("top1", "top2", "full"))
    assert parse_model_arg("mono=/models/mono") == ModelSpec("mono", Path("/models/mono"), None)
    assert parse_strategy("top1") == ("top1", 1)
    assert parse_strategy("top2") == ("topk", 2)
    assert parse_strategy("full") == ("full", 1)
    assert parse_strategy("oracle") == ("oracle", 1)
    assert RunSpec("ddm", Path("f"), "oracle", 3).sampler_args(0.1) == {"strategy": "oracle"}
    for bad in ("ddm", "ddm=", "a/b=/x", "ddm=/x:tpo1", "ddm=/x:top0", "ddm=/x:top1,top1"):
        with pytest.raises(ValueError):
            parse_model_arg(bad)

    runs = model_runs(ModelSpec("ddm", Path("f")), 3)
    assert [r.name for r in runs] == ["ddm/top1", "ddm/top2", "ddm/full"]
    assert runs[1].sampler_args(0.1) == {"strategy": "topk", "k": 2}
    assert [r.name for r in model_runs(ModelSpec("mono", Path("m")), 1)] == ["mono"]
    with pytest.raises(ValueError, match="monolith"):
        model_runs(ModelSpec("mono", Path("m"), ("top2",)), 1)
    with pytest.raises(ValueError, match="keeps 3 experts but the folder has 2"):
        model_runs(ModelSpec("ddm", Path("f"), ("top3",)), 2)


# --- comparison arithmetic (hand-made values) --------------------------------------------------------------------

def _run(name: str, values: dict[str, float], per_video: dict[str, list[float]] | None = None) -> dict:
    per_video = per_video or {}
    return {"name": name, "model": name.split("/")[0], "strategy": name.split("/")[-1], "metrics": {
        k: {"value": v, "stderr": None if k == "fvd" else 0.01, "n": 3,
            "details": {"per_video": per_video.get(k), "backbone": "b"}} for k, v in values.items()}}


def test_relative_improvement_is_positive_when_better_for_fvd_lower_and_others_higher():
    # Paris 2.0's published table: DDM better on all four.
    mono = _run("mono", {"fvd": 561.04, "clip": 0.2032, "aesthetic": 3.7950, "motion": 0.555})
    ddm = _run("ddm/top2", {"fvd": 279.01, "clip": 0.2178, "aesthetic": 3.9036, "motion": 0.712})
    worse = _run("ddm/full", {"fvd": 600.0, "clip": 0.2000, "aesthetic": 3.7000, "motion": 0.500})
    table = compare_runs([ddm, worse, mono], "mono")
    assert set(table) == {"ddm/top2", "ddm/full"}  # the baseline is not compared with itself
    expected = {"fvd": (561.04 - 279.01) / 561.04, "clip": (0.2178 - 0.2032) / 0.2032,
                "aesthetic": (3.9036 - 3.7950) / 3.7950, "motion": (0.712 - 0.555) / 0.555}
    for key, value in expected.items():
        assert table["ddm/top2"][key]["relative_improvement"] == pytest.approx(value, rel=1e-12)
        assert table["ddm/top2"][key]["relative_improvement"] > 0
        assert table["ddm/full"][key]["relative_improvement"] < 0
    assert table["ddm/top2"]["fvd"]["relative_improvement"] == pytest.approx(0.50269, abs=1e-5)  # 50.3 %
    assert relative_improvement(1.0, 0.0, lower_is_better=False) is None
    assert relative_improvement(None, 1.0, lower_is_better=True) is None
    with pytest.raises(ValueError, match="baseline run 'nope'"):
        compare_runs([ddm, mono], "nope")


def test_paired_difference_matches_numpy():
    a, b = [0.21, 0.25, 0.19, 0.30], [0.20, 0.22, 0.18, 0.26]
    d = np.array(a) - np.array(b)
    got = paired_difference(a, b)
    assert got["mean"] == pytest.approx(d.mean(), rel=1e-12)
    assert got["stderr"] == pytest.approx(d.std(ddof=1) / 2.0, rel=1e-12)
    assert got["n"] == 4
    assert paired_difference(a, b[:3]) is None and paired_difference(None, b) is None


def _hand_record(tiny: bool) -> dict:
    """An evaluation record as ddm.evaluate writes it, with hand-chosen numbers (K = 3, 4 steps, N = 5)."""
    mean_weights = [[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.0, 0.25, 0.75]]
    usage = [[5, 3, 2], [4, 3, 1], [1, 1, 5], [0, 2, 5]]
    details = {"backbone": TINY_LABEL if tiny else "CLIP ViT-L/14", "tiny_test_backbone": tiny}

    def run(name, model, strategy, k, values, routing):
        return {"name": name, "model": model, "strategy": strategy, "folder": f"/m/{model}", "num_experts": k,
                "videos": {"n": 5, "reused": 2, "generated": 3, "frames": 17, "height": 16, "width": 16},
                "routing": routing,
                "metrics": {key: {"name": key, "value": v, "stderr": None if key == "fvd" else 0.002, "n": 5,
                                  "details": dict(details)} for key, v in values.items()}}

    runs = [run("ddm/top2", "ddm", "top2", 3, {"fvd": 279.01, "clip": 0.2178, "aesthetic": 3.9036, "motion": 0.712},
                {"strategy": "topk", "t": [1.0, 0.75, 0.5, 0.25], "mean_weights": mean_weights,
                 "samples_per_expert": usage}),
            run("mono", "mono", "single", 1, {"fvd": 561.04, "clip": 0.2032, "aesthetic": 3.7950, "motion": 0.555},
                None)]
    return {"format": "ddm-eval-v1", "baseline": "mono", "notes": ["a note"], "runs": runs,
            "settings": {"num_videos": 5, "num_prompts": 5, "prompt_source": "p.txt", "seed": 0, "steps": 4,
                         "cfg": 7.5, "stage": None, "metrics": list(METRICS)},
            "comparison": compare_runs(runs, "mono")}


def _check_plots_match(record: dict, out: Path) -> None:
    """Every PNG is a real non-trivial image, and the numbers drawn equal the ones in the record."""
    for name in ("relative_improvement", "router_weights", "expert_usage"):
        png = (out / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5000
    baseline_run = next(r for r in record["runs"] if r["name"] == record["baseline"])
    base = {k: v["value"] for k, v in baseline_run["metrics"].items()}
    bars = json.loads((out / "plots" / "relative_improvement.json").read_text())
    compared = [r for r in record["runs"] if r["name"] != record["baseline"]]
    assert set(bars["runs"]) == {r["name"] for r in compared}
    for r in compared:
        for key, drawn in zip(bars["metrics"], bars["runs"][r["name"]]):
            value = r["metrics"][key]["value"]
            gain = base[key] - value if key == "fvd" else value - base[key]  # FVD: lower is better
            assert drawn == pytest.approx(100 * gain / abs(base[key]), rel=1e-9, abs=1e-12)
    routed = [r for r in record["runs"] if r["num_experts"] > 1]
    for name, field in (("router_weights", "mean_weights"), ("expert_usage", "samples_per_expert")):
        drawn = json.loads((out / "plots" / f"{name}.json").read_text())["runs"]
        assert set(drawn) == {r["name"] for r in routed}
        for r in routed:
            values = np.asarray(r["routing"][field], dtype=float)
            np.testing.assert_array_equal(np.asarray(drawn[r["name"]]["experts"]).T, values)
            x = r["routing"]["t"] if field == "mean_weights" else list(range(len(values)))
            np.testing.assert_array_equal(drawn[r["name"]]["x"], x)


def test_report_and_plots_are_drawn_from_metrics_json(tmp_path):
    record = _hand_record(tiny=True)
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    written = write_report(tmp_path / "metrics.json")
    assert set(written) == {"relative_improvement", "router_weights", "expert_usage", "report"}
    _check_plots_match(record, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert TINY_LABEL in report.split("|")[0]  # the warning comes before the table
    assert "| mono (baseline) | single | 1 | 5 | 561.04 | 0.2032 ± 0.0020 |" in report
    assert "| ddm/top2 | +50.3% | +7.2%" in report
    assert "Reused 4 already generated video(s); generated 6." in report
    assert "- a note" in report

    real = render_markdown(_hand_record(tiny=False))
    assert TINY_LABEL not in real and "CLIP ViT-L/14" in real


# --- metric plumbing on hand-made videos ---------------------------------------------------------------------------

def test_shared_embeddings_run_clip_once_per_frame_for_both_metrics(backbones):
    from ddm.eval.aesthetic import aesthetic_score
    from ddm.eval.clip_score import clip_score

    videos = moving_videos(3, 5, 20)
    shared = SharedImageEmbeddings(backbones.clip)
    clip_shared = clip_score(videos, PROMPTS, shared, progress=False)
    aesthetic_shared = aesthetic_score(videos, shared, backbones.aesthetic, progress=False)
    assert shared.frames_embedded == 3 * 5  # not 2 x 15: the aesthetic score reused CLIP score's embeddings
    clip_direct = clip_score(videos, PROMPTS, backbones.clip, progress=False)
    aesthetic_direct = aesthetic_score(videos, backbones.clip, backbones.aesthetic, progress=False)
    assert clip_shared.details["per_video"] == clip_direct.details["per_video"]
    assert aesthetic_shared.details["per_video"] == aesthetic_direct.details["per_video"]


def test_compute_metrics_scores_the_files_with_their_own_captions(tmp_path, backbones):
    from ddm.eval.aesthetic import aesthetic_score
    from ddm.eval.clip_score import clip_score
    from ddm.eval.fvd import fvd, fvd_stats
    from ddm.eval.motion import motion_score

    paths = write_videos(tmp_path / "gen", moving_videos(3, 17, 24, seed=1))
    real = fvd_stats(moving_videos(3, 17, 24, seed=2), backbones.i3d, progress=False)
    got = compute_metrics(paths, PROMPTS, list(METRICS), backbones, real_stats=real, progress=False, name="x")
    decoded = [read_video(p)[0] for p in paths]  # what is on disk (the mp4 is lossy), decoded independently
    expected = {"fvd": fvd(decoded, real, backbones.i3d, progress=False),
                "clip": clip_score(decoded, PROMPTS, backbones.clip, progress=False),
                "aesthetic": aesthetic_score(decoded, backbones.clip, backbones.aesthetic, progress=False),
                "motion": motion_score(decoded, progress=False)}
    assert set(got) == set(expected)
    for key, ref in expected.items():
        assert got[key].value == pytest.approx(ref.value, rel=1e-9), key
        assert got[key].n == 3
    assert got["clip"].details["per_video"] == expected["clip"].details["per_video"]  # captions stayed paired
    assert got["fvd"].is_tiny and got["clip"].is_tiny and not got["motion"].is_tiny
    assert "fvd" not in compute_metrics(paths, PROMPTS, ["fvd", "motion"], backbones, progress=False)  # no real set


def test_too_short_videos_for_fvd_name_the_run_with_a_real_style_backbone(tmp_path):
    from ddm.eval.fvd import ClipSettings, FeatureStats
    from ddm.eval.i3d import InceptionI3d, load_i3d

    torch.save(InceptionI3d().state_dict(), tmp_path / "rgb_imagenet.pt")  # full width: not a tiny stand-in
    i3d = load_i3d(tmp_path / "rgb_imagenet.pt")
    assert not i3d.tiny
    real = FeatureStats(np.zeros(400), np.eye(400), 10, {**i3d.details(), **ClipSettings().as_dict()})
    paths = write_videos(tmp_path / "gen", moving_videos(2, 9, 16))
    with pytest.raises(ValueError, match=r"ddm/top2: FVD: .*at least 16 frames.*got 9"):
        compute_metrics(paths, PROMPTS[:2], ["fvd"], Backbones(i3d=i3d), real_stats=real, progress=False,
                        name="ddm/top2")
    # asked for 9 frames up front: refused before anything is generated
    with pytest.raises(ValueError, match="at least 16 frames, but --num-frames is 9"):
        evaluate([ModelSpec("ddm", tmp_path / "nowhere")], "ddm", tmp_path / "out", PROMPTS, num_frames=9,
                 metrics=["fvd"], backbones=Backbones(i3d=i3d), real_videos=tmp_path / "gen")


# --- prompts ---------------------------------------------------------------------------------------------------

def test_prompt_sources(tmp_path, test_shards_dir):
    (tmp_path / "p.txt").write_text("  first prompt \n\nsecond prompt\n")
    assert read_prompt_file(tmp_path / "p.txt") == ["first prompt", "second prompt"]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError):
        read_prompt_file(tmp_path / "missing.txt")

    # the val captions, read independently: the .txt members of the val tars the index lists
    index = pq.read_table(test_shards_dir / "shards.parquet").to_pylist()
    val = [r for r in index if r["split"] == "val"]
    expected = []
    for shard in sorted({r["shard"] for r in val}):
        with tarfile.open(test_shards_dir / shard) as tar:
            expected += [tar.extractfile(m).read().decode().strip()
                         for m in tar.getmembers() if m.name.endswith(".txt")]
    captions = shard_captions(test_shards_dir, "val")
    assert captions == expected and len(captions) == len(val) > 0
    assert len(shard_captions(test_shards_dir, "train")) == len(index) - len(val)


# --- bad inputs ------------------------------------------------------------------------------------------------

def test_bad_inputs_fail_before_generating_with_clear_messages(tmp_path, model_folders, backbone_dir):
    out = tmp_path / "out"
    ddm, mono = ModelSpec("ddm", model_folders["ddm"], ("top1",)), ModelSpec("mono", model_folders["mono"])
    with pytest.raises(ValueError, match="prompt set is empty"):
        evaluate([ddm, mono], "mono", out, [], metrics=["motion"])
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate([ddm, mono], "mono", out, PROMPTS, metrics=["fid"])
    with pytest.raises(FileNotFoundError, match="model 'x'.*no model_index.json"):
        evaluate([ModelSpec("x", tmp_path)], "x", out, PROMPTS, metrics=["motion"])
    with pytest.raises(ValueError, match="--baseline 'ddm' has several runs"):
        evaluate([ModelSpec("ddm", model_folders["ddm"], ("top1", "full")), mono], "ddm", out, PROMPTS,
                 metrics=["motion"])
    assert not (out / "videos").exists()  # nothing was generated by any of these

    broken = shutil.copytree(model_folders["mono"], tmp_path / "broken")
    (broken / "expert1" / "stage2" / "master.safetensors").write_bytes(b"not a safetensors file")
    shutil.rmtree(broken / "expert1" / "stage2" / "model")
    with pytest.raises(ValueError, match="model 'broken': .* does not load"):
        evaluate([ModelSpec("broken", broken)], "broken", out, PROMPTS, metrics=["motion"], steps=1)

    with pytest.raises(FileNotFoundError, match="i3d_torchscript.pt"):
        load_backbones(["fvd"], i3d=tmp_path / "i3d_torchscript.pt", clip=None, aesthetic=None)
    with pytest.raises(FileNotFoundError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        load_backbones(["aesthetic"], i3d=None, clip=backbone_dir / "clip", aesthetic=tmp_path / "head.pth")
    with pytest.raises(ValueError, match="--clip"):
        load_backbones(["clip"], i3d=None, clip=None, aesthetic=None)


def test_models_that_make_different_frame_sizes_are_refused(tmp_path, model_folders):
    # ddm samples its default stage2 (8x8), mono16 its default stage3 (16x16): stopped at the first other size
    with pytest.raises(ValueError, match=r"different sizes: ddm/top1 \(5 frames, 8x8\), mono16 \(5 frames, 16x16\)"):
        evaluate([ModelSpec("ddm", model_folders["ddm"], ("top1",)), ModelSpec("mono16", model_folders["mono16"])],
                 "mono16", tmp_path / "out", PROMPTS[:2], metrics=["motion"], steps=1, cfg=1.0, progress=False)


def test_steps_and_guidance_default_to_each_folders_scheduler(tmp_path, model_folders):
    folder = tmp_path / "mono_fast"
    shutil.copytree(model_folders["mono"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = {**index["scheduler"], "num_steps": 2, "cfg_scale": 1.0}
    (folder / "model_index.json").write_text(json.dumps(index))
    record = evaluate([ModelSpec("mono", folder)], "mono", tmp_path / "out", PROMPTS[:1], metrics=["motion"],
                      progress=False)
    resolved = record["runs"][0]["resolved"]
    assert (resolved["num_steps"], resolved["cfg_scale"]) == (2, 1.0)


def test_oracle_run_samples_each_prompt_with_its_given_expert(tmp_path, model_folders):
    """``ddm=FOLDER:oracle`` with one expert id per prompt: every step of every video runs exactly that expert
    (the routing trace says so), ids repeat with the prompts, and a missing id list is refused up front."""
    folder = tmp_path / "ddm_fast"
    shutil.copytree(model_folders["ddm"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": {**index["scheduler"], "num_steps": 2}}))
    spec = ModelSpec("ddm", folder, ("oracle",))
    with pytest.raises(ValueError, match="an oracle run needs one expert id per prompt .* got none for 2 prompts"):
        evaluate([spec], "ddm/oracle", tmp_path / "out", PROMPTS[:2], metrics=["motion"], progress=False)
    record = evaluate([spec], "ddm/oracle", tmp_path / "out", PROMPTS[:2], num_videos=3, metrics=["motion"],
                      progress=False, oracle_ids=[2, 1], batch_size=3)
    run = record["runs"][0]
    assert run["name"] == "ddm/oracle" and run["generation"]["oracle_ids"] == [2, 1, 2]
    trace = json.loads(next(Path(run["videos"]["dir"]).glob("trace-*.json")).read_text())
    weights = np.asarray(trace["weights"])  # (steps, videos, K)
    assert weights.shape[1:] == (3, 2)
    np.testing.assert_array_equal(weights.argmax(-1), [[1, 0, 1]] * weights.shape[0])
    assert np.all(weights.max(-1) == 1.0)


# --- end to end through the CLI --------------------------------------------------------------------------------

def _cli_args(out: Path, folders: dict[str, Path], backbone_dir: Path, real: Path, prompts: Path, *extra: str):
    return ["--model", f"ddm={folders['ddm']}:top1,full", "--model", f"mono={folders['mono']}",
            "--baseline", "mono", "--out", str(out), "--prompts", str(prompts), "--num-videos", "3",
            "--tiny-backbones", str(backbone_dir), "--real-videos", str(real), "--num-steps", "2", "--cfg-scale", "2.0",
            "--batch-size", "2", "--height", "16", "--width", "16", "--num-frames", "17", "--no-progress", *extra]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, model_folders, backbone_dir):
    root = tmp_path_factory.mktemp("e2e")
    write_videos(root / "real", moving_videos(4, 17, 16, seed=3))
    (root / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n")  # 3 videos from 2 prompts: they repeat
    args = _cli_args(root / "out", model_folders, backbone_dir, root / "real", root / "prompts.txt")
    return root, args, main(args)


def test_cli_writes_metrics_report_and_plots(first_run):
    root, _, record = first_run
    out = root / "out"
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(record))
    assert [r["name"] for r in record["runs"]] == ["ddm/top1", "ddm/full", "mono"]
    for run in record["runs"]:
        assert set(run["metrics"]) == set(CLASSIC_METRICS)
        assert run["videos"] == {**run["videos"], "n": 3, "reused": 0, "generated": 3, "frames": 17, "height": 16,
                                 "width": 16}  # --num-frames 17: FVD's 16-frame clips
        folder = Path(run["videos"]["dir"])
        assert sorted(p.name for p in folder.glob("*.mp4")) == ["000000.mp4", "000001.mp4", "000002.mp4"]
        assert run["metrics"]["fvd"]["details"]["backbone"] == TINY_LABEL
        assert TINY_LABEL in run["metrics"]["aesthetic"]["details"]["backbone"]
    _check_plots_match(record, out)

    # routing: top-1 gives each sample to exactly one expert; full gives every sample to every expert
    top1, full = record["runs"][0]["routing"], record["runs"][1]["routing"]
    assert len(top1["t"]) == 2 and top1["t"][0] == 1.0
    assert all(sum(step) == 3 for step in top1["samples_per_expert"])
    assert all(step == [3, 3] for step in full["samples_per_expert"])
    for routing in (top1, full):
        np.testing.assert_allclose(np.sum(routing["mean_weights"], axis=1), 1.0, rtol=1e-6)
    assert record["runs"][2]["routing"] is None or record["runs"][2]["num_experts"] == 1

    report = (out / "report.md").read_text()
    assert TINY_LABEL in report and "| mono (baseline) | single | 1 | 3 |" in report
    assert "prompts repeat" in report and "FVD real set: 4 videos" in report
    assert "| stage | stage2 (folder default) |" in report and "| frames | 17 |" in report
    assert "Reused 0 already generated video(s); generated 9." in report


@pytest.mark.slow
def test_rerun_reuses_every_video_and_recovers_from_a_killed_write(first_run, tmp_path, capsys):
    root, args, first = first_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)  # keep the module's output intact for the other tests
    args = [out.as_posix() if a == str(root / "out") else a for a in args]
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("videos/**/*.mp4")}
    assert len(mtimes) == 9

    again = main(args)
    assert capsys.readouterr().out.strip().startswith("reused 9 video(s), generated 0")
    assert {p: p.stat().st_mtime_ns for p in out.glob("videos/**/*.mp4")} == mtimes
    for a, b in zip(first["runs"], again["runs"]):
        assert b["videos"]["reused"] == 3 and b["videos"]["generated"] == 0
        for key in CLASSIC_METRICS:
            assert b["metrics"][key]["value"] == a["metrics"][key]["value"]
    assert "Reused 9 already generated video(s); generated 0." in (out / "report.md").read_text()

    # A run killed after writing video 1 of ddm/full but before committing it (and one killed mid-write): the
    # uncommitted file is regenerated, the temp file removed, nothing else touched.
    folder = out / "videos" / "ddm" / "full"
    manifest = json.loads((folder / "run.json").read_text())
    del manifest["videos"]["1"]
    (folder / "run.json").write_text(json.dumps(manifest))
    (folder / "000001.mp4").write_bytes((folder / "000001.mp4").read_bytes()[:100])
    (folder / ".000002.tmp-999.mp4").write_bytes(b"torn")
    third = main(args)
    assert [r["videos"]["generated"] for r in third["runs"]] == [0, 1, 0]
    assert not (folder / ".000002.tmp-999.mp4").exists()
    assert read_video(folder / "000001.mp4")[0].shape == (17, 16, 16, 3)
    assert {p: t for p, t in mtimes.items() if p.name != "000001.mp4" or "full" not in str(p)} == \
        {p: p.stat().st_mtime_ns for p in out.glob("videos/**/*.mp4") if p.name != "000001.mp4" or "full" not in str(p)}
    # the same prompt and seed give the same video again (up to float round-off: it was batched differently)
    again, before = read_video(folder / "000001.mp4")[0], read_video(root / "out" / "videos/ddm/full/000001.mp4")[0]
    other = read_video(folder / "000000.mp4")[0]  # another seed: a different video, for scale
    assert np.abs(again.astype(int) - before).mean() < 1.0 < 10.0 < np.abs(other.astype(int) - before).mean()

    # other generation settings into the same folder are refused, not mixed
    with pytest.raises(ValueError, match="other settings.*num_steps: 2 then, 3 now"):
        main([a if a != "2" or args[i - 1] != "--num-steps" else "3" for i, a in enumerate(args)])
