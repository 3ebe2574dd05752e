"""``ddm.evaluate`` with the synthetic data's own metrics: ``--groundtruth`` and ``--domain-backbone`` through
real (untrained, tiny) model folders, the report's ground-truth table, and the contact sheet."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data.synthetic import make_synthetic_dataset
from ddm.eval.contact_sheet import contact_sheet_image
from ddm.eval.domain import DOMAIN_LABEL, DomainConfig, load_or_build
from ddm.eval.reference import GT_METRICS
from ddm.eval.stats import TINY_LABEL
from ddm.evaluate import main
from tests.fixtures.pipeline import STAGES, build_model_folder

N = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_text_dir):
    root = tmp_path_factory.mktemp("eval_synth")
    build_model_folder(root / "ddm", tiny_text_dir, num_experts=2)
    build_model_folder(root / "mono", tiny_text_dir, num_experts=1, router=False)
    for name in ("ddm", "mono"):  # sample fast by the folders' own defaults (the report must say which)
        index = json.loads((root / name / "model_index.json").read_text())
        index["scheduler"] = {**index["scheduler"], "num_steps": 2, "cfg_scale": 1.5}
        (root / name / "model_index.json").write_text(json.dumps(index))
    frames = STAGES["stage2"][1]
    make_synthetic_dataset(root / "heldout", 2 * N, seed=555, size=32, num_frames=frames, progress=False)
    small = DomainConfig(num_frames=frames, families=("ocean", "desert", "forest"), num_clips=48, epochs=2,
                         channels=(8, 8, 8), feature_dim=8)
    load_or_build(root / "domain.safetensors", small)  # a tiny one: the default takes ~40 s to build
    args = ["--model", f"ddm={root / 'ddm'}:top1,top2", "--model", f"mono={root / 'mono'}", "--baseline", "mono",
            "--groundtruth", str(root / "heldout"), "--domain-backbone", str(root / "domain.safetensors"),
            "--num-videos", str(N), "--batch-size", "3", "--out", str(root / "out"), "--no-progress",
            "--contact-sheet-rows", "2"]
    return root, main(args)


@pytest.mark.slow  # ~20 s: three real runs through ddm.evaluate's CLI
def test_groundtruth_and_domain_fvd_for_every_run(setup):
    root, record = setup
    frames, size = STAGES["stage2"][1], STAGES["stage2"][0]
    assert [r["name"] for r in record["runs"]] == ["ddm/top1", "ddm/top2", "mono"]
    for run in record["runs"]:
        # generated at the frame count the folders were trained on (not FVD's 17)
        assert (run["videos"]["frames"], run["videos"]["height"]) == (frames, size)
        assert (run["resolved"]["num_steps"], run["resolved"]["cfg_scale"]) == (2, 1.5)
        assert set(run["metrics"]) == {"motion", "domain_fvd", *GT_METRICS}  # no network given for the others
        for key in GT_METRICS:
            m = run["metrics"][key]
            assert m["n"] == N and len(m["details"]["per_video"]) == N and 0 <= m["value"] <= 1
            assert m["value"] == pytest.approx(np.mean(m["details"]["per_video"]))
            assert 0 < m["details"]["chance"] < 1
        prompt = np.asarray(run["metrics"]["gt_prompt"]["details"]["per_video"])
        for key in ("gt_family", "gt_colour"):  # all attributes right implies each one right
            assert np.all(prompt <= np.asarray(run["metrics"][key]["details"]["per_video"]))
        d = run["metrics"]["domain_fvd"]
        assert d["details"]["backbone"] == DOMAIN_LABEL and d["details"]["floor"] >= 0 and d["n"] == N
        assert Path(run["videos"]["dir"], "000000.npy").is_file()  # scored from the exact frames
    floors = {r["metrics"]["domain_fvd"]["details"]["floor"] for r in record["runs"]}
    assert len(floors) == 1  # one real-vs-real floor for every run
    comparison = record["comparison"]["ddm/top1"]
    assert comparison["gt_prompt"]["paired_difference"]["n"] == N
    assert record["settings"]["num_frames"] == frames

    report = (root / "out" / "report.md").read_text()
    assert "prompt accuracy (GT)" in report and "(floor " in report and "domain backbone" in report
    assert "| sampling steps | 2 (folder default) |" in report and "| CFG scale | 1.5 (folder default) |" in report
    assert "Chance (a uniform guess)" in report and "None" not in report.split("## Setup")[1].split("##")[0]
    assert TINY_LABEL not in report  # no random-init backbone behind any number
    assert "FVD (I3D) skipped" not in report  # no fvd asked without --real-videos; nothing to skip
    drawn = json.loads((root / "out" / "plots" / "relative_improvement.json").read_text())
    assert "gt_prompt" in drawn["metrics"] and "domain_fvd" in drawn["metrics"]

    png = root / "out" / "contact_sheet.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_synthetic_inputs(setup, tmp_path):
    root, _ = setup
    base = ["--model", f"mono={root / 'mono'}", "--baseline", "mono", "--out", str(tmp_path / "o"), "--no-progress"]
    (tmp_path / "p.txt").write_text("a cat on a mat\n")
    with pytest.raises(ValueError, match="synthetic-generator captions only"):
        main(base + ["--prompts", str(tmp_path / "p.txt"), "--groundtruth", str(root / "heldout")])
    with pytest.raises(ValueError, match="need --groundtruth"):
        main(base + ["--prompts", str(tmp_path / "p.txt"), "--metrics", "groundtruth"])
    with pytest.raises(FileNotFoundError, match="python -m data.synthetic"):
        main(base + ["--groundtruth", str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match="needs 2N = 8 reference clips"):
        main(base + ["--groundtruth", str(root / "heldout"), "--domain-backbone", str(root / "domain.safetensors"),
                     "--num-videos", "4", "--metrics", "domain_fvd", "--contact-sheet-rows", "0"])
    assert not (tmp_path / "o" / "videos").exists()  # every one refused before generating


def test_contact_sheet_places_each_frame_scaled(tmp_path):
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    fake = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    img = np.asarray(contact_sheet_image(["a prompt"], {"real": [real], "ddm": [fake], "mono": [None]}, frames=3,
                                         cell=32))
    scale, pad, text_h = 4, 6, 14  # 8 px frames drawn at 32 px; layout constants of ddm.eval.contact_sheet
    block_w = 3 * 32 + 2 * 2
    y0 = pad + text_h + text_h
    for col, video in enumerate((real, fake)):
        for j, f in enumerate((0, 2, 4)):  # first, middle, last frame
            x0 = pad + col * (block_w + pad) + j * (32 + 2)
            got = img[y0:y0 + 32:scale, x0:x0 + 32:scale]
            np.testing.assert_array_equal(got, video[f])
    with pytest.raises(ValueError, match="2 videos for 1 prompts"):
        contact_sheet_image(["a prompt"], {"real": [real, real]})
    shutil.rmtree(tmp_path, ignore_errors=True)
