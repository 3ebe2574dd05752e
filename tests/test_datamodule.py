"""ShardDataModule: batch contents, rank/worker splitting, fixed epochs, corrupt samples, resume (data/datamodule.py)."""
from __future__ import annotations

import tarfile
from itertools import islice

import numpy as np
import pytest
import torch

from data.datamodule import ShardDataModule, ShardInfo, shards_for_slot
from ddm.shards import decode_sample, encode_sample, iter_shard, write_index, write_shard

# 8 train shards over three experts (enough for 2 ranks x 2 workers to read disjoint subsets) + a val split.
COUNTS = {(1, "train"): [4, 4, 3], (2, "train"): [4, 2], (3, "train"): [3, 3, 1],
          (1, "val"): [2], (2, "val"): [3], (3, "val"): [1, 1]}


def _dm(shards_dir, **kw):
    args = {"experts": "all", "batch_size": 4, "samples_per_epoch": 24, "rank": 0, "world_size": 1} | kw
    return ShardDataModule(shards_dir, **args)


def _check_batch_against_truth(batch, truth, body="latent", pad_to=None):
    keys = batch["key"]
    b = len(keys)
    lengths = [truth[k]["t5"].shape[0] for k in keys]
    assert batch["t5"].shape == (b, pad_to or max(lengths), 8) and batch["t5"].dtype == torch.float32
    assert batch["t5_len"].tolist() == lengths
    for i, k in enumerate(keys):
        t = truth[k]
        if body == "latent":
            assert batch["latent"].dtype == torch.float32
            assert torch.equal(batch["latent"][i], torch.from_numpy(t["latent"].astype(np.float32)))
        else:  # (3, F, H, W) in [-1, 1] from uint8 (F, H, W, 3)
            expected = torch.from_numpy(t["frames"].astype(np.float64) / 127.5 - 1).permute(3, 0, 1, 2)
            assert torch.allclose(batch["frames"][i].double(), expected, atol=1e-6)
        n = lengths[i]
        assert torch.equal(batch["t5"][i, :n], torch.from_numpy(t["t5"].astype(np.float32)))
        assert not batch["t5"][i, n:].any()  # zero padding
        assert torch.equal(batch["clip"][i], torch.from_numpy(t["clip"]))
        assert batch["expert"][i].item() == t["expert"] and batch["label"][i].item() == t["expert"] - 1
        assert batch["caption"][i] == t["caption"]


def test_batches_are_shaped_and_labelled_like_the_written_samples(make_shards):
    shards_dir, truth = make_shards(COUNTS)
    dm = _dm(shards_dir)
    batches = list(dm.train_dataloader())
    assert len(batches) == 6 == len(dm.train_dataloader())
    for batch in batches:
        assert batch["latent"].shape == (4, 4, 2, 3, 3)
        assert set(batch) == {"latent", "t5", "t5_len", "clip", "expert", "label", "key", "caption"}
        assert all(truth[k]["split"] == "train" for k in batch["key"])
        _check_batch_against_truth(batch, truth)
    padded = next(iter(_dm(shards_dir, text_pad_to=7).train_dataloader()))
    _check_batch_against_truth(padded, truth, pad_to=7)


def test_raw_frames_mode_gives_video_in_minus_one_to_one(make_shards):
    shards_dir, truth = make_shards({(1, "train"): [3], (2, "train"): [2]}, raw_frames=True)
    batch = next(iter(_dm(shards_dir, raw_frames=True, batch_size=2).train_dataloader()))
    assert batch["frames"].shape == (2, 3, 5, 4, 4) and "latent" not in batch
    _check_batch_against_truth(batch, truth, body="frames")
    with pytest.raises(ValueError, match="set raw_frames=True"):
        next(iter(_dm(shards_dir, batch_size=2).train_dataloader()))


def test_expert_selection_and_unknown_experts(make_shards):
    shards_dir, truth = make_shards(COUNTS)
    batches = list(_dm(shards_dir, experts=2).train_dataloader())
    assert {truth[k]["expert"] for b in batches for k in b["key"]} == {2}
    assert {k for b in batches for k in b["key"]} <= {k for k, t in truth.items() if t["expert"] == 2}
    with pytest.raises(ValueError, match=r"expert\(s\) \[7, 9\] not found .* holds experts \[1, 2, 3\]"):
        _dm(shards_dir, experts=[1, 9, 7])


def test_ranks_and_workers_read_disjoint_shards_and_yield_equal_batch_counts(make_shards):
    shards_dir, truth = make_shards(COUNTS)
    shard_of = {k: t["shard"] for k, t in truth.items()}
    all_shards = sorted({t["shard"] for t in truth.values() if t["split"] == "train"})
    read_by_slot: dict[int, set[str]] = {}
    for rank in range(2):
        dm = _dm(shards_dir, num_workers=2, rank=rank, world_size=2, samples_per_epoch=20)
        batches = list(dm.train_dataloader())
        assert len(batches) == 5  # every rank: samples_per_epoch // batch_size, whatever its shards hold
        for i, batch in enumerate(batches):  # the DataLoader takes batches from its workers in turn
            read_by_slot.setdefault(rank * 2 + i % 2, set()).update(shard_of[k] for k in batch["key"])
    for slot, read in read_by_slot.items():
        assert read <= set(all_shards[slot::4]), f"slot {slot} read shards outside its share"
    slots = list(read_by_slot.values())
    assert all(a.isdisjoint(b) for i, a in enumerate(slots) for b in slots[i + 1:])


def test_fewer_shards_than_slots_falls_back_to_shared_shards():
    shards = [ShardInfo(f"expert_1/train-{i:06d}.tar", 1, 5) for i in range(3)]
    assert shards_for_slot(shards, 1, 3) == [shards[1]]
    assert shards_for_slot(shards, 3, 4) == shards  # 3 shards for 4 slots: everybody reads everything


def test_validation_is_one_ordered_pass_split_evenly_across_ranks(make_shards):
    shards_dir, truth = make_shards(COUNTS)
    val_keys = sorted(k for k, t in truth.items() if t["split"] == "val")
    seen = []
    for rank in range(2):
        loader = _dm(shards_dir, batch_size=2, rank=rank, world_size=2).val_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader)
        keys = [k for b in batches for k in b["key"]]
        assert len(keys) in (len(val_keys) // 2, len(val_keys) // 2 + 1)
        seen += keys
    assert sorted(seen) == val_keys  # every val sample exactly once over the ranks


@pytest.mark.slow
def test_balanced_sampling_is_uniform_over_experts(make_shards):
    shards_dir, truth = make_shards({(1, "train"): [10, 10, 10], (2, "train"): [3]})
    for balanced, p2 in ((False, 3 / 33), (True, 0.5)):
        batches = _dm(shards_dir, balanced=balanced, batch_size=100, samples_per_epoch=2000).train_dataloader()
        frac2 = float(np.mean([e == 2 for b in batches for e in b["expert"].tolist()]))
        # ~240-430 shard draws: the standard error of the fraction is about 0.01-0.015 (and the seed is fixed)
        assert abs(frac2 - p2) < 0.05, (balanced, frac2)


def test_few_shards_mix_every_expert_into_every_batch_at_the_right_frequencies(make_shards):
    """One shard per expert (a laptop run): with all of them open at once, nearly every batch holds every expert,
    in the long run at natural frequencies (∝ shard size) or uniformly with ``balanced``. (Drawing the open
    shards with replacement used to leave an expert out of runs of consecutive batches — a router trained on
    such batches chased the batch's classes.)"""
    shards_dir, _ = make_shards({(1, "train"): [30], (2, "train"): [20], (3, "train"): [10]})
    for balanced, want in ((False, [0.5, 1 / 3, 1 / 6]), (True, [1 / 3] * 3)):
        batches = list(_dm(shards_dir, balanced=balanced, batch_size=24, samples_per_epoch=2400).train_dataloader())
        experts = [b["expert"].tolist() for b in batches]
        # independent draws: P(a batch of 24 misses the 1/6 expert) = (5/6)^24 ≈ 1.3 %
        assert np.mean([set(e) == {1, 2, 3} for e in experts]) >= 0.95, balanced
        flat = np.array([x for e in experts for x in e])
        got = [float(np.mean(flat == k)) for k in (1, 2, 3)]
        np.testing.assert_allclose(got, want, atol=0.03, err_msg=str(balanced))  # SE of a share ≈ 0.01


def _truncate_inside(path, member_name):
    with tarfile.open(path) as tar:
        cut = next(m for m in tar.getmembers() if m.name == member_name).offset_data + 5
    path.write_bytes(path.read_bytes()[:cut])


def test_truncated_tar_is_skipped_and_counted(make_shards):
    shards_dir, truth = make_shards(COUNTS)
    # val: expert_2/val-000000.tar holds 3 samples; damage the second one -> the second and third are lost
    _truncate_inside(shards_dir / "expert_2" / "val-000000.tar", "e2-val-000-001.t5.npy")
    loader = _dm(shards_dir, batch_size=2, max_skip_fraction=0.5).val_dataloader()
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == ["e1-val-000-000", "e1-val-000-001", "e2-val-000-000", "e3-val-000-000",
                            "e3-val-001-000"]
    assert loader.progress.skipped == 2 and loader.progress.seen == 7

    # train: a damaged sample never reaches a batch, the epoch keeps its length, the loss is counted
    _truncate_inside(shards_dir / "expert_1" / "train-000000.tar", "e1-train-000-002.latent.npy")
    dm = _dm(shards_dir, max_skip_fraction=0.5, samples_per_epoch=80)
    batches = list(dm.train_dataloader())
    assert len(batches) == 20
    lost = {"e1-train-000-002", "e1-train-000-003"}
    assert lost.isdisjoint(k for b in batches for k in b["key"])
    assert dm.skipped == 2  # the two lost samples, however often that shard was drawn


def test_corrupt_npy_over_the_skip_fraction_stops_the_run_naming_the_shard(make_shards):
    shards_dir, _ = make_shards(COUNTS)
    path = shards_dir / "expert_3" / "train-000002.tar"  # the only sample of this shard gets a broken header
    raw = bytearray(path.read_bytes())
    start = raw.index(b"\x93NUMPY")
    raw[start:start + 6] = b"BROKEN"
    path.write_bytes(bytes(raw))
    dm = _dm(shards_dir, experts=3, max_skip_fraction=0.0, samples_per_epoch=400)
    with pytest.raises(RuntimeError, match=r"too many corrupt samples.*expert_3/train-000002\.tar.*e3-train-002-000: "
                                           "content differs from what encode wrote"):
        list(dm.train_dataloader())
    unverified = _dm(shards_dir, experts=3, max_skip_fraction=0.0, samples_per_epoch=400, verify_hashes=False)
    with pytest.raises(RuntimeError, match=r"too many corrupt samples.*expert_3/train-000002\.tar.*not a readable"):
        list(unverified.train_dataloader())
    tolerant = _dm(shards_dir, experts=3, max_skip_fraction=0.5, samples_per_epoch=40)
    keys = {k for b in tolerant.train_dataloader() for k in b["key"]}
    assert "e3-train-002-000" not in keys and tolerant.skipped > 0


def _flip_latent_byte(tar_path, key):
    """Flip one mantissa bit of the last float16 of ``key``'s latent.npy: still a readable .npy of finite
    values, so only the content hash can tell."""
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name == f"{key}.latent.npy")
    raw = bytearray(tar_path.read_bytes())
    raw[member.offset_data + member.size - 1] ^= 0x01
    tar_path.write_bytes(bytes(raw))


def test_flipped_latent_byte_is_skipped_at_read_time_naming_shard_and_key(make_shards, caplog):
    shards_dir, truth = make_shards(COUNTS)
    victim, shard = "e2-val-000-001", "expert_2/val-000000.tar"
    _flip_latent_byte(shards_dir / shard, victim)
    loader = _dm(shards_dir, batch_size=2, max_skip_fraction=0.5).val_dataloader()
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == sorted(k for k, t in truth.items() if t["split"] == "val" and k != victim)
    assert loader.progress.skipped == 1
    assert any(shard in r.message and victim in r.message and "content differs" in r.message for r in caplog.records)

    victim, shard = "e1-train-001-002", "expert_1/train-000001.tar"
    _flip_latent_byte(shards_dir / shard, victim)
    dm = _dm(shards_dir, max_skip_fraction=0.5, samples_per_epoch=80)
    batches = list(dm.train_dataloader())
    assert len(batches) == 20 and dm.skipped > 0
    read = {k for b in batches for k in b["key"]}
    assert victim not in read and {f"e1-train-001-00{i}" for i in (0, 1, 3)} <= read  # only that sample is lost


def _replace_sample(shards_dir, truth, key, **arrays):
    """Rewrite ``key`` with some arrays replaced, and re-index (with the new content's hash), as an encode
    that produced those values would have."""
    path = shards_dir / truth[key]["shard"]
    samples = []
    for k, members in iter_shard(path):
        if k == key:
            d = decode_sample(k, members)
            members = encode_sample(k, meta=d["meta"], **{n: arrays.get(n, d[n]) for n in ("latent", "t5", "clip")})
        samples.append({"__key__": k, **members})
    write_shard(path, samples)
    write_index(shards_dir, [{"key": k, **{f: t[f] for f in ("expert", "split", "shard", "position")}}
                             for k, t in truth.items()])


def test_non_finite_latents_and_text_are_skipped_per_sample_naming_shard_and_key(make_shards, caplog):
    shards_dir, truth = make_shards(COUNTS)
    nan_latent = truth["e1-val-000-001"]["latent"].copy()
    nan_latent[0, 1, 2, 0] = np.nan
    _replace_sample(shards_dir, truth, "e1-val-000-001", latent=nan_latent)
    inf_t5 = truth["e3-val-001-000"]["t5"].copy()
    inf_t5[0, 3] = np.inf
    _replace_sample(shards_dir, truth, "e3-val-001-000", t5=inf_t5)
    loader = _dm(shards_dir, batch_size=2, max_skip_fraction=0.5).val_dataloader()
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == ["e1-val-000-000", "e2-val-000-000", "e2-val-000-001", "e2-val-000-002", "e3-val-000-000"]
    assert all(torch.isfinite(b["latent"]).all() and torch.isfinite(b["t5"]).all() for b in batches)
    assert loader.progress.skipped == 2
    messages = [r.message for r in caplog.records]
    assert any("expert_1/val-000000.tar" in m and "e1-val-000-001: non-finite values in latent.npy" in m
               for m in messages)
    assert any("expert_3/val-000001.tar" in m and "e3-val-001-000: non-finite values in t5.npy" in m
               for m in messages)


@pytest.mark.slow
def test_one_bad_sample_redrawn_across_epochs_and_resumes_counts_once(make_shards, caplog):
    # The router's case: balanced sampling draws the small expert's only shard again and again, so its one
    # bad sample was met ~20 times in 600 and, counted each time, stopped the run at max_skip_fraction=0.01.
    shards_dir, truth = make_shards({(1, "train"): [35, 35], (2, "train"): [35, 35], (3, "train"): [10]},
                                    latent_shape=(2, 1, 2, 2))
    victim = "e3-train-000-004"
    _flip_latent_byte(shards_dir / "expert_3" / "train-000000.tar", victim)
    dm = _dm(shards_dir, balanced=True, max_skip_fraction=0.01, batch_size=10, samples_per_epoch=300)
    loader = dm.train_dataloader()
    epochs = [[k for b in loader for k in b["key"]] for _ in range(2)]
    assert all(len(keys) == 300 and victim not in keys for keys in epochs)
    assert dm.progress.seen > 600  # every read counted as a read, re-draws of the bad one included...
    assert dm.skipped == 1 and dm.state_dict()["bad"] == ["expert_3/train-000000.tar#4"]  # ...but it once
    warned = [r for r in caplog.records if victim in r.message and r.levelname == "WARNING"]
    assert len(warned) == 1 and "expert_3/train-000000.tar" in warned[0].message

    resumed = _dm(shards_dir, balanced=True, max_skip_fraction=0.01, batch_size=10, samples_per_epoch=300)
    resumed.load_state_dict(dm.state_dict())
    list(resumed.train_dataloader())
    assert resumed.skipped == 1 and len([r for r in caplog.records if victim in r.message
                                         and r.levelname == "WARNING"]) == 1


def test_resume_continues_with_new_batches_and_is_deterministic(make_shards):
    shards_dir, _ = make_shards(COUNTS)

    def keys(batches):
        return [tuple(b["key"]) for b in batches]

    first = _dm(shards_dir, samples_per_epoch=40, num_workers=2)
    loader = first.train_dataloader()
    seen = keys(islice(iter(loader), 3))
    state = first.state_dict()
    assert (state["epoch"], state["consumed"]) == (0, 3)
    continued = keys(loader)  # the same process simply goes on from its own state

    resumed = _dm(shards_dir, samples_per_epoch=40, num_workers=2)
    resumed.load_state_dict(state)
    after = keys(resumed.train_dataloader())
    assert len(after) == 10 - 3  # the rest of the epoch, not a whole one
    assert after[:3] != seen  # not a replay of what was already trained on
    assert after == continued  # the same continuation a run that never stopped takes
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["consumed"] == 0

    replay = _dm(shards_dir, samples_per_epoch=40, num_workers=2)
    assert keys(islice(iter(replay.train_dataloader()), 3)) == seen  # same seed, same start: same stream


def test_checked_in_test_shards_give_pixel_vae_latents_and_tiny_text(test_shards_dir):
    dm = ShardDataModule(test_shards_dir, "all", batch_size=4, samples_per_epoch=8, rank=0, world_size=1)
    assert dm.experts == [1, 2, 3]
    for batch in dm.train_dataloader():
        assert batch["latent"].shape == (4, 12, 3, 16, 16)
        assert batch["t5"].shape[0] == 4 and batch["t5"].shape[2] == 32 and batch["clip"].shape == (4, 32)
        assert torch.equal(batch["label"], batch["expert"] - 1) and set(batch["expert"].tolist()) <= {1, 2, 3}
    assert len(list(dm.val_dataloader())) >= 1


def test_lightning_checkpoint_mid_epoch_resumes_the_data_stream(make_shards, tmp_path):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.keys = []

        def training_step(self, batch, batch_idx):
            self.keys.append(tuple(batch["key"]))
            return self.layer(batch["latent"].mean(dim=(1, 2, 3, 4))[:, None]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    shards_dir, _ = make_shards(COUNTS)
    trainer_args = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "use_distributed_sampler": False}
    first, dm1 = Probe(), ShardDataModule(shards_dir, "all", batch_size=4, samples_per_epoch=24)  # 6 batches/epoch
    trainer = L.Trainer(max_steps=3, **trainer_args)
    trainer.fit(first, datamodule=dm1)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    state = torch.load(tmp_path / "mid.ckpt", weights_only=False)["ShardDataModule"]
    assert state["epoch"] == 0 and state["consumed"] >= 3  # (one batch more when Lightning prefetched it)

    second, dm2 = Probe(), ShardDataModule(shards_dir, "all", batch_size=4, samples_per_epoch=24)
    L.Trainer(max_steps=8, **trainer_args).fit(second, datamodule=dm2, ckpt_path=tmp_path / "mid.ckpt")
    assert len(second.keys) == 5  # steps 4..8, across the end of epoch 0, no hang and no extra epoch
    assert second.keys[:3] != first.keys[:3]  # the resumed stream is not a replay
    assert dm2.state_dict()["epoch"] == 1
