"""GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup", arXiv 2101.06983; sentence-transformers' CachedMultipleNegativesRankingLoss): a batch of any
size on the activation memory of one mini-batch.

A contrastive loss couples every embedding of the batch, but the encoder does not: each text's
embedding depends only on that text. So the step splits in three:

    1. embed every text in mini-batches of at most N rows, without a graph;    e_i (no activations kept)
    2. take the loss (gathered across ranks, CBB-scaled, Matryoshka) on the cached e_i
       and backpropagate it to them only;                                      g_i = dL/de_i
    3. per mini-batch again, forward with a graph and backpropagate sum_i <e_i, g_i>, whose gradient
       with respect to the weights is sum_i g_i * de_i/dtheta = dL/dtheta (chain rule), accumulated.

Only step 3's one mini-batch holds activations at a time. The price is a second forward (~+1/3
compute). Dropout draws the same masks in both forwards: each mini-batch restores the RNG state it
started from. Every rank runs the same number of mini-batches (the largest any rank needs), which
ZeRO-3's parameter gathers require.

DeepSpeed sees step 3 as gradient accumulation (the boundary only at the last mini-batch): the
gradient is the uncached one at every stage, but how often it crosses the network depends on the
stage (DeepSpeed 0.19.8; counted in tests/test_grad_cache.py):
    ZeRO-0, ZeRO-1 (and bf16's BF16_Optimizer)   once per step, at the boundary
    ZeRO-2, ZeRO-3                               at every mini-batch's backward: k reductions a step
                                                 (engine.allreduce_gradients flushes the partitioned
                                                 gradients whatever the boundary)
    ZeRO-2, ZeRO-3 with reduce_once              once per step (engine.coalesce_grad_reduction), the
                                                 price being whole gradients of the trained weights
                                                 on every rank until the step's reduction
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist

from train.step.encoding import Tokenized, in_row_order, merge_features, to_device


class GradCache:
    """`encode` a rank's texts for the step, compute the loss from them, then `backward(loss)` instead
    of engine.backward(loss); engine.step() as usual."""

    def __init__(self, engine, mini_batch: int, device, control_group=None, reduce_once: bool = False):
        if mini_batch < 1:
            raise ValueError(f"--mini-batch must be >= 1 (0 turns GradCache off), got {mini_batch}")
        self.engine, self.mini_batch, self.device, self.control = engine, mini_batch, device, control_group
        # only ZeRO-2/3 reduce per backward; ZeRO-0/1 reduce once already (and coalescing refuses their bf16 optimizer)
        self.coalesce = reduce_once and engine.zero_optimization_stage() >= 2
        self._chunks: list = []  # (row indices, features, RNG state) of the step's mini-batches
        self._cached: torch.Tensor | None = None
        self._rows = 0

    def _chunk_count(self, rows: int) -> int:
        """The mini-batches this step takes: the most any rank needs (an all-reduce on the control group:
        a CPU tensor on a gloo group, the host-side one; on the device where the group carries no CPU
        tensors, e.g. NCCL, which refuses them: "No backend type associated with device type cpu")."""
        count = torch.tensor([math.ceil(rows / self.mini_batch)], dtype=torch.long)
        if dist.is_initialized():
            if not carries_cpu_tensors(self.control):
                count = count.to(self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.control)
        return max(1, int(count.item()))

    def encode(self, tokenized: Tokenized) -> tuple[list[torch.Tensor], int]:
        """Embeddings of every group (leaves that collect dL/de), and the non-padding tokens."""
        rows, n = tokenized.rows, len(tokenized.rows)
        k = self._chunk_count(n)
        rows = rows + [rows[-1]] * max(0, k - n)  # fewer rows than mini-batches: repeat one, its gradient is 0
        order = sorted(range(len(rows)), key=lambda i: rows[i]["attention_mask"].shape[1])  # by length: less padding
        self._chunks, outputs = [], []
        for c in range(k):  # k near-equal pieces, none empty (a rank with fewer rows takes smaller ones)
            index = order[c * len(rows) // k:(c + 1) * len(rows) // k]
            features = merge_features([rows[i] for i in index], tokenized.pad_id, tokenized.left_pad)
            rng = _rng_state(self.device)
            with torch.no_grad():
                outputs.append(self.engine(to_device(features, self.device))["sentence_embedding"])
            self._chunks.append((index, features, rng))
        self._cached = in_row_order(outputs, [index for index, _, _ in self._chunks], n).detach().requires_grad_()
        self._rows = n
        return list(self._cached.split(tokenized.sizes)), tokenized.tokens

    def backward(self, loss: torch.Tensor) -> None:
        """dL/de on the cached embeddings (the loss's own collectives run here, on every rank), then
        each mini-batch's forward again, with its gradient pushed through the engine."""
        loss.backward()
        grad = self._cached.grad
        if grad is None:  # the loss does not depend on this rank's texts (it still runs the forwards)
            grad = torch.zeros_like(self._cached)
        grad = torch.cat([grad, grad.new_zeros(max(0, sum(len(i) for i, _, _ in self._chunks) - self._rows),
                                               grad.shape[1])])
        last = len(self._chunks) - 1
        with self.engine.coalesce_grad_reduction() if self.coalesce else nullcontext():
            for c, (index, features, rng) in enumerate(self._chunks):
                self.engine.set_gradient_accumulation_boundary(c == last)
                with torch.random.fork_rng(devices=_cuda_devices(self.device)):
                    _set_rng_state(self.device, rng)
                    out = self.engine(to_device(features, self.device))["sentence_embedding"]
                surrogate = (out * grad[torch.tensor(index, device=grad.device)].to(out.dtype)).sum()
                self.engine.backward(surrogate)
        self._chunks, self._cached = [], None


def carries_cpu_tensors(group=None) -> bool:
    """Whether a process group's backend takes CPU tensors: gloo and mpi do, NCCL does not, and a mixed
    backend names its device types ("cpu:gloo,cuda:nccl")."""
    backend = str(dist.get_backend(group))
    return backend in ("gloo", "mpi") or "cpu:" in backend


def _cuda_devices(device) -> list:
    device = torch.device(device)
    return [device] if device.type == "cuda" else []


def _rng_state(device) -> tuple:
    devices = _cuda_devices(device)
    return torch.get_rng_state(), (torch.cuda.get_rng_state(devices[0]) if devices else None)


def _set_rng_state(device, state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, torch.device(device))
