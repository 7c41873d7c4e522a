"""Does mining keep up at corpus scale? data_prep/mine_negatives.py on generated corpora of 100k and 1M
passages (5M with --sizes), 10k queries, a tiny encoder (this measures the pipeline, not the model).

    python -m bench.mining_scale [--sizes 100000,1000000] [--queries 10000] [--out /tmp/mining_scale]

Per size: the wall time of each phase (the text store, encoding, the index, the recall check, search and
writing) and the peak RSS of the mining process, for exact search (flat, streamed over the shards) and
IVF (the second run reuses the first's shards); IVF's recall@50 against exact search on 1,000 queries;
and a run killed halfway through encoding, then started again: its time against the whole run's, the
shards encoded again, and whether its output is the uninterrupted one's. Results: OUT/results.json and
a markdown table on stdout (docs/mining_scale.md keeps the measured one).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.launch import script_env
from bench.tiny_model import demo_texts, make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
SHARD_ROWS = 50_000


def write_data(folder: Path, passages: int, queries: int, seed: int = 0) -> tuple[Path, Path]:
    """A corpus of `passages` distinct passages made of demo sentences, and `queries` retrieval lines whose
    positive is one of them (written at run time, never committed)."""
    rng = random.Random(seed)
    sentences = sorted(set(t.strip() for t in demo_texts() if 4 <= len(t.strip()) <= 80 and "\n" not in t and "\r" not in t))
    folder.mkdir(parents=True, exist_ok=True)
    corpus, data = folder / f"corpus_{passages}.txt", folder / f"queries_{passages}.jsonl"
    if not corpus.is_file():
        with open(corpus, "w", encoding="utf-8") as f:
            for i in range(passages):
                f.write(f"{rng.choice(sentences)}{rng.choice(sentences)} 第{i}段\n")
    if not data.is_file():
        picked = rng.sample(range(passages), queries)
        lines = open(corpus, encoding="utf-8").read().splitlines()
        with open(data, "w", encoding="utf-8") as f:
            for i in picked:
                f.write(json.dumps({"query": lines[i][:24], "pos": [lines[i]]}, ensure_ascii=False) + "\n")
    return data, corpus


def mine(model: Path, data: Path, corpus: Path, out: Path, index: str, env: dict | None = None) -> tuple[int, float]:
    cmd = [sys.executable, str(ROOT / "data_prep/mine_negatives.py"), "--model", str(model), "--input", str(data),
           "--corpus", str(corpus), "--output", str(out), "--top-k", "50", "--perc-pos", "100", "--index", index,
           "--shard-rows", str(SHARD_ROWS), "--query-chunk", "2000", "--recall-queries", "1000", "--batch-size", "256",
           "--work-dir", str(out.parent / "work")]
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env={**script_env(threads=os.cpu_count()), **(env or {})},
                          capture_output=True, text=True)
    (out.parent / f"{out.stem}.log").write_text(proc.stdout + proc.stderr)
    return proc.returncode, time.time() - started


def one_size(model: Path, passages: int, queries: int, out: Path) -> dict:
    data, corpus = write_data(out / "data", passages, queries)
    run = out / f"n{passages}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    result = {"passages": passages, "queries": queries}
    for index in ("flat", "ivf"):
        code, seconds = mine(model, data, corpus, run / f"{index}.jsonl", index)
        if code:
            raise SystemExit(f"mining ({index}, {passages}) failed; see {run / f'{index}.log'}")
        result[index] = {**json.loads((run / f"{index}.jsonl.report.json").read_text()), "wall_s": round(seconds, 1)}
    # a kill halfway through encoding, then the same command again, in a fresh work folder
    killed = run / "killed"
    killed.mkdir()
    shards = -(-result["flat"]["corpus"] // SHARD_ROWS)
    before = max(1, shards // 2)
    code, first = mine(model, data, corpus, killed / "flat.jsonl", "flat", env={"CONAN_MINE_CRASH_AFTER_SHARD": str(before)})
    code2, second = mine(model, data, corpus, killed / "flat.jsonl", "flat")
    log = (killed / "flat.log").read_text()
    again = next((int(line.split("(")[1].split()[0]) for line in log.splitlines() if "encoded now" in line), None)
    result["kill"] = {"killed_exit": code, "resumed_exit": code2, "killed_after_s": round(first, 1),
                      "restart_s": round(second, 1), "shards": shards, "shards_encoded_before_the_kill": before,
                      "shards_encoded_on_restart": again, "shards_encoded_twice": before + (again or 0) - shards,
                      "identical_output": (killed / "flat.jsonl").read_bytes() == (run / "flat.jsonl").read_bytes()}
    return result


def table(results: list[dict]) -> str:
    head = ("| passages | index | store s | encode s | index s | recall check s | search+write s | total s | "
            "peak RSS MB | recall@50 |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in results:
        for index in ("flat", "ivf"):
            x, s = r[index], r[index]["seconds"]
            recall = next((v for k, v in x.items() if k.startswith("recall_at_")), None)
            rows.append(f"| {r['passages']:,} | {index} | {s['store_s']:.0f} | {s['encode_s']:.0f} | {s['index_s']:.0f} | "
                        f"{s.get('recall_s', 0):.0f} | {s['search_write_s']:.0f} | {s['total_s']:.0f} | "
                        f"{x['peak_rss_mb']:,.0f} | {'' if recall is None else f'{recall:.3f}'} |")
    kills = "\n".join(f"- {r['passages']:,} passages: killed after {r['kill']['killed_after_s']} s "
                      f"({r['kill']['shards_encoded_before_the_kill']} of {r['kill']['shards']} shards encoded); the "
                      f"same command then took {r['kill']['restart_s']} s (the whole run: "
                      f"{r['flat']['seconds']['total_s']:.0f} s) and encoded {r['kill']['shards_encoded_on_restart']} "
                      f"shards, {r['kill']['shards_encoded_twice']} of them a second time; output identical to the "
                      f"uninterrupted run's: {r['kill']['identical_output']}" for r in results)
    return head + "\n".join(rows) + "\n\n" + kills


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table-only", action="store_true", help="print the table of OUT/results.json")
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--out", default="/tmp/mining_scale")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.table_only:
        print(table(json.loads((out / "results.json").read_text())))
        return
    model = make_tiny_model(out / "model") if not (out / "model/modules.json").is_file() else out / "model"
    results = [one_size(model, int(n), args.queries, out) for n in args.sizes.split(",")]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
