"""Retrieval: a query, its positive passage and hard negatives; InfoNCE_CBB (Conan-embedding §2.3).

    {"query": str, "pos": [str], "neg": [str], "neg_pool": [str]?, "neg_scores": [float]?, ...}

Under CBB the task's N ranks hold the same B queries and positives and split the n hard negatives
of each query (n / N each); the loss gathers every rank's negatives (losses/cbb.py). Under the random
schedule or `--task-placement every-rank` each rank holds its own queries with all their negatives,
and the candidates (positives and negatives) are gathered from every rank of the task. Mined tasks
get their negatives from the miner and report each query's mean score against them, read from the
similarities the loss already computed (no extra forward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from train.input.data import PairStream
from train.losses.cbb import gather_negatives, retrieval_cbb
from train.losses.distill import cbb_own_columns, distill, gathered_own_columns
from train.losses.distributed import rank as group_rank, world_size as group_size
from train.losses.infonce import false_negatives, gathered_candidates, info_nce
from train.losses.matryoshka import matryoshka
from train.input.records import pair_maker
from train.kinds.base import LossSettings, TaskKind, TaskLoss, candidate_ids, count, own_slice, with_score_guard


class Retrieval(TaskKind):
    name = "retrieval"
    mteb_types = ("Retrieval", "Reranking")
    line_format = '{"query", "pos": [...], "neg": [...]}'
    needs_negatives = True
    shares_queries = True
    minable = True

    def parser(self, num_negatives: int = 0, sample: bool = True):
        return pair_maker(max(num_negatives, 1), sample)

    def stream(self, task, **common):
        # mined tasks keep a fixed set of negatives (the miner tracks their scores); others draw afresh
        return PairStream(task.files, task.batch_size, num_negatives=task.num_negatives,
                          sample_negatives=task.mining is None, need_scores=task.distill is not None, **common)

    def texts(self, task, global_batch, rank, miner=None):
        qp, pp = task.query_prompt, task.passage_prompt
        if task.shares_queries:  # CBB: the same queries on every rank of the task, a slice of the negatives
            me, n = task.assigned.index(rank), task.negatives_per_rank
            negatives = [miner.negatives(ex.source, ex.neg, ex.pool) if miner else ex.neg for ex in global_batch]
            return [([ex.query for ex in global_batch], qp), ([ex.pos for ex in global_batch], pp),
                    ([t for negs in negatives for t in negs[me * n:(me + 1) * n]], pp)]
        batch = own_slice(task, global_batch, rank)  # this rank's own queries, each with all its negatives
        negatives = [miner.negatives(ex.source, ex.neg, ex.pool) if miner else ex.neg for ex in batch]
        return [([ex.query for ex in batch], qp), ([ex.pos for ex in batch], pp),
                ([t for negs in negatives for t in negs], pp)]

    def loss(self, task, global_batch, embeddings, group, settings: LossSettings, miner=None, texts=None) -> TaskLoss:
        q, p, neg = embeddings
        dims, weights, rank = settings.dims, settings.weights, torch.distributed.get_rank()
        if not task.shares_queries:  # InfoNCE over every rank's positives and negatives
            batch = own_slice(task, global_batch, rank)
            candidates, labels = gathered_candidates(q, p, neg, group)
            exclude = false_negatives(candidate_ids(batch, texts, settings, q.device), labels, group)
            copies = count(exclude)
            exclude, guarded = with_score_guard(exclude, q, candidates, labels, settings)
            value = matryoshka(info_nce, [q, candidates], dims, weights, labels=labels,
                               temperature=settings.temperature, exclude=exclude)
            if task.distill:
                own = gathered_own_columns(q.shape[0], task.num_negatives, group_rank(group), group_size(group),
                                           q.device)
                value = value + distillation(task, batch, miner, q, candidates, own, exclude, settings)
            own = own_negative_scores(q.detach(), neg.detach(), task.num_negatives, 1) if miner else None
            return TaskLoss(value, mining_scores(miner, batch, own) if miner else {}, copies, guarded)
        neg_all = gather_negatives(neg, group)
        labels = torch.arange(q.shape[0], device=q.device)
        exclude = false_negatives(candidate_ids(global_batch, texts, settings, q.device), labels, group,
                                  gather_pos=False)
        copies = count(exclude)
        candidates = torch.cat([p, neg_all])  # retrieval_cbb's columns: positives, then every rank's negatives
        exclude, guarded = with_score_guard(exclude, q, candidates, labels, settings)
        value = matryoshka(retrieval_cbb, [q, p, neg_all], dims, weights, temperature=settings.temperature,
                           exclude=exclude)
        if task.distill:
            own = cbb_own_columns(q.shape[0], task.negatives_per_rank, len(task.assigned), q.device)
            value = value + distillation(task, global_batch, miner, q, candidates, own, exclude, settings)
        scores = {}
        if miner:  # the similarities the loss used, read back: no extra forward pass
            own = own_negative_scores(q.detach(), neg_all.detach(), task.negatives_per_rank, len(task.assigned))
            scores = mining_scores(miner, global_batch, own)
        # every rank of the task holds the same queries: their false negatives are counted once
        first = rank == task.assigned[0]
        return TaskLoss(value, scores, copies if first else 0, guarded if first else 0)


def distillation(task, examples: list, miner, q, candidates, own, exclude, settings: LossSettings) -> torch.Tensor:
    """weight x the task's distillation loss (losses/distill.py) at every Matryoshka dim, from the
    teacher's scores of each query's positive and own negatives (a mined negative's from the pool)."""
    spec, k = task.distill, own.shape[1] - 1
    teacher = torch.tensor([[ex.pos_score] + (miner.negative_scores(ex.source, ex.neg_scores, ex.pool_scores)
                                              if miner else ex.neg_scores)[:k] for ex in examples], device=q.device)
    value = matryoshka(distill, [q, candidates], settings.dims, settings.weights, own=own, teacher=teacher,
                       loss=spec["loss"], temperature=spec["temperature"] or settings.temperature,
                       teacher_temperature=spec["teacher_temperature"], exclude=exclude)
    return spec["weight"] * value


def own_negative_scores(q: torch.Tensor, neg_all: torch.Tensor, per_rank: int, ranks: int) -> torch.Tensor:
    """Mean cosine of each query with its own hard negatives (all ranks' slices), for mining. [B]

    neg_all is [rank 0: B x per_rank, rank 1: B x per_rank, ...], query-major within each rank.
    """
    b = q.shape[0]
    own = neg_all.reshape(ranks, b, per_rank, -1).transpose(0, 1).reshape(b, ranks * per_rank, -1)
    return torch.einsum("bd,bkd->bk", F.normalize(q.float(), dim=-1), F.normalize(own.float(), dim=-1)).mean(1)


def mining_scores(miner, examples: list, scores: torch.Tensor) -> dict:
    """{id: (Si, pool size, S0 from the mining scores)} of the examples whose negatives were scored."""
    return {ex.source: (float(s), len(ex.pool), miner.mined_score(ex.source, ex.neg_scores, ex.pool_scores))
            for ex, s in zip(examples, scores.tolist())}
