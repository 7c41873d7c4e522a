"""Classification: labelled texts; contrastive without in-batch negatives (Conan-embedding §2.3).

    {"text": str, "label": str | int}

Each text is trained against one other text of its label (the positive) and num_negatives texts of
other labels, all encoded with the query prompt (a symmetric task). Files are read whole (labelled
sets, not web corpora), because each text needs a same-label text and other-label texts.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

from train.input.data import JsonlStream, pair_length
from train.losses.classification import classification
from train.losses.matryoshka import matryoshka
from train.input.records import DataError, Example, json_object, read_examples, text_field
from train.kinds.base import LossSettings, TaskKind, TaskLoss, own_slice


def parse_labelled(line: str, rng: random.Random, source: str) -> tuple[str, str, str]:
    obj = json_object(line, "text", "label")
    label = obj["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ValueError(f"'label' must be a string or an integer, got {label!r}")
    return text_field(obj["text"], "text"), str(label), source


@dataclass
class ClassificationStream(JsonlStream):
    """Each text with one other text of its label (positive) and texts of other labels (negatives)."""
    num_negatives: int = 1
    singletons: int = field(default=0, init=False)   # texts whose label has no other text: unusable

    def _records(self) -> list[tuple[str, str, str]]:
        if not hasattr(self, "_cache"):
            skipped = self.skipped if self.skip_bad_lines else None
            rows = [r for p in self.paths for r in read_examples(p, parse_labelled, random.Random(0), skipped)]
            by_label = defaultdict(list)
            for text, label, _ in rows:
                by_label[label].append(text)
            if len(by_label) < 2:
                raise DataError(f"{', '.join(map(str, self.paths))}: classification needs at least 2 labels, "
                                f"found {len(by_label)}")
            usable = [r for r in rows if len(by_label[r[1]]) > 1]
            self.singletons = len(rows) - len(usable)
            self._cache = (usable, dict(by_label))
        return self._cache

    def source(self, epoch: int, rng: random.Random, state: dict | None = None) -> "LabelledSource":
        rows, by_label = self._records()
        order = list(range(len(rows)))
        random.Random(f"{self.seed}-{epoch}-order").shuffle(order)
        return LabelledSource(rows, by_label, order, rng, self.num_negatives, state["next"] if state else 0)

    def batches_per_epoch(self) -> int:
        return len(self._records()[0]) // self.global_batch


@dataclass
class LabelledSource:
    """One epoch of a classification set in shuffled order; its state is how far it got."""
    rows: list[tuple[str, str, str]]
    by_label: dict[str, list[str]]
    order: list[int]
    rng: random.Random
    num_negatives: int
    next: int = 0

    def __iter__(self):
        return self

    def __post_init__(self):
        self.labels = sorted(self.by_label)
        self.label_index = {label: i for i, label in enumerate(self.labels)}

    def __next__(self) -> Example:
        if self.next >= len(self.order):
            raise StopIteration
        text, label, source = self.rows[self.order[self.next]]
        self.next += 1
        negatives = [self.rng.choice(self.by_label[self.other_label(label)]) for _ in range(self.num_negatives)]
        return Example(text, self.positive(text, label), negatives, source)

    # both in O(1) per example (a scan of the label's texts would make an epoch O(N^2) on big labels)
    def positive(self, text: str, label: str) -> str:
        """Another text of the same label (a duplicate of `text` only if the label holds nothing else)."""
        texts = self.by_label[label]
        for _ in range(8):
            other = self.rng.choice(texts)
            if other != text:
                return other
        return self.rng.choice([t for t in texts if t != text] or texts)

    def other_label(self, label: str) -> str:
        k = self.rng.randrange(len(self.labels) - 1)
        return self.labels[k + (k >= self.label_index[label])]

    def state_dict(self) -> dict:
        return {"next": self.next}

    def close(self) -> None:
        pass


class Classification(TaskKind):
    name = "classification"
    mteb_types = ("Classification", "Clustering", "MultilabelClassification")
    symmetric = True
    line_format = '{"text", "label"}'
    needs_negatives = True

    def parser(self, num_negatives: int = 0, sample: bool = True):
        return parse_labelled

    def stream(self, task, **common):
        return ClassificationStream(task.files, task.batch_size, make=parse_labelled, length=pair_length,
                                    num_negatives=task.num_negatives, **common)

    def ready(self, stream) -> None:
        stream._records()  # read now: bad lines and too few labels stop the run before training

    def texts(self, task, global_batch, rank, miner=None):
        batch, qp = own_slice(task, global_batch, rank), task.query_prompt
        return [([ex.query for ex in batch], qp), ([ex.pos for ex in batch], qp), ([t for ex in batch for t in ex.neg], qp)]

    def loss(self, task, global_batch, embeddings, group, settings: LossSettings, miner=None, texts=None) -> TaskLoss:
        return TaskLoss(matryoshka(classification, embeddings, settings.dims, settings.weights,
                                   temperature=settings.temperature))
