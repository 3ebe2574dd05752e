"""Context (sequence) parallelism for the MM-DiT expert: Ulysses all-to-all over attention heads.

Every rank of a cp group holds the same batch and the same (replicated) weights, but only its own slice of
the token sequence: a contiguous ``1/cp`` of the text tokens and a contiguous ``1/cp`` of the image tokens
(their RoPE positions and i2v condition tokens sliced identically). Everything per token (projections, MLPs,
norms, modulation, RoPE) runs on the local slice. Attention needs every key, so before it one all-to-all
turns (all heads, local tokens) into (``heads/cp`` heads, all tokens) — q, k and v packed in one call —, the
rank runs ordinary full attention (any SDPA kernel) on its heads, and a second all-to-all brings the
outputs back to (all heads, local tokens). RoPE is applied *before* the first all-to-all with each token's
own angles, and attention has no mask, so the order in which the gathered keys arrive does not matter.
After the last block the image tokens are all-gathered, so ``model(x, t, cond)`` returns the full velocity
on every rank and the training step's loss code is unchanged.

Token counts need not divide by cp: slices differ by at most one token (``shard_sizes``) and the
all-to-alls use uneven split sizes — no padding, no mask, results identical to the unsplit model.
The head count must divide by cp (``valid_context_parallel_sizes`` names the valid sizes).

Gradients: each rank's parameter gradients are its tokens' share, and the shares *sum* to the unsplit
model's gradient (the final all-gather's backward hands each rank its own slice of the identical output
gradient). With FSDP2 over the flattened dp × cp mesh, :func:`fully_shard_dp_cp` sets the gradient
divide factor to dp so the reduction is sum over cp, mean over dp. The training step must therefore see
identical inputs and noise on every rank of a cp group: :func:`data_parallel_coords` gives the data
loader its (rank, world) and ``check_inputs`` verifies each forward's inputs agree across the group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["ContextParallel", "SequenceSplit", "shard_sizes", "valid_context_parallel_sizes",
           "check_context_parallel_size", "data_parallel_coords", "rng_seed_for_rank", "make_dp_cp_mesh",
           "apply_context_parallel", "fully_shard_dp_cp", "tokens_per_rank", "transformer_blocks",
           "DP_DIM", "CP_DIM"]

DP_DIM, CP_DIM = "data_parallel", "context_parallel"


def shard_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous slices of ``n`` tokens; the first ``n % parts`` get one more."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def valid_context_parallel_sizes(num_heads: int) -> list[int]:
    """The cp sizes Ulysses can use for ``num_heads`` heads: its divisors."""
    return [d for d in range(1, num_heads + 1) if num_heads % d == 0]


def check_context_parallel_size(cp: int, num_heads: int, world_size: int | None = None,
                                setting: str = "model.context_parallel") -> None:
    """Raise ValueError naming the valid sizes unless ``cp`` divides ``num_heads`` (and ``world_size``);
    ``setting`` is the config key the message names."""
    valid = valid_context_parallel_sizes(num_heads)
    if world_size is not None:
        valid = [d for d in valid if world_size % d == 0]
    if cp < 1 or num_heads % cp or (world_size is not None and world_size % cp):
        where = f" and the world size {world_size}" if world_size is not None else ""
        raise ValueError(f"{setting}={cp} must divide the {num_heads} attention heads{where} "
                         f"(Ulysses splits heads across the cp group); valid sizes: {valid}")


def data_parallel_coords(rank: int, world_size: int, cp: int) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of global ``rank`` on a (dp, cp) mesh, row-major as
    :func:`make_dp_cp_mesh` builds it: ranks ``k·cp … k·cp + cp-1`` form cp group ``k``. Pass these as the
    data module's ``rank``/``world_size`` so every rank of a cp group reads the same batches."""
    if cp < 1 or world_size % cp:
        raise ValueError(f"context_parallel={cp} must divide the world size {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return rank // cp, world_size // cp


def rng_seed_for_rank(seed: int, rank: int, world_size: int, cp: int) -> int:
    """A per-data-parallel-rank seed: equal within a cp group (same noise, t and dropout draws), distinct
    across dp ranks."""
    return int(seed) + data_parallel_coords(rank, world_size, cp)[0]


def tokens_per_rank(image_tokens: int, text_tokens: int, cp: int) -> int:
    """The most tokens (text + image) any rank of a cp group holds outside attention."""
    return shard_sizes(image_tokens, cp)[0] + shard_sizes(text_tokens, cp)[0]


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with (possibly uneven) split sizes; backward swaps the splits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


class _GatherTokens(torch.autograd.Function):
    """All-gather uneven token slices (B, n_r, F) along dim 1; backward keeps this rank's slice of the
    (identical on every rank) output gradient — the parameter gradients then sum over the group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int, group) -> torch.Tensor:
        ctx.start, ctx.size = sum(sizes[:rank]), sizes[rank]
        longest = max(sizes)
        padded = F.pad(x, (0, 0, 0, longest - x.shape[1])).contiguous()  # communication only
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[:, ctx.start:ctx.start + ctx.size], None, None, None


@dataclass
class ContextParallel:
    """The cp group a model's forward splits its sequence over (see module docstring)."""

    group: object  # torch.distributed ProcessGroup
    size: int
    rank: int
    check_inputs: bool = True

    @classmethod
    def from_group(cls, group, check_inputs: bool = True) -> ContextParallel:
        """From a process group this process belongs to."""
        return cls(group, dist.get_world_size(group), dist.get_rank(group), check_inputs)

    # -- splitting -------------------------------------------------------------------------------
    def local_range(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's slice of ``n`` tokens."""
        sizes = shard_sizes(n, self.size)
        start = sum(sizes[:self.rank])
        return start, start + sizes[self.rank]

    def shard(self, tokens: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous slice of ``tokens`` along ``dim``."""
        start, stop = self.local_range(tokens.shape[dim])
        return tokens.narrow(dim, start, stop - start)

    def gather(self, tokens: torch.Tensor, total: int) -> torch.Tensor:
        """All slices (B, n_r, F) → (B, total, F), in rank order (differentiable, see ``_GatherTokens``)."""
        return _GatherTokens.apply(tokens, shard_sizes(total, self.size), self.rank, self.group)

    # -- attention -------------------------------------------------------------------------------
    def split(self, text_tokens: int, image_tokens: int) -> SequenceSplit:
        """The per-rank sequence lengths of one forward (each rank holds a text slice and an image slice)."""
        sizes = [a + b for a, b in zip(shard_sizes(text_tokens, self.size), shard_sizes(image_tokens, self.size))]
        return SequenceSplit(self, tuple(sizes))

    # -- safety ----------------------------------------------------------------------------------
    def assert_same_inputs(self, *tensors: torch.Tensor | None) -> None:
        """Raise RuntimeError if the cp ranks were given different inputs (a data loader or seed that is
        not per data-parallel rank): the split forward would silently mix different samples."""
        if not self.check_inputs:
            return
        given = [t for t in tensors if t is not None]
        device = next((t.device for t in given if isinstance(t, torch.Tensor)), None)
        given = [torch.as_tensor(t, device=device).double() for t in given]
        local = torch.stack([s for t in given for s in (t.sum(), t.abs().sum(), t.new_tensor(float(t.numel())))])
        lo, hi = local.clone(), local.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.allclose(lo, hi, rtol=1e-9, atol=0.0, equal_nan=True):  # NaN inputs: not a mismatch
            raise RuntimeError("context parallelism: the ranks of one cp group were given different inputs "
                               "(x, t or cond). Every rank of a cp group must read the same batch "
                               "(data_parallel_coords) and draw the same noise (rng_seed_for_rank).")


@dataclass(frozen=True, eq=False)
class SequenceSplit:
    """One forward's split: the cp group and every rank's local sequence length (passed to the blocks)."""

    cp: ContextParallel
    sizes: tuple[int, ...]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Full unmasked attention of local tokens against every rank's tokens.

        ``q``, ``k``, ``v``: (B, heads, n_local, D), RoPE already applied; returns (B, n_local, heads·D).
        """
        cp, sizes = self.cp, list(self.sizes)
        b, heads, n_local, d = q.shape
        if heads % cp.size:
            raise ValueError(f"{heads} heads cannot be split over a cp group of {cp.size}; valid sizes: "
                             f"{valid_context_parallel_sizes(heads)}")
        if n_local != sizes[cp.rank]:
            raise RuntimeError(f"cp rank {cp.rank} holds {n_local} tokens, the split says {sizes[cp.rank]}")
        hp = heads // cp.size
        # (3, B, heads, n, D) → (cp, 3, hp, B, n, D): head chunk j goes to rank j (one call for q, k and v)
        qkv = torch.stack([q, k, v]).view(3, b, cp.size, hp, n_local, d).permute(2, 0, 3, 1, 4, 5)
        rows = 3 * hp * b  # rows of D elements per token in one rank's chunk
        recv = _AllToAll.apply(qkv.reshape(-1, d), [rows * n for n in sizes], [rows * n_local] * cp.size, cp.group)
        parts = [p.view(3, hp, b, n, d) for p, n in zip(recv.split([rows * n for n in sizes]), sizes)]
        full = torch.cat(parts, dim=3).permute(0, 2, 1, 3, 4)  # (3, B, hp, L, D), L = all ranks' tokens
        out = F.scaled_dot_product_attention(full[0], full[1], full[2])  # (B, hp, L, D)
        # token slice r goes back to rank r; this rank receives its tokens for every rank's head chunk
        send = out.permute(2, 1, 0, 3)  # (L, hp, B, D)
        back = _AllToAll.apply(send, [n_local] * cp.size, sizes, cp.group)  # (cp·n_local, hp, B, D)
        back = back.view(cp.size, n_local, hp, b, d).permute(3, 1, 0, 2, 4)  # (B, n_local, cp, hp, D)
        return back.reshape(b, n_local, heads * d)


# ---------------------------------------------------------------------------------------------------
# meshes and wiring


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The units FSDP wraps one by one: the expert's ``blocks()`` (double then single), the router's
    ``blocks`` ModuleList."""
    blocks = model.blocks
    return list(blocks) if isinstance(blocks, torch.nn.ModuleList) else list(blocks())


def make_dp_cp_mesh(cp: int, device_type: str = "cuda", world_size: int | None = None) -> DeviceMesh:
    """A 2-D DeviceMesh (``data_parallel``, ``context_parallel``) = (world/cp, cp) over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size() if world_size is None else world_size
    if cp < 1 or world % cp:
        raise ValueError(f"context_parallel={cp} must divide the world size {world}")
    return init_device_mesh(device_type, (world // cp, cp), mesh_dim_names=(DP_DIM, CP_DIM))


def apply_context_parallel(model: torch.nn.Module, mesh: DeviceMesh | None, cp_dim: str = CP_DIM,
                           check_inputs: bool = True) -> int:
    """Make ``model`` (an MMDiT or a Router) split its sequence over ``mesh[cp_dim]``; returns the cp size.

    A cp size of 1 (or no mesh) leaves the model unsplit. Call on the model and on its EMA twin, before or
    after :func:`fully_shard_dp_cp` (it only records the group; meta-device models are fine). Every rank of
    the group must then call the model's forward together — under FSDP2 that is already the rule.
    With Lightning's ``ModelParallelStrategy(data_parallel_size=world // cp, tensor_parallel_size=cp)`` the
    cp dimension of ``strategy.device_mesh`` is the one named ``"tensor_parallel"``: pass ``cp_dim`` so.
    """
    if mesh is None or cp_dim not in (mesh.mesh_dim_names or ()):
        return 1
    sub = mesh[cp_dim]
    if sub.size() == 1:
        return 1
    check_context_parallel_size(sub.size(), model.config.num_heads)
    model.set_context_parallel(ContextParallel.from_group(sub.get_group(), check_inputs))
    return sub.size()


def fully_shard_dp_cp(model: torch.nn.Module, mesh: DeviceMesh, dp_dim: str = DP_DIM, cp_dim: str = CP_DIM,
                      **fsdp_kwargs) -> None:
    """FSDP2 over all dp × cp ranks (every block, then the root), gradients summed over cp, averaged over dp.

    Weights are sharded across the whole mesh (cp ranks hold identical weights, so they may as well share
    the memory); the reduce-scatter divides by dp instead of dp·cp because each cp rank's gradient is a
    share of the sample's gradient, not a replica of it.
    """
    from torch.distributed.fsdp import fully_shard

    names = mesh.mesh_dim_names or ()
    units = [*transformer_blocks(model), model]
    if cp_dim not in names or mesh[cp_dim].size() == 1:  # plain FSDP2 over dp (the cp=1 behaviour)
        for unit in units:
            fully_shard(unit, mesh=mesh[dp_dim], **fsdp_kwargs)
        return
    flat = mesh[dp_dim, cp_dim]._flatten(f"{dp_dim}_{cp_dim}")
    dp = mesh[dp_dim].size()
    for unit in units:
        fully_shard(unit, mesh=flat, **fsdp_kwargs)
    gloo = dist.get_backend(flat.get_group()) == "gloo"
    for unit in units:
        unit.set_gradient_divide_factor(float(dp))
        if gloo:  # a custom factor uses NCCL's PreMulSum, which gloo lacks: sum, then scale
            unit.set_force_sum_reduction_for_comms(True)
