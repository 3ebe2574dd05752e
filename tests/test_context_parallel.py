"""Context parallelism (Ulysses) of the MM-DiT expert against the unsplit model, on 2 gloo CPU processes.

One spawn of two ranks runs every distributed check (the spawn and imports are most of the cost) and rank 0
writes the measured errors; the tests assert on them. Token counts are odd on purpose (27 image tokens,
5 text tokens over cp=2) so the uneven slices are exercised, and i2v conditioning is on with a non-zero
``cond_in`` so a mis-sliced condition would show.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ddm import flow
from ddm.models.context_parallel import (ContextParallel, apply_context_parallel, check_context_parallel_size,
                                         data_parallel_coords, fully_shard_dp_cp, make_dp_cp_mesh,
                                         rng_seed_for_rank, shard_sizes, tokens_per_rank,
                                         valid_context_parallel_sizes)
from ddm.models.mmdit import MMDiT
from ddm.models.presets import get_expert_config
from ddm.models.router import Router, get_router_config
from tests.fixtures.models import build_seeded_expert, make_expert_inputs

TOL = 1e-5
GRID = dict(batch=2, latent_frames=3, height=6, width=6, text_len=5)  # 3·3·3 = 27 image tokens, 5 text
STEPS = 4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _inputs(cfg, seed: int, text_len: int = GRID["text_len"]):
    x, t, cond = make_expert_inputs(cfg, seed=seed, i2v=cfg.cond_embed, **{**GRID, "text_len": text_len})
    return x, t, cond


def _check_fwd_bwd(preset: str, cp: ContextParallel, text_len: int = GRID["text_len"],
                   tag: str = "") -> dict[str, float]:
    cfg = get_expert_config(preset)
    ref = build_seeded_expert(cfg, seed=1)
    if cfg.cond_embed:  # cond_in starts at zero: give it weights so the i2v slice matters
        with torch.no_grad():
            ref.cond_in.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    split = copy.deepcopy(ref)
    split.set_context_parallel(cp)
    split.set_activation_checkpointing(True)  # the recompute re-runs the all-to-alls
    x, t, cond = _inputs(cfg, seed=3, text_len=text_len)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    v_ref = ref(x, t, cond)
    (v_ref * w).sum().backward()
    v_cp = split(x, t, cond)
    (v_cp * w).sum().backward()
    grad_err = 0.0
    for (name, p_ref), (_, p_cp) in zip(ref.named_parameters(), split.named_parameters()):
        g = p_cp.grad.clone()
        dist.all_reduce(g, group=cp.group)  # each rank holds its tokens' share of the gradient
        grad_err = max(grad_err, _rel(g, p_ref.grad))
    return {f"{preset}{tag}_fwd": _rel(v_cp, v_ref), f"{preset}{tag}_grad": grad_err}


def _flow_loss(model: torch.nn.Module, x0: torch.Tensor, cond: dict, gen: torch.Generator) -> torch.Tensor:
    t = torch.rand(x0.shape[0], generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    v = model(flow.interpolate(x0, noise, t), t, cond)
    return ((v.float() - flow.velocity_target(x0, noise)) ** 2).mean()


def _train(model: torch.nn.Module) -> tuple[list[float], list[float]]:
    """STEPS AdamW steps on a fixed batch (noise/t from a generator seeded identically on every rank):
    the losses and the gradient norms (AdamW hides a wrongly scaled gradient; the norm does not)."""
    cfg = model.config
    x0, _, cond = make_expert_inputs(cfg, seed=5, **GRID)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(6)
    losses, norms = [], []
    for _ in range(STEPS):
        loss = _flow_loss(model, x0, cond, gen)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, norms


# the router: 2·3·3 = 18 patches + CLS = 19 tokens (odd, so rank 0 holds 10 with the CLS, rank 1 holds 9)
ROUTER_LATENT = (2, 12, 2, 6, 6)


def _seeded_router(seed: int) -> Router:
    """The text-aware tiny router with every weight random (its zero-initialised modulation and head would
    make the logits, and most gradients, trivially equal)."""
    torch.manual_seed(seed)
    router = Router(get_router_config("tiny-pixel", patch_size=(1, 2, 2), text_dim=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return router


def _router_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    b = ROUTER_LATENT[0]
    return (torch.randn(ROUTER_LATENT, generator=gen), torch.rand(b, generator=gen),
            {"clip": torch.randn(b, 8, generator=gen)}, torch.tensor([0, 2]))


def _check_router(cp: ContextParallel) -> dict[str, float]:
    """Router logits and summed per-rank gradients under cp=2 against the unsplit router (training mode,
    activation checkpointing on, so the recompute re-runs the all-to-alls)."""
    ref = _seeded_router(11)
    split = copy.deepcopy(ref)
    split.set_context_parallel(cp)
    split.set_activation_checkpointing(True)
    x, t, cond, labels = _router_inputs(12)
    logits_ref = ref(x, t, cond)
    torch.nn.functional.cross_entropy(logits_ref, labels).backward()
    logits_cp = split(x, t, cond)
    torch.nn.functional.cross_entropy(logits_cp, labels).backward()
    grad_err = 0.0
    for (name, p_ref), (_, p_cp) in zip(ref.named_parameters(), split.named_parameters()):
        g = p_cp.grad.clone()
        dist.all_reduce(g, group=cp.group)
        grad_err = max(grad_err, _rel(g, p_ref.grad))
    return {"router_fwd": _rel(logits_cp, logits_ref), "router_grad": grad_err,
            "router_logit_scale": float(logits_ref.abs().max())}


def _train_router(model: Router) -> list[float]:
    """STEPS AdamW steps of the router's cross-entropy on a fixed batch; the losses."""
    x0, _, cond, labels = _router_inputs(13)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(14)
    losses = []
    for _ in range(STEPS):
        t = torch.rand(x0.shape[0], generator=gen)
        x = flow.interpolate(x0, torch.randn(x0.shape, generator=gen), t)
        loss = torch.nn.functional.cross_entropy(model(x, t, cond), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cp = ContextParallel.from_group(dist.group.WORLD)
        results: dict[str, object] = {}
        for preset in ("tiny", "tiny-flux"):
            results.update(_check_fwd_bwd(preset, cp))
        results.update(_check_fwd_bwd("tiny", cp, text_len=1, tag="-text1"))  # rank 1 holds no text token

        # inputs that differ across the cp group are refused, not silently mixed
        cfg = get_expert_config("tiny-flux")
        model = build_seeded_expert(cfg)
        model.set_context_parallel(cp)
        x, t, cond = _inputs(cfg, seed=7 + rank)
        try:
            model(x, t, cond)
            results["mismatch_refused"] = False
        except RuntimeError as e:
            results["mismatch_refused"] = "different inputs" in str(e)

        # dp=1 × cp=2 under FSDP2 (flattened mesh, gradients summed over cp) vs the unsplit model
        cfg = get_expert_config("tiny-flux")
        results["loss_cp1"], results["gnorm_cp1"] = _train(build_seeded_expert(cfg, seed=8))
        mesh = make_dp_cp_mesh(world, device_type="cpu")
        model = build_seeded_expert(cfg, seed=8)
        results["cp_size"] = apply_context_parallel(model, mesh)
        fully_shard_dp_cp(model, mesh)
        results["loss_cp2"], results["gnorm_cp2"] = _train(model)

        # the router: split forward/backward, then dp=1 × cp=2 under FSDP2 vs the unsplit router
        results.update(_check_router(cp))
        results["router_loss_cp1"] = _train_router(_seeded_router(15))
        router = _seeded_router(15)
        results["router_cp_size"] = apply_context_parallel(router, mesh)
        fully_shard_dp_cp(router, mesh)
        results["router_loss_cp2"] = _train_router(router)
        if rank == 0:
            Path(out_file).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory) -> dict:
    """Run the distributed checks once (2 ranks) and return rank 0's measurements."""
    tmp = tmp_path_factory.mktemp("cp")
    out = tmp / "results.json"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp / "init"), str(out)), nprocs=2, join=True)
    results = json.loads(out.read_text())
    print("context-parallel measurements:", results)
    return results


@pytest.mark.slow  # the module's one 2-rank spawn takes ~30 s on the shared 2-core machine
@pytest.mark.parametrize("preset", ["tiny", "tiny-flux", "tiny-text1"])
def test_forward_and_gradients_match_unsplit(cp_results: dict, preset: str) -> None:
    assert cp_results[f"{preset}_fwd"] <= TOL, cp_results
    assert cp_results[f"{preset}_grad"] <= TOL, cp_results


@pytest.mark.slow
def test_different_inputs_across_cp_group_are_refused(cp_results: dict) -> None:
    assert cp_results["mismatch_refused"] is True


@pytest.mark.slow
def test_dp1_cp2_fsdp_loss_curve_equals_cp1(cp_results: dict) -> None:
    assert cp_results["cp_size"] == 2
    cp1, cp2 = cp_results["loss_cp1"], cp_results["loss_cp2"]
    assert len(cp1) == len(cp2) == STEPS
    assert cp1[0] != cp1[-1]  # the model trains, so equal curves are not trivially equal
    for a, b in zip(cp1, cp2):
        assert abs(a - b) <= TOL * abs(a), (cp1, cp2)
    for a, b in zip(cp_results["gnorm_cp1"], cp_results["gnorm_cp2"]):
        assert abs(a - b) <= TOL * abs(a), cp_results


@pytest.mark.slow
def test_router_forward_gradients_and_loss_curve_match_unsplit(cp_results: dict) -> None:
    """The router splits [CLS, patches] (19 tokens, uneven) over cp=2 like the expert does."""
    assert cp_results["router_logit_scale"] > 0.1  # random weights: the logits are not trivially zero
    assert cp_results["router_fwd"] <= TOL, cp_results
    assert cp_results["router_grad"] <= TOL, cp_results
    assert cp_results["router_cp_size"] == 2
    cp1, cp2 = cp_results["router_loss_cp1"], cp_results["router_loss_cp2"]
    assert len(cp1) == len(cp2) == STEPS and cp1[0] != cp1[-1]
    for a, b in zip(cp1, cp2):
        assert abs(a - b) <= TOL * abs(a), (cp1, cp2)


# ---- single-process pieces ------------------------------------------------------------------------


def test_shard_sizes_cover_uneven_counts() -> None:
    assert shard_sizes(27, 2) == [14, 13]
    assert shard_sizes(5, 4) == [2, 1, 1, 1]
    assert sum(shard_sizes(76_032 + 512, 8)) == 76_544
    assert tokens_per_rank(27, 5, 2) == 14 + 3


def test_invalid_cp_size_names_valid_sizes() -> None:
    assert valid_context_parallel_sizes(24) == [1, 2, 3, 4, 6, 8, 12, 24]
    check_context_parallel_size(4, 24, world_size=8)
    with pytest.raises(ValueError, match=r"valid sizes: \[1, 2, 3, 4, 6, 8, 12, 24\]"):
        check_context_parallel_size(5, 24)
    with pytest.raises(ValueError, match=r"world size 8.*\[1, 2, 4, 8\]"):
        check_context_parallel_size(3, 24, world_size=8)


def test_data_parallel_coords_give_a_cp_group_one_stream() -> None:
    coords = [data_parallel_coords(r, 8, 4) for r in range(8)]
    assert coords == [(0, 2)] * 4 + [(1, 2)] * 4
    assert [rng_seed_for_rank(10, r, 8, 4) for r in range(8)] == [10] * 4 + [11] * 4
    with pytest.raises(ValueError, match="must divide the world size 6"):
        data_parallel_coords(0, 6, 4)


def test_cp_size_one_is_the_plain_model() -> None:
    model = MMDiT(get_expert_config("tiny"))
    assert apply_context_parallel(model, None) == 1 and model.context_parallel == 1

