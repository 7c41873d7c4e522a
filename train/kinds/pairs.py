"""Pairs: a query and its positive, no hard negatives; InfoNCE with in-batch negatives gathered over
the task's ranks, as in pre-training (Conan-embedding Eq. 1).

    {"query": str, "pos": str | [str]}
"""
from __future__ import annotations

import torch

from train.input.data import PairStream
from train.losses.infonce import false_negatives, gathered_candidates, info_nce
from train.losses.matryoshka import matryoshka
from train.input.records import pair_maker
from train.kinds.base import LossSettings, TaskKind, TaskLoss, candidate_ids, count, own_slice, with_score_guard


class Pairs(TaskKind):
    name = "pairs"
    mteb_types = ("Retrieval", "Reranking")
    line_format = '{"query", "pos"}'

    def parser(self, num_negatives: int = 0, sample: bool = True):
        return pair_maker(num_negatives, sample)

    def stream(self, task, **common):
        return PairStream(task.files, task.batch_size, num_negatives=task.num_negatives, **common)

    def texts(self, task, global_batch, rank, miner=None):
        batch = own_slice(task, global_batch, rank)
        return [([ex.query for ex in batch], task.query_prompt), ([ex.pos for ex in batch], task.passage_prompt)]

    def loss(self, task, global_batch, embeddings, group, settings: LossSettings, miner=None, texts=None) -> TaskLoss:
        q, p = embeddings
        batch = own_slice(task, global_batch, torch.distributed.get_rank())
        p_all, labels = gathered_candidates(q, p, None, group)
        exclude = false_negatives(candidate_ids(batch, texts, settings, q.device), labels, group)
        copies = count(exclude)
        exclude, guarded = with_score_guard(exclude, q, p_all, labels, settings)
        return TaskLoss(matryoshka(info_nce, [q, p_all], settings.dims, settings.weights, labels=labels,
                                   temperature=settings.temperature, exclude=exclude), {}, copies, guarded)
