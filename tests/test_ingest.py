"""data.ingest: real files probed with PyAV, every bad input rejected with a reason, manifests, idempotency."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import data.ingest as ingest_module
from data.ingest import ingest, make_keys
from ddm.video_io import write_gif, write_video


def clip(num_frames: int, height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    return frames


def add_video(folder, rel, num_frames=9, fps=8, caption="a clip", size=(24, 32)):
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = write_gif if path.suffix == ".gif" else write_video
    writer(path, clip(num_frames, *size), fps)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def add_image(folder, rel, caption="an image", size=(20, 30)):
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), clip(1, *size)[0])
    path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def read(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_folder_videos_and_images_recovered(tmp_path):
    src = tmp_path / "src"
    add_video(src, "a/one.mp4", num_frames=9, fps=8, size=(24, 32))
    add_video(src, "a/two.gif", num_frames=5, fps=10, size=(16, 16))
    add_video(src, "b/three.mp4", num_frames=13, fps=24, size=(33, 47), caption="  odd size  \n")
    add_image(src, "b/four.png", size=(20, 30))
    add_image(src, "b/five.jpg", size=(16, 18))
    result = ingest(src, tmp_path / "out", progress=False)
    assert (result.n_input, result.n_output, result.n_rejected) == (5, 5, 0)
    rows = {r["key"]: r for r in read(tmp_path / "out" / "manifest.parquet")}
    expect = {"a__one": ("video", 9, 8.0, 24, 32), "a__two": ("video", 5, 10.0, 16, 16),
              "b__three": ("video", 13, 24.0, 33, 47), "b__four": ("image", 1, 0.0, 20, 30),
              "b__five": ("image", 1, 0.0, 16, 18)}
    assert {k: (r["kind"], r["num_frames"], r["fps"], r["height"], r["width"]) for k, r in rows.items()} == expect
    assert rows["b__three"]["caption"] == "odd size"
    assert rows["a__one"]["path"] == str((src / "a" / "one.mp4").resolve())
    assert read(tmp_path / "out" / "rejected.parquet") == []
    assert "5 in → 5 ok, 0 rejected" in result.summary_line()


def test_bad_inputs_are_rejected_with_reasons_and_the_rest_succeeds(tmp_path):
    src = tmp_path / "src"
    add_video(src, "good.mp4")
    good = add_video(src, "cut.mp4").read_bytes()
    (src / "cut.mp4").write_bytes(good[: len(good) // 2])  # truncated
    (src / "empty.mp4").write_bytes(b"")
    (src / "empty.txt").write_text("an empty file", encoding="utf-8")
    add_video(src, "latin1.mp4", caption=None)
    (src / "latin1.txt").write_bytes("une vidéo".encode("latin-1"))
    add_video(src, "nocaption.mp4", caption=None)
    add_video(src, "blank.mp4", caption="   \n")
    add_video(src, "short.mp4", num_frames=2)
    result = ingest(src, tmp_path / "out", min_frames=3, progress=False)
    assert [r["key"] for r in read(tmp_path / "out" / "manifest.parquet")] == ["good"]
    reasons = {os.path.basename(r["path"]): r["reason"] for r in read(tmp_path / "out" / "rejected.parquet")}
    assert reasons["cut.mp4"].startswith("undecodable")
    assert "zero-byte" in reasons["empty.mp4"]
    assert "not valid UTF-8" in reasons["latin1.mp4"]
    assert "missing caption" in reasons["nocaption.mp4"]
    assert "empty" in reasons["blank.mp4"]
    assert "min_frames=3" in reasons["short.mp4"]
    assert (result.n_output, result.n_rejected) == (1, 6)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_input(tmp_path, fmt):
    data = tmp_path / "data"
    add_video(data, "clips/x.mp4", caption=None)
    add_image(data, "clips/y.png")
    outside = add_video(tmp_path / "elsewhere", "z.mp4", caption=None)
    table = pa.table({"path": ["clips/x.mp4", "clips/y.png", str(outside), "clips/missing.mp4", "clips/x.mp4"],
                      "text": ["from the manifest", "an image", "absolute path", "gone", "listed twice"]})
    manifest = data / f"meta.{fmt}"
    if fmt == "csv":
        pacsv.write_csv(table, manifest)
    else:
        pq.write_table(table, manifest)
    result = ingest(manifest, tmp_path / "out", progress=False)
    rows = {r["key"]: r for r in read(tmp_path / "out" / "manifest.parquet")}
    assert rows["clips__x"]["caption"] == "from the manifest"  # the manifest's text, not a sidecar
    assert rows["clips__y"]["kind"] == "image"
    assert any(k.endswith("elsewhere__z") for k in rows)
    reasons = sorted(r["reason"] for r in read(tmp_path / "out" / "rejected.parquet"))
    assert reasons == ["duplicate path (listed more than once)", "file not found"]
    assert (result.n_output, result.n_rejected) == (3, 2)


def test_rerun_does_no_work_until_something_changes(tmp_path, monkeypatch):
    src = tmp_path / "src"
    add_video(src, "a.mp4")
    add_video(src, "b.mp4")
    first = ingest(src, tmp_path / "out", progress=False)
    stamp = (tmp_path / "out" / "manifest.parquet").stat().st_mtime_ns

    def no_probing(*a, **k):
        raise AssertionError("probed again")

    monkeypatch.setattr(ingest_module, "probe_video", no_probing)
    again = ingest(src, tmp_path / "out", progress=False)
    assert again.skipped and (again.n_output, again.n_input) == (first.n_output, first.n_input)
    assert (tmp_path / "out" / "manifest.parquet").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    (src / "b.txt").write_text("a new caption", encoding="utf-8")  # a changed input reruns the stage
    redo = ingest(src, tmp_path / "out", progress=False)
    assert not redo.skipped
    assert {r["key"]: r["caption"] for r in read(tmp_path / "out" / "manifest.parquet")}["b"] == "a new caption"


def test_clear_errors_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ingest(tmp_path / "nowhere", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no media here")
    with pytest.raises(ValueError, match="nothing to ingest"):
        ingest(tmp_path / "empty", tmp_path / "out", progress=False)
    pq.write_table(pa.table({"file": ["a.mp4"], "caption": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="'path' and 'text'"):
        ingest(tmp_path / "bad.parquet", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_keys_are_stable_unique_and_dot_free():
    rels = ["a/clip.v2.mp4", "a/clip.v2.png", "b c/x.mp4", "b_c/x.mp4", "top.gif"]
    keys = make_keys(rels)
    assert keys == make_keys(rels)
    assert len(set(keys)) == len(keys) and not any("." in k or "/" in k or " " in k for k in keys)
    assert keys[0] == "a__clip_v2_mp4" and keys[1] == "a__clip_v2_png" and keys[4] == "top"


def test_marker_guards_config_outputs_and_damage(tmp_path):
    """data.step through ingest: a changed setting, a deleted output or a damaged marker reruns the stage."""
    src = tmp_path / "src"
    add_video(src, "a.mp4", num_frames=4)
    out = tmp_path / "out"
    assert not ingest(src, out, progress=False).skipped
    assert ingest(src, out, progress=False).skipped
    assert not ingest(src, out, min_frames=2, progress=False).skipped  # config is part of the fingerprint
    (out / "rejected.parquet").unlink()
    assert not ingest(src, out, min_frames=2, progress=False).skipped  # an output went missing
    (out / "ingest.done.json").write_text("{ torn")
    assert not ingest(src, out, min_frames=2, progress=False).skipped  # a damaged marker is "not done"
    assert ingest(src, out, min_frames=2, progress=False).skipped


def test_tiny_and_elongated_clips_are_rejected_with_the_reason_not_upscaled(tmp_path):
    src = tmp_path / "src"
    add_video(src, "ok.mp4", size=(24, 32))
    add_video(src, "strip.mp4", size=(16, 1024))
    add_video(src, "tiny.mp4", size=(2, 2))
    add_image(src, "speck.png", size=(8, 8))
    add_video(src, "wide.mp4", size=(16, 64))  # exactly 4:1 is still accepted
    result = ingest(src, tmp_path / "out", progress=False)
    assert [r["key"] for r in read(tmp_path / "out" / "manifest.parquet")] == ["ok", "wide"]
    reasons = {os.path.basename(r["path"]): r["reason"] for r in read(tmp_path / "out" / "rejected.parquet")}
    assert reasons == {
        "strip.mp4": "too elongated: 1024x16 px, aspect ratio 64 above max_aspect=4",
        "tiny.mp4": "too small: 2x2 px, the shorter side is below min_size=16",
        "speck.png": "too small: 8x8 px, the shorter side is below min_size=16"}
    assert (result.n_output, result.n_rejected) == (2, 3)
    # the limits are settings (part of the stage's fingerprint: changing them reruns it)
    loose = ingest(src, tmp_path / "out", min_size=2, max_aspect=100, progress=False)
    assert not loose.skipped and (loose.n_output, loose.n_rejected) == (5, 0)


def test_a_manifest_that_is_not_utf8_is_a_clear_error_naming_file_line_and_byte(tmp_path):
    add_video(tmp_path, "clip.mp4", caption=None)
    csv = tmp_path / "meta.csv"
    csv.write_bytes("path,text\nclip.mp4,un caf\xe9 noir\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"manifest '.*meta\.csv' is not valid UTF-8: byte 0xe9 at line 2, "
                                         r"column 16 .*iconv"):
        ingest(csv, tmp_path / "out", progress=False)
    binary = tmp_path / "meta.parquet"  # a parquet whose text column holds raw bytes
    pq.write_table(pa.table({"path": ["clip.mp4"], "text": [b"un caf\xe9"]}), binary)
    with pytest.raises(ValueError, match=r"meta\.parquet' is not valid UTF-8: column 'text', row 1, byte 0xe9"):
        ingest(binary, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
