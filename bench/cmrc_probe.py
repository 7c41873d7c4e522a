"""Why does fine-tuning lose CMRC? (#12) Variants of the ablation's row d, scored on CMRC queries that
no row trains on and no table reports.

    python bench/cmrc_probe.py      # after python bench/ablation.py: its split, mined data and rows d, e

Every row of the ablation loses 1.7-2.3 nDCG@10 on CMRC-dev, where the base already scores 97. This
script tests causes on the probe set, never on the dev set: the tune split's CMRC queries and the
CMRC training queries that the 400-query draw left out, against the full 256-paragraph corpus,
nDCG@10, every model encoding at the base's 512 tokens. Rows:
  base          the base model
  base@128      the base encoding at the training length (what truncation alone costs)
  d, e          the ablation's rows d (random task + mining) and e (CBB + mining), as trained there
  d_len256      row d trained at 256 tokens instead of 128: every CMRC paragraph is longer than 128
                (median 360), so at 128 most answers are cut from the positives it trains on
  d_lr1e-5      row d at half the learning rate
The variants train with row d's recipe, data, examples seen and seed (bench/ablation.py's train_ours);
a variant whose OUT/runs/<row>/final exists is not trained again.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from bench.ablation import train_ours
from bench.ablation_data import Budget, read_jsonl, read_qrels, write_beir

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {"d_len256": {"max_length": 256}, "d_lr1e-5": {"lr": 1e-5}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--ablation", default=str(ROOT / "bench/results/ablation"), help="the full ablation's output")
    p.add_argument("--out", default=str(ROOT / "bench/results/cmrc_probe"))
    return p.parse_args(argv)


def write_probe_set(data_dir: Path, folder: Path) -> int:
    """CMRC queries neither in the dev set nor among the queries any row trained on; returns how many."""
    cmrc = ROOT.parent / "shared/data/cmrc2018-trial"
    seen = {r["query"] for r in read_jsonl(data_dir / "train/retrieval_raw.jsonl")}
    seen |= {q["text"] for q in read_jsonl(data_dir / "dev/cmrc/queries.jsonl")}
    qrels = read_qrels(cmrc / "qrels.tsv")
    queries = [q for q in read_jsonl(cmrc / "queries.jsonl")
               if q["text"].strip() and q["_id"] in qrels and q["text"] not in seen]
    write_beir(folder, read_jsonl(cmrc / "corpus.jsonl"), queries, {q["_id"]: qrels[q["_id"]] for q in queries})
    return len(queries)


def score(model_path: str, task, length: int, name: str, out: Path) -> float:
    from sentence_transformers import SentenceTransformer

    from eval.cmteb import evaluate
    model = SentenceTransformer(model_path, device="cpu", local_files_only=True)
    model.max_seq_length = length
    return 100 * next(iter(evaluate(model, [task], [None], 32, f"probe-{name}", out / "eval" / name)[None].values()))


def main(argv=None) -> dict:
    args = parse_args(argv)
    ablation, out = Path(args.ablation), Path(args.out)
    data_dir = ablation / "data"
    base = json.loads((ablation / "results/base.json").read_text())["model"]
    from eval.local_tasks import local_retrieval
    n = write_probe_set(data_dir, out / "cmrc")
    task = local_retrieval(out / "cmrc", "CMRC-probe")
    models = {"base": (base, 512), "base@128": (base, 128),
              **{r: (str(ablation / "runs" / r / "final"), 512) for r in ("d", "e")}}
    for row, overrides in VARIANTS.items():
        final = out / "runs" / row / "final"
        if not final.is_dir():
            train_ours(row, out, data_dir, base, replace(Budget(), **overrides), "random", mining=True)
        models[row] = (str(final), 512)
    scores = {row: score(path, task, length, row, out) for row, (path, length) in models.items()}
    lines = ["| row | CMRC-probe nDCG@10 | vs base |", "|---|---|---|"]
    for row, s in scores.items():
        lines.append(f"| {row} | {s:.2f} | " + ("—" if row == "base" else f"{s - scores['base']:+.2f}") + " |")
    report = "\n".join(lines) + f"\n\nCommand: `python bench/cmrc_probe.py`; {n} probe queries, full corpus."
    (out / "table.md").write_text(report + "\n")
    print(report)
    return scores


if __name__ == "__main__":
    main()
