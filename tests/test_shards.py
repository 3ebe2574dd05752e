"""Shard format, atomic writing, index and reading (ddm/shards.py)."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from ddm.shards import (
    ShardReadError,
    ShardWriter,
    available_experts,
    decode_sample,
    encode_sample,
    expert_counts,
    expert_priors,
    iter_shard,
    list_shards,
    read_index,
    scan_shard,
    write_shard,
)
from tests.fixtures.data import write_random_shards

COUNTS = {(1, "train"): [3, 2], (2, "train"): [4], (3, "train"): [1], (1, "val"): [2], (3, "val"): [1]}


def _meta(key, expert=1):
    return {"key": key, "expert": expert, "split": "train", "caption": f"a caption {key}", "fps": 8.0,
            "num_frames": 5, "height": 4, "width": 4, "source": "x.mp4"}


def _sample(key, rng, expert=1):
    return encode_sample(key, latent=rng.standard_normal((2, 1, 2, 2)), t5=rng.standard_normal((3, 4)),
                         clip=rng.standard_normal(5), meta=_meta(key, expert))


def test_round_trip_matches_written_arrays_and_index(tmp_path):
    shards_dir = tmp_path / "shards"
    truth = write_random_shards(shards_dir, COUNTS)
    read = {}
    for (expert, split), counts in COUNTS.items():
        paths = list_shards(shards_dir, expert, split)
        assert [p.name for p in paths] == [f"{split}-{i:06d}.tar" for i in range(len(counts))]
        for path in paths:
            for position, (key, members) in enumerate(iter_shard(path)):
                read[key] = (decode_sample(key, members), f"expert_{expert}/{path.name}", position)
    assert sorted(read) == sorted(truth)
    for key, (sample, shard, position) in read.items():
        t = truth[key]
        assert sample["latent"].dtype == np.float16 and np.array_equal(sample["latent"], t["latent"])
        assert sample["t5"].dtype == np.float16 and np.array_equal(sample["t5"], t["t5"])
        assert sample["clip"].dtype == np.float32 and np.array_equal(sample["clip"], t["clip"])
        assert sample["caption"] == t["caption"] == sample["meta"]["caption"]
        assert sample["meta"]["expert"] == t["expert"] and sample["meta"]["split"] == t["split"]
        assert (shard, position) == (t["shard"], t["position"])
    index = read_index(shards_dir).to_pylist()
    assert sorted((r["key"], r["expert"], r["split"], r["shard"], r["position"]) for r in index) == sorted(
        (k, t["expert"], t["split"], t["shard"], t["position"]) for k, t in truth.items())
    assert available_experts(shards_dir) == [1, 2, 3]
    assert expert_counts(shards_dir, "train") == {1: 5, 2: 4, 3: 1}
    assert expert_counts(shards_dir, "val") == {1: 2, 3: 1}
    assert expert_priors(shards_dir, "train") == pytest.approx({1: 0.5, 2: 0.4, 3: 0.1})


def test_shards_are_readable_by_webdataset_itself(tmp_path):
    truth = write_random_shards(tmp_path, {(2, "train"): [3]})
    url = str(tmp_path / "expert_2" / "train-000000.tar")
    samples = list(wds.WebDataset(url, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == sorted(truth)
    for s in samples:
        t = truth[s["__key__"]]
        assert np.array_equal(s["latent.npy"], t["latent"]) and np.array_equal(s["t5.npy"], t["t5"])
        assert s["txt"] == t["caption"] and s["json"]["expert"] == 2


def test_write_shard_is_atomic_and_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    samples = [_sample(f"k{i}", rng) for i in range(3)]

    def failing():
        yield samples[0]
        raise RuntimeError("encoder crashed")

    target = tmp_path / "expert_1" / "train-000000.tar"
    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_shard(target, failing())
    assert list(target.parent.iterdir()) == []  # neither the final tar nor a temp file
    assert write_shard(target, samples) == ["k0", "k1", "k2"]
    first = target.read_bytes()
    write_shard(tmp_path / "again.tar", samples)
    assert (tmp_path / "again.tar").read_bytes() == first  # fixed mtimes: a rerun writes the same bytes


def test_shard_writer_rolls_over_on_samples_and_bytes_and_discards_a_failed_tar(tmp_path):
    rng = np.random.default_rng(1)
    samples = [_sample(f"k{i}", rng) for i in range(7)]
    with ShardWriter(tmp_path / "a", "train", max_samples=3) as w:
        for s in samples:
            w.write(s)
    assert [p.name for p in sorted((tmp_path / "a").iterdir())] == [f"train-{i:06d}.tar" for i in range(3)]
    assert [k for k, _ in scan_shard(tmp_path / "a" / "train-000002.tar")] == ["k6"]
    assert w.written[3] == ("k3", "train-000001.tar", 0)

    one = sum(len(v) for k, v in samples[0].items() if k != "__key__")
    with ShardWriter(tmp_path / "b", "val", max_samples=100, max_bytes=2 * one) as w:
        for s in samples[:4]:
            w.write(s)
    assert [len(scan_shard(p)) for p in sorted((tmp_path / "b").iterdir())] == [2, 2]

    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "c", "train", max_samples=2) as w:
            for s in samples[:3]:
                w.write(s)
            raise RuntimeError("killed")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["train-000000.tar"]  # the torn second tar is gone


def test_bad_samples_are_refused_with_clear_errors():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="invalid sample key"):
        _sample("clip.0001", rng)
    with pytest.raises(ValueError, match="exactly one of latent= or frames="):
        encode_sample("k", latent=np.zeros((1, 1, 1, 1)), frames=np.zeros((1, 2, 2, 3), np.uint8),
                      t5=np.zeros((1, 2)), clip=np.zeros(2), meta=_meta("k"))
    with pytest.raises(ValueError, match="metadata lacks"):
        encode_sample("k", latent=np.zeros((1, 1, 1, 1)), t5=np.zeros((1, 2)), clip=np.zeros(2), meta={"key": "k"})
    members = _sample("k", rng)
    members["t5.npy"] = b"\x93NUMPY garbage"
    with pytest.raises(ValueError, match=r"k\.t5\.npy: not a readable \.npy"):
        decode_sample("k", members)
    del members["clip.npy"]
    with pytest.raises(ValueError, match=r"missing members \['clip.npy'\]"):
        decode_sample("k", members)


def test_truncated_tar_yields_the_intact_samples_then_raises_naming_the_file(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "train-000000.tar"
    write_shard(path, [_sample(f"k{i}", rng) for i in range(3)])
    with tarfile.open(path) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "k2.latent.npy").offset_data + 10
    path.write_bytes(path.read_bytes()[:cut])
    got = []
    with pytest.raises(ShardReadError, match="train-000000.tar"):
        for key, _ in iter_shard(path):
            got.append(key)
    assert got == ["k0", "k1"]  # k1 is complete and is not lost with the damaged k2
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar" * 100)
    with pytest.raises(ShardReadError, match="garbage.tar. cannot be listed"):
        scan_shard(garbage)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_shard_reader_agrees_with_tarfile_on_long_names_pax_headers_and_directories(tmp_path, fmt):
    """The member reader behind iter_shard (hand-written for speed) against Python's tarfile on the same
    archives: long names (pax records / GNU long-name members / ustar prefix), non-ASCII names, a directory
    entry and zero-length members."""
    path = tmp_path / "a.tar"
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 60
    names = ["k0.latent.npy", "k0.txt", "k1.json", f"{long_dir}/k2.txt", "k3.empty"]
    if fmt == tarfile.PAX_FORMAT:
        names.append("ké4.txt")
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(_dir_info("somedir"))
        for i, name in enumerate(names):
            data = b"" if name.endswith("empty") else rng.bytes(int(rng.integers(1, 3000)))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        want = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]
    from ddm.shards import _tar_members

    with open(path, "rb") as f:
        got = [(name, payload) for name, size, payload in _tar_members(f)]
    assert got == want and len(got) == len(names)


def _dir_info(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_shard_reader_refuses_a_bad_checksum_at_the_start_and_stops_at_one_later(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "train-000000.tar"
    write_shard(path, [_sample(f"k{i}", rng) for i in range(3)])
    raw = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        k2 = next(m for m in tar.getmembers() if m.name.startswith("k2.")).offset
    bad = bytearray(raw)
    bad[k2 + 10] ^= 0xFF  # a flipped byte in k2's first header: the archive ends there, like tarfile
    path.write_bytes(bytes(bad))
    assert [k for k, _ in iter_shard(path)] == ["k0", "k1"]
    raw[10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardReadError, match="bad header checksum"):
        list(iter_shard(path))
