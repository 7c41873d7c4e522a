"""Cross-GPU Batch Balance (CBB) loss (Conan-embedding, arXiv 2408.15710, §2.3, Eq. 3-4).

Every optimizer step holds every task; each rank runs one task (or, with few ranks, several as
sub-batches). The step's objective is

    L = sum_t w_t * L_t          e.g.  L = L_InfoNCE_CBB + beta * L_CoSENT,  beta = 0.8

Retrieval (InfoNCE_CBB): the task's N ranks hold the same queries and positives and different hard
negatives; each query is scored against its positive, the other queries' positives and the
negatives of all N ranks (n * N per query, gathered with gradients):

    L_ret = -1/B sum_i log( exp(s(q_i, p_i)/tau) / (sum_j exp(s(q_i, p_j)/tau) + sum_{k <= n*N*B} exp(s(q_i, y_k)/tau)) )

leaving out of each query's sums the candidates that are copies of its own positive (infonce.py).

STS (CoSENT): the task's batch is split over its ranks; the embeddings are gathered so CoSENT ranks
all the task's pairs against each other, as one process would.

Classification: each text against one same-label text and n other-label texts, no in-batch negatives
(a text of the same label elsewhere in the batch must not be pushed away).

Pairs: InfoNCE with in-batch negatives gathered over the task's ranks (as in pre-training).

(Each kind's texts and loss call are in train/kinds/; this module holds the CBB maths they share.)

Combining: DeepSpeed averages gradients over all W ranks. A task held by |R_t| ranks has each of
them compute a loss whose gradients sum to |R_t| * grad(L_t), so each rank scales its task loss by
w_t * W / |R_t|; the averaged gradient is then exactly grad(sum_t w_t L_t), whatever the number of
ranks. A rank that runs no task of a kind adds nothing for it (not a NaN from an empty batch).
"""
from __future__ import annotations

import torch

from train.losses.distributed import all_gather_with_grad
from train.losses.infonce import info_nce


def task_scale(weight: float, world: int, task_ranks: int) -> float:
    """Factor on a rank's task loss so the DeepSpeed-averaged gradient is weight * grad(L_task)."""
    return weight * world / task_ranks


def retrieval_cbb(q: torch.Tensor, pos: torch.Tensor, neg_all: torch.Tensor, temperature: float,
                  exclude: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE_CBB: q, pos [B, d] (the same on every rank of the task), neg_all [n*N*B, d] (gathered);
    exclude [B, B + n*N*B]: false negatives (infonce.false_negatives with gather_pos=False)."""
    labels = torch.arange(q.shape[0], device=q.device)
    return info_nce(q, torch.cat([pos, neg_all]), labels, temperature, exclude)


def gather_negatives(neg: torch.Tensor, group) -> torch.Tensor:
    """Every retrieval rank's hard negatives, with gradients flowing back to the rank that made them."""
    return all_gather_with_grad(neg, group)


__all__ = ["task_scale", "retrieval_cbb", "gather_negatives"]
