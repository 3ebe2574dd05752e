"""``python -m data.prepare`` end to end: outputs, no-op reruns, crash-resume, early errors (data/prepare.py)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from data.audit import audit
from data.datamodule import ShardDataModule
from data.encode import KILL_ENV
from data.prepare import compose_config, prepare
from ddm.shards import read_index
from data.synthetic import make_synthetic_dataset
from ddm.lock import DirLockedError
from tests.fixtures.data import REPO_ROOT, TINY_PREP_OVERRIDES


def _cli(args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "data.prepare", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}, timeout=timeout)


def _stamps(folder):  # every output file (the lock file names each run's holder, so it is rewritten)
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
def test_cli_killed_mid_encode_resumes_to_an_audited_set_and_then_does_no_work(tmp_path):
    src = make_synthetic_dataset(tmp_path / "src", 10, num_images=2, size=24, num_frames=12, fps=8, progress=False)
    root, cwd = tmp_path / "root", tmp_path / "cwd"
    cwd.mkdir()
    args = [f"input={src}", f"paths.root_dir={root}", *TINY_PREP_OVERRIDES, "encode.samples_per_shard=2"]

    # 1. the real CLI, SIGKILLed by the test hook once 2 tars are complete and the 3rd is half-written
    killed = _cli(args, cwd, env={KILL_ENV: "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    log = killed.stdout + killed.stderr
    assert "building tiny random-initialised T5 + CLIP" in log  # text=tiny, folder absent: built and said so
    assert "[cluster] 12 in → 12 ok" in log  # the stages before encode completed
    assert list(cwd.iterdir()) == []  # Hydra's output went under the prep dir, not into the cwd
    prep = root / "prep"
    assert (prep / "logs" / "prepare" / ".hydra" / "config.yaml").is_file()
    shards_dir = prep / "shards" / "stage2"
    complete = sorted(shards_dir.glob("expert_*/[tv]*.tar"))
    assert len(complete) == 2 and len(list(shards_dir.glob("expert_*/.*.tmp*"))) == 1  # 2 done + 1 torn temp
    assert not (shards_dir / "shards.parquet").exists() and not (shards_dir / "encode.done.json").exists()
    done_stamps = {p: p.stat().st_mtime_ns for p in complete}

    # 2. the same command again: earlier stages are up to date, encode finishes what is missing
    results = prepare(compose_config(args))
    assert [name for name, r in results.items() if r.skipped] == ["ingest", "embed", "cluster"]
    assert {p: p.stat().st_mtime_ns for p in complete} == done_stamps  # finished tars were kept, not redone
    assert not list(shards_dir.glob("expert_*/.*.tmp*"))  # the torn temp tar was cleaned up
    report = audit(prep, "stage2")
    assert report.ok, report.summary()
    assert report.samples == len(read_index(shards_dir)) == 12 and report.shards > 2
    batch = next(iter(ShardDataModule(shards_dir, "all", batch_size=4, samples_per_epoch=4).train_dataloader()))
    assert batch["latent"].shape == (4, 12, 3, 16, 16) and batch["clip"].shape == (4, 32)

    # 3. and once more: nothing is rewritten (markers, parquet files, tars)
    stamps = _stamps(prep)
    results = prepare(compose_config(args))
    assert [name for name, r in results.items() if r.skipped] == ["ingest", "embed", "cluster", "encode"]
    assert _stamps(prep) == stamps


@pytest.fixture
def small_src(tmp_path):
    return make_synthetic_dataset(tmp_path / "src", 4, size=24, num_frames=12, fps=8, progress=False)


def _prepare(tmp_path, *overrides):
    return prepare(compose_config([f"paths.root_dir={tmp_path / 'root'}", *TINY_PREP_OVERRIDES, *overrides]))


def test_missing_or_empty_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="set input="):
        _prepare(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _prepare(tmp_path, f"input={tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty: nothing to prepare"):
        _prepare(tmp_path, f"input={tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="steps must be a non-empty subset"):
        _prepare(tmp_path, f"input={tmp_path}", "steps=[ingest,train]")
    with pytest.raises(ValueError, match="steps must be a non-empty subset"):  # the deprecated name still parses
        _prepare(tmp_path, f"input={tmp_path}", "stages=[ingest,train]")


def test_more_experts_than_samples_stops_before_embedding(tmp_path, small_src, tiny_text_dir):
    with pytest.raises(ValueError, match="num_experts=5 is more than the 4 usable samples"):
        _prepare(tmp_path, f"input={small_src}", "num_experts=5", f"text.folder={tiny_text_dir}")
    prep = tmp_path / "root" / "prep"
    assert (prep / "manifest.parquet").is_file() and not (prep / "embeddings.parquet").exists()


@pytest.mark.parametrize("override, message", [
    ("embedder=dinov2", "DINOv2 .* not found at .*dinov2.* given as embedder.path "),
    ("vae=hunyuan", "HunyuanVideo VAE not found at .*vae.pt"),
    ("text=paris", "T5"),
])
def test_missing_weights_are_reported_before_any_work(tmp_path, small_src, tiny_text_dir, override, message):
    text = [] if override == "text=paris" else [f"text.folder={tiny_text_dir}"]
    with pytest.raises(FileNotFoundError, match=message):
        _prepare(tmp_path, f"input={small_src}", f"paths.weights_dir={tmp_path / 'no_weights'}", *text, override)
    assert not (tmp_path / "root" / "prep" / "manifest.parquet").exists()  # not even ingest ran


def test_bad_frame_count_is_reported_before_any_work(tmp_path, small_src, tiny_text_dir):
    with pytest.raises(ValueError, match="4k\\+1"):
        _prepare(tmp_path, f"input={small_src}", f"text.folder={tiny_text_dir}", "encode.num_frames=8")


def test_a_second_prepare_on_the_same_prep_dir_is_refused_naming_the_holder(tmp_path, small_src, tiny_text_dir):
    prep = tmp_path / "root" / "prep"
    holder = subprocess.Popen(  # another process, e.g. a prepare started a moment earlier, holds the prep dir
        [sys.executable, "-c", "import sys, time; from ddm.lock import DirLock; DirLock(sys.argv[1]).acquire(); "
         "print('held', flush=True); time.sleep(300)", str(prep)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    args = [f"input={small_src}", f"text.folder={tiny_text_dir}", "steps=[ingest]"]
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirLockedError, match=rf"prep dir {prep} is in use by host {socket.gethostname()}, "
                                                 rf"PID {holder.pid} "):
            _prepare(tmp_path, *args)
        assert not (prep / "manifest.parquet").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed: the kernel dropped its lock), so the folder is free again
    assert _prepare(tmp_path, *args)["ingest"].n_output == 4
    # the deprecated 'stages' still selects the steps (for one release): ingest is done, so it is skipped
    again = _prepare(tmp_path, f"input={small_src}", f"text.folder={tiny_text_dir}", "stages=[ingest]")
    assert list(again) == ["ingest"] and again["ingest"].skipped
