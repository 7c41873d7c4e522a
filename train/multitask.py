"""One CBB step of multi-task fine-tuning (Conan-embedding §2.3): which texts each task needs from
this rank, one forward for all of them, and each task's loss from its slice of the embeddings.

The losses themselves live in train/losses/ (cbb.py, cosent.py, matryoshka.py); this module only
routes texts and embeddings between the tasks a rank holds and the ranks a task spans.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from .data import rank_slice
from .distributed import LOCAL
from .encoding import TextGroup
from .losses import cbb
from .losses.infonce import TextIds
from .losses.matryoshka import matryoshka
from .mining import HardNegativeMiner
from .tasks import Task
from .text_ids import retrieval_ids


@dataclass
class LossSettings:
    temperature: float = 0.02
    cosent_scale: float = 20.0
    dims: list[int] | None = None         # Matryoshka dims (None: the full width only)
    weights: list[float] | None = None
    mask_false_negatives: bool = True     # leave copies of a query's positive out of its InfoNCE denominator


@dataclass
class StepResult:
    total: torch.Tensor                                     # sum of this rank's CBB-scaled task losses
    losses: dict[str, torch.Tensor] = field(default_factory=dict)   # unscaled, per task
    scores: dict[str, dict] = field(default_factory=dict)           # mined tasks: {id: (score, pool size)}
    tokens: int = 0
    sources: list[str] = field(default_factory=list)
    false_negatives: int = 0                                # candidates left out as copies of a query's positive


def task_groups(tasks: list[Task]) -> dict:
    """One process group per task (every rank creates every group, in the same order)."""
    world = dist.get_world_size()
    return {t.name: LOCAL if len(t.assigned) == 1 else dist.new_group(t.assigned) if len(t.assigned) < world else None
            for t in tasks}


def tasks_this_step(tasks: list[Task], rank: int, step: int, schedule: str, seed: int) -> list[Task]:
    if schedule == "random":  # the same draw on every rank: one task for the whole step
        return [tasks[random.Random(f"{seed}-schedule-{step}").randrange(len(tasks))]]
    return [t for t in tasks if rank in t.assigned]


def task_texts(task: Task, global_batch: list, rank: int, miner: HardNegativeMiner | None = None) -> list[TextGroup]:
    """The text groups this rank encodes for one task, with their prompts, in the order task_loss reads them."""
    me = task.assigned.index(rank)
    qp, pp = task.query_prompt, task.passage_prompt
    if task.shares_queries:  # CBB: same queries on every rank of the task, a different slice of negatives
        n = task.negatives_per_rank
        negatives = [miner.negatives(ex.source, ex.neg, ex.pool) if miner else ex.neg for ex in global_batch]
        return [([ex.query for ex in global_batch], qp), ([ex.pos for ex in global_batch], pp),
                ([t for negs in negatives for t in negs[me * n:(me + 1) * n]], pp)]
    batch = rank_slice(global_batch, me, len(task.assigned))
    if task.type == "retrieval":  # random schedule: this rank's own queries, each with all its negatives
        negatives = [miner.negatives(ex.source, ex.neg, ex.pool) if miner else ex.neg for ex in batch]
        return [([ex.query for ex in batch], qp), ([ex.pos for ex in batch], pp), ([t for negs in negatives for t in negs], pp)]
    if task.type == "sts":
        return [([ex.sentence1 for ex in batch], qp), ([ex.sentence2 for ex in batch], qp)]
    if task.type == "classification":  # symmetric texts: the query prompt on every side
        return [([ex.query for ex in batch], qp), ([ex.pos for ex in batch], qp), ([t for ex in batch for t in ex.neg], qp)]
    return [([ex.query for ex in batch], qp), ([ex.pos for ex in batch], pp)]  # pairs


def mining_scores(miner: HardNegativeMiner, examples: list, scores: torch.Tensor) -> dict:
    """{id: (Si, pool size, S0 from the mining scores)} of the examples whose negatives were scored."""
    return {ex.source: (float(s), len(ex.pool), miner.mined_score(ex.source, ex.neg_scores, ex.pool_scores))
            for ex, s in zip(examples, scores.tolist())}


def candidate_ids(examples: list, texts: list[TextGroup] | None, loss: LossSettings, device) -> TextIds | None:
    """What finds a query's false negatives: the ids of each example's positives and of the positive and
    negative texts this rank encoded for them (task_texts' groups 1 and 2); None with the mask off."""
    if not (loss.mask_false_negatives and texts):
        return None
    return retrieval_ids(examples, texts[1][0], texts[2][0] if len(texts) > 2 else (), device)


def task_loss(task: Task, global_batch: list, embeddings: list[torch.Tensor], group, loss: LossSettings,
              miner: HardNegativeMiner | None = None, texts: list[TextGroup] | None = None
              ) -> tuple[torch.Tensor, dict, int]:
    """This rank's share of one task's loss (before CBB scaling) from the embeddings of task_texts,
    for mined retrieval tasks the scores of each example's negatives (mining_scores), and the number
    of false negatives left out (counted on the task's first rank where its ranks share queries)."""
    dims, weights = loss.dims, loss.weights
    device = embeddings[0].device
    if task.type == "retrieval" and task.split_queries:  # InfoNCE over every rank's positives and negatives
        q, p, neg = embeddings
        batch = rank_slice(global_batch, task.assigned.index(dist.get_rank()), len(task.assigned))
        candidates, labels = cbb.gathered_candidates(q, p, neg, group)
        exclude = cbb.false_negatives(candidate_ids(batch, texts, loss, device), labels, group)
        value = matryoshka(cbb.pairs_infonce, [q, candidates], dims, weights, labels=labels,
                           temperature=loss.temperature, exclude=exclude)
        scores = {}
        if miner:
            own = cbb.own_negative_scores(q.detach(), neg.detach(), task.num_negatives, 1)
            scores = mining_scores(miner, batch, own)
        return value, scores, count(exclude)
    if task.type == "retrieval":
        q, p, neg = embeddings
        neg_all = cbb.gather_negatives(neg, group)
        labels = torch.arange(q.shape[0], device=device)
        exclude = cbb.false_negatives(candidate_ids(global_batch, texts, loss, device), labels, group, gather_pos=False)
        value = matryoshka(cbb.retrieval_cbb, [q, p, neg_all], dims, weights, temperature=loss.temperature,
                           exclude=exclude)
        scores = {}
        if miner:  # the similarities the loss used, read back: no extra forward pass
            own = cbb.own_negative_scores(q.detach(), neg_all.detach(), task.negatives_per_rank, len(task.assigned))
            scores = mining_scores(miner, global_batch, own)
        return value, scores, count(exclude) if dist.get_rank() == task.assigned[0] else 0
    if task.type == "sts":  # gathered, so CoSENT orders all of the task's pairs, as one process would
        e1, e2 = (cbb.all_gather_with_grad(e, group) for e in embeddings)
        gold = torch.tensor([ex.score for ex in global_batch], device=e1.device)
        return matryoshka(cbb.sts_cosent, [e1, e2], dims, weights, gold=gold, scale=loss.cosent_scale), {}, 0
    if task.type == "classification":
        return matryoshka(cbb.classification, embeddings, dims, weights, temperature=loss.temperature), {}, 0
    q, p = embeddings  # pairs: in-batch negatives over the task's ranks
    batch = rank_slice(global_batch, task.assigned.index(dist.get_rank()), len(task.assigned))
    p_all, labels = cbb.gathered_candidates(q, p, None, group)
    exclude = cbb.false_negatives(candidate_ids(batch, texts, loss, device), labels, group)
    return matryoshka(cbb.pairs_infonce, [q, p_all], dims, weights, labels=labels, temperature=loss.temperature,
                      exclude=exclude), {}, count(exclude)


def count(exclude: torch.Tensor | None) -> int:
    return 0 if exclude is None else int(exclude.sum())


def step_loss(batches: dict[str, list], tasks: list[Task], encode: Callable, groups: dict, rank: int, world: int,
              loss: LossSettings, miners: dict[str, HardNegativeMiner]) -> StepResult:
    """sum over this rank's tasks of w_t * W / |R_t| * L_t, from ONE forward of all of their texts."""
    plans = [(t, task_texts(t, batches[t.name], rank, miners.get(t.name))) for t in tasks]
    embeddings, tokens = encode([g for _, texts in plans for g in texts])
    result = StepResult(total=torch.zeros((), device=embeddings[0].device), tokens=tokens)
    at = 0
    for task, texts in plans:
        value, scores, excluded = task_loss(task, batches[task.name], embeddings[at:at + len(texts)],
                                            groups[task.name], loss, miners.get(task.name), texts)
        at += len(texts)
        result.false_negatives += excluded
        result.total = result.total + cbb.task_scale(task.weight, world, len(task.assigned)) * value
        result.losses[task.name] = value
        result.scores[task.name] = scores
        result.sources += [ex.source for ex in batches[task.name]]
    return result
