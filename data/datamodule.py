"""The training DataModule: batches from per-expert WebDataset shards, for every rank and worker.

Training (``train_dataloader``) reads *resampled* shards with a fixed epoch length, so ranks never starve
and never hang at the end of an epoch:

* the selected experts' shards of the split are dealt round-robin to the (rank, worker) *slots*
  (slot = rank × workers + worker), so every slot reads a disjoint subset. With fewer shards than slots
  every slot reads all shards instead, each with its own seed (logged as a warning): samples are drawn
  with replacement anyway, so this only costs some repeats across ranks within an epoch;
* each slot draws shards at random from its subset, so that samples come at their natural frequencies
  or, with ``balanced=True`` (the router's option), equally from every expert; it reads ``interleave``
  of them at once, taking each next sample from a random open shard (batches mix experts), through a
  seeded shuffling buffer. A slot with at most ``interleave`` shards keeps every one of them open and
  takes each next sample from shard s with probability ∝ its draw weight × its size (the same frequencies,
  and every batch mixes all experts in proportion);
* every rank yields exactly ``samples_per_epoch // batch_size`` batches per epoch.

Resume: the state is (epoch, batches consumed). A restored loader reseeds from (seed, epoch, batches
consumed, rank, worker) and yields the rest of the epoch: new samples, never a replay of the stream
already seen. Batches prefetched but not trained on before a checkpoint are not revisited.

Validation (``val_dataloader``) is one ordered pass over the ``val`` split; sample i (in index order)
goes to slot i mod slots, so every rank gets an equal share (±1 sample) however few val shards exist.

A corrupt sample (unreadable .npy, missing member, truncated tar, content that differs from the SHA-256
the index recorded at encode time, NaN or infinity in its latent or text embeddings) is skipped, logged
naming its shard and key, and counted once: by its shard and position, so a sample re-drawn in this epoch,
a later one or after a resume is not counted again (``LoaderProgress.bad`` carries the ids across passes and
checkpoints). Once more than ``max_skip_fraction`` of the distinct samples a worker met are corrupt (judged
over at least ``max(1 / max_skip_fraction, 20)`` samples, so one early bad sample is tolerated) the run
stops with an error naming the shard.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ddm.shards import (ShardReadError, available_experts, check_split, decode_sample, index_digests, iter_shard,
                          non_finite_members, sample_digest, shard_sizes)
from ddm.models.context_parallel import data_parallel_coords
from ddm.models.text import pad_tokens

log = logging.getLogger(__name__)

MIN_SKIP_WINDOW = 20  # samples over which the skip fraction is judged at the earliest (with max_skip_fraction > 0)
STATS_KEY = "_stats"  # per-batch (samples read, new corrupt ids) from the worker; removed before the batch is handed out


# ---------------------------------------------------------------------------------------------------
# shards, ranks and slots


@dataclass(frozen=True)
class ShardInfo:
    """One tar of the index: its path relative to the shards dir, its expert and its sample count."""

    shard: str
    expert: int
    size: int


def select_shards(shards_dir: str | Path, experts: int | str | Sequence[int], split: str) -> tuple[list[int], list[ShardInfo]]:
    """Resolve ``experts`` (an id, a list of ids or ``"all"``) and return them with their shards of ``split``.

    Raises ValueError naming the experts that exist when a requested one has no shards.
    """
    check_split(split)
    present = available_experts(shards_dir)
    if isinstance(experts, str):
        if experts != "all":
            raise ValueError(f"experts must be an id, a list of ids or 'all', got {experts!r}")
        wanted = present
    else:
        wanted = sorted({int(e) for e in ([experts] if isinstance(experts, (int, np.integer)) else experts)})
    missing = [e for e in wanted if e not in present]
    if missing or not wanted:
        raise ValueError(f"expert(s) {missing or wanted} not found in '{shards_dir}'; it holds experts {present}")
    shards = [ShardInfo(s, e, n) for s, (e, n) in sorted(shard_sizes(shards_dir, split).items()) if e in wanted]
    return wanted, shards


def resolve_world(trainer: Any = None, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): explicit values, else the trainer's, else torch.distributed's, else RANK/WORLD_SIZE."""
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither")
    if rank is None:
        if trainer is not None:
            rank, world_size = trainer.global_rank, trainer.world_size
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return int(rank), int(world_size)


def shards_for_slot(shards: Sequence[ShardInfo], slot: int, num_slots: int) -> list[ShardInfo]:
    """The disjoint share of ``shards`` read by one (rank, worker) slot; all of them when there are fewer
    shards than slots (each slot then samples the whole set with its own seed)."""
    if len(shards) < num_slots:
        return list(shards)
    return list(shards[slot::num_slots])


def shard_weights(shards: Sequence[ShardInfo], balanced: bool) -> np.ndarray:
    """Probability of drawing each shard so that *samples* come at natural frequencies, or, when ``balanced``,
    so that each expert present supplies the same share of samples.

    A draw of shard s yields its ``size`` samples, so P(s) ∝ (wanted sample share of s) / size: uniform over
    shards for natural frequencies, ∝ 1 / (samples of s's expert) for balanced ones.
    """
    if not shards or any(s.size < 1 for s in shards):
        raise ValueError(f"cannot sample from empty shards: {[s.shard for s in shards if s.size < 1] or 'none given'}")
    if balanced:
        per_expert: dict[int, int] = {}
        for s in shards:
            per_expert[s.expert] = per_expert.get(s.expert, 0) + s.size
        weights = np.array([1.0 / per_expert[s.expert] for s in shards])
    else:
        weights = np.ones(len(shards))
    return weights / weights.sum()


# ---------------------------------------------------------------------------------------------------
# reading, skipping and collating


def sample_id(shard: str, position: int) -> str:
    """``<shard>#<position>``: names one sample slot of the index (also one lost to a damaged tar)."""
    return f"{shard}#{position}"


class SkipCounter:
    """Counts the samples one worker read and the *distinct* corrupt ones; raises once too much of the data
    is corrupt.

    Resampled shards come round again and again, so one bad sample is met many times; it counts once
    (by its shard and position), and so does each sample in the fraction's denominator: the fraction is
    that of the distinct samples met that are corrupt. ``known_bad`` (ids from earlier passes) are skipped
    without a new warning and are not reported as new.
    """

    def __init__(self, max_skip_fraction: float, known_bad: Iterable[str] = ()) -> None:
        if not 0.0 <= max_skip_fraction < 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1), got {max_skip_fraction}")
        self.max_fraction = max_skip_fraction
        self.reads = 0  # samples taken out of tars, good or bad, re-draws included
        self.distinct = 0  # distinct samples met
        self.bad: set[str] = set()  # distinct corrupt samples met
        self._known = set(known_bad)
        self._met: dict[str, np.ndarray] = {}  # per shard, one flag per position (1 byte a sample)
        self._new_bad: list[str] = []
        self._reported_reads = 0

    @property
    def skipped(self) -> int:
        """Distinct corrupt samples met by this counter."""
        return len(self.bad)

    def _meet(self, shard: str, positions: Sequence[int], size: int) -> None:
        flags = self._met.get(shard)
        top = max(size, max(positions, default=-1) + 1)
        if flags is None or len(flags) < top:
            grown = np.zeros(top, dtype=bool)
            if flags is not None:
                grown[:len(flags)] = flags
            self._met[shard] = flags = grown
        idx = np.asarray(positions, dtype=np.int64)
        self.distinct += int((~flags[idx]).sum())
        flags[idx] = True
        self.reads += len(idx)

    def ok(self, shard: str, position: int, size: int) -> None:
        """A good sample was read."""
        self._meet(shard, [position], size)

    def skip(self, shard: str, reason: str, positions: Sequence[int], size: int) -> None:
        """The samples at ``positions`` of ``shard`` (``size`` samples) are lost; raise RuntimeError when
        more than ``max_skip_fraction`` of the distinct samples met are corrupt."""
        self._meet(shard, positions, size)
        ids = [sample_id(shard, i) for i in positions]
        fresh = [i for i in ids if i not in self.bad]
        self.bad.update(ids)
        unknown = [i for i in fresh if i not in self._known]
        self._new_bad += unknown
        if unknown:
            log.warning("skipped %d sample(s) of shard %s: %s (%d corrupt of %d distinct samples met so far)",
                        len(ids), shard, reason, self.skipped, self.distinct)
        else:  # met again (re-drawn), already counted and reported
            log.debug("skipped %d known corrupt sample(s) of shard %s again: %s", len(ids), shard, reason)
        f = self.max_fraction
        # Judge the fraction only over a minimal window, so a corrupt sample met early is not fatal.
        limit = f * max(self.distinct, math.ceil(1 / f), MIN_SKIP_WINDOW) if f > 0 else 0.0
        if self.skipped > limit:
            raise RuntimeError(f"too many corrupt samples: {self.skipped} of {self.distinct} distinct samples "
                               f"skipped, more than max_skip_fraction={f}; last one in shard '{shard}': {reason}")

    def delta(self) -> dict[str, Any]:
        """Since the last call: samples read, and the ids of corrupt samples newly found (what the main
        process adds to its totals)."""
        d = {"seen": self.reads - self._reported_reads, "bad": self._new_bad}
        self._reported_reads, self._new_bad = self.reads, []
        return d


def read_shard_samples(root: Path, info: ShardInfo, body: str, counter: SkipCounter,
                       digests: dict[str, str] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(position, decoded sample)`` from one shard, skipping (and counting) what is corrupt.

    ``body`` is ``"latent"`` or ``"frames"``: a shard holding the other kind is a configuration error and
    raises ValueError. Samples missing at the end of a truncated tar count as skipped too. ``digests``
    (``{key: sha256}`` from the index) are checked against each sample's content; keys without one are
    not verified.
    """
    read = 0  # samples taken out of the tar, good or bad
    try:
        for key, members in iter_shard(root / info.shard):
            position, read = read, read + 1
            want = digests.get(key) if digests else None
            if want is not None and (got := sample_digest(members)) != want:
                counter.skip(info.shard, f"sample {key}: content differs from what encode wrote (sha256 {got[:12]}…, "
                                         f"the index recorded {want[:12]}…)", [position], info.size)
                continue
            try:
                sample = decode_sample(key, members)
            except ValueError as e:
                counter.skip(info.shard, str(e), [position], info.size)
                continue
            if body not in sample:
                other = "frames" if body == "latent" else "latent"
                raise ValueError(f"shard '{info.shard}' holds {other}.npy but the DataModule expects {body}.npy: "
                                 f"set raw_frames={other == 'frames'} to match how the shards were encoded")
            bad = non_finite_members(sample)
            if bad:  # e.g. a VAE that overflowed at encode time: one such sample would poison a whole batch
                counter.skip(info.shard, f"sample {key}: non-finite values in {', '.join(bad)}", [position], info.size)
                continue
            if sample["meta"]["expert"] != info.expert:
                counter.skip(info.shard, f"sample {key} says expert {sample['meta']['expert']}, "
                                         f"its shard belongs to expert {info.expert}", [position], info.size)
                continue
            counter.ok(info.shard, position, info.size)
            sample["expert"] = info.expert
            yield position, sample
    except ShardReadError as e:
        counter.skip(info.shard, str(e), range(read, max(read + 1, info.size)), info.size)
        return
    if read < info.size:  # a tar cut at a sample boundary reads cleanly, but short
        counter.skip(info.shard, f"tar ends after {read} of {info.size} indexed samples", range(read, info.size),
                     info.size)


def collate(samples: Sequence[dict], body: str, text_pad_to: int | None) -> dict[str, Any]:
    """Stack decoded samples into a batch (docs/architecture.md, "Batches")."""
    shapes = {s["key"]: s[body].shape for s in samples}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"samples in one batch have different {body} shapes: {shapes}")
    stacked = torch.from_numpy(np.stack([s[body] for s in samples]))
    if body == "latent":
        x = stacked.float()
    else:  # uint8 (B, F, H, W, 3) -> float (B, 3, F, H, W) in [-1, 1]
        x = stacked.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    t5, t5_len = pad_tokens([torch.from_numpy(s["t5"].astype(np.float32)) for s in samples], text_pad_to)
    expert = torch.tensor([s["expert"] for s in samples], dtype=torch.long)
    return {
        body: x,
        "t5": t5,
        "t5_len": t5_len,
        "clip": torch.from_numpy(np.stack([s["clip"] for s in samples]).astype(np.float32)),
        "expert": expert,
        "label": expert - 1,
        "key": [s["key"] for s in samples],
        "caption": [s["caption"] for s in samples],
    }


# ---------------------------------------------------------------------------------------------------
# the per-rank datasets (each DataLoader worker runs one slot)


@dataclass(frozen=True)
class StreamConfig:
    """Everything a worker needs to produce its batches."""

    root: str
    shards: tuple[ShardInfo, ...]
    rank: int
    world_size: int
    batch_size: int
    raw_frames: bool
    text_pad_to: int | None
    max_skip_fraction: float
    verify_hashes: bool = True

    def digests(self, shards: Sequence[ShardInfo]) -> dict[str, dict[str, str]]:
        """``{shard: {key: sha256}}`` for ``shards`` from the index ({} when verification is off)."""
        return index_digests(self.root, {s.shard for s in shards}) if self.verify_hashes else {}


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ResampledShards(IterableDataset):
    """Training stream of one rank: ``num_batches`` batches, drawn with replacement (see module docstring)."""

    def __init__(self, cfg: StreamConfig, *, num_batches: int, seed: int, epoch: int, start_batch: int,
                 balanced: bool, shuffle_buffer: int, interleave: int = 8, known_bad: Iterable[str] = ()) -> None:
        self.cfg = cfg
        self.known_bad = frozenset(known_bad)
        self.interleave = max(1, interleave)
        self.num_batches = num_batches
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        self.balanced = balanced
        self.shuffle_buffer = max(1, shuffle_buffer)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        worker, workers = _worker()
        slot, num_slots = cfg.rank * workers + worker, cfg.world_size * workers
        mine = shards_for_slot(cfg.shards, slot, num_slots)
        weights = shard_weights(mine, self.balanced)
        remaining = self.num_batches - self.start_batch
        my_batches = remaining // workers + (worker < remaining % workers)
        rng = np.random.default_rng([self.seed, self.epoch, self.start_batch, cfg.rank, worker])
        counter = SkipCounter(cfg.max_skip_fraction, self.known_bad)
        body = "frames" if cfg.raw_frames else "latent"
        digests = cfg.digests(mine)

        def reopen(i: int) -> Iterator[dict]:  # shard i of this slot, read from its start
            info = mine[i]
            return (sample for _, sample in
                    read_shard_samples(Path(cfg.root), info, body, counter, digests.get(info.shard)))

        def open_shard() -> Iterator[dict]:  # a shard drawn by the weights
            return reopen(int(rng.choice(len(mine), p=weights)))

        def stream() -> Iterator[dict]:
            # Several shards open at once, each next sample from a random one of them: shards hold one
            # expert each, so reading them one after another would give single-expert batches (fatal for
            # the router and the monolith). Every opened shard is read to its end, so the long-run sample
            # frequencies are still those of the shard draws. Few shards (a laptop run: one per expert):
            # all of them stay open, the next sample from shard i with probability ∝ its draw weight × size —
            # the same frequencies, without the runs of batches that miss an expert when two open streams
            # happen to read the same shard.
            if len(mine) <= self.interleave:
                share = weights * np.array([info.size for info in mine], dtype=np.float64)
                streams, pick, refill = [reopen(i) for i in range(len(mine))], \
                    (lambda: rng.choice(len(mine), p=share / share.sum())), reopen
            else:
                streams = [open_shard() for _ in range(self.interleave)]
                pick, refill = (lambda: rng.integers(len(streams))), (lambda _: open_shard())
            while True:
                j = int(pick())
                sample = next(streams[j], None)
                if sample is None:
                    streams[j] = refill(j)
                    continue
                yield sample

        if my_batches <= 0:
            return
        buffer: list[dict] = []
        batch: list[dict] = []
        produced = 0
        for sample in stream():
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], sample = sample, buffer[j]
            batch.append(sample)
            if len(batch) == cfg.batch_size:
                out = collate(batch, body, cfg.text_pad_to)
                out[STATS_KEY] = counter.delta()
                batch = []
                produced += 1
                yield out
                if produced == my_batches:
                    return


class OrderedShards(IterableDataset):
    """Validation: one ordered pass; sample i (index order) goes to slot i mod slots; a last partial batch."""

    def __init__(self, cfg: StreamConfig, known_bad: Iterable[str] = ()) -> None:
        self.cfg = cfg
        self.known_bad = frozenset(known_bad)

    def slot_sizes(self, workers: int) -> list[int]:
        """Samples each worker of this rank reads (for ``len``)."""
        total = sum(s.size for s in self.cfg.shards)
        slots = self.cfg.world_size * workers
        return [len(range(self.cfg.rank * workers + w, total, slots)) for w in range(workers)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        worker, workers = _worker()
        slot, num_slots = cfg.rank * workers + worker, cfg.world_size * workers
        counter = SkipCounter(cfg.max_skip_fraction, self.known_bad)
        body = "frames" if cfg.raw_frames else "latent"
        digests = cfg.digests(cfg.shards)
        batch: list[dict] = []
        offset = 0
        for info in cfg.shards:
            if (slot - offset) % num_slots < info.size:  # the shard holds at least one sample of this slot
                for position, sample in read_shard_samples(Path(cfg.root), info, body, counter,
                                                           digests.get(info.shard)):
                    if (offset + position) % num_slots == slot:
                        batch.append(sample)
                    if len(batch) == cfg.batch_size:
                        yield {**collate(batch, body, cfg.text_pad_to), STATS_KEY: counter.delta()}
                        batch = []
            offset += info.size
        if batch:
            yield {**collate(batch, body, cfg.text_pad_to), STATS_KEY: counter.delta()}


# ---------------------------------------------------------------------------------------------------
# the loader Lightning iterates, and the DataModule


@dataclass
class LoaderProgress:
    """Where the training stream is, and what it skipped: the resumable state."""

    epoch: int = 0
    consumed: int = 0  # batches handed out in this epoch
    seen: int = 0  # samples read (re-draws included)
    skipped: int = 0  # distinct corrupt samples met (a re-drawn one counts once, across epochs and resumes)
    bad: list[str] = field(default_factory=list)  # their ids, <shard>#<position>

    def add_bad(self, ids: Iterable[str]) -> None:
        """Record corrupt sample ids; only ones not recorded before add to ``skipped``."""
        known = set(self.bad)
        for i in ids:
            if i not in known:
                known.add(i)
                self.bad.append(i)
                self.skipped += 1

    def load(self, state: dict[str, Any]) -> None:
        """Take the values of a saved :func:`dataclasses.asdict` state (unknown keys are ignored)."""
        for k, v in state.items():
            if k == "bad":
                self.bad = [str(i) for i in v]
            elif k in self.__dataclass_fields__:
                setattr(self, k, int(v))


class ShardLoader:
    """Iterable of batches over a fresh DataLoader per pass; sized, and stateful (Lightning's ``_Stateful``).

    ``make_dataset(epoch, start_batch, known_bad)`` builds the dataset for one pass (``known_bad``: the ids of
    the corrupt samples met so far, so that a re-drawn one is not counted again). With ``resumable`` the pass
    starts at ``progress.consumed`` and the epoch counter advances when a pass ends.
    """

    def __init__(self, make_dataset: Callable[[int, int, Sequence[str]], IterableDataset], length: int, num_workers: int,
                 progress: LoaderProgress, resumable: bool) -> None:
        self.make_dataset = make_dataset
        self.length = length
        self.num_workers = num_workers
        self.progress = progress
        self.resumable = resumable

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        p = self.progress
        if self.resumable and p.consumed >= self.length:  # a checkpoint taken on an epoch's last batch
            p.epoch, p.consumed = p.epoch + 1, 0
        dataset = self.make_dataset(p.epoch, p.consumed if self.resumable else 0, tuple(p.bad))
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available())
        for batch in loader:
            stats = batch.pop(STATS_KEY)
            p.seen += int(stats["seen"])
            p.add_bad(stats["bad"])
            if self.resumable:
                p.consumed += 1
            yield batch
        if self.resumable:
            p.epoch, p.consumed = p.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.progress)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.progress.load(state)


class ShardDataModule(L.LightningDataModule):
    """Batches from ``<prep>/shards/<stage>/`` for one expert, several, or all (the monolith, the router).

    Batches: ``latent`` (B, C, T, H, W) float32 — or ``frames`` (B, 3, F, H, W) in [-1, 1] with
    ``raw_frames`` — ``t5`` (B, L, D) zero-padded to ``text_pad_to`` (None: the batch's longest),
    ``t5_len`` (B,), ``clip`` (B, D), ``expert`` (B,) 1..K, ``label`` (B,) 0..K-1, ``key``, ``caption``.
    ``skipped`` counts the corrupt training samples skipped so far (for logging). ``verify_hashes``: check each
    sample against the content hash in ``shards.parquet`` (a mismatch is a skipped sample).
    ``context_parallel``: ranks ``k·cp … k·cp+cp-1`` read the same batches (data-parallel rank ``k``).
    """

    def __init__(self, shards_dir: str | Path, experts: int | str | Sequence[int] = "all", split: str = "train", *,
                 batch_size: int, num_workers: int = 0, samples_per_epoch: int = 100_000, seed: int = 0,
                 text_pad_to: int | None = None, raw_frames: bool = False, max_skip_fraction: float = 0.01,
                 balanced: bool = False, rank: int | None = None, world_size: int | None = None,
                 shuffle_buffer: int = 64, interleave: int = 8, verify_hashes: bool = True,
                 context_parallel: int = 1) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if samples_per_epoch < batch_size:
            raise ValueError(f"samples_per_epoch ({samples_per_epoch}) must be at least batch_size ({batch_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        SkipCounter(max_skip_fraction)  # validates the fraction now rather than inside a worker
        self.shards_dir = Path(shards_dir)
        self.split = check_split(split)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_batches = samples_per_epoch // batch_size
        self.seed = seed
        self.text_pad_to = text_pad_to
        self.raw_frames = raw_frames
        self.max_skip_fraction = max_skip_fraction
        self.balanced = balanced
        self.shuffle_buffer = shuffle_buffer
        self.interleave = interleave
        self.verify_hashes = verify_hashes
        self._rank, self._world_size = rank, world_size
        if context_parallel < 1:
            raise ValueError(f"context_parallel must be >= 1, got {context_parallel}")
        self.context_parallel = context_parallel
        self.experts, self.train_shards = select_shards(self.shards_dir, experts, split)
        if not self.train_shards:
            raise ValueError(f"experts {self.experts} have no '{split}' samples in '{self.shards_dir}'")
        self.progress = LoaderProgress()
        self.val_progress = LoaderProgress()

    @property
    def skipped(self) -> int:
        """Distinct corrupt training samples met so far (all workers of this rank; a re-drawn one counts once)."""
        return self.progress.skipped

    def _stream_config(self, shards: Sequence[ShardInfo]) -> StreamConfig:
        rank, world_size = resolve_world(self.trainer, self._rank, self._world_size)
        # every rank of a context-parallel group reads its group's batches (it holds a slice of each sample)
        rank, world_size = data_parallel_coords(rank, world_size, self.context_parallel)
        workers = max(1, self.num_workers)
        if len(shards) < world_size * workers:
            log.warning("%d shards for %d ranks x %d workers: every slot reads all shards with its own seed "
                        "(write smaller shards for disjoint reads)", len(shards), world_size, workers)
        return StreamConfig(str(self.shards_dir), tuple(shards), rank, world_size, self.batch_size, self.raw_frames,
                            self.text_pad_to, self.max_skip_fraction, self.verify_hashes)

    def train_dataloader(self) -> ShardLoader:
        cfg = self._stream_config(self.train_shards)

        def make(epoch: int, start_batch: int, known_bad: Sequence[str]) -> ResampledShards:
            return ResampledShards(cfg, num_batches=self.num_batches, seed=self.seed, epoch=epoch,
                                   start_batch=start_batch, balanced=self.balanced, shuffle_buffer=self.shuffle_buffer,
                                   interleave=self.interleave, known_bad=known_bad)

        log.info("train data: experts %s, %d '%s' shards in %s; rank %d/%d, %d batches of %d per epoch",
                 self.experts, len(cfg.shards), self.split, self.shards_dir, cfg.rank, cfg.world_size,
                 self.num_batches, self.batch_size)
        return ShardLoader(make, self.num_batches, self.num_workers, self.progress, resumable=True)

    def val_dataloader(self) -> ShardLoader | list:
        _, shards = select_shards(self.shards_dir, self.experts, "val")
        if not sum(s.size for s in shards):
            log.info("no 'val' samples for experts %s in %s: validation is off", self.experts, self.shards_dir)
            return []
        cfg = self._stream_config(shards)
        length = sum(math.ceil(n / self.batch_size) for n in OrderedShards(cfg).slot_sizes(max(1, self.num_workers)))
        return ShardLoader(lambda epoch, start, known_bad: OrderedShards(cfg, known_bad), length, self.num_workers,
                           self.val_progress, resumable=False)

    def state_dict(self) -> dict[str, Any]:
        """Training stream position (epoch, batches consumed), samples read and the corrupt samples met."""
        return asdict(self.progress)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a saved position: the next pass reseeds from it (new samples, no replay)."""
        self.progress.load(state_dict)
