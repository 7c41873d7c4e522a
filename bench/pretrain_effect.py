"""What the demo pre-training does to the base model, scored on the ablation's dev sets.

    python bench/pretrain_effect.py      # README's step 2 as written, then both models scored (~20 min, 2 cores)

Trains with the command README's quick start gives (`deepspeed train/pretrain.py`: multilingual-e5-small,
the shipped demo pairs, 80 steps of 16 at 128 tokens), into OUT/pretrain, and scores the base and
the release through eval/cmteb.py on the dev sets of bench/ablation.py (STS-B-zh validation, held-out
AFQMC, held-out CMRC queries against the full corpus, alpaca-zh instruction -> response). No row of
the ablation trains on them, but the demo pre-training data does hold some of them (its LLM pairs are
cut from the same alpaca-zh file, its question pairs from AFQMC): every dev pair or query with a
text the pre-training saw is left out, for both models, and the table counts what is kept. The
release encodes at the base model's own length (512), not the training length: the table prints
both models' max_seq_length.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from bench.ablation import evaluate_row
from bench.ablation_data import Budget, split_data
from bench.base_model import base_model

ROOT = Path(__file__).resolve().parent.parent


def pretraining_texts() -> set[str]:
    """Every text of the demo pre-training data (what `deepspeed train/pretrain.py` trains on)."""
    from train.pretrain import DEMO_DATA
    texts = set()
    for path in DEMO_DATA:
        for line in open(path, encoding="utf-8"):
            for value in json.loads(line).values():
                texts.update(t.strip() for t in (value if isinstance(value, list) else [value]) if isinstance(t, str))
    return texts


def unseen_dev(data_dir: Path, to: Path, seen: set[str]) -> tuple[Path, dict[str, str]]:
    """A copy of the ablation's dev sets without the STS pairs and retrieval queries (with their
    relevant passages) that hold a text in `seen`; the corpus stays whole. Returns the copy and,
    per task, how many items were kept of how many."""
    from bench.ablation_data import read_jsonl, write_beir, write_jsonl
    from eval.local_tasks import read_beir
    kept = {}
    for file, task in (("stsb.jsonl", "STSB-zh-dev"), ("afqmc.jsonl", "AFQMC-dev")):
        rows = read_jsonl(data_dir / "dev" / file)
        keep = [r for r in rows if r["sentence1"].strip() not in seen and r["sentence2"].strip() not in seen]
        write_jsonl(to / "dev" / file, keep)
        kept[task] = f"{len(keep)} of {len(rows)}"
    for folder, task in (("cmrc", "CMRC-dev"), ("alpaca", "Alpaca-OOD")):
        corpus, queries, qrels = read_beir(data_dir / "dev" / folder)
        text = {d["_id"]: d["text"].strip() for d in corpus}
        keep = [q for q in queries if q["text"].strip() not in seen and not any(text[d] in seen for d in qrels[q["_id"]])]
        write_beir(to / "dev" / folder, corpus, keep, {q["_id"]: list(qrels[q["_id"]]) for q in keep})
        kept[task] = f"{len(keep)} of {len(queries)}"
    return to, kept


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench/results/pretrain_effect"))
    p.add_argument("--force", action="store_true", help="train again though OUT/pretrain/final exists")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()  # the training runs with the repo as cwd
    budget = Budget()
    data_dir = out / "data"
    split_data(data_dir, budget)  # the ablation's split: same seed, same dev sets
    final = out / "pretrain" / "final"
    if args.force or not (final / "modules.json").is_file():
        command = ["deepspeed", "train/pretrain.py", "--output-dir", str(out / "pretrain")]
        log = out / "pretrain.log"
        with open(log, "w") as f:
            if subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"pre-training failed; see {log}")
        shutil.rmtree(out / "pretrain" / "checkpoints", ignore_errors=True)  # the release is in final/
    unseen, kept = unseen_dev(data_dir, out / "unseen", pretraining_texts())
    base = base_model(None, False, out)
    results = {}
    for row, model in (("base", base), ("demo pre-training", str(final))):
        results[row] = evaluate_row({"model": model}, unseen, out / "unseen", row.replace(" ", "-"), budget)
        print(f"{row}: {results[row]['scores']}", flush=True)
    (out / "results.json").write_text(json.dumps({"kept": kept, **results}, indent=1))
    tasks = list(results["base"]["scores"])
    lines = ["| model | " + " | ".join(f"{t} ({kept[t]})" for t in tasks) + " | average | encodes at |",
             "|---" * (len(tasks) + 3) + "|"]
    for row, r in results.items():
        s = r["scores"]
        lines.append(f"| {row} | " + " | ".join(f"{100 * s[t]:.2f}" for t in tasks)
                     + f" | **{100 * sum(s.values()) / len(s):.2f}** | {r['max_seq_length']} |")
    print("\n".join(lines) + "\n\nCommand: `python bench/pretrain_effect.py`")
    return results


if __name__ == "__main__":
    main()
