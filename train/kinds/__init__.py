"""The task kinds of fine-tuning, one module each: its line format and parser, its stream, the texts
a rank encodes for a step and its loss (train/kinds/base.py says what each provides).

    retrieval       query, positive, hard negatives: InfoNCE_CBB        (kinds/retrieval.py)
    sts             sentence pairs with a score: CoSENT                (kinds/sts.py)
    classification  labelled texts: contrastive, no in-batch negatives (kinds/classification.py)
    pairs           query and positive: InfoNCE, in-batch negatives    (kinds/pairs.py)
"""
from __future__ import annotations

from train.kinds.base import LossSettings, TaskKind, TaskLoss
from train.kinds.classification import Classification
from train.kinds.pairs import Pairs
from train.kinds.retrieval import Retrieval
from train.kinds.sts import Sts

KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (Retrieval(), Sts(), Classification(), Pairs())}

__all__ = ["KINDS", "LossSettings", "TaskKind", "TaskLoss"]
