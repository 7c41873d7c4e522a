"""How fast data_prep/validate.py checks a large corpus, against the speed of just reading its bytes.

    python bench/validate_speed.py                 # a generated 2 GB pairs file in a temp folder
    python bench/validate_speed.py --gb 4 --dir /data/tmp --keep

The corpus is written at run time (never committed): the demo pairs, each line made unique, until
--gb gigabytes, with one bad line per million. Printed: MB/s for reading the bytes, for validate
with 1 process and with one per core, and the bad lines found (they must be exactly the planted ones).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_corpus(path: Path, gigabytes: float, bad_every: int = 1_000_000) -> list[int]:
    """Demo pairs, numbered so no two lines are alike, until `gigabytes`; returns the bad line numbers."""
    rows = [json.loads(line) for f in sorted((ROOT / "data/demo/pretrain").glob("*.jsonl"))
            for line in open(f, encoding="utf-8")]
    target, written, line_no, bad = gigabytes * 1e9, 0, 0, []
    with open(path, "w", encoding="utf-8", buffering=1 << 24) as f:
        while written < target:
            block = []
            for row in rows:
                line_no += 1
                if line_no % bad_every == 0:
                    block.append('{"query": "truncated", "pos": ')
                    bad.append(line_no)
                else:
                    block.append(json.dumps({"query": f"{row['query']} #{line_no}", "pos": row["pos"]},
                                            ensure_ascii=False))
            text = "\n".join(block) + "\n"
            f.write(text)
            written += len(text.encode("utf-8"))
    return bad


def read_speed(path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    return path.stat().st_size / 1e6 / (time.perf_counter() - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--dir", default=None, help="where to write the corpus (default: a temp folder)")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    from train.run.validation import validate
    folder = Path(args.dir or tempfile.mkdtemp(prefix="validate_speed_"))
    path = folder / "pairs.jsonl"
    start = time.perf_counter()
    planted = write_corpus(path, args.gb)
    print(f"wrote {path.stat().st_size / 1e9:.2f} GB ({planted[-1] if planted else 0:,}+ lines, "
          f"{len(planted)} bad) in {time.perf_counter() - start:.0f} s")
    rows = [("read the bytes", read_speed(path))]
    for workers in (1, os.cpu_count() or 1):
        report = validate([(path, "pairs", 0)], workers=workers)
        found = [line for _, line, _ in report.bad]
        assert found == planted, f"validate found lines {found[:5]}..., planted {planted[:5]}..."
        rows.append((f"validate, {workers} process{'es' if workers > 1 else ''}", report.mb_per_s))
    print(f"{os.cpu_count()} CPU cores; {report.lines:,} lines; every planted bad line found at its line number")
    for what, speed in rows:
        print(f"  {what:<28} {speed:8,.0f} MB/s")
    if not args.keep:
        path.unlink()
        folder.rmdir() if not args.dir else None


if __name__ == "__main__":
    main()
