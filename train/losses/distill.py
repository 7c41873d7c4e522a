"""Distillation from a teacher's scores of each query's own candidates (its positive and its hard
negatives), beside InfoNCE: the student's ranking of them is pulled towards the teacher's.

kl (FlagEmbedding's `kl_div`; sentence-transformers' DistillKLDivLoss): with s the student's cosine,
t the teacher's score, K_i = {p_i} + N_i the query's own candidates,

    L_kl = 1/B sum_i KL( softmax_K(t_i / tau_t) || softmax_K(s_i / tau) )

m3 (BGE-M3, arXiv 2402.03216, its self-knowledge distillation loss): the teacher's distribution over
K_i weights the student's log-probabilities over *all* candidates of InfoNCE's denominator C (the
in-batch positives and every rank's negatives), a teacher-weighted InfoNCE:

    L_m3 = -1/B sum_i sum_{k in K_i} softmax_K(t_i / tau_t)_k * log softmax_C(s_i / tau)_k

Both read the candidates as InfoNCE lays them out (gathered across ranks, CBB's negatives split over
the task's ranks), so on any number of ranks they equal the one-process value.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DISTILL_LOSSES = ("kl", "m3")


def distill(q: torch.Tensor, candidates: torch.Tensor, own: torch.Tensor, teacher: torch.Tensor, loss: str,
            temperature: float, teacher_temperature: float, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, d], candidates [C, d] (InfoNCE's), own [B, K]: the columns of each query's own candidates,
    teacher [B, K]: the teacher's scores of them; exclude [B, C]: InfoNCE's false negatives (m3)."""
    q, candidates = F.normalize(q.float(), dim=-1), F.normalize(candidates.float(), dim=-1)
    logits = q @ candidates.T / temperature
    target = F.softmax(teacher.float() / teacher_temperature, dim=-1)
    if loss == "kl":
        return F.kl_div(F.log_softmax(logits.gather(1, own), dim=-1), target, reduction="batchmean")
    if exclude is not None:  # a false negative is left out of the denominator, as in InfoNCE
        logits = logits.masked_fill(exclude & ~torch.zeros_like(exclude).scatter(1, own, True), float("-inf"))
    return -(target * F.log_softmax(logits, dim=-1).gather(1, own)).sum(1).mean()


def cbb_own_columns(batch: int, per_rank: int, ranks: int, device) -> torch.Tensor:
    """[B, 1 + ranks * per_rank] columns of each query's positive and own negatives among CBB's candidates
    [positives (B); negatives of the task's rank 0..N-1, each B x per_rank, query-major]. The teacher's
    scores are then [pos score, the query's first ranks * per_rank negative scores in order]."""
    b = torch.arange(batch, device=device)[:, None]
    negs = [batch + r * batch * per_rank + b * per_rank + torch.arange(per_rank, device=device) for r in range(ranks)]
    return torch.cat([b, *negs], dim=1)


def gathered_own_columns(local: int, negatives: int, rank: int, world: int, device) -> torch.Tensor:
    """[B_local, 1 + n] columns of this rank's queries' positives and negatives among the gathered
    candidates [positives of rank 0..W-1 (B_local each); negatives of rank 0..W-1 (B_local x n each)]."""
    i = torch.arange(local, device=device)[:, None]
    negs = world * local + rank * local * negatives + i * negatives + torch.arange(negatives, device=device)
    return torch.cat([rank * local + i, negs], dim=1)
