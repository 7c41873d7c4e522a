"""The data stream at pre-training scale: start-up, resume late in an epoch, and memory, as the corpus grows.

    python bench/data_scale.py                       # 1M and 5M pairs in 100k-line shard files, in a temp folder
    python bench/data_scale.py --sizes 1e6 2e7 --dir /data/tmp --keep

The corpus is written at run time (never committed): the demo pairs, each line made unique, the
response cut to 200 characters, in files of --lines-per-file lines (the usual sharded layout).
For each size, each measure runs in a fresh process (so its peak memory is its own):
  start-up   PairStream over every file (the shard index: one read of the bytes) and the first batch
  position   read 90% of the epoch, as a run would before it is killed, and keep its position
  resume     a new stream from that position (what --resume does) to its first batch, and the same
             from a position that only counts batches (the old way: re-read the 90%)
Printed: seconds and peak RSS of each, and the lines and bytes of the corpus.
"""
from __future__ import annotations

import argparse
import json
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BATCH = 128  # global batch: 8 ranks x 16


def write_corpus(folder: Path, lines: int, per_file: int) -> list[Path]:
    rows = [json.loads(line) for f in sorted((ROOT / "data/demo/pretrain").glob("*.jsonl"))
            for line in open(f, encoding="utf-8")]
    folder.mkdir(parents=True, exist_ok=True)
    files, n = [], 0
    while n < lines:
        path = folder / f"part-{len(files):05d}.jsonl"
        with open(path, "w", encoding="utf-8", buffering=1 << 22) as f:
            for _ in range(min(per_file, lines - n)):
                row = rows[n % len(rows)]
                f.write(json.dumps({"query": f"{row['query']} #{n}", "pos": row["pos"][:200]}, ensure_ascii=False) + "\n")
                n += 1
        files.append(path)
    return files


def stream(files: list[Path]):
    from train.input.data import PairStream
    return PairStream(files, global_batch=BATCH)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(what: str, folder: Path, position_file: Path) -> dict:
    """One measure, in this (fresh) process."""
    import train.input.data  # noqa: F401  (imports are not the stream's cost)
    files = sorted(folder.glob("*.jsonl"))
    start = time.perf_counter()
    s = stream(files)
    if what == "startup":
        indexed = time.perf_counter() - start
        next(s.epoch(0))
        return {"index_s": indexed, "first_batch_s": time.perf_counter() - start, "peak_mb": peak_mb(),
                "lines": s.num_lines, "shards": len(s.shards), "files": len(files)}
    if what == "position":
        position, stop = {"epoch": 0, "batch": 0}, int(0.9 * s.batches_per_epoch())
        for _ in zip(range(stop), s.batches(position)):
            pass
        position_file.write_bytes(pickle.dumps(position))
        return {"read_90_percent_s": time.perf_counter() - start, "batch": position["batch"], "peak_mb": peak_mb()}
    position = pickle.loads(position_file.read_bytes())
    if what == "resume_by_counting":
        position = {"epoch": position["epoch"], "batch": position["batch"]}
    next(s.batches(position))
    return {"resume_s": time.perf_counter() - start, "peak_mb": peak_mb()}


def run_child(what: str, folder: Path, position_file: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", what, "--dir", str(folder), "--position", str(position_file)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1e6, 5e6], help="pairs per corpus")
    p.add_argument("--lines-per-file", type=int, default=100_000)
    p.add_argument("--dir", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--legacy-up-to", type=float, default=5e6, help="time the re-reading resume only up to this size")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    p.add_argument("--position", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.dir), Path(args.position))))
        return
    base = Path(args.dir or tempfile.mkdtemp(prefix="data_scale_"))
    print("| pairs | files | GB | start-up s (index) | peak MB | read 90% s | resume at 90% s | peak MB "
          "| resume by re-reading s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        folder = base / f"corpus_{int(size)}"
        if not any(folder.glob("*.jsonl")):
            write_corpus(folder, int(size), args.lines_per_file)
        gb = sum(f.stat().st_size for f in folder.glob("*.jsonl")) / 1e9
        position = base / f"position_{int(size)}.pkl"
        up = run_child("startup", folder, position)
        at = run_child("position", folder, position)
        re = run_child("resume", folder, position)
        legacy = run_child("resume_by_counting", folder, position)["resume_s"] if size <= args.legacy_up_to else None
        print(f"| {up['lines']:,} | {up['files']} | {gb:.2f} | {up['first_batch_s']:.1f} ({up['index_s']:.1f}) "
              f"| {up['peak_mb']:.0f} | {at['read_90_percent_s']:.0f} | {re['resume_s']:.2f} | {re['peak_mb']:.0f} | "
              + (f"{legacy:.0f}" if legacy is not None else "-") + " |", flush=True)
    if not args.keep and not args.dir:
        import shutil
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
