"""Cluster: embeddings → K expert clusters with two-level balanced k-means (DESIGN §5.7, MoDE).

1. **Fine level**: plain k-means with ``fine_clusters`` centres (default 1024, capped at N/8 for small
   data) on a random subsample.
2. **Coarse level**: the fine centres, weighted by how many subsample points each holds, are grouped
   into K clusters by balanced k-means (balance on total weight). An expert is a *union of fine cells*,
   so expert regions need not be convex.
3. **Sample level**: the cost of putting sample i in expert k is its squared distance to the nearest
   fine centre of expert k. Without balancing, each sample goes to the expert of its nearest fine
   centre. With balancing, every expert's size must lie in a band ``[lo, hi]`` with ``hi <= 1.1·lo``
   (``max_ratio``): this is a capacity-constrained transport problem, whose optimum is a nearest rule
   with one additive price per expert (LP duality). :func:`balanced_assign` finds those prices by dual
   ascent on groups of experts and :func:`repair_band` makes the band exact, so the bound holds for
   any N where it is achievable at all (N/K ≥ ~10; below that sizes differ by at most one).

The prices are saved with the centres, so :func:`assign_new` applies the very same rule to new data.
Distances are computed in chunks (||x||² − 2x·c + ||c||², one GEMM per chunk), so 1,000,000 × 768
embeddings fit in memory on CPU or GPU.
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data.embed import load_embeddings
from data.step import StepResult, completed_result, fingerprint, mark_step_done, write_parquet_atomic
from ddm.files import atomic_path

log = logging.getLogger(__name__)

STEP = "cluster"
CENTROIDS_FORMAT = "ddm-centroids-v1"
MIN_POINTS_PER_FINE = 8  # fine centres are capped at N / 8 so small data sets do not get singleton cells
SUBSAMPLE_PER_FINE = 64  # default subsample: 64 points per fine centre (faiss warns below 39)
CHUNK_ELEMENTS = 1 << 24  # rows per distance chunk = 16M / number of centres (a 64 MiB float32 block)
SMALL_WORK = 1 << 22  # below ~4M multiply-adds a fit runs single-threaded (see _single_threaded)


@contextmanager
def _single_threaded(enabled: bool = True):
    """Run a block on one intra-op thread. Tiny ops and CPU ``index_add_`` are faster that way: waking
    the pool (or its atomics) cost milliseconds per op on a busy machine, 10× the work itself."""
    threads = torch.get_num_threads()
    if not enabled or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- distances --------------------------------------------------------------------------------------------
def _chunk_rows(num_centres: int) -> int:
    return max(256, CHUNK_ELEMENTS // max(num_centres, 1))


def _partial_sq_dists(xb: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    """||c||² − 2·x·c for a chunk (the ||x||² term does not change any argmin, so it is added later)."""
    return torch.addmm(c_sq.unsqueeze(0), xb, c.T, beta=1.0, alpha=-2.0)


def _rows(x: torch.Tensor, start: int, stop: int, device: torch.device) -> torch.Tensor:
    return x[start:stop].to(device=device, dtype=torch.float32, non_blocking=True)


def nearest_centres(x: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest centre, squared distance to it) for every row of ``x``, in chunks."""
    device = centres.device
    c_sq = (centres * centres).sum(1)
    labels = torch.empty(len(x), dtype=torch.long, device=device)
    dists = torch.empty(len(x), dtype=torch.float32, device=device)
    step = _chunk_rows(len(centres))
    for s in range(0, len(x), step):
        xb = _rows(x, s, s + step, device)
        d, i = _partial_sq_dists(xb, centres, c_sq).min(1)
        labels[s:s + step], dists[s:s + step] = i, (d + (xb * xb).sum(1)).clamp_min(0)
    return labels, dists


def expert_costs(x: torch.Tensor, fine: torch.Tensor, fine_expert: torch.Tensor, num_experts: int,
                 progress: bool = False) -> torch.Tensor:
    """(N, K) squared distance from each row of ``x`` to the nearest fine centre of each expert.

    ``fine_expert`` holds 0-based expert ids. Experts without a fine centre get +inf.
    """
    device = fine.device
    order = torch.argsort(fine_expert, stable=True)  # group the fine centres by expert: contiguous slices
    fine_sorted = fine[order]
    bounds = torch.bincount(fine_expert, minlength=num_experts).cumsum(0).tolist()
    c_sq = (fine_sorted * fine_sorted).sum(1)
    costs = torch.full((len(x), num_experts), math.inf, dtype=torch.float32, device=device)
    step = _chunk_rows(len(fine))
    bar = tqdm(total=len(x), desc="assign", unit="row", disable=not progress)
    for s in range(0, len(x), step):
        xb = _rows(x, s, s + step, device)
        d = _partial_sq_dists(xb, fine_sorted, c_sq)
        x_sq = (xb * xb).sum(1)
        start = 0
        for k, stop in enumerate(bounds):
            if stop > start:
                costs[s:s + step, k] = (d[:, start:stop].amin(1) + x_sq).clamp_min(0)
            start = stop
        bar.update(len(xb))
    bar.close()
    return costs


# --- the balanced assignment ------------------------------------------------------------------------------
def balance_band(total: int, k: int, max_ratio: float = 1.1) -> tuple[int, int]:
    """Integer size band ``[lo, hi]`` with ``hi <= max_ratio·lo`` and ``k·lo <= total <= k·hi``.

    Centred on total/k for slack on both sides. When no such band exists (total/k below ~1/(r−1)),
    returns floor/ceil of total/k: sizes then differ by at most one, the best any assignment can do.
    """
    if k < 1 or total < k:
        raise ValueError(f"cannot split {total} samples into {k} non-empty clusters")
    mean = total / k
    lo = math.ceil(mean / math.sqrt(max_ratio))
    hi = math.floor(max_ratio * lo)
    if k * lo <= total <= k * hi:
        return lo, hi
    return total // k, -(-total // k)


def _weighted_sizes(labels: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(labels, weights=weights, minlength=k).to(torch.float64)


def _group_shift(adj: torch.Tensor, w: torch.Tensor, j: int, lo: float, hi: float, shed: bool,
                 eps: float) -> torch.Tensor:
    """Price shifts that fix column ``j``'s violation by moving weight across the edge of a column group.

    ``shed``: ``j`` is over ``hi``; the group's prices rise together until enough weight leaves it.
    Otherwise ``j`` is under ``lo``; the group's prices fall until enough weight joins it. Moving all of a
    group's prices together leaves the exchanges inside it untouched, so an outside column that would
    overflow (or run dry) joins the group instead of bouncing the same samples back and forth — the
    price war that makes one-column-at-a-time ascent crawl when two columns share one dense region.
    """
    n, k = adj.shape
    group = torch.zeros(k, dtype=torch.bool, device=adj.device)
    group[j] = True
    shift = torch.zeros(k, dtype=torch.float64, device=adj.device)
    sign = 1.0 if shed else -1.0
    for _ in range(k):
        cur = adj + shift
        labels = cur.argmin(1)
        sizes = _weighted_sizes(labels, w, k)
        in_group = group[labels]
        movers = in_group if shed else ~in_group
        a = cur[movers]
        own = a.gather(1, labels[movers].unsqueeze(1)).squeeze(1)
        if shed:  # leave the group for the cheapest outside column
            a[:, group] = math.inf
            best, other = a.min(1)
            need = float(sizes[group].sum()) - hi * int(group.sum())
            capacity = (hi - sizes).clamp_min(0)
        else:  # join the cheapest group column, leaving the mover's own column ("other")
            best, other = a[:, group].min(1).values, labels[movers]
            need = lo * int(group.sum()) - float(sizes[group].sum())
            capacity = (sizes - lo).clamp_min(0)
        if need <= 1e-9:
            break
        margin = best - own
        finite = torch.isfinite(margin)
        if not bool(finite.any()):
            break
        order = torch.argsort(margin[finite])
        margin, other, wm = margin[finite][order], other[finite][order], w[movers][finite][order]
        # running flow into (or out of) each outside column, mover by mover, cheapest first
        flow = torch.zeros(len(order), k, dtype=torch.float64, device=adj.device)
        flow.scatter_(1, other.unsqueeze(1), wm.unsqueeze(1))
        flow = flow.cumsum(0)
        bad = (flow > capacity + 1e-9).any(1).nonzero()
        first_bad = int(bad[0]) if len(bad) else len(order)
        pos_need = int(torch.searchsorted(wm.cumsum(0), torch.tensor(need - 1e-9, dtype=torch.float64,
                                                                      device=adj.device)))
        last = min(pos_need, first_bad - 1, len(order) - 1)  # the last mover to move in this step
        if last >= 0:
            nxt = float(margin[last + 1]) if last + 1 < len(order) else math.inf
            gap = nxt - float(margin[last])
            shift[group] += sign * (float(margin[last]) + (min(eps, gap / 2) if gap > 0 else eps))
        if pos_need < first_bad:
            break
        group[int(other[first_bad])] = True  # that column is at its limit: it moves with the group now
    return shift


def balanced_assign(cost: torch.Tensor, lo: float, hi: float, *, weights: torch.Tensor | None = None,
                    prices: torch.Tensor | None = None, max_rounds: int = 200,
                    patience: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign rows of ``cost`` (N, K) to columns so each column's (weighted) size is in ``[lo, hi]``.

    Labels are ``argmin_k cost[i, k] + price[k]`` (the form of the optimal capacity-constrained
    assignment). Dual ascent: each round takes the most violated column and shifts the prices of a
    growing group of columns by exactly the margin that moves the missing weight (:func:`_group_shift`).
    Stops when balanced or after ``patience`` rounds without a smaller total violation (weighted rows
    are indivisible atoms, so a band may be out of reach), keeping the best prices seen. Returns
    ``(labels, prices)``; with unit weights follow with :func:`repair_band` to make the band exact.
    """
    with _single_threaded(cost.numel() < SMALL_WORK):
        return _balanced_assign(cost, lo, hi, weights, prices, max_rounds, patience)


def _balanced_assign(cost, lo, hi, weights, prices, max_rounds, patience):
    n, k = cost.shape
    cost64 = cost.to(torch.float64)
    prices = torch.zeros(k, dtype=torch.float64, device=cost.device) if prices is None else prices.clone()
    w = torch.ones(n, dtype=torch.float64, device=cost.device) if weights is None else weights.to(torch.float64)
    finite = cost64[torch.isfinite(cost64)]
    eps = 1e-9 * float(finite.abs().max().clamp_min(1e-12)) if len(finite) else 1e-9  # tips ties, scale-relative
    best_violation, best_prices, stale = math.inf, prices.clone(), 0
    for _ in range(max_rounds):
        adj = cost64 + prices
        sizes = _weighted_sizes(adj.argmin(1), w, k)
        over, under = sizes - hi, lo - sizes
        violation = float(over.clamp_min(0).sum() + under.clamp_min(0).sum())
        if violation < best_violation - 1e-9:
            best_violation, best_prices, stale = violation, prices.clone(), 0
        else:
            stale += 1
        if violation <= 1e-9 or stale > patience:
            break
        shed = float(over.max()) >= float(under.max())
        j = int(over.argmax()) if shed else int(under.argmax())
        prices = prices + _group_shift(adj, w, j, lo, hi, shed, eps)
    return (cost64 + best_prices).argmin(1), best_prices


def repair_band(cost: torch.Tensor, labels: torch.Tensor, prices: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Move samples (unit weights) at the least extra priced cost until every size is in [lo, hi].

    Terminates: every move reduces the total band violation and none creates a new one.
    """
    n, k = cost.shape
    if k * lo > n or k * hi < n:
        raise ValueError(f"band [{lo}, {hi}] is infeasible for {n} samples in {k} clusters")
    adj = (cost.to(torch.float64) + prices).cpu()
    labels = labels.cpu().clone()
    sizes = torch.bincount(labels, minlength=k)
    while True:
        over = (sizes > hi).nonzero().flatten()
        under = (sizes < lo).nonzero().flatten()
        if len(over) == 0 and len(under) == 0:
            return labels
        if len(over):  # push the cheapest members of the fullest column into columns with room
            src = int(over[sizes[over].argmax()])
            idx = (labels == src).nonzero().flatten()
            room = (hi - sizes).clamp_min(0)
            room[src] = 0
            extra = adj[idx] - adj[idx, src].unsqueeze(1)
            extra[:, room == 0] = math.inf
            best, dest = extra.min(1)
            todo = int(sizes[src] - hi)
            for i in torch.argsort(best).tolist():
                d = int(dest[i])
                if todo == 0 or not math.isfinite(float(best[i])):
                    break
                if room[d] > 0:  # a full destination is skipped; the next round re-plans those samples
                    labels[idx[i]], room[d], todo = d, room[d] - 1, todo - 1
                    sizes[src] -= 1
                    sizes[d] += 1
        else:  # pull the cheapest samples from columns that can spare one into the emptiest column
            dst = int(under[sizes[under].argmin()])
            spare = (sizes - lo).clamp_min(0)
            spare[dst] = 0
            idx = (spare[labels] > 0).nonzero().flatten()
            extra = adj[idx, dst] - adj[idx, labels[idx]]
            todo = int(lo - sizes[dst])
            for i in torch.argsort(extra).tolist():
                src = int(labels[idx[i]])
                if todo == 0:
                    break
                if spare[src] > 0:
                    labels[idx[i]], spare[src], todo = dst, spare[src] - 1, todo - 1
                    sizes[src] -= 1
                    sizes[dst] += 1


# --- k-means ----------------------------------------------------------------------------------------------
@dataclass
class KMeansFit:
    """A k-means fit: centres (k, D), labels (N,), prices (k,) (zeros when unbalanced)."""

    centroids: torch.Tensor
    labels: torch.Tensor
    prices: torch.Tensor


def _init_centres(x: torch.Tensor, k: int, w: torch.Tensor, init: str, gen: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    if init == "random":  # k distinct points, uniformly among the positively weighted ones (as faiss does)
        candidates = (w > 0).nonzero().flatten()
        idx = candidates[torch.randperm(len(candidates), generator=gen)[:k]]
        return x[idx].to(device, torch.float32)
    if init != "kmeans++":
        raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")
    # weighted k-means++ (D² sampling)
    first = int(torch.multinomial(w.cpu(), 1, generator=gen))
    centres = [x[first].to(device, torch.float32)]
    best = nearest_centres(x, centres[0].unsqueeze(0))[1].to(torch.float64)
    for _ in range(1, k):
        p = (best * w.to(best.device)).cpu()
        nxt = int(torch.multinomial(p, 1, generator=gen)) if float(p.sum()) > 0 else int(
            torch.multinomial(w.cpu(), 1, generator=gen))
        c = x[nxt].to(device, torch.float32)
        centres.append(c)
        best = torch.minimum(best, nearest_centres(x, c.unsqueeze(0))[1].to(torch.float64))
    return torch.stack(centres)


def _add_rows(sums: torch.Tensor, xb: torch.Tensor, labels: torch.Tensor, wb: torch.Tensor | None) -> None:
    """sums[labels[i]] += w[i]·x[i] for one chunk, summed in float32 then added to the float64 total."""
    part = torch.zeros(sums.shape, dtype=xb.dtype, device=xb.device)
    with _single_threaded(xb.device.type == "cpu"):
        part.index_add_(0, labels, xb if wb is None else xb * wb.unsqueeze(1).to(xb.dtype))
    sums += part


def _centre_sums(x: torch.Tensor, labels: torch.Tensor, w: torch.Tensor | None, k: int,
                 device: torch.device) -> torch.Tensor:
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=device)
    step = _chunk_rows(k)
    for s in range(0, len(x), step):
        _add_rows(sums, _rows(x, s, s + step, device), labels[s:s + step], None if w is None else w[s:s + step])
    return sums


def _row_sq_norms(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    step = CHUNK_ELEMENTS // max(x.shape[1], 1)
    return torch.cat([_rows(x, s, s + step, device).pow(2).sum(1) for s in range(0, len(x), step)])


def _assign_and_sum(x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor, w: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused Lloyd pass: nearest centre, squared distance and per-centre sums, reading ``x`` once
    (``x_sq``: the rows' squared norms, computed once per fit)."""
    device = centres.device
    c_sq = (centres * centres).sum(1)
    labels = torch.empty(len(x), dtype=torch.long, device=device)
    dists = torch.empty(len(x), dtype=torch.float32, device=device)
    sums = torch.zeros(centres.shape, dtype=torch.float64, device=device)
    step = _chunk_rows(len(centres))
    for s in range(0, len(x), step):
        xb = _rows(x, s, s + step, device)
        d, i = _partial_sq_dists(xb, centres, c_sq).min(1)
        labels[s:s + step], dists[s:s + step] = i, (d + x_sq[s:s + step]).clamp_min(0)
        _add_rows(sums, xb, i, None if w is None else w[s:s + step])
    return labels, dists, sums


def _means(sums: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, dists: torch.Tensor,
           x: torch.Tensor) -> torch.Tensor:
    """Weighted means from per-centre sums; an empty cluster is reseeded at the point farthest from its centre."""
    k = len(sums)
    mass = torch.bincount(labels, weights=w, minlength=k).to(torch.float64)
    new = (sums / mass.clamp_min(1e-300).unsqueeze(1)).to(torch.float32)
    empty = (mass <= 0).nonzero().flatten()
    if len(empty):
        far = torch.argsort(dists * (w > 0), descending=True)[: len(empty)]
        new[empty] = x[far.cpu()].to(new.device, torch.float32)
    return new


def kmeans_fit(x: torch.Tensor, k: int, *, iters: int = 20, seed: int = 0, balanced: bool = True,
               device: str | torch.device = "cpu", weights: torch.Tensor | None = None, init: str = "kmeans++",
               max_ratio: float = 1.1, progress: bool = False, desc: str = "k-means") -> KMeansFit:
    """Lloyd's k-means (optionally weighted), with a balanced assignment step when ``balanced``.

    Unbalanced mode returns the last assignment step's labels, whose means are the returned centres
    (as faiss does: ``iters`` assignment passes, no extra one). Balanced mode keeps each cluster's (weighted) size in the :func:`balance_band`; with unit weights the
    final labels meet it exactly. ``x`` may live on the CPU while ``device`` is a GPU: rows move in chunks.
    """
    with _single_threaded(x.numel() * k < SMALL_WORK):
        return _kmeans_fit(x, k, iters, seed, balanced, torch.device(device), weights, init, max_ratio, progress, desc)


def _kmeans_fit(x, k, iters, seed, balanced, device, weights, init, max_ratio, progress, desc) -> KMeansFit:
    n = len(x)
    w = torch.ones(n, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64).cpu()
    if x.ndim != 2 or len(w) != n:
        raise ValueError(f"x must be (N, D) with one weight per row, got {tuple(x.shape)} and {len(w)} weights")
    if not 1 <= k <= int((w > 0).sum()):
        raise ValueError(f"k={k} must be between 1 and the number of (positively weighted) points {int((w > 0).sum())}")
    gen = torch.Generator().manual_seed(seed)
    centres = _init_centres(x, k, w, init, gen, device)
    w_dev = w.to(device)
    unit = weights is None
    if balanced:
        lo, hi = balance_band(n, k, max_ratio) if unit else (
            float(w.sum()) / k / math.sqrt(max_ratio), float(w.sum()) / k * math.sqrt(max_ratio))
    prices = torch.zeros(k, dtype=torch.float64, device=device)
    w_sum = None if unit else w_dev  # unit weights: plain sums, no multiply
    x_sq = None if balanced else _row_sq_norms(x, device)
    labels = None
    for _ in tqdm(range(iters), desc=desc, disable=not progress):
        if balanced:
            cost = expert_costs(x, centres, torch.arange(k, device=device), k)
            new_labels, prices = balanced_assign(cost, lo, hi, weights=w_sum, prices=prices)
            dists = cost.gather(1, new_labels.unsqueeze(1)).squeeze(1)
            sums = _centre_sums(x, new_labels, w_sum, k, device)
        else:
            new_labels, dists, sums = _assign_and_sum(x, x_sq, centres, w_sum)
        if labels is not None and torch.equal(new_labels, labels):
            break  # converged: the centres are already the means of this assignment
        labels = new_labels
        new_centres = _means(sums, labels, w_dev, dists, x)
        moved = float((new_centres - centres).pow(2).sum()) / max(float(centres.pow(2).sum()), 1e-30)
        centres = new_centres
        if moved < 1e-12:  # balanced labels can flicker on ties while the centres stay put
            break
    if balanced:  # the final balanced assignment to the final centres
        cost = expert_costs(x, centres, torch.arange(k, device=device), k)
        labels, prices = balanced_assign(cost, lo, hi, weights=w_sum, prices=prices)
        if unit:
            labels = repair_band(cost, labels, prices, lo, hi).to(device)
    elif labels is None:  # iters == 0
        labels = nearest_centres(x, centres)[0]
    return KMeansFit(centres, labels, prices)


def balanced_kmeans(x: torch.Tensor, k: int, *, iters: int = 20, seed: int = 0, balanced: bool = True,
                    device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of ``x`` (N, D) into ``k`` clusters → ``(centroids (k, D), labels (N,) in 0..k-1)``.

    ``balanced=True`` keeps every cluster size within a factor 1.1 of every other (see module doc).
    """
    fit = kmeans_fit(x, k, iters=iters, seed=seed, balanced=balanced, device=device)
    return fit.centroids, fit.labels


# --- two levels -------------------------------------------------------------------------------------------
@dataclass
class TwoLevelFit:
    """Result of :func:`two_level_kmeans`: fine centres, their 0-based experts, coarse centres, prices,
    and per-sample 0-based expert labels and Euclidean distances to the nearest fine centre of that expert."""

    fine_centroids: torch.Tensor
    fine_expert: torch.Tensor
    coarse_centroids: torch.Tensor
    prices: torch.Tensor
    labels: torch.Tensor
    distances: torch.Tensor


def two_level_kmeans(x: torch.Tensor, num_experts: int, *, fine_clusters: int = 1024, subsample: int | None = None,
                     iters: int = 20, balanced: bool = True, seed: int = 0, max_ratio: float = 1.1,
                     device: str | torch.device = "cpu", progress: bool = False) -> TwoLevelFit:
    """Fine k-means on a subsample, balanced grouping of the fine centres into experts, then a balanced
    sample-level assignment of all of ``x`` (see module doc)."""
    device = torch.device(device)
    n = len(x)
    if not 1 <= num_experts <= n:
        raise ValueError(f"num_experts={num_experts} must be between 1 and the number of samples ({n})")
    num_fine = max(num_experts, min(fine_clusters, n // MIN_POINTS_PER_FINE))
    size = min(n, subsample if subsample else SUBSAMPLE_PER_FINE * num_fine)
    gen = torch.Generator().manual_seed(seed)
    sub_idx = torch.sort(torch.randperm(n, generator=gen)[:size]).values
    sub = x[sub_idx]
    log.info("[cluster] fine k-means: %d centres on %d of %d samples (%d iterations)", num_fine, size, n, iters)
    fine = kmeans_fit(sub, num_fine, iters=iters, seed=seed, balanced=False, device=device, init="random",
                      progress=progress, desc="fine k-means")
    weight = torch.bincount(fine.labels.cpu(), minlength=num_fine).to(torch.float64)
    coarse = kmeans_fit(fine.centroids, num_experts, iters=100, seed=seed, balanced=balanced, device=device,
                        weights=weight, max_ratio=max_ratio)
    fine_expert = coarse.labels
    if len(torch.unique(fine_expert)) < num_experts:
        raise RuntimeError("an expert received no fine centre; use fewer experts or more fine clusters")
    costs = expert_costs(x, fine.centroids, fine_expert, num_experts, progress=progress)
    if balanced:
        lo, hi = balance_band(n, num_experts, max_ratio)
        labels, prices = balanced_assign(costs, lo, hi)
        labels = repair_band(costs, labels, prices, lo, hi).to(device)
    else:
        labels, prices = costs.argmin(1), torch.zeros(num_experts, dtype=torch.float64, device=device)
    distances = costs.gather(1, labels.unsqueeze(1)).squeeze(1).sqrt()
    return TwoLevelFit(fine.centroids, fine_expert, coarse.centroids, prices, labels, distances)


# --- the stage --------------------------------------------------------------------------------------------
def save_centroids(fit: TwoLevelFit, path: str | Path, metadata: dict) -> Path:
    """Write ``centroids.safetensors``: fine centres, fine→expert (1..K), coarse centres, expert prices."""
    tensors = {"fine_centroids": fit.fine_centroids.float().cpu().contiguous(),
               "fine_expert": (fit.fine_expert + 1).long().cpu().contiguous(),
               "coarse_centroids": fit.coarse_centroids.float().cpu().contiguous(),
               "expert_prices": fit.prices.double().cpu().contiguous()}
    meta = {"format": CENTROIDS_FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def assign_new(embeddings: torch.Tensor, centroids_path: str | Path,
               device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Assign new embeddings (N, D) with a saved clustering, without re-clustering.

    Applies the stored rule (nearest fine centre per expert, plus the expert prices) and returns
    ``(expert ids 1..K (N,), Euclidean distances (N,))``. No balancing is enforced on new data.
    """
    t = load_file(str(centroids_path), device=str(device))
    fine, fine_expert, prices = t["fine_centroids"], t["fine_expert"] - 1, t["expert_prices"]
    x = torch.as_tensor(embeddings)
    if x.ndim != 2 or x.shape[1] != fine.shape[1]:
        raise ValueError(f"embeddings must be (N, {fine.shape[1]}), got {tuple(x.shape)}")
    costs = expert_costs(x, fine, fine_expert, len(prices))
    labels = (costs.to(torch.float64) + prices).argmin(1)
    return (labels + 1).cpu(), costs.gather(1, labels.unsqueeze(1)).squeeze(1).sqrt().cpu()


def cluster(embeddings_path: str | Path, out_dir: str | Path, *, num_experts: int, fine_clusters: int = 1024,
            subsample: int | None = None, iters: int = 20, balanced: bool = True, max_ratio: float = 1.1,
            seed: int = 0, device: str = "cpu", progress: bool = True) -> StepResult:
    """Cluster ``embeddings.parquet`` into ``num_experts`` experts.

    Writes ``out_dir/centroids.safetensors`` and ``out_dir/assignments.parquet`` (``key``, ``expert``
    1..K, ``distance``) and logs the cluster sizes. ``subsample`` defaults to 64 points per fine centre.
    """
    t0 = time.perf_counter()
    embeddings_path, out = Path(embeddings_path), Path(out_dir)
    if not embeddings_path.is_file():
        raise FileNotFoundError(f"embeddings not found: '{embeddings_path}' (run embed first)")
    if num_experts < 1 or fine_clusters < 1 or iters < 1 or max_ratio < 1:
        raise ValueError(f"need num_experts, fine_clusters, iters >= 1 and max_ratio >= 1 (got {num_experts}, "
                         f"{fine_clusters}, {iters}, {max_ratio})")
    n = pq.ParquetFile(embeddings_path).metadata.num_rows
    if num_experts > n:
        raise ValueError(f"num_experts={num_experts} is more than the {n} embedded samples in '{embeddings_path}'")
    config = {"stage": STEP,  # (key kept: it is part of the fingerprint)
               "num_experts": num_experts, "fine_clusters": fine_clusters, "subsample": subsample,
              "iters": iters, "balanced": balanced, "max_ratio": max_ratio, "seed": seed}
    fp = fingerprint(config, [embeddings_path])
    if done := completed_result(out, STEP, fp):
        return done

    keys, x = load_embeddings(embeddings_path)
    fit = two_level_kmeans(x, num_experts, fine_clusters=fine_clusters, subsample=subsample, iters=iters,
                           balanced=balanced, seed=seed, max_ratio=max_ratio, device=device, progress=progress)
    experts = (fit.labels.cpu() + 1).numpy()
    sizes = np.bincount(experts, minlength=num_experts + 1)[1:].tolist()
    out.mkdir(parents=True, exist_ok=True)
    centroids = save_centroids(fit, out / "centroids.safetensors",
                               {"num_experts": num_experts, "seed": seed, "config": config, "sizes": sizes,
                                "embeddings": str(embeddings_path.resolve())})
    table = pa.table({"key": pa.array(keys, pa.string()), "expert": pa.array(experts, pa.int64()),
                      "distance": pa.array(fit.distances.float().cpu().numpy(), pa.float32())})
    assignments = write_parquet_atomic(table, out / "assignments.parquet")
    ratio = max(sizes) / max(min(sizes), 1)
    result = StepResult(STEP, n, n, 0, time.perf_counter() - t0, [str(assignments), str(centroids)],
                         info={"sizes": sizes, "balance_ratio": ratio, "fine_clusters": len(fit.fine_centroids)})
    mark_step_done(out, STEP, fp, result)
    log.info("[cluster] expert sizes %s (largest/smallest = %.3f)",
             ", ".join(f"{k + 1}: {s}" for k, s in enumerate(sizes)), ratio)
    log.info(result.summary_line())
    return result
