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
started from. DeepSpeed sees step 3 as gradient accumulation (boundary only at the last mini-batch),
so ZeRO 1-3 reduce and partition the gradient as they would the uncached one. Every rank runs the
same number of mini-batches (the largest any rank needs), which ZeRO-3's parameter gathers require.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from train.step.encoding import Tokenized, in_row_order, merge_features, to_device


class GradCache:
    """`encode` a rank's texts for the step, compute the loss from them, then `backward(loss)` instead
    of engine.backward(loss); engine.step() as usual."""

    def __init__(self, engine, mini_batch: int, device, control_group=None):
        if mini_batch < 1:
            raise ValueError(f"--mini-batch must be >= 1 (0 turns GradCache off), got {mini_batch}")
        self.engine, self.mini_batch, self.device, self.control = engine, mini_batch, device, control_group
        self._chunks: list = []  # (row indices, features, RNG state) of the step's mini-batches
        self._cached: torch.Tensor | None = None
        self._rows = 0

    def _chunk_count(self, rows: int) -> int:
        """The mini-batches this step takes: the most any rank needs (a host-side all-reduce)."""
        count = torch.tensor([math.ceil(rows / self.mini_batch)], dtype=torch.long)
        if dist.is_initialized():
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
        for c, (index, features, rng) in enumerate(self._chunks):
            self.engine.set_gradient_accumulation_boundary(c == last)
            with torch.random.fork_rng(devices=_cuda_devices(self.device)):
                _set_rng_state(self.device, rng)
                out = self.engine(to_device(features, self.device))["sentence_embedding"]
            surrogate = (out * grad[torch.tensor(index, device=grad.device)].to(out.dtype)).sum()
            self.engine.backward(surrogate)
        self._chunks, self._cached = [], None


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
