"""Lightning callbacks shared by the expert and router jobs.

* :class:`StepCheckpoint` — a checkpoint every N steps, written under a temporary name and renamed when
  complete, ``last.ckpt`` swapped atomically (a symlink replaced with ``os.replace``), the last K kept.
  A job killed while writing never leaves ``last`` pointing at a torn checkpoint.
* :class:`SignalHandler` — SLURM's ``USR1`` (sent ``--signal=USR1@<s>`` before the time limit) saves and
  requeues the job; ``SIGTERM`` saves and exits. The decision is synchronised across ranks so every
  rank saves at the same step.
* :class:`ThroughputMonitor` — samples/s, tokens/s, achieved TFLOP/s and MFU (peak FLOP/s from config).
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

from ddm.checkpoint import fsync_dir

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
    """USR1 → checkpoint + requeue (when this job owns requeue); SIGTERM → checkpoint + stop."""

    def __init__(self, checkpoint: StepCheckpoint, requeue: bool = True) -> None:
        self.checkpoint = checkpoint
        self.requeue = requeue
        self._received: str | None = None
        self._previous: dict[int, object] = {}

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
        reason = self._received or "signal on another rank"
        self.checkpoint.save(trainer, reason=f"{reason} received")
        trainer.should_stop = True
        if self._received == "SIGUSR1" and self.requeue and trainer.is_global_zero:
            job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID") and (
                f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}")
            job = job or os.environ.get("SLURM_JOB_ID")
            if job:
                result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                log.info("requeue of SLURM job %s: %s", job, "ok" if result.returncode == 0 else result.stderr)
            else:
                log.info("USR1 outside SLURM: checkpoint written, not requeued")


class ThroughputMonitor(L.Callback):
    """Logs samples/s, tokens/s, TFLOP/s and MFU over each logging window."""

    def __init__(self, flops_per_sample: float, tokens_per_sample: int, batch_size: int,
                 peak_flops_per_device: float | None, log_every_n_steps: int) -> None:
        self.flops_per_sample = float(flops_per_sample)
        self.tokens_per_sample = int(tokens_per_sample)
        self.batch_size = int(batch_size)
        self.peak = float(peak_flops_per_device) if peak_flops_per_device else None
        self.every = max(1, int(log_every_n_steps))
        self._t0: float | None = None
        self._steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._steps += 1
        if self._steps < self.every or self._t0 is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - self._t0
        world = trainer.world_size
        samples_s = self._steps * self.batch_size * world / dt
        flops_s = samples_s * self.flops_per_sample
        metrics = {
            "perf/samples_per_s": samples_s,
            "perf/tokens_per_s": samples_s * self.tokens_per_sample,
            "perf/tflops_per_s": flops_s / 1e12,
        }
        if self.peak:
            metrics["perf/mfu"] = flops_s / (self.peak * world)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        self._t0, self._steps = time.perf_counter(), 0
