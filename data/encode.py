"""Encode: manifest + cluster assignments → per-expert WebDataset shards of one training stage.

For every manifest row with a cluster assignment: pick ``num_frames`` frames at the target fps (a
centred window; a clip too short for it is rejected), resize the short side and centre-crop to the
stage resolution, scale to [-1, 1] and VAE-encode in batches (or keep the uint8 frames in raw-frames
mode, ``vae=None``, which defers the VAE to training); encode the caption with T5 (stored at its true
token length) and CLIP (pooled). A still image becomes a static clip (``image_mode="repeat"``) or is
rejected (``"skip"``). Each sample goes to the ``train`` or ``val`` split by a stable hash of its key.

Outputs, under ``<out_dir>/shards/<stage>/`` (see :mod:`ddm.shards`): ``expert_<k>/<split>-NNNNNN.tar``,
``shards.parquet`` (the index, with every sample's content hash), ``encode_rejected.parquet`` (key, reason)
and ``encode_plan.json``.

Resumable: the sample → shard plan is a pure function of the inputs and the config, and every tar is
written atomically, so a rerun after a crash or a kill skips the complete tars and writes the rest.
``encode_plan.json`` records the plan's hash: a shards dir written under a different plan is refused
rather than mixed. Idempotent through :mod:`data.step` (``encode.done.json`` in the shards dir).

Test hook: with the environment variable ``DDM_ENCODE_KILL_AFTER_SHARDS=N`` the process SIGKILLs itself
once it has completed N tars in this run and is half-way through the next one (the crash-resume test).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from ddm.shards import (HASH_COLUMN, SPLITS, ShardReadError, check_key, encode_sample, expert_dirname, shard_digests,
                         shard_relpath, write_index, write_shard)
from data.step import StepResult, completed_result, fingerprint, mark_step_done, write_parquet_atomic
from ddm.files import atomic_path
from ddm.flow import latent_frames
from ddm.models.text import TextEncoders
from ddm.models.vae import build_vae
from ddm.video_io import read_video, resize_center_crop

log = logging.getLogger(__name__)

STEP = "encode"
REJECTED_NAME = "encode_rejected.parquet"
PLAN_NAME = "encode_plan.json"
KILL_ENV = "DDM_ENCODE_KILL_AFTER_SHARDS"
IMAGE_MODES = ("repeat", "skip")
REJECTED_SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string())])


def shards_dir_for(prep_dir: str | Path, stage: str) -> Path:
    """``<prep_dir>/shards/<stage>``: where :func:`encode` writes one stage's shards."""
    return Path(prep_dir) / "shards" / stage


# ---------------------------------------------------------------------------------------------------
# pure helpers: frames, sizes, splits


def target_size(resolution: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` from an int (square) or a pair; ValueError for anything else."""
    if isinstance(resolution, (int, np.integer)):
        h = w = int(resolution)
    elif isinstance(resolution, Sequence) and len(resolution) == 2:
        h, w = (int(v) for v in resolution)
    else:
        raise ValueError(f"resolution must be an int or (height, width), got {resolution!r}")
    if h < 1 or w < 1:
        raise ValueError(f"resolution must be positive, got {resolution!r}")
    return h, w


def sample_frame_indices(native_frames: int, native_fps: float, num_frames: int,
                         target_fps: float | None) -> list[int] | None:
    """Source frame indices for ``num_frames`` frames at ``target_fps`` (None: the native rate), centred in
    the clip; None when the clip is too short. Nearest-frame resampling: 24 → 8 fps takes every 3rd frame."""
    step = 1.0 if target_fps is None or native_fps <= 0 else native_fps / target_fps
    offsets = [math.floor(i * step + 0.5) for i in range(num_frames)]  # nearest, halves up
    if offsets[-1] >= native_frames:
        return None
    start = (native_frames - 1 - offsets[-1]) // 2
    return [start + o for o in offsets]


def split_of(key: str, val_fraction: float) -> str:
    """``"val"`` for a stable ``val_fraction`` of keys (by a hash of the key), else ``"train"``."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    return "val" if u < val_fraction else "train"


# ---------------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class PlannedSample:
    """One manifest row on its way into a shard."""

    key: str
    path: str
    caption: str
    expert: int
    split: str
    frame_indices: tuple[int, ...]
    fps: float  # of the stored clip


@dataclass(frozen=True)
class PlannedShard:
    """One tar: its path relative to the shards dir and its samples in order."""

    rel: str
    expert: int
    split: str
    samples: tuple[PlannedSample, ...]


def plan_shards(manifest: Sequence[Mapping[str, Any]], expert_of: Mapping[str, int], *, num_frames: int,
                fps: float | None, val_fraction: float, samples_per_shard: int,
                image_mode: str) -> tuple[list[PlannedShard], list[dict[str, str]]]:
    """Deterministic sample → shard plan: per (expert, split), samples sorted by key, cut every
    ``samples_per_shard``. Returns the shards and the rejected rows ``{key, reason}``."""
    groups: dict[tuple[int, str], list[PlannedSample]] = {}
    rejected: list[dict[str, str]] = []
    for row in sorted(manifest, key=lambda r: r["key"]):
        key = check_key(row["key"])
        if key not in expert_of:
            rejected.append({"key": key, "reason": "no cluster assignment"})
            continue
        if row["kind"] == "image":
            if image_mode == "skip":
                rejected.append({"key": key, "reason": "still image (image_mode=skip)"})
                continue
            indices, clip_fps = [0] * num_frames, float(fps or 0.0)
        else:
            indices = sample_frame_indices(int(row["num_frames"]), float(row["fps"]), num_frames, fps)
            if indices is None:
                rate = f"{fps:g}" if fps else "the native rate"
                rejected.append({"key": key, "reason": f"too short: {row['num_frames']} frames at {row['fps']:g} fps "
                                                       f"cannot give {num_frames} frames at {rate}"})
                continue
            clip_fps = float(fps or row["fps"])
        expert = int(expert_of[key])
        split = split_of(key, val_fraction)
        groups.setdefault((expert, split), []).append(
            PlannedSample(key, str(row["path"]), str(row["caption"]), expert, split, tuple(indices), clip_fps))
    shards = []
    for (expert, split), samples in sorted(groups.items()):
        for i in range(0, len(samples), samples_per_shard):
            shards.append(PlannedShard(shard_relpath(expert, split, i // samples_per_shard), expert, split,
                                       tuple(samples[i:i + samples_per_shard])))
    return shards, rejected


def plan_hash(shards: Sequence[PlannedShard], config: Mapping[str, Any]) -> str:
    """Hash of what the tars will contain: the plan and the encoding config (not file dates)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for shard in shards:
        h.update(json.dumps(asdict(shard), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _claim_shards_dir(shards_dir: Path, digest: str, config: Mapping[str, Any]) -> None:
    """Record the plan's hash; refuse a dir whose tars were written under another plan."""
    path = shards_dir / PLAN_NAME
    if path.is_file():
        recorded = json.loads(path.read_text()).get("plan_hash")
        if recorded != digest:
            raise ValueError(f"'{shards_dir}' holds shards of a different encode plan ({recorded} ≠ {digest}): the "
                             "config or the inputs changed. Delete that folder, or encode under another stage name.")
        return
    if any(shards_dir.glob("expert_*/*.tar")):
        raise ValueError(f"'{shards_dir}' holds tars but no {PLAN_NAME}: not written by this encoder; delete it "
                         "or encode under another stage name")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"plan_hash": digest, "config": config}, indent=2, default=str))


def _remove_stale_temp_tars(shards_dir: Path) -> None:
    stale = list(shards_dir.glob("expert_*/.*.tmp*"))  # ddm.files.atomic_path temp names
    for p in stale:
        p.unlink()
    if stale:
        log.info("[encode] removed %d unfinished tar(s) left by an interrupted run", len(stale))


# ---------------------------------------------------------------------------------------------------
# encoding


class _Encoders:
    """The VAE (or none, raw-frames mode) and the text encoders, loaded on first use."""

    def __init__(self, vae_spec: Mapping[str, Any] | None, text: Mapping[str, Any], device: str) -> None:
        self.vae_spec, self.text_spec, self.device = vae_spec, text, torch.device(device)
        self._vae = self._text = None

    @property
    def vae(self):
        if self._vae is None and self.vae_spec is not None:
            self._vae = build_vae(self.vae_spec).to(self.device).eval()
        return self._vae

    @property
    def text(self) -> TextEncoders:
        if self._text is None:
            self._text = TextEncoders.from_folder(self.text_spec["t5_dir"], self.text_spec["clip_dir"], device=self.device)
        return self._text

    @torch.inference_mode()
    def latents(self, clips: list[np.ndarray]) -> np.ndarray:
        """uint8 (B, F, H, W, 3) → scaled latents float16 (B, C, T, h, w)."""
        vae = self.vae
        dtype = next((p.dtype for p in vae.parameters()), torch.float32)
        video = torch.from_numpy(np.stack(clips)).to(self.device).permute(0, 4, 1, 2, 3)
        video = (video.float() / 127.5 - 1.0).to(dtype)
        return vae.encode(video).float().cpu().numpy().astype(np.float16)


def _read_clip(sample: PlannedSample, size: tuple[int, int]) -> np.ndarray:
    frames, _ = read_video(sample.path, frame_indices=list(sample.frame_indices))
    return resize_center_crop(frames, size)


def _encode_shard(shard: PlannedShard, enc: _Encoders, *, size: tuple[int, int], batch_size: int,
                  errors: dict[str, str], bar: tqdm, kill_after_half: bool) -> Iterator[dict[str, Any]]:
    """Yield the encoded samples of one shard (unreadable clips are left out and noted in ``errors``)."""
    yielded = 0
    for start in range(0, len(shard.samples), batch_size):
        chunk, clips = [], []
        for s in shard.samples[start:start + batch_size]:
            try:
                clips.append(_read_clip(s, size))
                chunk.append(s)
            except (ValueError, FileNotFoundError) as e:
                errors[s.key] = f"unreadable at encode time: {e}"
                log.warning("[encode] skipping %s: %s", s.key, e)
        bar.update(len(shard.samples[start:start + batch_size]))
        if not chunk:
            continue
        t5, clip = enc.text.encode([s.caption for s in chunk])
        bodies = enc.latents(clips) if enc.vae_spec is not None else clips
        for s, body, t5_i, clip_i in zip(chunk, bodies, t5, clip):
            meta = {"key": s.key, "expert": s.expert, "split": s.split, "caption": s.caption, "fps": s.fps,
                    "num_frames": len(s.frame_indices), "height": size[0], "width": size[1], "source": s.path}
            kind = "latent" if enc.vae_spec is not None else "frames"
            yield encode_sample(s.key, t5=t5_i.cpu().numpy(), clip=clip_i.cpu().numpy(), meta=meta, **{kind: body})
            yielded += 1
            if kill_after_half and yielded >= max(1, len(shard.samples) // 2):
                log.warning("[encode] %s is set: killing this process half-way through %s", KILL_ENV, shard.rel)
                os.kill(os.getpid(), signal.SIGKILL)


def _index_rows(shards_dir: Path, shards: Sequence[PlannedShard]) -> tuple[list[dict], set[str]]:
    """Index rows read back from the tars, each with its sample's content hash, and the planned keys found.

    The hashes are taken from the complete tars as they lie on disk (tars of an earlier, killed run
    included), so what the index records is what training and ``data.audit --deep`` will compare against.
    """
    rows, found = [], set()
    for shard in shards:
        try:
            listed = shard_digests(shards_dir / shard.rel)
        except ShardReadError as e:
            raise RuntimeError(f"a shard written by this run cannot be read back: {e}") from e
        for position, (key, digest) in enumerate(listed):
            rows.append({"key": key, "expert": shard.expert, "split": shard.split, "shard": shard.rel,
                         "position": position, HASH_COLUMN: digest})
            found.add(key)
    return rows, found


def encode(manifest_path: str | Path, assignments_path: str | Path, out_dir: str | Path, *, stage: str = "stage2",
           resolution: int | Sequence[int] = 256, num_frames: int = 33, fps: float | None = None,
           vae: Mapping[str, Any] | None = None, text: Mapping[str, Any], val_fraction: float = 0.05,
           samples_per_shard: int = 256, image_mode: str = "repeat", batch_size: int = 8, device: str = "cpu",
           progress: bool = True) -> StepResult:
    """Write ``<out_dir>/shards/<stage>/`` from ``manifest.parquet`` and ``assignments.parquet``.

    ``vae``: a :func:`ddm.models.vae.build_vae` spec, or None for raw-frames shards. ``text``: ``{"t5_dir",
    "clip_dir"}`` (:meth:`ddm.models.text.TextEncoders.from_folder`). ``num_frames`` must be 4k + 1.
    Returns the stage result; a rerun with the same inputs and config does no work.
    """
    t0 = time.perf_counter()
    size = target_size(resolution)
    latent_frames(num_frames)  # F = 4k + 1, else a ValueError naming the rule
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if samples_per_shard < 1 or batch_size < 1:
        raise ValueError(f"samples_per_shard and batch_size must be >= 1, got {samples_per_shard}, {batch_size}")
    if image_mode not in IMAGE_MODES:
        raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be > 0 or None (native rate), got {fps}")
    missing = [k for k in ("t5_dir", "clip_dir") if not (text or {}).get(k)]
    if missing:
        raise ValueError(f"text must give {missing} (the T5 and CLIP folders)")
    text = {"t5_dir": str(text["t5_dir"]), "clip_dir": str(text["clip_dir"])}
    vae = None if vae is None else dict(vae)
    manifest_path, assignments_path = Path(manifest_path), Path(assignments_path)
    for p, what in ((manifest_path, "manifest (run ingest first)"), (assignments_path, "assignments (run cluster first)")):
        if not p.is_file():
            raise FileNotFoundError(f"{what} not found: '{p}'")
    shards_dir = shards_dir_for(out_dir, stage)
    config = {"stage": STEP,  # (key kept: it is part of the fingerprint)
               "shards": stage, "size": size, "num_frames": num_frames, "fps": fps, "vae": vae,
              "text": text, "val_fraction": val_fraction, "samples_per_shard": samples_per_shard,
              "image_mode": image_mode}
    fp = fingerprint(config, [manifest_path, assignments_path])
    if done := completed_result(shards_dir, STEP, fp):
        return done

    manifest = pq.read_table(manifest_path).to_pylist()
    assignments = pq.read_table(assignments_path, columns=["key", "expert"]).to_pydict()
    expert_of = dict(zip(assignments["key"], assignments["expert"]))
    stale = sorted(set(expert_of) - {r["key"] for r in manifest})
    if stale:
        raise ValueError(f"'{assignments_path}' assigns {len(stale)} keys that are not in '{manifest_path}' "
                         f"(e.g. {stale[:3]}): it is out of date, rerun cluster")
    shards, rejected = plan_shards(manifest, expert_of, num_frames=num_frames, fps=fps, val_fraction=val_fraction,
                                   samples_per_shard=samples_per_shard, image_mode=image_mode)
    shards_dir.mkdir(parents=True, exist_ok=True)
    _claim_shards_dir(shards_dir, plan_hash(shards, config), config)
    _remove_stale_temp_tars(shards_dir)
    todo = [s for s in shards if not (shards_dir / s.rel).is_file()]
    planned = sum(len(s.samples) for s in shards)
    log.info("[encode] %d samples in %d shards (%d to write, %d rejected) at %dx%d, %d frames, %s → %s",
             planned, len(shards), len(todo), len(rejected), size[0], size[1], num_frames,
             "raw frames" if vae is None else f"VAE {vae.get('type')}", shards_dir)

    kill_after = int(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else None
    enc = _Encoders(vae, text, device)
    if todo and vae is not None:
        enc.vae.latent_shape(num_frames, *size)  # geometry errors before any video is read
    errors: dict[str, str] = {}
    with tqdm(total=sum(len(s.samples) for s in todo), desc=f"encode {stage}", unit="clip",
              disable=not progress) as bar:
        for n_done, shard in enumerate(todo):
            write_shard(shards_dir / shard.rel,
                        _encode_shard(shard, enc, size=size, batch_size=batch_size, errors=errors, bar=bar,
                                      kill_after_half=kill_after is not None and n_done == kill_after))

    rows, found = _index_rows(shards_dir, shards)
    for shard in shards:
        for s in shard.samples:
            if s.key not in found:
                rejected.append({"key": s.key, "reason": errors.get(s.key, "unreadable in an earlier encode run")})
    index = write_index(shards_dir, rows)
    rejects = write_parquet_atomic(pa.Table.from_pylist(sorted(rejected, key=lambda r: r["key"]),
                                                        schema=REJECTED_SCHEMA), shards_dir / REJECTED_NAME)
    counts = {f"{expert_dirname(k)}/{split}": sum(1 for r in rows if r["expert"] == k and r["split"] == split)
              for k in sorted({r["expert"] for r in rows}) for split in SPLITS}
    result = StepResult(STEP, len(manifest), len(rows), len(rejected), time.perf_counter() - t0,
                         [str(index), str(rejects)], info={"samples": counts, "shards": len(shards)})
    mark_step_done(shards_dir, STEP, fp, result)
    log.info("[encode] samples per expert/split: %s", ", ".join(f"{k}: {n}" for k, n in counts.items()))
    log.info(result.summary_line())
    return result
