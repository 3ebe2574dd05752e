"""One-command GPU validation of the scale path (issue 12): a table of step times, throughput, MFU and peak
memory, each figure with the command that reproduces it. Run through ``launch/gpu_check.sh``.

    python tests/benchmarks/gpu_check.py [--sections abcde] [--steps 5] [--smoke]

Sections (full mode: one H100/H200, ≤ 8 minutes, no downloads — every model has random weights):

a. bf16 train step of the full-width expert at reduced depth (4 double + 8 single blocks) at 256² × 33
   frames (2,304 image + 512 text tokens), batch 1, AdamW: FSDP2 (bf16 params, fp32 reduce) and DeepSpeed
   ZeRO-2 / ZeRO-3 (bf16, torch AdamW as client optimizer, no JIT-built ops); step time, tokens/s, MFU,
   peak memory vs ``ddm.models.budget.training_memory`` (without the EMA, which is not built here).
b. the full 11B expert (bf16 weights), one forward + backward at 256² × 33 with activation checkpointing,
   no optimizer: peak memory vs the same prediction's params + grads + activations.
c. routed top-1 sampling step (router + grouped dispatch over 3 experts, one sample each) vs one expert
   step on the same 3 samples, reduced-depth experts (the three share one module: same compute, 1/3 memory).
d. HunyuanVideo VAE (real 884-16c config, random weights, bf16) decode of 33 frames at 256², whole and tiled.
e. context parallelism cp=1 vs cp=2 (reduced depth, fwd + bwd) — needs ≥ 2 GPUs, else skipped with a message.

The script exits 1 if a step raises, a loss/output is non-finite, or a peak exceeds its prediction by > 25 %.
``--smoke`` (or ``DDM_GPU_CHECK_SMOKE=1``) runs every section's code path on the CPU with tiny sizes in
well under a minute (DeepSpeed's engine needs a GPU: smoke mode builds its config and skips the engine;
section e runs on 2 gloo processes).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist

from ddm.sampling_spec import Routing
from ddm import flow
from ddm.conditioning import batch_frame_mask, i2v_condition
from ddm.models import budget
from ddm.models.context_parallel import apply_context_parallel, make_dp_cp_mesh
from ddm.models.hunyuan_vae import HunyuanVAEConfig
from ddm.models.mmdit import MMDiT
from ddm.models.presets import ExpertConfig, get_expert_config
from ddm.models.router import Router, get_router_config
from ddm.models.vae import HunyuanVideoVAE
from ddm.sampler import routed_velocity

MEMORY_TOLERANCE = 1.25
# dense bf16 peak FLOP/s by device name (no sparsity); unknown devices print MFU as n/a
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one mode runs: expert geometries, video size and VAE config."""

    smoke: bool
    reduced: ExpertConfig
    full: ExpertConfig
    height: int
    frames: int
    text_tokens: int
    spatial_factor: int
    vae: HunyuanVAEConfig
    vae_tile: int  # spatial tile (pixels) for the tiled decode
    router: str


def sizes_for(smoke: bool) -> Sizes:
    if smoke:
        tiny = get_expert_config("tiny")
        return Sizes(True, dataclasses.replace(tiny, depth=1, depth_single_blocks=2),
                     dataclasses.replace(tiny, depth=2, depth_single_blocks=2), height=32, frames=5,
                     text_tokens=8, spatial_factor=8, vae=HunyuanVAEConfig.tiny(), vae_tile=16, router="tiny")
    full = get_expert_config("opensora-v2-11b")
    return Sizes(False, dataclasses.replace(full, depth=4, depth_single_blocks=8), full, height=256, frames=33,
                 text_tokens=512, spatial_factor=8, vae=HunyuanVAEConfig(), vae_tile=128, router="dit-b")


# ---------------------------------------------------------------------------------------------------
# measuring


class Report:
    """Rows of the final table, and whether anything failed."""

    def __init__(self, base_command: str) -> None:
        self.rows: list[dict[str, str]] = []
        self.failed: list[str] = []
        self.base = base_command

    def add(self, section: str, name: str, command_args: str, **figures: str) -> None:
        self.rows.append({"section": section, "check": name, **figures,
                          "command": f"{self.base} {command_args}".strip()})
        print(f"[{section}] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)

    def fail(self, section: str, why: str) -> None:
        self.failed.append(f"[{section}] {why}")
        print(f"FAIL [{section}] {why}", flush=True)

    def table(self) -> str:
        cols = ["section", "check", "time", "tokens/s", "MFU", "peak mem", "predicted", "ratio", "note", "command"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            lines.append("| " + " | ".join(r.get(c, "") for c in cols) + " |")
        return "\n".join(lines)


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> int | None:
    """Peak allocated CUDA memory since the last reset (None on CPU: no per-section measure there)."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def gib(n: int | None) -> str:
    return "n/a (CPU)" if n is None else f"{n / 2**30:.2f} GiB"


def timed(fn: Callable[[], object], steps: int, warmup: int) -> tuple[float, object]:
    """Median seconds per call of ``fn`` over ``steps`` calls after ``warmup``; and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], out


def mfu(flops_per_step: float) -> Callable[[float], str]:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return lambda seconds: "n/a" if peak is None else f"{flops_per_step / seconds / peak:.1%}"


def check_memory(report: Report, section: str, measured: int | None, predicted: int | None) -> dict[str, str]:
    """Figures for the table; a failure when the peak exceeds the prediction by more than 25 %."""
    if predicted is None:
        return {"peak mem": gib(measured), "predicted": "n/a (budget.training_memory missing)"}
    figures = {"peak mem": gib(measured), "predicted": f"{predicted / 2**30:.2f} GiB"}
    if measured is not None:
        figures["ratio"] = f"{measured / predicted:.2f}"
        if measured > MEMORY_TOLERANCE * predicted:
            report.fail(section, f"peak {gib(measured)} exceeds the prediction {gib(predicted)} by > 25%")
    return figures


def predicted_memory(cfg: ExpertConfig, strategy: str, tokens: dict, precision: str, checkpointing: bool,
                     parts: tuple[str, ...]) -> int | None:
    """Sum of ``parts`` of ``budget.training_memory`` (world 1, batch 1), or None where it does not exist yet."""
    fn = getattr(budget, "training_memory", None)
    if fn is None:
        return None
    mem = fn(cfg, strategy=strategy, world_size=1, batch_size=1, image_tokens=tokens["image_tokens"],
             text_tokens=tokens["text_tokens"], precision=precision, activation_checkpointing=checkpointing)
    return sum(mem[p] for p in parts)


def finite(report: Report, section: str, what: str, value: torch.Tensor) -> bool:
    if not bool(torch.isfinite(value).all()):
        report.fail(section, f"{what} is not finite")
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# inputs


def expert_batch(cfg: ExpertConfig, s: Sizes, batch: int, dtype: torch.dtype, seed: int = 0) -> dict:
    tok = budget.tokens_per_sample(cfg, s.height, s.height, s.frames, s.text_tokens, s.spatial_factor)
    side = s.height // s.spatial_factor
    g = torch.Generator().manual_seed(seed)
    dev = device()

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    x0 = rnd(batch, cfg.latent_channels, tok["latent_frames"], side, side)
    cond = {"t5": rnd(batch, s.text_tokens, cfg.context_in_dim), "clip": rnd(batch, cfg.vec_in_dim)}
    if cfg.cond_embed:  # first-frame i2v, as the training mixture gives (and ZeRO-3 needs cond_in called)
        mask = batch_frame_mask(["first_frame"] * batch, tok["latent_frames"]).to(dev)
        cond["i2v"] = i2v_condition(x0, mask).to(dtype)
    return {"x0": x0, "cond": cond, "tokens": tok}


def flow_loss(model: torch.nn.Module, b: dict) -> torch.Tensor:
    x0 = b["x0"]
    t = torch.rand(x0.shape[0], device=x0.device)
    noise = torch.randn_like(x0)
    v = model(flow.interpolate(x0, noise, t.to(x0.dtype)), t, b["cond"])
    return ((v.float() - flow.velocity_target(x0, noise).float()) ** 2).mean()


def build_expert(cfg: ExpertConfig, dtype: torch.dtype, seed: int = 0) -> MMDiT:
    """Random weights built directly on the device in ``dtype`` (no full-precision copy of the 11B model)."""
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device():
            return MMDiT(cfg)
    finally:
        torch.set_default_dtype(old)


def train_flops(cfg: ExpertConfig, b: dict) -> float:
    tok = b["tokens"]
    return 3 * budget.forward_flops(cfg, tok["image_tokens"], tok["text_tokens"])["total"] \
        * b["x0"].shape[0]


# ---------------------------------------------------------------------------------------------------
# sections


def section_a(report: Report, s: Sizes, args) -> None:
    """Reduced-depth train step under FSDP2 and DeepSpeed ZeRO-2/3."""
    cfg = s.reduced
    b = expert_batch(cfg, s, args.batch, torch.bfloat16)
    tokens = (b["tokens"]["image_tokens"] + s.text_tokens) * args.batch
    flops = train_flops(cfg, b)
    rate = mfu(flops)
    params = budget.count_parameters(cfg)
    note = f"{params / 1e9:.2f}B params, {tokens} tokens/step"

    # FSDP2: fp32 sharded params, bf16 compute, fp32 gradient reduction (world 1 here: the code path of N)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    reset_peak()
    model = build_expert(cfg, torch.float32)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in [*model.blocks(), model]:
        fully_shard(unit, mp_policy=policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> torch.Tensor:
        loss = flow_loss(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    seconds, loss = timed(step, args.steps, args.warmup)
    if finite(report, "a", "FSDP2 loss", loss):
        pred = predicted_memory(cfg, "fsdp", b["tokens"], "bf16-mixed", False,
                                ("params", "grads", "optimizer", "master", "activations"))
        report.add("a", "FSDP2 bf16-mixed train step", "--sections a", time=f"{seconds * 1e3:.1f} ms",
                   **{"tokens/s": f"{tokens / seconds:,.0f}", "MFU": rate(seconds)},
                   **check_memory(report, "a", peak_bytes(), pred), note=note)
    del model, opt
    for stage in (2, 3):
        deepspeed_step(report, s, cfg, b, stage, args, tokens, rate, note)


def deepspeed_step(report: Report, s: Sizes, cfg: ExpertConfig, b: dict, stage: int, args, tokens: int,
                   rate: Callable[[float], str], note: str) -> None:
    ds_config = {"train_micro_batch_size_per_gpu": args.batch, "bf16": {"enabled": True},
                 "zero_optimization": {"stage": stage, "contiguous_gradients": True, "overlap_comm": True},
                 "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0}
    name = f"DeepSpeed ZeRO-{stage} bf16 train step"
    if not torch.cuda.is_available():
        import deepspeed  # noqa: F401  (the import and the config are what the CPU can check)
        report.add("a", name, "--sections a", note="skipped in smoke mode: DeepSpeed's engine needs a GPU")
        return
    import deepspeed

    reset_peak()
    model = build_expert(cfg, torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)

    def step() -> torch.Tensor:
        loss = flow_loss(engine, b)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    seconds, loss = timed(step, args.steps, args.warmup)
    if finite(report, "a", f"ZeRO-{stage} loss", loss):
        pred = predicted_memory(cfg, f"zero{stage}", b["tokens"], "bf16-mixed", False,
                                ("params", "grads", "optimizer", "master", "activations"))
        report.add("a", name, "--sections a", time=f"{seconds * 1e3:.1f} ms",
                   **{"tokens/s": f"{tokens / seconds:,.0f}", "MFU": rate(seconds)},
                   **check_memory(report, "a", peak_bytes(), pred), note=note)
    engine.destroy()
    del engine, model, opt


def section_b(report: Report, s: Sizes, args) -> None:
    """The full expert: one fwd + bwd with activation checkpointing, bf16 weights, no optimizer."""
    cfg = s.full
    reset_peak()
    model = build_expert(cfg, torch.bfloat16)
    model.set_activation_checkpointing(True)
    b = expert_batch(cfg, s, 1, torch.bfloat16)
    start = time.perf_counter()
    loss = flow_loss(model, b)
    loss.backward()
    sync()
    seconds = time.perf_counter() - start
    bad = [n for n, p in model.named_parameters() if p.grad is None or not bool(torch.isfinite(p.grad).all())]
    if bad:
        report.fail("b", f"{len(bad)} gradients missing or not finite, e.g. {bad[:3]}")
    if finite(report, "b", "loss", loss.detach()):
        pred = predicted_memory(cfg, "ddp", b["tokens"], "bf16-true", True, ("params", "grads", "activations"))
        report.add("b", f"{budget.count_parameters(cfg) / 1e9:.2f}B expert fwd+bwd, checkpointing",
                   "--sections b", time=f"{seconds:.2f} s (first call)",
                   **check_memory(report, "b", peak_bytes(), pred),
                   note=f"{b['tokens']['image_tokens'] + s.text_tokens} tokens, bf16 weights+grads, no optimizer")
    del model


def section_c(report: Report, s: Sizes, args) -> None:
    """Routed top-1 velocity (router + grouped dispatch) vs one expert on the whole batch."""
    cfg = s.reduced
    num = 3
    expert = build_expert(cfg, torch.bfloat16).eval()
    rcfg = get_router_config(s.router, num_experts=num, latent_channels=cfg.latent_channels)
    router = Router(rcfg).to(device(), torch.bfloat16).eval()
    b = expert_batch(cfg, s, num, torch.bfloat16, seed=1)
    x, t, cond = b["x0"], torch.full((num,), 0.5, device=device()), b["cond"]
    offset = torch.eye(num, device=device()) * 1e4  # one sample per expert, whatever the random router says

    def routed_router(xx, tt, cc):
        return router(xx, tt).float() + offset

    with torch.inference_mode():
        one, v1 = timed(lambda: expert(x, t, cond), args.steps, args.warmup)
        routed, v2 = timed(lambda: routed_velocity(x, t, cond, [expert] * num, routed_router, Routing("top1")),
                           args.steps, args.warmup)
    if finite(report, "c", "expert velocity", v1) and finite(report, "c", "routed velocity", v2):
        report.add("c", f"routed top-1 step / one expert step (K={num}, batch {num})", "--sections c",
                   time=f"{routed * 1e3:.1f} / {one * 1e3:.1f} ms", ratio=f"{routed / one:.3f}",
                   note="one sample per expert; router cost included")


def section_d(report: Report, s: Sizes, args) -> None:
    """HunyuanVideo VAE decode, whole and tiled."""
    vae = HunyuanVideoVAE(s.vae).to(device(), torch.bfloat16).eval()
    side = s.height // s.vae.spatial_compression
    frames = 1 + (s.frames - 1) // s.vae.temporal_compression
    z = torch.randn(1, s.vae.latent_channels, frames, side, side, generator=torch.Generator().manual_seed(2))
    z = z.to(device(), torch.bfloat16)
    for tiled in (False, True):
        if tiled:
            vae.enable_tiling(tile_sample_min_size=s.vae_tile, tile_latent_min_frames=max(1, frames // 2),
                              progress=False)
        else:
            vae.disable_tiling()
        reset_peak()
        with torch.inference_mode():
            seconds, video = timed(lambda: vae.decode(z), max(1, args.steps // 2), 1)
        if finite(report, "d", f"decoded video (tiled={tiled})", video):
            label = f"tiles of {s.vae_tile}² px, {max(1, frames // 2)} latent frames" if tiled else "whole clip"
            report.add("d", f"VAE decode {s.frames} frames at {s.height}², {label}", "--sections d",
                       time=f"{seconds * 1e3:.0f} ms", **{"peak mem": gib(peak_bytes())},
                       note=f"output {tuple(video.shape)}")


def _cp_worker(rank: int, world: int, port: int, smoke: bool, steps: int, out: str) -> None:
    s = sizes_for(smoke)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        results = {}
        for cp in (1, world):
            model = build_expert(s.reduced, torch.bfloat16)
            model.set_activation_checkpointing(True)
            if cp > 1:
                apply_context_parallel(model, make_dp_cp_mesh(cp, "cuda" if cuda else "cpu"))
            b = expert_batch(s.reduced, s, 1, torch.bfloat16)
            torch.manual_seed(3)  # the same noise on every rank of the cp group
            reset_peak()

            def step() -> torch.Tensor:
                loss = flow_loss(model, b)
                loss.backward()
                return loss.detach()

            seconds, loss = timed(step, steps, 1)
            results[cp] = (seconds, float(loss), peak_bytes())
            del model
        if rank == 0:
            with open(out, "w") as f:
                f.write(repr(results))
    finally:
        dist.destroy_process_group()


def section_e(report: Report, s: Sizes, args) -> None:
    """cp=1 vs cp=2 (reduced depth, fwd + bwd, activation checkpointing)."""
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        report.add("e", "context parallel cp=1 vs cp=2", "--sections e",
                   note=f"skipped: needs >= 2 GPUs, found {torch.cuda.device_count()}")
        return
    import tempfile

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cp.txt")
        torch.multiprocessing.spawn(_cp_worker, args=(2, port, s.smoke, args.steps, out), nprocs=2, join=True)
        with open(out) as f:
            results = eval(f.read(), {})  # noqa: S307 (our own repr of a dict of tuples)
    (t1, l1, m1), (t2, l2, m2) = results[1], results[2]
    if not all(math.isfinite(v) for v in (l1, l2)):
        report.fail("e", f"non-finite loss (cp1 {l1}, cp2 {l2})")
    report.add("e", "context parallel fwd+bwd, cp=1 vs cp=2 (per rank)", "--sections e",
               time=f"{t1 * 1e3:.1f} / {t2 * 1e3:.1f} ms", **{"peak mem": f"{gib(m1)} / {gib(m2)}"},
               note=f"loss {l1:.4f} / {l2:.4f} (bf16; same inputs and noise)")


SECTIONS = {"a": section_a, "b": section_b, "c": section_c, "d": section_d, "e": section_e}


@contextlib.contextmanager
def single_rank_group():
    """A world-1 process group (FSDP2 and DeepSpeed need one even on one device)."""
    if dist.is_initialized():
        yield
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                  "WORLD_SIZE": "1"}
    saved = {key: os.environ.get(key) for key in rendezvous}
    os.environ.update(rendezvous)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        # Put the caller's environment back: a leaked MASTER_PORT/RANK would be inherited by every later
        # subprocess (e.g. two trainers started side by side would then fight over one port).
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="abcde", help="which sections to run, e.g. 'ab' (default all)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help="videos per train step in section a")
    p.add_argument("--smoke", action="store_true", default=os.environ.get("DDM_GPU_CHECK_SMOKE") == "1",
                   help="tiny sizes on the CPU: every section's code path, no meaningful figures")
    args = p.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {''.join(SECTIONS)}")
    if args.smoke:
        args.steps, args.warmup = 1, 0
    elif not torch.cuda.is_available():
        p.error("no GPU found: run with --smoke (or DDM_GPU_CHECK_SMOKE=1) for the CPU code-path check")
    s = sizes_for(args.smoke)
    base = "launch/gpu_check.sh" + (" --smoke" if args.smoke else "")
    report = Report(base)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"gpu_check: device {dev}, torch {torch.__version__}, {'smoke' if args.smoke else 'full'} mode, "
          f"sections {args.sections}", flush=True)
    start = time.perf_counter()
    with single_rank_group():
        for key in args.sections:
            t0 = time.perf_counter()
            try:
                SECTIONS[key](report, s, args)
            except Exception as e:  # a failing section is reported and the others still run
                traceback.print_exc()
                report.fail(key, f"{type(e).__name__}: {e}")
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            print(f"[{key}] section took {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"\n## gpu_check — {dev}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{time.perf_counter() - start:.0f} s\n")
    print(report.table())
    if report.failed:
        print("\nFAILED:\n" + "\n".join(report.failed))
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
