"""Check every line of the training data before a run, in parallel, and report every bad line.

    python data_prep/validate.py /data/pairs/ more.jsonl                 # pre-training pairs
    python data_prep/validate.py --num-negatives 7 /data/mined.jsonl     # pairs that must carry 'neg'
    python data_prep/validate.py --data-config my_tasks.yaml             # every task's files, by task type
    deepspeed train/pretrain.py --validate-data ...                      # the same, before the model loads

Each line is parsed by the very code the training loop uses (train/input/data.py, train/kinds/task_data.py),
so a line that passes here is a line training accepts. Files are cut into byte ranges (--chunk-mb)
aligned to line starts and checked by --workers processes; line numbers are recovered from the
per-chunk line counts, so every bad line is reported as file:line (1-based, blank lines counted, as
an editor shows them) with its reason. Output: counts per reason and per file, the first bad lines,
the speed in MB/s, and with --report a TSV of every bad line. Exit status 1 when a line is bad.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.run.validation import KINDS, Report, validate


def expand(paths: list[str]) -> list[Path]:
    """Files and folders (every *.jsonl below them, sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(p.rglob("*.jsonl"))
        elif p.is_file():
            out.append(p)
        else:
            raise SystemExit(f"{p}: no such file or folder")
    return out


def files_of_config(config_path: str) -> list[tuple[Path, str, int]]:
    from train.kinds.tasks import ConfigError, load_data_config
    try:
        config = load_data_config(config_path)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    return [(f, t.type, t.num_negatives) for t in config.tasks for f in t.files]


def write_tsv(report: Report, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("file\tline\treason\n")
        for file, line, reason in report.bad:
            f.write(f"{file}\t{line}\t{reason}\n")


def main(argv=None) -> Report:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="*", help="JSONL files or folders of them")
    p.add_argument("--kind", default="pairs", choices=KINDS, help="line format of the paths")
    p.add_argument("--num-negatives", type=int, default=0, help="pairs: each line must carry 'neg' if > 0")
    p.add_argument("--data-config", default=None, help="a fine-tuning task config: each task's files by its type")
    p.add_argument("--workers", type=int, default=0, help="processes (0: one per CPU core)")
    p.add_argument("--chunk-mb", type=float, default=64, help="byte range one process checks at a time")
    p.add_argument("--report", default=None, help="write every bad line to this TSV (file, line, reason)")
    args = p.parse_args(argv)
    files = [(f, args.kind, args.num_negatives) for f in expand(args.paths)]
    if args.data_config:
        files += files_of_config(args.data_config)
    if not files:
        raise SystemExit("nothing to check: give JSONL files or folders, or --data-config")
    report = validate(files, args.workers, args.chunk_mb)
    print(report.summary())
    if args.report:
        write_tsv(report, args.report)
        print(f"every bad line: {args.report}")
    return report


if __name__ == "__main__":
    sys.exit(1 if main().bad else 0)
