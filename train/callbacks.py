"""Lightning callbacks shared by the expert and router jobs.

* :class:`StepCheckpoint` — a checkpoint every N steps, written under a temporary name and renamed when
  complete, ``last.ckpt`` swapped atomically (a symlink replaced with ``os.replace``), the last K kept.
  A job killed while writing never leaves ``last`` pointing at a torn checkpoint.
* :class:`SignalHandler` — SLURM's ``USR1`` (sent ``--signal=USR1@<s>`` before the time limit) saves and
  requeues the job; ``SIGTERM`` saves and exits. The decision is synchronised across ranks so every
  rank saves at the same step; :attr:`SignalHandler.exit_code` is what the job exits with (``train.run``).
* :class:`ThroughputMonitor` — smoothed samples/s, tokens/s, TFLOP/s and MFU against the device's peak
  after a warm-up, and every rank's peak memory.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import torch

from ddm.files import fsync_dir
from train.run import EXIT_NOT_REQUEUED, EXIT_SIGTERM, log_media
from ddm.sampling_spec import SamplingSpec
from ddm.video_io import write_gif, write_video

log = logging.getLogger("ddm.train")

# Test hook: exit hard (as kill -9 would) after writing a partial checkpoint at this step, before the
# rename. Lets the test suite check that a kill during checkpoint writing never tears `last`.
CRASH_DURING_CHECKPOINT_ENV = "DDM_TEST_CRASH_DURING_CHECKPOINT_AT_STEP"


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


class StepCheckpoint(L.Callback):
    """Atomic step checkpoints + ``last`` + keep-last-K. See the module docstring."""

    def __init__(self, dirpath: Path, every_n_steps: int, keep_last: int = 3) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.keep_last = max(1, int(keep_last))
        self.last_saved_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            for stale in self.dirpath.glob("*.partial"):  # left by a job killed mid-write
                log.info("removing incomplete checkpoint %s", stale)
                _remove(stale)
        trainer.strategy.barrier("ddm-checkpoint-setup")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self.last_saved_step:
            self.save(trainer, reason=f"every {self.every_n_steps} steps")

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self.last_saved_step and trainer.global_step > 0:
            self.save(trainer, reason="end of training")

    def save(self, trainer: L.Trainer, reason: str) -> Path:
        """Write ``step-XXXXXXXX.ckpt`` atomically and point ``last.ckpt`` at it. Call on every rank."""
        step = trainer.global_step
        final = self.dirpath / f"step-{step:08d}.ckpt"
        partial = final.with_name(final.name + ".partial")
        if trainer.is_global_zero:
            _remove(partial)
        trainer.strategy.barrier("ddm-checkpoint-begin")
        trainer.save_checkpoint(partial)  # a file, or a folder for sharded strategies
        trainer.strategy.barrier("ddm-checkpoint-written")
        if trainer.is_global_zero:
            if os.environ.get(CRASH_DURING_CHECKPOINT_ENV) == str(step):
                os._exit(137)
            if partial.is_file():
                with open(partial, "rb+") as f:
                    os.fsync(f.fileno())
            _remove(final)
            os.replace(partial, final)
            link_tmp = self.dirpath / ".last.ckpt.tmp"
            _remove(link_tmp)
            os.symlink(final.name, link_tmp)
            os.replace(link_tmp, self.dirpath / "last.ckpt")
            fsync_dir(self.dirpath)
            self._prune()
            log.info("checkpoint step %d (%s) → %s", step, reason, final)
        trainer.strategy.barrier("ddm-checkpoint-done")
        self.last_saved_step = step
        return final

    def _prune(self) -> None:
        steps = sorted(p for p in self.dirpath.glob("step-*.ckpt"))
        for old in steps[: -self.keep_last]:
            _remove(old)


class SignalHandler(L.Callback):
    """USR1 → checkpoint + requeue (when this job owns requeue); SIGTERM → checkpoint + stop.

    :attr:`exit_code` after a signal stop: 0 when the requeue succeeded (the requeued job carries on),
    ``EXIT_NOT_REQUEUED`` (138) for USR1 without a requeue, ``EXIT_SIGTERM`` (143) for SIGTERM; None when no
    signal stopped training. Non-zero codes keep SLURM ``afterok`` dependents from starting on an
    unfinished stage.
    """

    def __init__(self, checkpoint: StepCheckpoint, requeue: bool = True) -> None:
        self.checkpoint = checkpoint
        self.requeue = requeue
        self._received: str | None = None
        self._previous: dict[int, object] = {}
        self.exit_code: int | None = None

    def _handler(self, signum, frame) -> None:
        self._received = signal.Signals(signum).name
        log.info("received %s: will checkpoint at the end of this step", self._received)

    def on_train_start(self, trainer, pl_module) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_end(self, trainer, pl_module) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        got = self._received is not None
        # Every rank must agree, or one would enter the collective checkpoint save alone.
        if not trainer.strategy.reduce_boolean_decision(got, all=False):
            return
        if self.exit_code is not None:
            return  # already stopping (a second signal, e.g. SLURM's SIGTERM after the requeue)
        reason = self._received or "signal on another rank"
        self.checkpoint.save(trainer, reason=f"{reason} received")
        trainer.should_stop = True
        # rank 0's signal decides for all ranks (it may be the only one that received it)
        usr1 = bool(trainer.strategy.broadcast(self._received == "SIGUSR1", src=0))
        requeued = False
        if usr1 and trainer.is_global_zero:
            requeued = self._requeue()
        requeued = bool(trainer.strategy.broadcast(requeued, src=0))
        self.exit_code = 0 if requeued else (EXIT_NOT_REQUEUED if usr1 else EXIT_SIGTERM)
        log.info("stopping at step %d after %s: exit code %d%s", trainer.global_step, reason, self.exit_code,
                 " (requeued)" if requeued else " (not requeued: dependent jobs stay held)")

    def _requeue(self) -> bool:
        """``scontrol requeue`` this job (array task); True when SLURM accepted it."""
        if not self.requeue:
            log.info("USR1 with trainer.slurm_auto_requeue=false: checkpoint written, not requeued")
            return False
        job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID") and (
            f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}")
        job = job or os.environ.get("SLURM_JOB_ID")
        if not job:
            log.info("USR1 outside SLURM: checkpoint written, not requeued")
            return False
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            log.error("requeue of SLURM job %s failed: %s", job, err)
            return False
        if result.returncode != 0:
            log.error("requeue of SLURM job %s failed (scontrol exit %d): %s", job, result.returncode,
                      (result.stderr or result.stdout).strip())
            return False
        log.info("requeue of SLURM job %s: ok", job)
        return True


class ThroughputMonitor(L.Callback):
    """Samples/s, tokens/s, TFLOP/s and MFU, smoothed, after a warm-up; peak memory of every rank.

    * The first ``skip_steps`` steps (compilation, allocator and data-loader warm-up) are not timed.
    * Every ``log_every_n_steps`` steps the rates over the last ``window`` logging windows are logged
      (total samples / total time, so one slow window does not dominate).
    * MFU = achieved FLOP/s / (peak FLOP/s per device × devices). The peak is
      ``trainer.peak_flops_per_device`` if set, else Lightning's ``get_available_flops`` for the device
      and precision, else :attr:`PEAK_BF16_FLOPS` by device name; unknown (e.g. a CPU): MFU not logged.
    * ``mem/peak_gib_rank<r>`` (and ``mem/peak_gib_max``): CUDA max-allocated on GPUs, the process's
      RSS high-water mark on CPUs, gathered from every rank.
    * Under context parallelism the ``context_parallel`` ranks of a group share each sample, so the samples
      (and tokens and FLOPs) of a step are ``batch_size × world / context_parallel``.
    """

    # Dense bf16 tensor-core peaks (FLOP/s) by a lower-case substring of the device name, for devices
    # Lightning's table does not name (it misses e.g. a plain "NVIDIA H200").
    PEAK_BF16_FLOPS = {"gb200": 2.5e15, "b200": 2.25e15, "h200": 989e12, "h100": 989e12, "h800": 989e12,
                       "mi300x": 1307e12, "a100": 312e12, "l40s": 362e12}

    def __init__(self, flops_per_sample: float, tokens_per_sample: int, batch_size: int,
                 peak_flops_per_device: float | None, log_every_n_steps: int, skip_steps: int = 10,
                 window: int = 5, context_parallel: int = 1) -> None:
        from collections import deque

        self.flops_per_sample = float(flops_per_sample)
        self.tokens_per_sample = int(tokens_per_sample)
        self.batch_size = int(batch_size)
        self.context_parallel = max(1, int(context_parallel))
        self.peak = float(peak_flops_per_device) if peak_flops_per_device else None
        self.every = max(1, int(log_every_n_steps))
        self.skip_steps = max(0, int(skip_steps))
        self._windows: deque[tuple[int, float]] = deque(maxlen=max(1, int(window)))
        self._t0: float | None = None
        self._seen = 0
        self._steps = 0

    @classmethod
    def device_peak_flops(cls, device: torch.device, precision: str) -> float | None:
        """Peak FLOP/s of one ``device`` at ``precision``: Lightning's table, then ours by name, else None."""
        if device.type != "cuda":
            return None
        dtype = torch.bfloat16 if "bf16" in str(precision) else torch.float16 if "16" in str(precision) \
            else torch.float32
        try:
            from lightning.fabric.utilities.throughput import get_available_flops

            found = get_available_flops(device, dtype)
        except Exception:  # noqa: BLE001 - a missing table entry must not stop training
            found = None
        if found:
            return float(found)
        name = torch.cuda.get_device_name(device).lower()
        for key, value in cls.PEAK_BF16_FLOPS.items():
            if key in name and dtype in (torch.bfloat16, torch.float16):
                return value
        return None

    @staticmethod
    def peak_memory_bytes(device: torch.device) -> int:
        """CUDA max-allocated bytes on a GPU; the RSS high-water mark of this process elsewhere."""
        if device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(device))
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB

    def on_train_start(self, trainer, pl_module) -> None:
        if self.peak is None:
            self.peak = self.device_peak_flops(pl_module.device, str(trainer.precision))
        log.info("throughput: first %d steps not timed; MFU %s", self.skip_steps,
                 f"against {self.peak / 1e12:.0f} TFLOP/s per device" if self.peak else
                 "not logged (device peak unknown: set trainer.peak_flops_per_device)")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None and self._seen >= self.skip_steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._seen += 1
        if self._t0 is None:
            return
        self._steps += 1
        if self._steps < self.every:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self._windows.append((self._steps, now - self._t0))
        steps = sum(n for n, _ in self._windows)
        seconds = sum(dt for _, dt in self._windows)
        world = trainer.world_size
        samples_s = steps * self.batch_size * world / self.context_parallel / seconds
        flops_s = samples_s * self.flops_per_sample
        metrics = {
            "perf/samples_per_s": samples_s,
            "perf/tokens_per_s": samples_s * self.tokens_per_sample,
            "perf/tflops_per_s": flops_s / 1e12,
            "perf/step_time_s": seconds / steps,
        }
        if self.peak:
            metrics["perf/mfu"] = flops_s / (self.peak * world)
        # every rank's peak memory, gathered (a collective: every rank reaches it at the same step)
        mine = torch.tensor([self.peak_memory_bytes(pl_module.device) / 2**30], dtype=torch.float64,
                            device=pl_module.device)
        peaks = trainer.strategy.all_gather(mine).reshape(-1).tolist()
        metrics.update({f"mem/peak_gib_rank{r}": v for r, v in enumerate(peaks)})
        metrics["mem/peak_gib_max"] = max(peaks)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        self._t0, self._steps = time.perf_counter(), 0


class SampleVideos(L.Callback):
    """Every N steps, sample a few videos from the EMA weights (the captions of the first batch seen) and
    write them as mp4 + gif to ``<run_dir>/samples/step-XXXXXXXX_<i>.{mp4,gif}`` (rank 0 only); the gifs also go
    to wandb as media under ``samples`` when a wandb logger is attached."""

    def __init__(self, every_n_steps: int, out_dir: Path, vae_spec: dict, fps: float, num_videos: int = 2,
                 num_steps: int = 20, cfg_scale: float = 5.0) -> None:
        self.every = int(every_n_steps)
        self.out_dir = Path(out_dir)
        self.vae_spec = dict(vae_spec)
        self.fps, self.num_videos, self.num_steps, self.cfg_scale = fps, num_videos, num_steps, cfg_scale
        self._vae = None
        self._prompts: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._prompts is None:  # fixed prompts for the whole run: the first batch's captions
            n = min(self.num_videos, len(batch["caption"]))
            raw = "latent" not in batch
            self._prompts = {"t5": batch["t5"][:n].detach().float().cpu(),
                             "clip": batch["clip"][:n].detach().float().cpu(),
                             "caption": list(batch["caption"][:n]), "raw_frames": raw,
                             "shape": tuple(batch["frames" if raw else "latent"].shape[1:])}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every <= 0 or step == 0 or step % self.every or not trainer.is_global_zero or self._prompts is None:
            return
        if any(hasattr(q, "full_tensor") or hasattr(q, "ds_tensor") for q in pl_module.ema_model.parameters()):
            # a sharded EMA forward on rank 0 alone would wait for the other ranks forever
            log.warning("periodic samples are off under sharded strategies; sample from the export instead")
            self.every = 0
            return
        from ddm.models.vae import build_vae
        from ddm.sampler import sample

        if self._vae is None:
            self._vae = build_vae(self.vae_spec)
        p = self._prompts
        shape = self._vae.latent_shape(*p["shape"][1:]) if p["raw_frames"] else p["shape"]
        device = pl_module.device
        cond = {"t5": p["t5"].to(device), "clip": p["clip"].to(device)}
        uncond = {"t5": pl_module.null_t5, "clip": pl_module.null_clip}
        with torch.no_grad():
            latents = sample([pl_module.ema_model], None, (len(p["caption"]), *shape), cond,
                             SamplingSpec(num_steps=self.num_steps, cfg_scale=self.cfg_scale),
                             shift_alpha=pl_module.shift_alpha(torch.empty(1, *shape)), uncond=uncond,
                             seeds=list(range(len(p["caption"]))))
            videos = self._vae.decode(latents.float().cpu())
        frames = ((videos.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        gifs = []
        for i, video in enumerate(frames):
            stem = self.out_dir / f"step-{step:08d}_{i}"
            write_video(stem.with_suffix(".mp4"), video, self.fps)
            gifs.append(write_gif(stem.with_suffix(".gif"), video, self.fps))
        (self.out_dir / f"step-{step:08d}.txt").write_text("\n".join(p["caption"]) + "\n")
        # the gifs as wandb media (they play in the browser) when a wandb logger is attached; no-op otherwise
        log_media(trainer.loggers, "samples", gifs, step=step, kind="video", captions=p["caption"])
        log.info("step %d: %d sample videos from the EMA weights → %s", step, len(frames), self.out_dir)
