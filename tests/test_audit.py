"""The shard audit: passes on a consistent prepared set, fails on every kind of tampering (data/audit.py)."""
from __future__ import annotations

import io
import shutil
import tarfile

import numpy as np
import pytest

from data.audit import audit, main
from ddm.shards import iter_shard, scan_shard, write_index, write_shard
from tests.fixtures.data import TEST_PREP_DIR

STAGE = "tiny"


@pytest.fixture
def prep_copy(tmp_path):
    """A writable copy of the checked-in tiny prepared set."""
    dst = tmp_path / "prep"
    shutil.copytree(TEST_PREP_DIR, dst)
    return dst


def _shards(prep):
    return prep / "shards" / STAGE


def _rewrite(tar, drop=(), add=()):
    """Rewrite a tar without the keys in ``drop`` and with the raw samples ``add`` appended."""
    kept = [{"__key__": k, **m} for k, m in iter_shard(tar) if k not in drop]
    write_shard(tar, kept + list(add))


def _raw(tar, key):
    return next({"__key__": k, **m} for k, m in iter_shard(tar) if k == key)


def _reindex(prep):
    """Make shards.parquet agree with the tars again, so only the tampering itself is left to find."""
    rows = []
    for tar in sorted(_shards(prep).glob("expert_*/*.tar")):
        for position, (key, _) in enumerate(scan_shard(tar)):
            rows.append({"key": key, "expert": int(tar.parent.name.split("_")[1]), "split": tar.name.split("-")[0],
                         "shard": f"{tar.parent.name}/{tar.name}", "position": position})
    write_index(_shards(prep), rows)


def test_checked_in_set_passes_and_cli_exits_zero(capsys):
    report = audit(TEST_PREP_DIR, STAGE)
    assert report.ok, report.summary()
    assert report.manifest == report.samples == 30 and report.shards == 12
    assert main([str(TEST_PREP_DIR), "--stage", STAGE]) == 0
    assert "→ OK" in capsys.readouterr().out


def test_deleted_sample_is_reported_missing_and_out_of_index(prep_copy, capsys):
    tar = _shards(prep_copy) / "expert_1" / "train-000001.tar"
    victim = scan_shard(tar)[0][0]
    _rewrite(tar, drop={victim})
    report = audit(prep_copy, STAGE)
    assert not report.ok
    assert [o.split()[0] for o in report.problems["manifest keys missing from the shards"]] == [victim]
    assert any(victim in o for o in report.problems["index rows not matching the tars"])
    assert main([str(prep_copy), "--stage", STAGE]) == 1
    assert victim in capsys.readouterr().out  # the offender is listed


def test_duplicated_sample_is_reported(prep_copy):
    src = _shards(prep_copy) / "expert_2" / "train-000000.tar"
    key = scan_shard(src)[0][0]
    _rewrite(_shards(prep_copy) / "expert_2" / "train-000002.tar", add=[_raw(src, key)])
    _reindex(prep_copy)
    report = audit(prep_copy, STAGE)
    assert [o.split(":")[0] for o in report.problems["samples in more than one place"]] == [key]
    assert not report.problems["manifest keys missing from the shards"]


def test_sample_moved_to_another_expert_is_reported(prep_copy):
    src = _shards(prep_copy) / "expert_1" / "train-000000.tar"
    key = scan_shard(src)[1][0]
    sample = _raw(src, key)
    _rewrite(src, drop={key})
    _rewrite(_shards(prep_copy) / "expert_3" / "train-000001.tar", add=[sample])
    _reindex(prep_copy)  # a consistent index: only the assignment check can catch this
    report = audit(prep_copy, STAGE)
    assert report.problems["samples in the wrong expert"] == [
        f"{key} in expert_3/train-000001.tar, assigned to expert 1"]
    assert not report.ok


def test_stale_index_and_foreign_sample_are_reported(prep_copy):
    tar = _shards(prep_copy) / "expert_3" / "val-000000.tar"
    foreign = dict(_raw(tar, scan_shard(tar)[0][0]), __key__="not_in_manifest")
    _rewrite(tar, add=[foreign])
    report = audit(prep_copy, STAGE)
    assert report.problems["samples not in the manifest"] == ["not_in_manifest in expert_3/val-000000.tar"]
    assert report.problems["tar samples missing from the index"] == ["not_in_manifest at expert_3/val-000000.tar#"
                                                                     f"{len(scan_shard(tar)) - 1}"]


def test_missing_inputs_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.parquet' is missing"):
        audit(tmp_path, STAGE)


def test_flipped_latent_byte_is_caught_by_deep_audit_only(prep_copy, capsys):
    tar = _shards(prep_copy) / "expert_2" / "train-000001.tar"
    key = scan_shard(tar)[1][0]
    with tarfile.open(tar) as t:
        member = next(m for m in t.getmembers() if m.name == f"{key}.latent.npy")
    raw = bytearray(tar.read_bytes())
    raw[member.offset_data + member.size - 1] ^= 0x01  # a mantissa bit of the last value: still finite, still .npy
    tar.write_bytes(bytes(raw))

    assert audit(prep_copy, STAGE).ok  # headers, names and index all agree: the plain audit cannot see it
    report = audit(prep_copy, STAGE, deep=True)
    assert [o.split(":")[0] for o in report.problems["content hash mismatches"]] == [
        f"{key} in expert_2/train-000001.tar"]
    assert not report.notes and sum(map(len, report.problems.values())) == 1
    assert main([str(prep_copy), "--stage", STAGE, "--deep"]) == 1
    out = capsys.readouterr().out
    assert "content hash mismatches: 1" in out and f"{key} in expert_2/train-000001.tar" in out


def test_deep_audit_reports_non_finite_latents_and_passes_on_the_clean_set(prep_copy):
    assert audit(TEST_PREP_DIR, STAGE, deep=True).ok
    tar = _shards(prep_copy) / "expert_1" / "val-000000.tar"
    key = scan_shard(tar)[0][0]
    sample = _raw(tar, key)
    latent = np.load(io.BytesIO(sample["latent.npy"]))
    latent[0, 0, 0, 0] = np.nan
    buf = io.BytesIO()
    np.save(buf, latent)
    _rewrite(tar, drop={key}, add=[{**sample, "latent.npy": buf.getvalue()}])
    _reindex(prep_copy)  # hashes taken from the tampered tar: only the values are wrong now
    report = audit(prep_copy, STAGE, deep=True)
    assert report.problems["bad sample contents"] == [
        f"{key} in expert_1/val-000000.tar: non-finite values in latent.npy"]
