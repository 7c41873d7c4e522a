"""The few collective helpers the losses need; DeepSpeed does everything else."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist


LOCAL = "local"  # a "group" of just this rank: gathers are the identity
_gather_seconds = [0.0]  # wall time in the losses' gathers, forward and backward (host tensors only, below)


def gather_seconds() -> float:
    """Seconds spent so far in all_gather_with_grad, forward and backward, including the wait for the
    slowest rank. Counted for host (gloo) tensors only: a CUDA collective returns before it has run."""
    return _gather_seconds[0]


def _count(started: float, x: torch.Tensor) -> None:
    if x.device.type == "cpu":
        _gather_seconds[0] += time.perf_counter() - started


def world_size(group=None) -> int:
    if group == LOCAL or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group=None) -> int:
    if group == LOCAL or not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the summed gradient of its own slice.

    Rank r's loss depends on the tensors of every rank, so the gradient of rank s's tensor is
    sum over r of dL_r/dx_s: an all_reduce of the full gradient, then each rank keeps its slice.
    (Gathering without grad and re-inserting only the local slice keeps dL_s/dx_s alone and
    silently trains a different objective.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        started = time.perf_counter()
        parts = [torch.empty_like(x) for _ in range(world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        _count(started, x)
        ctx.rows, ctx.group = x.shape[0], group
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        started = time.perf_counter()
        # summed in fp32: a bf16 engine's embeddings bring a bf16 gradient here, and a ring all-reduce
        # would round it at every hop (the error growing with the ranks) where DeepSpeed reduces in fp32
        total = grad.float().contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        _count(started, total)
        me = rank(ctx.group)
        return total[me * ctx.rows:(me + 1) * ctx.rows].to(grad.dtype), None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate x from every rank of `group` (default: all) along dim 0, differentiably."""
    if world_size(group) == 1:
        return x
    return _AllGatherWithGrad.apply(x, group)


def all_gather_ids(ids: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate an integer tensor (text ids) from every rank of `group` along dim 0; no gradient."""
    if world_size(group) == 1:
        return ids
    parts = [torch.empty_like(ids) for _ in range(world_size(group))]
    dist.all_gather(parts, ids.contiguous(), group=group)
    return torch.cat(parts)


def all_reduce_sum(value: float | int, device: torch.device | str = "cpu") -> float:
    """Sum of a Python number over ranks (for logging)."""
    if world_size() == 1:
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())
