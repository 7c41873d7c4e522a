"""Streaming pair data: JSONL files -> validated examples -> length-grouped global batches -> a rank's slice.

Formats and line validation: train/input/records.py.

Every rank reads the same deterministic global stream and keeps its own slice of each global batch,
so ranks always agree on the number of steps, no example is seen twice in an epoch, and a bad line
stops every rank at the same step with the same message. Files are never loaded whole: examples are
read lazily, mixed across files in proportion to what is left of each, and grouped by length inside
a bounded buffer so little compute goes to padding.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from train.input.records import DataError, Example, SkipReport, pair_maker, parse_line


@dataclass(frozen=True)
class Shard:
    """A byte range of one file: it owns the lines that start in [start, end)."""
    file: int          # index into the stream's paths
    start: int
    end: int
    first_line: int    # 1-based number of its first line (for file:line messages)
    lines: int         # lines that start in the range, blank ones too


def index_shards(file: int, path: Path, shard_bytes: int, chunk: int = 1 << 20) -> list[Shard]:
    """Cut a file into byte ranges of `shard_bytes` and count the lines that start in each: one
    sequential read (1 MiB chunks, no parsing), so a huge file is shuffled in pieces and a reader can
    start at any shard with its true line numbers."""
    size, step = path.stat().st_size, max(1, shard_bytes)
    bounds = list(range(0, size, step)) + [size]
    starts_at = [0] * (len(bounds) - 1)
    if size:
        starts_at[0] = 1  # the first line
    pos, last = 0, b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            # a newline at p starts a line at p + 1, which shard (p + 1) // step owns
            for k in range(pos // step, min((pos + len(block)) // step + 1, len(starts_at))):
                lo, hi = max(k * step - 1 - pos, 0), min((k + 1) * step - 1 - pos, len(block))
                if lo < hi:
                    starts_at[k] += block.count(b"\n", lo, hi)
            pos, last = pos + len(block), block[-1:]
    if last == b"\n" and size % step:  # a final newline starts no line (counted above unless it ends a range)
        starts_at[-1] -= 1
    shards, line = [], 1
    for k, n in enumerate(starts_at):
        if n:
            shards.append(Shard(file, bounds[k], bounds[k + 1], line, n))
        line += n
    return shards


class ShardReader:
    """The lines of one shard, from a byte offset on; (shard, offset, line, left) is all its state."""

    def __init__(self, path: Path, shard_id: int, shard: Shard, offset: int | None = None,
                 line_no: int | None = None, left: int | None = None):
        self.path, self.shard_id = path, shard_id
        self.file = open(path, "rb")
        if offset is None:  # the first line that starts at or after shard.start
            if shard.start:
                self.file.seek(shard.start - 1)
                self.file.readline()
            offset = self.file.tell()
        self.file.seek(offset)
        self.offset, self.line_no = offset, shard.first_line if line_no is None else line_no
        self.left = shard.lines if left is None else left

    def next_line(self) -> tuple[bytes, int]:
        raw = self.file.readline()
        line_no = self.line_no
        self.offset, self.line_no, self.left = self.offset + len(raw), line_no + 1, self.left - 1
        return raw, line_no

    def state(self) -> list[int]:
        return [self.shard_id, self.offset, self.line_no, self.left]


class ShardMixer:
    """The examples of one epoch: shards in a seeded random order, `open_shards` of them read at once,
    each drawn in proportion to the lines it has left (files of different sizes and the parts of one
    big file are spread over the whole epoch). At most `open_shards` files are open. Its state is
    which shard opens next and each open reader's byte offset, so a resume seeks to where it was
    instead of re-reading what was trained on."""

    def __init__(self, stream: "JsonlStream", order: list[int], rng: random.Random, state: dict | None = None):
        self.stream, self.order, self.rng = stream, order, rng
        self.skipped = stream.skipped if stream.skip_bad_lines else None
        self.next = state["next"] if state else 0
        self.readers = [self._reader(*r) for r in state["open"]] if state else []
        self._fill()

    def _reader(self, shard_id: int, *position) -> ShardReader:
        shard = self.stream.shards[shard_id]
        return ShardReader(self.stream.paths[shard.file], shard_id, shard, *position)

    def _fill(self) -> None:
        while len(self.readers) < max(1, self.stream.open_shards) and self.next < len(self.order):
            self.readers.append(self._reader(self.order[self.next]))
            self.next += 1

    def __iter__(self):
        return self

    def __next__(self):
        while self.readers:
            r = self.rng.random() * sum(reader.left for reader in self.readers)
            i = 0
            while i < len(self.readers) - 1 and r >= self.readers[i].left:
                r -= self.readers[i].left
                i += 1
            reader = self.readers[i]
            raw, line_no = reader.next_line()
            if reader.left <= 0 or not raw:  # the shard is done: the next one takes its place
                reader.file.close()
                self.readers.pop(i)
                self._fill()
            example = parse_line(raw, self.stream.make, self.rng, f"{reader.path}:{line_no}", self.skipped) if raw else None
            if example is not None:
                return example
        raise StopIteration

    def state_dict(self) -> dict:
        return {"next": self.next, "open": [r.state() for r in self.readers]}

    def close(self) -> None:
        for reader in self.readers:
            reader.file.close()


def pair_length(ex: Example, cap: int) -> tuple[int, int]:
    # queries and passages are padded separately: group by passage length (most of the compute),
    # then query length; measured on the demo data: 26% padding vs 59% ungrouped
    return min(len(ex.pos), cap), min(len(ex.query), cap)


@dataclass
class JsonlStream:
    """Deterministic global batches of one epoch over JSONL files; the same on every rank.

    `make(line, rng, source)` turns a line into an example (ValueError: the line is bad) and
    `length(example, cap)` is the key examples are grouped by.

    Per epoch: the shards of every file in a new order (ShardMixer), then blocks of `shuffle_buffer`
    examples, each shuffled, sorted by length in groups of `group_buffer` global batches, cut into
    batches that are served in random order. A position ({"epoch", "batch", "block", "served"}) is
    the block's start (RNG state, byte offsets) plus the batches served from it, so resuming re-reads
    at most one block, whatever the size of the corpus.
    """
    paths: list[Path]
    global_batch: int
    make: Callable
    length: Callable
    seed: int = 42
    group_buffer: int = 64        # global batches sorted together by length; 1 = no grouping
    shuffle_buffer: int = 0       # examples shuffled together (0: group_buffer global batches)
    shard_bytes: int = 64 << 20   # files are shuffled in byte ranges of this size
    open_shards: int = 16         # shards read at once (and files open at once)
    skip_bad_lines: bool = False
    max_chars: int = 512          # lengths past the truncation point do not add padding
    indexer: Callable = index_shards  # (file, path, shard_bytes) -> shards; training shares one across ranks
    shards: list[Shard] = field(init=False)
    sizes: list[int] = field(init=False)
    skipped: SkipReport = field(default_factory=SkipReport)
    dropped: int = 0

    def __post_init__(self):
        self.paths = [Path(p) for p in self.paths]
        if not self.paths:
            raise DataError("no training files were given")
        for p in self.paths:
            if not p.is_file():
                raise DataError(f"{p}: no such file")
        self.shards = [s for i, p in enumerate(self.paths) for s in self.indexer(i, p, self.shard_bytes)]
        self.sizes = [0] * len(self.paths)  # lines per file, in one pass (a corpus may have thousands of files)
        for shard in self.shards:
            self.sizes[shard.file] += shard.lines
        for p, n in zip(self.paths, self.sizes):
            if n == 0:
                raise DataError(f"{p}: the file is empty")
        if self.global_batch <= 0:
            raise DataError(f"global batch size must be positive, got {self.global_batch}")

    @property
    def num_lines(self) -> int:
        return sum(self.sizes)

    @property
    def block_size(self) -> int:
        b = self.global_batch
        return max(self.shuffle_buffer or b * self.group_buffer, b) // b * b

    def batches_per_epoch(self) -> int:
        """Upper bound from line counts (exact when no line is skipped)."""
        return self.num_lines // self.global_batch

    def source(self, epoch: int, rng: random.Random, state: dict | None = None):
        """The epoch's examples in reading order, resumable from `state` (its state_dict())."""
        order = list(range(len(self.shards)))
        random.Random(f"{self.seed}-{epoch}-shards").shuffle(order)
        return ShardMixer(self, order, rng, state)

    def epoch(self, epoch: int) -> Iterator[list]:
        """Global batches of `epoch` from its start."""
        return self.batches({"epoch": epoch, "batch": 0})

    def batches(self, position: dict) -> Iterator[list]:
        """The rest of position['epoch'] from `position`, which is kept up to date as batches are
        taken: it is what a checkpoint saves. The last partial batch is dropped (counted in `dropped`)."""
        if position.get("batch") and "block" not in position:  # a position that only counts batches
            skip, position["batch"] = position["batch"], 0
            batches = self.batches(position)
            for _ in zip(range(skip), batches):
                pass
            yield from batches
            return
        rng = random.Random(f"{self.seed}-{position['epoch']}")
        block = position.get("block")
        if block:
            rng.setstate(block["rng"])
        source, skip = self.source(position["epoch"], rng, block and block["source"]), position.get("served", 0)
        self.dropped = 0
        try:
            while True:
                position.update(block={"rng": rng.getstate(), "source": source.state_dict()}, served=skip)
                examples = list(itertools.islice(source, self.block_size))
                batches = self.group(examples, rng)
                self.dropped = len(examples) % self.global_batch
                for i, batch in enumerate(batches[skip:], start=skip + 1):
                    position.update(served=i, batch=position["batch"] + 1)
                    yield batch
                if len(examples) < self.block_size:
                    return
                skip = 0
        finally:
            source.close()

    def group(self, examples: list, rng: random.Random) -> list[list]:
        """One block -> global batches: shuffled, sorted by length within groups of `group_buffer`
        batches (little padding), cut, and served in random order."""
        rng.shuffle(examples)
        b, per_group = self.global_batch, self.global_batch * self.group_buffer
        full = len(examples) - len(examples) % b
        batches = []
        for g in range(0, full, per_group):
            part = examples[g:min(g + per_group, full)]
            if self.group_buffer > 1:
                part.sort(key=lambda ex: self.length(ex, self.max_chars))
            batches += [part[i:i + b] for i in range(0, len(part), b)]
        rng.shuffle(batches)
        return batches


def PairStream(paths: list[Path], global_batch: int, num_negatives: int = 0, sample_negatives: bool = True,
               need_scores: bool = False, **kwargs) -> JsonlStream:
    """The stream of {query, pos[, neg[, neg_pool]]} examples (need_scores: with a teacher's scores, for distillation)."""
    return JsonlStream(paths, global_batch, make=pair_maker(num_negatives, sample_negatives, need_scores),
                       length=pair_length, **kwargs)


def rank_slice(global_batch: list[Example], rank: int, world: int) -> list[Example]:
    """This rank's contiguous share of a global batch."""
    per_rank = len(global_batch) // world
    return global_batch[rank * per_rank:(rank + 1) * per_rank]
