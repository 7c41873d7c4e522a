"""Throughput of data_prep/filter_pairs.py's scoring against a plain SentenceTransformer.encode loop.

    python bench/filter_throughput.py [--model intfloat/multilingual-e5-small] [--pairs 1280] [--repeats 2]

Both score the same pairs with the same model: the plain loop encodes 32 pairs at a time in input
order (how a quick script does it); the filter encodes a whole chunk per call, so sentence-transformers
sorts it by length and pads little. Runs alternate in one process (machines are noisy) and the
ratio of the medians is printed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from data_prep.filter_pairs import Scorer
from train.models.model import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parent.parent


def plain_loop(model, queries, passages, qp, pp, batch: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(queries), batch):
        q = model.encode(queries[i:i + batch], prompt=qp, batch_size=batch, normalize_embeddings=True)
        p = model.encode(passages[i:i + batch], prompt=pp, batch_size=batch, normalize_embeddings=True)
        out.append((q * p).sum(1))
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--pairs", type=int, default=1280)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    rows = [json.loads(line) for p in sorted((ROOT / "data/demo/pretrain").glob("*.jsonl")) for line in open(p, encoding="utf-8")]
    rows = rows[:args.pairs]
    queries, passages = [r["query"] for r in rows], [r["pos"][0] for r in rows]
    scorer = Scorer(args.model, None, 256, None, None)
    scorer.model.max_seq_length = args.max_length
    times = {"plain encode loop (32 in order)": [], "filter_pairs (whole chunk)": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        a = plain_loop(scorer.model, queries, passages, scorer.query_prompt, scorer.passage_prompt)
        times["plain encode loop (32 in order)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        b = scorer.scores(queries, passages)
        times["filter_pairs (whole chunk)"].append(time.perf_counter() - t)
    assert np.allclose(a, b, atol=1e-4), "the two ways must give the same scores"
    for name, ts in times.items():
        print(f"{name:34s} {len(rows) / statistics.median(ts):8.1f} pairs/s  (runs: {', '.join(f'{x:.1f}s' for x in ts)})")
    base, ours = (statistics.median(ts) for ts in times.values())
    print(f"speed-up of filter_pairs over the plain loop: {base / ours:.2f}x on {len(rows)} pairs, max_length {args.max_length}")


if __name__ == "__main__":
    main()
