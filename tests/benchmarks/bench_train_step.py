"""Lightning expert step vs a bare PyTorch loop: same tiny model, batch, data and math, CPU.

    python tests/benchmarks/bench_train_step.py [--steps 60] [--batch 8] [--repeats 3]

The Lightning side is ``train.expert_module.ExpertModule`` under ``lightning.Trainer`` exactly as
``python -m train.expert`` builds it (EMA, grad-norm logging and clipping, per-mode loss logging, the
non-finite guard, the throughput monitor), minus checkpoint writing. The bare side does the same work by
hand: logit-normal t, interpolation, CFG text dropout, the i2v mixture, forward, loss, backward, clipping,
AdamW, the EMA update. Both read the same batch from memory. Goal (issue 4): ratio ≤ 1.05.
"""
from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from ddm import flow
from ddm.conditioning import batch_frame_mask, i2v_condition, sample_condition_modes
from ddm.models.mmdit import MMDiT
from ddm.models.presets import get_expert_config
from train.callbacks import ThroughputMonitor
from train.ema import ema_update, make_ema_twin
from train.expert_module import ExpertModule

MIX = {"t2v": 0.5, "first_frame": 0.3, "last_frame": 0.1, "both_ends": 0.1}


def make_batch(cfg, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"latent": torch.randn(batch, cfg.latent_channels, 3, 16, 16, generator=g),
            "t5": torch.randn(batch, 24, cfg.context_in_dim, generator=g),
            "clip": torch.randn(batch, cfg.vec_in_dim, generator=g)}


class Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batch: dict, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        for _ in range(self.n):
            yield self.batch

    def __len__(self) -> int:
        return self.n


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()
        self.steps = batch_idx + 1 - self.warmup


def lightning_seconds_per_step(cfg, batch: dict, steps: int, warmup: int) -> float:
    null_t5, null_clip = torch.zeros(1, 24, cfg.context_in_dim), torch.zeros(1, cfg.vec_in_dim)
    optim = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "warmup_steps": 10,
             "schedule": "constant", "min_lr_ratio": 0.1, "grad_clip": 1.0, "ema_decay": 0.999, "ema_warmup": True}
    train = {"optim": optim, "flow": {"logit_mean": 0.0, "logit_std": 1.0, "shift": None, "text_dropout_t5": 0.316,
                                      "text_dropout_clip": 0.316},
             "max_steps": steps, "max_nonfinite_steps": 20, "grad_clip_in_module": True, "conditioning": MIX}
    module = ExpertModule(cfg.to_dict(), train, null_t5, null_clip, export_metadata={})
    timer = StepTimer(warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=10, callbacks=[timer, ThroughputMonitor(1.0, 1, 8, None, 10)])
    loader = torch.utils.data.DataLoader(Repeat(batch, steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return (timer.end - timer.start) / timer.steps


def bare_seconds_per_step(cfg, batch: dict, steps: int, warmup: int) -> float:
    model = MMDiT(cfg)
    ema = make_ema_twin(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    null_t5, null_clip = torch.zeros(1, 24, cfg.context_in_dim), torch.zeros(1, cfg.vec_in_dim)
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        x0 = batch["latent"]
        b = x0.shape[0]
        t = flow.shift_time(flow.sample_logit_normal(b), flow.video_shift_alpha(64, 3))
        noise = torch.randn_like(x0)
        x_t, target = flow.interpolate(x0, noise, t), flow.velocity_target(x0, noise)
        t5, clip, _, _ = flow.drop_text(batch["t5"], batch["clip"], null_t5, null_clip, 0.316, 0.316)
        modes = sample_condition_modes(b, MIX)
        cond = {"t5": t5, "clip": clip, "i2v": i2v_condition(x0, batch_frame_mask(modes, 3))}
        loss = ((model(x_t, t, cond) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, model, min(0.999, (1 + step) / (10 + step)))
    return (time.perf_counter() - start) / (steps - warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = get_expert_config("tiny-pixel")
    batch = make_batch(cfg, args.batch)
    light, bare = [], []
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit both sides
        torch.manual_seed(0)
        bare.append(bare_seconds_per_step(cfg, batch, args.steps, args.warmup))
        torch.manual_seed(0)
        light.append(lightning_seconds_per_step(cfg, batch, args.steps, args.warmup))
    lm, bm = statistics.median(light), statistics.median(bare)
    print(f"tiny-pixel expert, batch {args.batch}, latent 12x3x16x16 (192 image + 24 text tokens), 1 CPU thread, "
          f"median of {args.repeats} runs of {args.steps - args.warmup} timed steps")
    print(f"  bare PyTorch loop   {bm * 1e3:8.2f} ms/step   (runs: {', '.join(f'{x * 1e3:.1f}' for x in bare)})")
    print(f"  Lightning module    {lm * 1e3:8.2f} ms/step   (runs: {', '.join(f'{x * 1e3:.1f}' for x in light)})")
    print(f"  ratio Lightning / bare = {lm / bm:.3f}   (goal <= 1.05)")


if __name__ == "__main__":
    main()
