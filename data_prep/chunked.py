"""What the data_prep jobs that score lines with a model share: input of any size read in chunks, each
chunk's output appended and made durable, then a progress file recording how far it got, so a killed
run continues where it stopped (no duplicate, no hole, never half a line). filter_pairs.py and
score_teacher.py are built on it.

    job = ChunkedJob(output, inputs, settings={"threshold": 0.4}, counters={"kept": 0}, extra=[scores_path])
    with job.files() as (out, *extra):
        for chunk in job.chunks(chunk_size, parse, skip_bad):   # [(where, record) | None], from where it stopped
            ... out.write(...) ...
            job.commit(len(chunk), kept=...)                    # fsync, then the progress, atomically

Parts: a job split over machines (`--part I/N`, or one part per rank of a torchrun / deepspeed launch)
takes a contiguous run of the input's chunks, so part i's output is the lines the whole job would write
for them; each part writes and resumes OUTPUT/part-0000i-of-0000N.jsonl on its own, the folder is read
by the trainer as one data set, and `python data_prep/join_parts.py OUTPUT joined.jsonl` concatenates the
parts into the one-machine output, byte for byte, once every part is complete.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from train.input.records import DataError

CRASH_ENV = "CONAN_FILTER_CRASH_AFTER_CHUNK"  # test hook: die like SIGKILL after a chunk's output, before its progress


def read_chunks(paths: list[Path], chunk_size: int, start: int, parse: Callable[[str], dict], skip_bad: bool,
                skipped: list[str], stop: int | None = None) -> Iterator[list]:
    """Chunks of (where, record) from the global line `start` on (up to line `stop`); a blank or skipped line
    is a None (it still counts as consumed input); a bad line raises DataError naming file:line unless skip_bad."""
    chunk, index = [], 0
    for path in paths:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                index += 1
                if index <= start:
                    continue
                if stop is not None and index > stop:
                    break
                if not raw.strip():
                    chunk.append(None)
                else:
                    where = f"{path}:{line_no}"
                    try:
                        chunk.append((where, parse(raw.decode("utf-8"))))
                    except (UnicodeDecodeError, ValueError) as e:
                        err = f"{where}: {'not valid UTF-8' if isinstance(e, UnicodeDecodeError) else e}"
                        if not skip_bad:
                            raise DataError(err) from None
                        skipped.append(err)
                        chunk.append(None)
                if len(chunk) >= chunk_size:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


def part_of_run(arg: str | None) -> tuple[int, int] | None:
    """(index, count) of this process's part: --part I/N, else its rank among a launch's (RANK, WORLD_SIZE of
    torchrun or deepspeed: one part per rank), else None (the whole input)."""
    if arg:
        try:
            index, count = (int(x) for x in arg.split("/"))
        except ValueError:
            raise SystemExit(f"--part {arg}: expected I/N, e.g. 0/4") from None
        if not 0 <= index < count:
            raise SystemExit(f"--part {arg}: I must be between 0 and N - 1")
        return index, count
    world = int(os.environ.get("WORLD_SIZE", 1))
    return (int(os.environ.get("RANK", 0)), world) if world > 1 else None


def count_lines(paths: list[Path]) -> int:
    """Lines of the inputs (a last line without a newline counts), read in blocks: about 1 GB/s."""
    total = 0
    for path in paths:
        last = b"\n"
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                total += block.count(b"\n")
                last = block[-1:]
        total += last != b"\n"
    return total


def part_lines(paths: list[Path], chunk_size: int, part: tuple[int, int]) -> tuple[int, int]:
    """The global lines [start, stop) of part (i, n): a contiguous run of whole chunks, as even as chunks allow."""
    total = count_lines(paths)
    chunks = -(-total // chunk_size)
    i, n = part
    return min(total, i * chunks // n * chunk_size), min(total, (i + 1) * chunks // n * chunk_size)


def part_path(output: Path, part: tuple[int, int], suffix: str = ".jsonl") -> Path:
    return Path(output) / f"part-{part[0]:05d}-of-{part[1]:05d}{suffix}"


class ChunkedJob:
    """One resumable job: its inputs, its output (and extra outputs), its settings and counters, in
    OUTPUT.progress.json. A progress file of another job (other inputs or settings) is refused.
    `lines`: the global lines [start, stop) this job (a part) takes; None: all."""

    def __init__(self, output: Path, inputs: list[str], settings: dict, counters: dict, extra: list[Path | None] = (),
                 lines: tuple[int, int] | None = None):
        self.output, self.inputs, self.extra, self.lines = Path(output), inputs, list(extra), lines
        for p in inputs:
            if not Path(p).is_file():
                raise SystemExit(f"data error: {p}: no such file")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.progress = self.output.with_name(self.output.name + ".progress.json")
        if lines is not None:
            settings = {**settings, "lines": list(lines)}
        fresh = {"inputs": inputs, **settings, "lines_done": lines[0] if lines else 0, "output_bytes": 0,
                 "extra_bytes": [0] * len(self.extra), "chunks": 0, **counters}
        if self.progress.is_file():
            self.state = json.loads(self.progress.read_text())
            if any(self.state.get(k) != v for k, v in {"inputs": inputs, **settings}.items()):
                raise SystemExit(f"{self.progress}: an earlier run with other inputs or settings; delete it "
                                 f"(and {self.output}) to start over")
        else:
            self.state = fresh
        for path, size in zip([self.output, *self.extra], [self.state["output_bytes"], *self.state["extra_bytes"]]):
            if path is not None:
                path.touch()
                with open(path, "ab") as f:
                    f.truncate(size)  # drop anything written after the last recorded chunk
        self._files: list = []

    @property
    def resumed(self) -> bool:
        return self.state["lines_done"] > 0

    @contextmanager
    def files(self):
        """The output and extra outputs opened for appending (None for an extra not asked for); a bad
        line met inside stops the job with its file:line (what was committed stays)."""
        self._files = [open(p, "a", encoding="utf-8") if p is not None else None for p in [self.output, *self.extra]]
        try:
            yield self._files
        except DataError as e:
            raise SystemExit(f"data error: {e}\n(pass --skip-bad to skip and count such lines)") from None
        finally:
            for f in self._files:
                if f:
                    f.close()

    def chunks(self, chunk_size: int, parse: Callable[[str], dict], skip_bad: bool, skipped: list[str]) -> Iterator[list]:
        return read_chunks([Path(p) for p in self.inputs], chunk_size, self.state["lines_done"], parse, skip_bad, skipped,
                           self.lines[1] if self.lines else None)

    @property
    def complete(self) -> bool:
        return self.lines is not None and self.state["lines_done"] >= self.lines[1]

    def commit(self, lines: int, **counts) -> dict:
        """After a chunk's output is written: make it durable, then record the progress (atomically, so the
        progress always describes whole chunks). counts are added to the job's counters."""
        for f in self._files:
            if f:
                f.flush()
                os.fsync(f.fileno())
        if os.environ.get(CRASH_ENV) == str(self.state["chunks"] + 1):
            os._exit(137)
        for key, value in counts.items():
            self.state[key] = self.state[key] + value
        self.state["lines_done"] += lines
        self.state["output_bytes"] = self._files[0].tell()
        self.state["extra_bytes"] = [f.tell() if f else 0 for f in self._files[1:]]
        self.state["chunks"] += 1
        tmp = self.progress.with_name(self.progress.name + ".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.progress)
        return self.state


def open_part_job(output: Path, inputs: list[str], settings: dict, counters: dict, chunk_size: int,
                  part: tuple[int, int] | None, extra: list[Path | None] = ()) -> ChunkedJob:
    """The job of this process: the whole input into `output`, or its part into OUTPUT/part-I-of-N.jsonl
    (extra outputs beside it: EXTRA.part-I-of-N)."""
    if part is None:
        return ChunkedJob(output, inputs, settings, counters, extra)
    lines = part_lines([Path(p) for p in inputs], chunk_size, part)
    extra = [None if e is None else Path(f"{e}.part-{part[0]:05d}-of-{part[1]:05d}") for e in extra]
    return ChunkedJob(part_path(output, part), inputs, {**settings, "chunk_size": chunk_size}, counters, extra, lines)


def join_parts(folder: Path, output: Path) -> int:
    """Concatenate the complete parts of `folder` into `output` (the one-machine output); returns the lines.
    Refused, naming them, while a part is missing or unfinished."""
    folder = Path(folder)
    parts = sorted(folder.glob("part-*-of-*.jsonl"))
    if not parts:
        raise SystemExit(f"{folder}: no part-I-of-N.jsonl files")
    count = int(parts[0].stem.rsplit("-", 1)[1])
    expected = [part_path(folder, (i, count)) for i in range(count)]
    unfinished = []
    for path in expected:
        progress = path.with_name(path.name + ".progress.json")
        state = json.loads(progress.read_text()) if progress.is_file() else None
        if state is None or state["lines_done"] < state["lines"][1]:
            unfinished.append(path.name)
    if unfinished:
        raise SystemExit(f"{folder}: parts missing or unfinished: {', '.join(unfinished)}; run them (the same "
                         "command resumes a part) before joining")
    lines = 0
    with open(output, "wb") as out:
        for path in expected:
            with open(path, "rb") as f:
                size = json.loads(path.with_name(path.name + ".progress.json").read_text())["output_bytes"]
                copied = 0
                while copied < size and (block := f.read(min(1 << 24, size - copied))):
                    out.write(block)
                    lines += block.count(b"\n")
                    copied += len(block)
    return lines
