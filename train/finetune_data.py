"""Fine-tuning data: one stream per task, in the formats FlagEmbedding and C-MTEB users have.

    retrieval, pairs   {"query": str, "pos": [str], "neg": [str]}      (train.data.PairStream)
    sts                {"sentence1": str, "sentence2": str, "score": number}
    classification     {"text": str, "label": str | int}

Classification files are read whole (they are small: labelled sets, not web corpora), because
each text needs a same-label text as its positive and other-label texts as its negatives.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

from .data import JsonlStream, PairStream
from .records import DataError, Example, SkipReport, _text, json_object, read_examples
from .tasks import Task


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
    return StsExample(_text(obj["sentence1"], "sentence1"), _text(obj["sentence2"], "sentence2"), float(score), source)


def sts_length(ex: StsExample, cap: int) -> tuple[int, int]:
    return min(max(len(ex.sentence1), len(ex.sentence2)), cap), 0


def parse_labelled(line: str, rng: random.Random, source: str) -> tuple[str, str, str]:
    obj = json_object(line, "text", "label")
    label = obj["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ValueError(f"'label' must be a string or an integer, got {label!r}")
    return _text(obj["text"], "text"), str(label), source


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


EXPECTED = {"retrieval": '{"query", "pos": [...], "neg": [...]}', "pairs": '{"query", "pos"}',
            "sts": '{"sentence1", "sentence2", "score"}', "classification": '{"text", "label"}'}


def check_first_line(stream: JsonlStream, task: Task) -> None:
    """Parse the first line of every file now, so a file of the wrong shape stops before training."""
    for path in stream.paths:
        with open(path, "rb") as f:
            line_no, raw = next(((i, r) for i, r in enumerate(f, 1) if r.strip()), (0, b""))
        try:
            stream.make(raw.decode("utf-8"), random.Random(0), f"{path}:{line_no}")
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(f"{path}:{line_no}: {e}; a {task.type} task expects lines like {EXPECTED[task.type]}") from None


def task_stream(task: Task, seed: int, max_chars: int, skip_bad_lines: bool, **options) -> JsonlStream:
    """The global-batch stream of one task (every rank of the task reads the same one); `options`:
    JsonlStream's shuffling and grouping settings (group_buffer, shuffle_buffer, shard_bytes, open_shards)."""
    common = dict(seed=seed, max_chars=max_chars, skip_bad_lines=skip_bad_lines, **options)
    try:
        if task.type in ("retrieval", "pairs"):
            stream = PairStream(task.files, task.batch_size, num_negatives=task.num_negatives,
                                sample_negatives=task.mining is None, **common)
            check_first_line(stream, task)
            return stream
        if task.type == "sts":
            stream = JsonlStream(task.files, task.batch_size, make=make_sts, length=sts_length, **common)
            check_first_line(stream, task)
            return stream
        from .data import pair_length
        stream = ClassificationStream(task.files, task.batch_size, make=parse_labelled, length=pair_length,
                                      num_negatives=task.num_negatives, **common)
        check_first_line(stream, task)
        stream._records()  # read now: bad lines and too few labels stop the run before training
        return stream
    except DataError as e:
        raise DataError(f"task '{task.name}': {e}") from None


def task_batches(stream: JsonlStream, position: dict) -> Iterator[list]:
    """A task's global batches forever, epoch after epoch, from `position` ({"epoch": 0, "batch": 0}
    or one a checkpoint saved). `position` is kept up to date as batches are taken."""
    while True:
        yield from stream.batches(position)
        epoch = position["epoch"] + 1
        position.clear()
        position.update(epoch=epoch, batch=0)


__all__ = ["StsExample", "ClassificationStream", "task_stream", "task_batches", "SkipReport"]
