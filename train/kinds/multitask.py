"""One CBB step of multi-task fine-tuning (Conan-embedding §2.3): the texts each of this rank's tasks
needs, one forward for all of them, and each task's loss from its slice of the embeddings, scaled so
that DeepSpeed's gradient average is grad(sum_t w_t L_t) (losses/cbb.py).

What a task's texts and loss are is its kind's (train/kinds/); this module only routes texts and
embeddings between the tasks a rank holds and the ranks a task spans.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from train.losses.distributed import LOCAL
from train.step.encoding import TextGroup
from train.kinds import KINDS, LossSettings
from train.losses.cbb import task_scale
from train.step.mining import HardNegativeMiner
from train.kinds.tasks import Task


@dataclass
class StepResult:
    total: torch.Tensor                                     # sum of this rank's CBB-scaled task losses
    losses: dict[str, torch.Tensor] = field(default_factory=dict)   # unscaled, per task
    scores: dict[str, dict] = field(default_factory=dict)           # mined tasks: {id: (score, pool size, S0)}
    tokens: int = 0
    sources: list[str] = field(default_factory=list)
    false_negatives: int = 0                                # candidates left out as copies of a query's positive
    guarded: int = 0                                        # ... and by the score guard


def task_groups(tasks: list[Task], timeout: timedelta | None = None) -> dict:
    """One process group per task (every rank creates every group, in the same order), waiting `timeout`
    for a lost rank as the default group does (torch gives a new group its backend's default otherwise:
    NCCL's is 10 minutes, whatever --dist-timeout says)."""
    world = dist.get_world_size()
    return {t.name: LOCAL if len(t.assigned) == 1 else dist.new_group(t.assigned, timeout=timeout)
            if len(t.assigned) < world else None for t in tasks}


def tasks_this_step(tasks: list[Task], rank: int, step: int, schedule: str, seed: int) -> list[Task]:
    if schedule == "random":  # the same draw on every rank: one task for the whole step
        return [tasks[random.Random(f"{seed}-schedule-{step}").randrange(len(tasks))]]
    return [t for t in tasks if rank in t.assigned]


def task_texts(task: Task, global_batch: list, rank: int, miner: HardNegativeMiner | None = None) -> list[TextGroup]:
    """The text groups this rank encodes for one task (its kind's), in the order its loss reads them."""
    return KINDS[task.type].texts(task, global_batch, rank, miner)


def step_loss(batches: dict[str, list], tasks: list[Task], encode: Callable, groups: dict, rank: int, world: int,
              loss: LossSettings, miners: dict[str, HardNegativeMiner]) -> StepResult:
    """sum over this rank's tasks of w_t * W / |R_t| * L_t, from ONE forward of all of their texts."""
    plans = [(t, task_texts(t, batches[t.name], rank, miners.get(t.name))) for t in tasks]
    embeddings, tokens = encode([g for _, texts in plans for g in texts])
    result = StepResult(total=torch.zeros((), device=embeddings[0].device), tokens=tokens)
    at = 0
    for task, texts in plans:
        part = KINDS[task.type].loss(task, batches[task.name], embeddings[at:at + len(texts)], groups[task.name],
                                     loss, miners.get(task.name), texts)
        at += len(texts)
        result.false_negatives += part.false_negatives
        result.guarded += part.guarded
        result.total = result.total + task_scale(task.weight, world, len(task.assigned)) * part.value
        result.losses[task.name] = part.value
        result.scores[task.name] = part.scores
        result.sources += [ex.source for ex in batches[task.name]]
    return result
