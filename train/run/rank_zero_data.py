"""Input data that rank 0 reads once and every rank receives: the --validate-data verdict and the
shard index of each training file. Rank 0 does the reading; a broadcast gives every rank the same
answer (or the same error), so no rank trains on data another rejected, and none waits forever.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from train.input import data
from train.run.cluster import from_rank_zero
from train.input.data import DataError, Shard


def validate_data(files: list[tuple[Path, str, int]], skip_bad_lines: bool) -> None:
    """--validate-data: rank 0 checks every line with all its cores (train/run/validation.py) before any
    model loads, and every rank gets the verdict: all stop with the same file:line list, or with
    --skip-bad-lines all go on knowing how many lines training will skip. (The other ranks wait in
    the broadcast, within --dist-timeout.)"""
    from train.run.validation import validate

    def check() -> tuple[int, str]:
        report = validate(files)
        return len(report.bad), report.summary()
    n_bad, summary = from_rank_zero(check)
    if n_bad and not skip_bad_lines:
        raise SystemExit(f"data error: --validate-data: {summary}\n(every bad line: python data_prep/validate.py "
                         f"... --report bad.tsv; or train with --skip-bad-lines)")
    if dist.get_rank() == 0:
        print(summary + (f"; --skip-bad-lines: those {n_bad} lines will be skipped and counted" if n_bad else ""),
              flush=True)


def shared_index(cache_dir: Path) -> Callable:
    """A shard indexer for JsonlStream (train.input.data.index_shards) that reads each file once per run,
    not once per rank: rank 0 indexes it, or loads the index an earlier start of this run saved in
    `cache_dir` (same path, size, mtime and shard size), and sends it to every rank. An error on
    rank 0 reaches every rank, so none waits in the broadcast."""
    def index(file: int, path: Path, shard_bytes: int) -> list[Shard]:
        def read_or_load() -> list[list[int]]:
            try:
                st = path.stat()
                key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{shard_bytes}".encode()).hexdigest()
                cached = cache_dir / f"{key}.json"
                if cached.is_file():
                    return json.loads(cached.read_text())
                rows = [[s.start, s.end, s.first_line, s.lines] for s in data.index_shards(file, path, shard_bytes)]
                cache_dir.mkdir(parents=True, exist_ok=True)
                cached.with_suffix(".tmp").write_text(json.dumps(rows))
                cached.with_suffix(".tmp").rename(cached)
                return rows
            except OSError as e:
                raise OSError(f"{path}: cannot index: {e}") from None
        return [Shard(file, *row) for row in from_rank_zero(read_or_load, error=DataError, catch=(OSError,))]
    return index
