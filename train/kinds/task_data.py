"""Fine-tuning data: one global-batch stream per task, opened by the task's kind (train/kinds/, which
holds each kind's line format), with the first line of every file checked before training, and
read epoch after epoch from a saved position.
"""
from __future__ import annotations

import random
from typing import Iterator

from train.input.data import JsonlStream
from train.kinds import KINDS
from train.input.records import DataError
from train.kinds.tasks import Task


def check_first_line(stream: JsonlStream, task: Task) -> None:
    """Parse the first line of every file now, so a file of the wrong shape stops before training."""
    for path in stream.paths:
        with open(path, "rb") as f:
            line_no, raw = next(((i, r) for i, r in enumerate(f, 1) if r.strip()), (0, b""))
        try:
            stream.make(raw.decode("utf-8"), random.Random(0), f"{path}:{line_no}")
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(f"{path}:{line_no}: {e}; a {task.type} task expects lines like "
                            f"{KINDS[task.type].line_format}") from None


def task_stream(task: Task, seed: int, max_chars: int, skip_bad_lines: bool, **options) -> JsonlStream:
    """The global-batch stream of one task (every rank of the task reads the same one); `options`:
    JsonlStream's shuffling and grouping settings (group_buffer, shuffle_buffer, shard_bytes, open_shards)."""
    common = dict(seed=seed, max_chars=max_chars, skip_bad_lines=skip_bad_lines, **options)
    try:
        kind = KINDS[task.type]
        stream = kind.stream(task, **common)
        check_first_line(stream, task)
        kind.ready(stream)
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


__all__ = ["task_stream", "task_batches"]
