"""What every task kind of fine-tuning provides (one module per kind beside this one, as
sentence-transformers has one file per loss): its line format, its stream, the texts a rank encodes
for a step, and the loss over their embeddings. train/kinds/multitask.py loops over a step's tasks and asks
each task's kind; a new kind is one new module, registered in train/kinds/__init__.py.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from train.step.encoding import TextGroup
from train.losses.infonce import TextIds
from train.losses.text_ids import retrieval_ids

if TYPE_CHECKING:
    from train.input.data import JsonlStream
    from train.step.mining import HardNegativeMiner
    from train.kinds.tasks import Task


@dataclass
class LossSettings:
    """The loss options every kind may read, from the command line (train/args.py)."""
    temperature: float = 0.02
    cosent_scale: float = 20.0
    dims: list[int] | None = None         # Matryoshka dims (None: the full width only)
    weights: list[float] | None = None
    mask_false_negatives: bool = True     # leave copies of a query's positive out of its InfoNCE denominator
    false_negative_margin: float | None = None  # and candidates scoring above the positive by more (score guard)


@dataclass
class TaskLoss:
    """One task's share of a step on this rank, before CBB scaling."""
    value: torch.Tensor
    scores: dict = field(default_factory=dict)   # mined tasks: {example id: (Si, pool size, S0)}
    false_negatives: int = 0                     # candidates left out as copies of a query's positive
    guarded: int = 0                             # ... and by the score guard (--false-negative-margin)


class TaskKind:
    """A task kind; subclasses set the class attributes and implement the four methods."""
    name: str = ""
    line_format: str = ""                # one line of its JSONL, as the error messages show it
    default_weight: float = 1.0          # w_t in L = sum_t w_t L_t (the config's `weight` overrides it)
    needs_negatives: bool = False        # the config must give num_negatives >= 1
    min_batch: int = 1                   # the smallest batch_size its loss is defined for
    shares_queries: bool = False         # under CBB every rank of the task holds all its queries (retrieval)
    minable: bool = False                # dynamic hard-negative mining applies (train/step/mining.py)
    mteb_types: tuple[str, ...] = ()     # the C-MTEB task types it trains for: the release's prompt names
    symmetric: bool = False              # both sides encoded with the query prompt (STS, classification)

    def release_prompts(self, query_prompt: str, passage_prompt: str) -> dict[str, str]:
        """Prompts under the names mteb looks up by task type ("Retrieval-query", "STS", ...), so
        `encode(..., prompt_name=...)` and eval/cmteb.py use the instruction training used."""
        if self.symmetric:
            return dict.fromkeys(self.mteb_types, query_prompt)
        return {f"{t}-{side}": prompt for t in self.mteb_types
                for side, prompt in (("query", query_prompt), ("document", passage_prompt))}

    def parser(self, num_negatives: int = 0, sample: bool = True) -> Callable[[str, random.Random, str], object]:
        """line -> example (ValueError with the reason for a bad line): the training loop's own parser,
        which data_prep/validate.py and --validate-data run too."""
        raise NotImplementedError

    def stream(self, task: Task, **common) -> JsonlStream:
        """The task's global-batch stream (every rank of the task reads the same one)."""
        raise NotImplementedError

    def ready(self, stream: JsonlStream) -> None:
        """Called once the stream's first lines have been checked: read what must be read before training."""

    def texts(self, task: Task, global_batch: list, rank: int, miner: HardNegativeMiner | None = None) -> list[TextGroup]:
        """The text groups this rank encodes for the task in a step, with their prompts, in the order
        `loss` reads their embeddings."""
        raise NotImplementedError

    def loss(self, task: Task, global_batch: list, embeddings: list[torch.Tensor], group, settings: LossSettings,
             miner: HardNegativeMiner | None = None, texts: list[TextGroup] | None = None) -> TaskLoss:
        raise NotImplementedError


def own_slice(task: Task, global_batch: list, rank: int) -> list:
    """This rank's contiguous share of a task's global batch (the task's ranks split it evenly)."""
    from train.input.data import rank_slice
    return rank_slice(global_batch, task.assigned.index(rank), len(task.assigned))


def candidate_ids(examples: list, texts: list[TextGroup] | None, settings: LossSettings, device) -> TextIds | None:
    """What finds a query's false negatives: the ids of each example's positives and of the positive and
    negative texts this rank encoded for them (texts' groups 1 and 2); None with the mask off."""
    if not (settings.mask_false_negatives and texts):
        return None
    return retrieval_ids(examples, texts[1][0], texts[2][0] if len(texts) > 2 else (), device)


def with_score_guard(exclude, q, candidates, labels, settings: LossSettings):
    """(exclude with the score guard's candidates added, how many it added); unchanged without a margin."""
    from train.losses.infonce import guarded, score_guard
    if settings.false_negative_margin is None:
        return exclude, 0
    return guarded(exclude, score_guard(q, candidates, labels, settings.false_negative_margin))


def count(exclude: torch.Tensor | None) -> int:
    return 0 if exclude is None else int(exclude.sum())
