"""Join the parts a split data_prep job wrote (filter_pairs.py, score_teacher.py with --part or under a
torchrun / deepspeed launch) into one file: the output one machine would have written, byte for byte.

    python data_prep/join_parts.py filtered/ filtered.jsonl

Refused, naming them, while a part is missing or unfinished. The trainer also reads the folder itself
as one data set (`--train-data filtered/`), with no join.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from data_prep.chunked import join_parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="the --output folder of the parts (part-I-of-N.jsonl)")
    ap.add_argument("output", help="the joined JSONL")
    args = ap.parse_args(argv)
    lines = join_parts(Path(args.folder), Path(args.output))
    print(f"joined {lines} lines into {args.output}")
    return lines


if __name__ == "__main__":
    main()
