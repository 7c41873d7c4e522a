"""What the data_prep jobs that score lines with a model share: input of any size read in chunks, each
chunk's output appended and made durable, then a progress file recording how far it got, so a killed
run continues where it stopped (no duplicate, no hole, never half a line). filter_pairs.py and
score_teacher.py are built on it.

    job = ChunkedJob(output, inputs, settings={"threshold": 0.4}, counters={"kept": 0}, extra=[scores_path])
    with job.files() as (out, *extra):
        for chunk in job.chunks(chunk_size, parse, skip_bad):   # [(where, record) | None], from where it stopped
            ... out.write(...) ...
            job.commit(len(chunk), kept=...)                    # fsync, then the progress, atomically
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
                skipped: list[str]) -> Iterator[list]:
    """Chunks of (where, record) from the global line `start` on; a blank or skipped line is a None (it still
    counts as consumed input); a bad line raises DataError naming file:line unless skip_bad."""
    chunk, index = [], 0
    for path in paths:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                index += 1
                if index <= start:
                    continue
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


class ChunkedJob:
    """One resumable job: its inputs, its output (and extra outputs), its settings and counters, in
    OUTPUT.progress.json. A progress file of another job (other inputs or settings) is refused."""

    def __init__(self, output: Path, inputs: list[str], settings: dict, counters: dict, extra: list[Path | None] = ()):
        self.output, self.inputs, self.extra = Path(output), inputs, list(extra)
        for p in inputs:
            if not Path(p).is_file():
                raise SystemExit(f"data error: {p}: no such file")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.progress = self.output.with_name(self.output.name + ".progress.json")
        fresh = {"inputs": inputs, **settings, "lines_done": 0, "output_bytes": 0, "extra_bytes": [0] * len(self.extra),
                 "chunks": 0, **counters}
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
        return read_chunks([Path(p) for p in self.inputs], chunk_size, self.state["lines_done"], parse, skip_bad, skipped)

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
