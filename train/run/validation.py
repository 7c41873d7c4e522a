"""Every line of the training data checked in parallel by the training loop's own parsers.

The core of `data_prep/validate.py` and of `--validate-data` in both training scripts. Files are cut
into byte ranges aligned to line starts and checked by worker processes; line numbers come back from
the per-chunk line counts, so every bad line is reported as file:line (1-based, blank lines counted,
as an editor shows them) with its reason.
"""
from __future__ import annotations

import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from train.kinds import KINDS as TASK_KINDS

KINDS = tuple(TASK_KINDS)  # each kind's line format and parser: train/kinds/


@dataclass
class Report:
    bad: list[tuple[str, int, str]] = field(default_factory=list)   # (file, line, reason), in file order
    lines: int = 0
    bytes: int = 0
    seconds: float = 0.0
    files: int = 0

    @property
    def by_reason(self) -> Counter:
        return Counter(reason_key(r) for _, _, r in self.bad)

    @property
    def by_file(self) -> Counter:
        return Counter(f for f, _, _ in self.bad)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def summary(self, shown: int = 20) -> str:
        head = (f"checked {self.lines:,} lines in {self.files} files ({self.bytes / 1e6:,.1f} MB) in "
                f"{self.seconds:.1f} s ({self.mb_per_s:,.0f} MB/s): ")
        if not self.bad:
            return head + "no bad lines"
        out = [head + f"{len(self.bad):,} bad lines", "by reason:"]
        out += [f"  {n:>9,}  {reason}" for reason, n in self.by_reason.most_common()]
        out.append("by file:")
        out += [f"  {n:>9,}  {f}" for f, n in self.by_file.most_common()]
        out.append(f"first {min(shown, len(self.bad))}:")
        out += [f"  {f}:{line}: {reason}" for f, line, reason in self.bad[:shown]]
        return "\n".join(out)


def reason_key(reason: str) -> str:
    """A reason without its particulars, for counting: "'pos[3]' is empty" -> "'pos[i]' is empty"."""
    reason = reason.split(" (", 1)[0]
    return re.sub(r"\[\d+\]", "[i]", re.sub(r"\d+ (scores|hard negatives)", r"N \1", reason))


def line_checker(kind: str, num_negatives: int = 0):
    """line (str) -> None, or ValueError with the reason: the training loop's own parser for `kind`."""
    make = TASK_KINDS[kind].parser(num_negatives)
    rng = random.Random(0)
    return lambda line: make(line, rng, "")


def check_chunk(job: tuple[str, int, int, str, int]) -> tuple[int, int, list[tuple[int, str]]]:
    """Lines that start in [start, end) of one file -> (lines, bytes read, [(index in chunk, reason)])."""
    path, start, end, kind, num_negatives = job
    check = line_checker(kind, num_negatives)
    with open(path, "rb") as f:
        skip_partial = False
        if start > 0:
            f.seek(start - 1)
            skip_partial = f.read(1) != b"\n"  # the line that straddles `start` belongs to the previous chunk
        data = f.read(end - start)
        if data and not data.endswith(b"\n"):
            data += f.readline()  # finish the last line that starts in this chunk
    if skip_partial:
        cut = data.find(b"\n")
        data = b"" if cut < 0 else data[cut + 1:]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    bad = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            check(raw.rstrip(b"\r").decode("utf-8"))
        except UnicodeDecodeError:
            bad.append((i, "not valid UTF-8"))
        except ValueError as e:
            bad.append((i, str(e)))
    return len(lines), len(data), bad


def chunks(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    size = path.stat().st_size
    return [(s, min(s + chunk_bytes, size)) for s in range(0, size, chunk_bytes)] or [(0, 0)]


def validate(files: list[tuple[Path, str, int]], workers: int = 0, chunk_mb: float = 64) -> Report:
    """files: (path, kind, num_negatives). Every line of every file, checked in `workers` processes."""
    started = time.perf_counter()
    jobs, owners = [], []
    for path, kind, num_negatives in files:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
        for start, end in chunks(path, max(1, int(chunk_mb * (1 << 20)))):
            jobs.append((str(path), start, end, kind, num_negatives))
            owners.append(path)
    workers = workers or min(os.cpu_count() or 1, len(jobs))
    if workers > 1 and len(jobs) > 1:
        with get_context("spawn").Pool(workers) as pool:  # spawn: safe beside torch / gloo threads
            results = pool.map(check_chunk, jobs, chunksize=1)
    else:
        results = [check_chunk(job) for job in jobs]
    report = Report(files=len(files))
    lines_before: Counter = Counter()
    for path, (n_lines, n_bytes, bad) in zip(owners, results):  # chunks are in file order
        report.bad += [(str(path), lines_before[path] + i + 1, reason) for i, reason in bad]
        lines_before[path] += n_lines
        report.lines += n_lines
        report.bytes += n_bytes
    report.seconds = time.perf_counter() - started
    return report
