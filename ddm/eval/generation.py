"""Resumable generation of an evaluation run: ``<out>/videos/<model>/<strategy>/`` holds the mp4 files, their exact
frames (``<i>.npy``), routing traces and ``run.json``, the commit point rewritten atomically after each batch, so a
killed evaluation resumes where it stopped and a rerun reuses every committed video."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ddm.files import atomic_write
from ddm.eval.videos import to_uint8_video
from ddm.sampler import RoutingTrace
from ddm.video_io import read_video, write_video

__all__ = ["RunFolder", "load_run_videos", "generate_run"]

log = logging.getLogger("ddm.evaluate")


class RunFolder:
    """``<out>/videos/<model>/<strategy>/``: the videos of one run, their traces and ``run.json``."""

    MANIFEST = "run.json"

    def __init__(self, path: str | Path, settings: dict[str, Any]):
        self.path = Path(path)
        self.settings = settings
        self.videos: dict[str, dict[str, Any]] = {}
        self.resolved: dict[str, Any] = {}  # what the pipeline made of the settings (stage, size, shift, ...)
        manifest = self.path / self.MANIFEST
        if manifest.is_file():
            data = json.loads(manifest.read_text())
            differ = {k: (data["settings"].get(k), v) for k, v in settings.items() if data["settings"].get(k) != v}
            if differ:
                raise ValueError(f"'{self.path}' holds videos generated with other settings "
                                 + "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in differ.items())
                                 + ". Use another --out, or delete that folder to regenerate.")
            self.videos, self.resolved = data["videos"], data.get("resolved") or {}
        # Leftovers of writes a kill interrupted (video_io and atomic_write temp names) are never trusted.
        for tmp in self.path.glob(".*.tmp*"):
            tmp.unlink(missing_ok=True)

    def video_path(self, index: int) -> Path:
        """Where video ``index`` lives."""
        return self.path / f"{index:06d}.mp4"

    def array_path(self, index: int) -> Path:
        """The exact uint8 (F, H, W, 3) frames of video ``index`` (the mp4 is lossy: 4:2:0 chroma)."""
        return self.path / f"{index:06d}.npy"

    def is_done(self, index: int, prompt: str, seed: int) -> bool:
        """True when video ``index`` was committed for this prompt and seed (ValueError for another one)."""
        entry = self.videos.get(str(index))
        if entry is None or not self.video_path(index).is_file():
            return False
        if entry["prompt"] != prompt or entry["seed"] != seed:
            raise ValueError(f"'{self.video_path(index)}' was generated for prompt {entry['prompt']!r} with seed "
                             f"{entry['seed']}, but video {index} is now prompt {prompt!r} with seed {seed}. Use "
                             "another --out for another prompt set or seed.")
        return True

    def commit(self, entries: dict[int, dict[str, Any]], resolved: dict[str, Any] | None = None) -> None:
        """Record finished videos in ``run.json`` (atomically: the file is the commit point)."""
        self.videos.update({str(i): e for i, e in entries.items()})
        self.resolved = dict(resolved or self.resolved)
        data = {"settings": self.settings, "resolved": self.resolved,
                "videos": dict(sorted(self.videos.items(), key=lambda kv: int(kv[0])))}
        atomic_write(self.path / self.MANIFEST, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))

    def routing_trace(self, count: int) -> RoutingTrace | None:
        """The routing weights of videos 0..count-1 as one trace (steps, count, K); None without traces."""
        entries = [self.videos[str(i)] for i in range(count)]
        if any(e.get("trace") is None for e in entries):
            return None
        traces = {name: RoutingTrace.from_json(self.path / name) for name in {e["trace"] for e in entries}}
        first = traces[entries[0]["trace"]]
        rows = [traces[e["trace"]].weights[:, e["row"]] for e in entries]
        return RoutingTrace(first.strategy, first.t, torch.stack(rows, dim=1))


def _save_array(path: Path, video: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.save would append ".npy" to the temp name
        np.save(fh, video)


def load_run_videos(paths: Sequence[Path]) -> list[np.ndarray]:
    """A run's exact frames (``<i>.npy``), decoding the mp4 only for folders written before they were kept."""
    return [np.load(p.with_suffix(".npy")) if p.with_suffix(".npy").is_file() else read_video(p)[0] for p in paths]


def generate_run(pipe: Any, folder: RunFolder, prompts: Sequence[str], seeds: Sequence[int], *, spec: Any = None,
                 generate_kwargs: dict[str, Any], batch_size: int, fps: float | None = None, progress: bool = True,
                 name: str = "run", per_prompt: dict[str, Sequence[Any]] | None = None) -> tuple[int, int]:
    """Generate the videos of ``folder`` that are not committed yet; returns ``(reused, generated)``.

    ``pipe`` is a loaded ``DDMPipeline`` (``pipe.generate(prompts, spec, seeds=..., trace=True,
    **generate_kwargs)``; ``spec`` a :class:`ddm.sampling_spec.SamplingSpec`, ``generate_kwargs`` the video size).
    Per batch: trace json, then the mp4 files (at ``fps``, default the model's, else ``ddm.generate``'s
    default), then the ``run.json`` commit. ``per_prompt`` holds generate arguments with one value per video
    (``oracle_ids``), sliced per batch.
    """
    from ddm.generate import DEFAULT_FPS

    pending = [i for i in range(len(prompts)) if not folder.is_done(i, prompts[i], seeds[i])]
    reused = len(prompts) - len(pending)
    if not pending:
        log.info("%s: all %d videos already generated in %s (reused)", name, reused, folder.path)
        return reused, 0
    log.info("%s: generating %d video(s) into %s (%d reused)", name, len(pending), folder.path, reused)
    bar = tqdm(total=len(pending), desc=f"generate {name}", unit="video", disable=not progress)
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        sliced = {key: [values[i] for i in batch] for key, values in (per_prompt or {}).items()}
        result = pipe.generate([prompts[i] for i in batch], spec, seeds=[seeds[i] for i in batch],
                               batch_size=len(batch), trace=True, progress=False, **generate_kwargs, **sliced)
        videos = [to_uint8_video(v, where=f"{name} video {i}") for i, v in zip(batch, result.videos)]
        if len(videos) != len(batch):
            raise ValueError(f"{name}: the pipeline returned {len(videos)} videos for {len(batch)} prompts")
        trace, trace_name = result.traces, None
        if trace is not None:
            ids = hashlib.sha1(json.dumps(batch).encode()).hexdigest()[:8]
            trace_name = f"trace-{batch[0]:06d}-{batch[-1]:06d}-{ids}.json"
            atomic_write(folder.path / trace_name, lambda tmp: trace.to_json(tmp))
        for i, video in zip(batch, videos):
            write_video(folder.video_path(i), video, fps or result.fps or DEFAULT_FPS)
            atomic_write(folder.array_path(i), lambda tmp, v=video: _save_array(tmp, v))
        folder.commit({i: {"prompt": prompts[i], "seed": seeds[i], "trace": trace_name, "row": row}
                       for row, i in enumerate(batch)}, resolved=result.settings)
        bar.update(len(batch))
    bar.close()
    return reused, len(pending)
