"""Safetensors exports: single file vs shards bit for bit, metadata, atomicity, validation, model rebuild."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

from ddm.export_files import build_model_from_export, load_export, read_export_metadata, save_export, state_dict_sha256, tensor_sha256
from ddm.files import atomic_save_torch, atomic_write, file_sha256
from ddm.models.router import Router, get_router_config

METADATA = {
    "kind": "router",
    "config": {"preset": "tiny", "patch_size": [1, 4, 4], "text_dim": None, "nested": {"a": [1.5, "x"]}},
    "expert_id": None,
    "stage": "stage2",
    "step": 1234,
    "manifest_hash": "ab" * 32,
    "centroids_hash": "cd" * 32,
    "train_config": {"optimizer": {"lr": 1e-4}, "seed": 0},
}


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return {
        "a.weight": torch.randn(64, 32, generator=g),  # 8 KiB
        "a.bias": torch.randn(64, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(40, 40, generator=g).to(torch.float16),
        "b.tied": base,  # shares storage with the next two
        "b.tied_again": base,
        "b.row": base[2],
        "c.transposed": torch.randn(7, 9, generator=g).t(),  # not contiguous
        "c.steps": torch.arange(10, dtype=torch.int64),
        "c.scalar": torch.tensor(3.25),
        "c.empty": torch.zeros(0, 4),
    }


def _assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k
    assert state_dict_sha256(got) == state_dict_sha256(want)


def test_single_file_and_shards_load_bit_identical(tmp_path):
    sd = _state_dict()
    save_export(sd, tmp_path / "exp", METADATA, max_shard_bytes=2048)
    index = json.loads((tmp_path / "exp" / "model" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(sd)
    for shard in shards:  # each shard under the limit unless it holds one oversized tensor
        part = load_file(tmp_path / "exp" / "model" / shard)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 2048 or len(part) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())

    master, _ = load_export(tmp_path / "exp" / "master.safetensors")
    sharded, _ = load_export(tmp_path / "exp" / "model")
    _assert_bit_identical(master, sd)
    _assert_bit_identical(sharded, sd)
    # tied names come back as independent tensors with equal values
    assert torch.equal(sharded["b.row"], sd["b.tied"][2])


def test_metadata_round_trip_from_every_entry_point(tmp_path):
    save_export(_state_dict(), tmp_path / "exp", METADATA, max_shard_bytes=2048)
    expected = {**METADATA, "format": "ddm-export-v1",
                "tensor_sha256": {k: tensor_sha256(t) for k, t in _state_dict().items()}}
    for path in (tmp_path / "exp", tmp_path / "exp" / "master.safetensors", tmp_path / "exp" / "model",
                 tmp_path / "exp" / "model" / "model.safetensors.index.json"):
        assert read_export_metadata(path) == expected, path
        assert load_export(path)[1] == expected, path
    # the safetensors header itself stores JSON strings (an independent reader sees them)
    with safetensors.safe_open(tmp_path / "exp" / "master.safetensors", framework="pt") as f:
        header = f.metadata()
    assert header["step"] == "1234" and json.loads(header["config"]) == METADATA["config"]


def test_folder_prefers_master_and_falls_back_to_shards(tmp_path):
    sd = _state_dict()
    save_export(sd, tmp_path / "only_shards", METADATA, single_file=False, max_shard_bytes=2048)
    assert not (tmp_path / "only_shards" / "master.safetensors").exists()
    _assert_bit_identical(load_export(tmp_path / "only_shards")[0], sd)

    save_export(sd, tmp_path / "both", METADATA)
    other = {k: v.clone() for k, v in sd.items()}
    other["c.scalar"] = torch.tensor(-1.0)
    save_export(other, tmp_path / "both", METADATA, sharded=False)  # master now differs from model/
    assert load_export(tmp_path / "both")[0]["c.scalar"] == -1.0
    assert load_export(tmp_path / "both" / "model")[0]["c.scalar"] == 3.25


def test_failed_write_never_replaces_a_good_file(tmp_path, monkeypatch):
    sd = _state_dict()
    save_export(sd, tmp_path / "exp", METADATA)
    good_master = (tmp_path / "exp" / "master.safetensors").read_bytes()
    good_index = (tmp_path / "exp" / "model" / "model.safetensors.index.json").read_bytes()

    def torn_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a header")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", torn_save_file)
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    with pytest.raises(OSError, match="disk full"):
        save_export(changed, tmp_path / "exp", METADATA)
    assert (tmp_path / "exp" / "master.safetensors").read_bytes() == good_master
    assert (tmp_path / "exp" / "model" / "model.safetensors.index.json").read_bytes() == good_index
    assert not list((tmp_path / "exp").rglob(".*.tmp*"))
    monkeypatch.undo()
    _assert_bit_identical(load_export(tmp_path / "exp")[0], sd)


def test_atomic_write_keeps_the_old_file_when_the_writer_raises(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"good")

    def writer(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(target, writer)
    assert target.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new"

    atomic_save_torch({"x": torch.arange(3)}, tmp_path / "obj.pt")
    assert torch.equal(torch.load(tmp_path / "obj.pt", weights_only=True)["x"], torch.arange(3))


def test_missing_or_damaged_shards_raise(tmp_path):
    save_export(_state_dict(), tmp_path / "exp", METADATA, single_file=False, max_shard_bytes=2048)
    model_dir = tmp_path / "exp" / "model"
    shards = sorted(model_dir.glob("model-*.safetensors"))
    victim = load_file(shards[1])
    dropped = sorted(victim)[0]
    save_file({k: v for k, v in victim.items() if k != dropped}, shards[1])
    with pytest.raises(ValueError, match=f"tensors missing \\['{dropped}'\\]"):
        load_export(tmp_path / "exp")
    shards[0].unlink()
    with pytest.raises(FileNotFoundError, match=shards[0].name):
        load_export(tmp_path / "exp")
    with pytest.raises(FileNotFoundError, match="neither master.safetensors nor"):
        load_export(tmp_path)
    with pytest.raises(FileNotFoundError, match="export not found"):
        load_export(tmp_path / "nope")


def test_re_export_with_fewer_shards_removes_stale_ones(tmp_path):
    sd = _state_dict()
    save_export(sd, tmp_path / "exp", METADATA, single_file=False, max_shard_bytes=2048)
    save_export(sd, tmp_path / "exp", METADATA, single_file=False)
    assert [p.name for p in (tmp_path / "exp" / "model").glob("*.safetensors")] == [
        "model-00001-of-00001.safetensors"]
    _assert_bit_identical(load_export(tmp_path / "exp")[0], sd)


def test_bad_metadata_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_export(_state_dict(), tmp_path / "exp", {"config": object()})
    with pytest.raises(ValueError, match="format"):
        save_export(_state_dict(), tmp_path / "exp", {"format": "pt"})
    with pytest.raises(ValueError, match="not a tensor"):
        save_export({"a": [1, 2]}, tmp_path / "exp", {})
    assert not (tmp_path / "exp").exists() or not any((tmp_path / "exp").rglob("*.safetensors"))


def test_hashes_against_hashlib_and_bit_sensitivity(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f", chunk=1000) == hashlib.sha256(data).hexdigest()

    sd = _state_dict()
    reordered = dict(reversed(list(sd.items())))
    assert state_dict_sha256(reordered) == state_dict_sha256(sd)
    flipped = dict(sd)
    w = sd["b.weight"].clone()
    w.view(torch.int16)[0, 0] ^= 1  # one bit of one fp16 weight
    flipped["b.weight"] = w
    assert state_dict_sha256(flipped) != state_dict_sha256(sd)
    cast = dict(sd)
    cast["c.steps"] = sd["c.steps"].to(torch.int32)  # same values, other dtype
    assert state_dict_sha256(cast) != state_dict_sha256(sd)


def test_router_rebuilds_from_its_export(tmp_path):
    cfg = get_router_config("tiny", num_experts=4, text_dim=32)
    router = Router(cfg)
    with torch.no_grad():
        for p in router.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_export(router.state_dict(), tmp_path / "router", {"kind": "router", "config": cfg.to_dict()},
                max_shard_bytes=20_000)
    x, t, cond = torch.randn(2, 16, 1, 8, 8), torch.rand(2), {"clip": torch.randn(2, 32)}
    for path in (tmp_path / "router", tmp_path / "router" / "model"):
        rebuilt = build_model_from_export(path)
        assert isinstance(rebuilt, Router) and rebuilt.cfg == cfg and not rebuilt.training
        torch.testing.assert_close(rebuilt(x, t, cond), router(x, t, cond), rtol=0, atol=0)
    half = build_model_from_export(tmp_path / "router", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_rebuild_is_strict_and_checks_the_kind(tmp_path):
    cfg = get_router_config("tiny")
    sd = Router(cfg).state_dict()
    del sd["head.0.weight"]
    save_export(sd, tmp_path / "bad", {"kind": "router", "config": cfg.to_dict()}, sharded=False)
    with pytest.raises(ValueError, match=r"missing keys \['head.0.weight'\]"):
        build_model_from_export(tmp_path / "bad")
    save_export(Router(cfg).state_dict(), tmp_path / "odd", {"kind": "vae", "config": {}}, sharded=False)
    with pytest.raises(ValueError, match="unknown export kind 'vae'"):
        build_model_from_export(tmp_path / "odd")
    save_file({"w": torch.zeros(1)}, tmp_path / "foreign.safetensors", metadata={"format": "pt"})
    assert read_export_metadata(tmp_path / "foreign.safetensors") == {"format": "pt"}
    with pytest.raises(ValueError, match="not a ddm-export-v1 export"):
        build_model_from_export(tmp_path / "foreign.safetensors")


@pytest.mark.parametrize("preset", ["tiny", "tiny-flux"])
def test_expert_rebuilds_from_its_export(tmp_path, preset):
    from ddm.models.mmdit import MMDiT
    from ddm.models.presets import get_expert_config

    cfg = get_expert_config(preset)
    torch.manual_seed(0)
    expert = MMDiT(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_export(expert.state_dict(), tmp_path / "e", {"kind": "expert", "config": cfg.to_dict(), "expert_id": 1,
                                                      "stage": "stage2"}, single_file=False, max_shard_bytes=50_000)
    rebuilt = build_model_from_export(tmp_path / "e")
    assert isinstance(rebuilt, MMDiT) and rebuilt.config == cfg and not rebuilt.training
    assert state_dict_sha256(rebuilt.state_dict()) == state_dict_sha256(expert.state_dict())
    assert all(p.dtype == torch.bfloat16 for p in rebuilt.parameters())
    cond = {"t5": torch.randn(1, 5, 32), "clip": torch.randn(1, 32), "guidance": torch.tensor([3.5])}
    x, t = torch.randn(1, 16, 1, 4, 4), torch.tensor([0.7])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t, cond), expert(x, t, cond), rtol=0, atol=0)


def test_expert_weights_in_the_other_layout_name_the_converter(tmp_path):
    from ddm.models.mmdit import MMDiT
    from ddm.models.presets import get_expert_config

    flux = MMDiT(get_expert_config("tiny", layout="flux"))
    config = get_expert_config("tiny").to_dict()  # says opensora
    save_export(flux.state_dict(), tmp_path / "e", {"kind": "expert", "config": config}, sharded=False)
    with pytest.raises(ValueError, match="convert_state_dict"):
        build_model_from_export(tmp_path / "e")


def test_atomic_writes_get_the_usual_file_permissions(tmp_path):
    """Temp files are created 0600; the final file must be readable as any file the user writes is."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    path = atomic_write(tmp_path / "shared.txt", lambda tmp: tmp.write_text("team-readable"))
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask


def _flip_last_data_byte(path: Path) -> None:
    """Flip one bit of the last byte of a safetensors file: inside the last tensor's data, header intact."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_tensor_hashes_are_recorded_and_a_tampered_export_is_refused_naming_the_file(tmp_path):
    sd = _state_dict()
    save_export(sd, tmp_path / "exp", METADATA, max_shard_bytes=2048)
    meta = read_export_metadata(tmp_path / "exp")
    for key, t in sd.items():  # an independent reference: hashlib over dtype, shape and the raw bytes
        c = t.contiguous()
        want = hashlib.sha256(f"{c.dtype}|{tuple(c.shape)}|".encode()
                              + c.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        assert meta["tensor_sha256"][key] == want, key
    _assert_bit_identical(load_export(tmp_path / "exp" / "model")[0], sd)  # verified and intact

    master = tmp_path / "exp" / "master.safetensors"
    _flip_last_data_byte(master)
    assert read_export_metadata(master)["step"] == 1234  # the header is intact ...
    with pytest.raises(ValueError, match=r"master\.safetensors': tensor '.*' does not match its recorded sha256"):
        load_export(tmp_path / "exp")  # ... the weights are not
    shard = sorted((tmp_path / "exp" / "model").glob("model-*.safetensors"))[-1]
    _flip_last_data_byte(shard)
    with pytest.raises(ValueError, match=f"{shard.name}': tensor .* does not match its recorded sha256"):
        load_export(tmp_path / "exp" / "model")


def test_a_damaged_safetensors_header_names_the_file(tmp_path):
    save_export(_state_dict(), tmp_path / "exp", METADATA, sharded=False)
    master = tmp_path / "exp" / "master.safetensors"
    data = bytearray(master.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage in the JSON header
    master.write_bytes(bytes(data))
    for call in (load_export, read_export_metadata, build_model_from_export):
        with pytest.raises(ValueError, match=rf"'{master}' is not a readable safetensors file"):
            call(tmp_path / "exp")


def test_the_old_module_name_still_imports_with_a_deprecation_warning():
    import importlib
    import sys
    import warnings

    sys.modules.pop("ddm.checkpoint", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("ddm.checkpoint")
    assert any(issubclass(w.category, DeprecationWarning) and "ddm.export_files" in str(w.message) for w in caught)
    from ddm.export_files import save_export
    from ddm.files import atomic_write

    assert old.save_export is save_export and old.atomic_write is atomic_write
