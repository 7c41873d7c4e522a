"""STS: sentence pairs with a graded similarity score; CoSENT (Conan-embedding Eq. 2).

    {"sentence1": str, "sentence2": str, "score": number}

The task's batch is split over its ranks and the pair embeddings are gathered, so CoSENT orders all
of the task's pairs against each other, as one process would. Both sides are encoded with the
query prompt (a symmetric task).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from train.input.data import JsonlStream
from train.losses.distributed import all_gather_with_grad
from train.losses.cosent import pair_cosent
from train.losses.matryoshka import matryoshka
from train.input.records import json_object, text_field
from train.kinds.base import LossSettings, TaskKind, TaskLoss, own_slice


@dataclass
class StsExample:
    sentence1: str
    sentence2: str
    score: float
    source: str


def make_sts(line: str, rng: random.Random, source: str) -> StsExample:
    obj = json_object(line, "sentence1", "sentence2", "score")
    score = obj["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise ValueError(f"'score' must be a number, got {score!r}")
    return StsExample(text_field(obj["sentence1"], "sentence1"), text_field(obj["sentence2"], "sentence2"),
                      float(score), source)


def sts_length(ex: StsExample, cap: int) -> tuple[int, int]:
    return min(max(len(ex.sentence1), len(ex.sentence2)), cap), 0


class Sts(TaskKind):
    name = "sts"
    mteb_types = ("STS", "PairClassification")
    symmetric = True
    line_format = '{"sentence1", "sentence2", "score"}'
    default_weight = 0.8  # the paper's beta
    min_batch = 2         # CoSENT compares pairs with each other

    def parser(self, num_negatives: int = 0, sample: bool = True):
        return make_sts

    def stream(self, task, **common):
        return JsonlStream(task.files, task.batch_size, make=make_sts, length=sts_length, **common)

    def texts(self, task, global_batch, rank, miner=None):
        batch = own_slice(task, global_batch, rank)
        return [([ex.sentence1 for ex in batch], task.query_prompt), ([ex.sentence2 for ex in batch], task.query_prompt)]

    def loss(self, task, global_batch, embeddings, group, settings: LossSettings, miner=None, texts=None) -> TaskLoss:
        e1, e2 = (all_gather_with_grad(e, group) for e in embeddings)
        gold = torch.tensor([ex.score for ex in global_batch], device=e1.device)
        return TaskLoss(matryoshka(pair_cosent, [e1, e2], settings.dims, settings.weights, gold=gold,
                                   scale=settings.cosent_scale))
