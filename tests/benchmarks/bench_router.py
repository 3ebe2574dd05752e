"""Router cost per call as a fraction of one expert call (the router runs once per denoising step).

    python tests/benchmarks/bench_router.py

FLOPs are counted analytically (``ddm.models.router.router_flops``, ``ddm.models.budget.forward_flops``;
both are checked against torch's FlopCounterMode in the test suite), so the 11B / 129M figures need no
memory. For the tiny presets the script also times one forward of each on this CPU.
Goal (issue 5): the ~130M router costs at most 2% of an 11B expert call at 256² × 33 frames.
"""
from __future__ import annotations

import time

import torch

from ddm.flow import latent_frames
from ddm.models.budget import forward_flops, tokens_per_sample
from ddm.models.mmdit import MMDiT
from ddm.models.presets import get_expert_config
from ddm.models.router import Router, get_router_config, router_flops


def ratio(expert_preset: str, router_preset: str, px: int, frames: int, spatial: int, text_tokens: int) -> dict:
    ecfg = get_expert_config(expert_preset)
    rcfg = get_router_config(router_preset, num_experts=3)
    tok = tokens_per_sample(ecfg, px, px, frames, text_tokens, spatial_factor=spatial)
    e = forward_flops(ecfg, tok["image_tokens"], text_tokens)["total"]
    lat = (rcfg.latent_channels, latent_frames(frames), px // spatial, px // spatial)
    r = router_flops(rcfg, lat)
    return {"expert": e, "router": r, "share": r / e, "latent": lat}


def time_call(model, x, t, cond, repeats: int = 20) -> float:
    with torch.no_grad():
        model(x, t, cond)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, t, cond)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    torch.set_num_threads(1)
    print("router forward FLOPs per call as a share of one expert forward (CFG doubles the expert calls,")
    print("not the router's: the router sees the conditional batch only, so the real share is half this)")
    print(f"{'expert':>16s} {'router':>10s} {'video':>16s} {'expert GFLOP':>13s} {'router GFLOP':>13s} {'share':>8s}")
    cases = [("opensora-v2-11b", "dit-b", 256, 33, 8, 512), ("opensora-v2-11b", "dit-b", 256, 129, 8, 512),
             ("opensora-v2-11b", "dit-b", 768, 129, 8, 512), ("tiny-pixel", "tiny-pixel", 16, 9, 1, 32),
             ("tiny-pixel", "tiny-pixel", 24, 9, 1, 32)]
    for e, r, px, frames, spatial, text in cases:
        out = ratio(e, r, px, frames, spatial, text)
        print(f"{e:>16s} {r:>10s} {f'{px}² x {frames} fr':>16s} {out['expert'] / 1e9:13.1f} "
              f"{out['router'] / 1e9:13.3f} {out['share']:8.3%}")

    ecfg, rcfg = get_expert_config("tiny-pixel"), get_router_config("tiny-pixel", num_experts=3)
    expert, router = MMDiT(ecfg).eval(), Router(rcfg).eval()
    x = torch.randn(8, ecfg.latent_channels, 3, 16, 16)
    t = torch.rand(8)
    cond = {"t5": torch.randn(8, 32, ecfg.context_in_dim), "clip": torch.randn(8, ecfg.vec_in_dim)}
    te, tr = time_call(expert, x, t, cond), time_call(router, x, t, {})
    print(f"\ntiny-pixel on this CPU (1 thread, batch 8, 16² x 9 frames): expert {te * 1e3:.1f} ms, "
          f"router {tr * 1e3:.1f} ms, measured share {tr / te:.1%}")


if __name__ == "__main__":
    main()
