"""Cut the shipped demo data out of ../shared/data (small real Chinese sets; licences in data/demo/README.md).

    python data_prep/make_demo_data.py [--shared ../shared/data] [--out data/demo]

Deterministic: the same slices every time. Evaluation sets (stsb-zh validation, cmrc2018-trial) are
never copied into training data.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{path}: {len(rows)} rows")


def alpaca_pairs(path: Path) -> list[dict]:
    """Prompt (instruction + input) -> response."""
    rows = []
    for item in json.loads(path.read_text(encoding="utf-8")):
        prompt = "\n".join(x for x in (item["instruction"], item.get("input", "")) if x.strip())
        if prompt.strip() and item["output"].strip():
            rows.append({"query": prompt, "pos": [item["output"]]})
    return rows


def dpo_pairs(path: Path) -> list[dict]:
    """Last human turn -> chosen response; the rejected response is a hard negative."""
    rows = []
    for item in json.loads(path.read_text(encoding="utf-8")):
        prompt = item["conversations"][-1]["value"]
        rows.append({"query": prompt, "pos": [item["chosen"]["value"]], "neg": [item["rejected"]["value"]]})
    return rows


def afqmc_question_pairs(path: Path, n: int, rng: random.Random) -> list[dict]:
    """Paraphrased customer questions (label 1) as weakly supervised question-question pairs."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    pairs = [{"query": r["sentence1"], "pos": [r["sentence2"]]} for r in rows if r["score"] >= 1]
    return rng.sample(pairs, n)


def retrieval_triples(path: Path, n: int, rng: random.Random) -> list[dict]:
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    return [r for r in rng.sample(rows, n) if r["neg"]]


def sts_pairs(path: Path, n: int, rng: random.Random) -> list[dict]:
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    return rng.sample(rows, n)


def afqmc_intents(path: Path, min_size: int) -> list[dict]:
    """Paraphrase clusters (connected components of AFQMC's label-1 pairs) as intent labels."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for line in open(path, encoding="utf-8"):
        r = json.loads(line)
        if r["score"] >= 1:
            a, b = find(r["sentence1"]), find(r["sentence2"])
            if a != b:
                parent[a] = b
    clusters: dict[str, list[str]] = {}
    for text in sorted(parent):
        clusters.setdefault(find(text), []).append(text)
    kept = sorted((sorted(c) for c in clusters.values() if len(c) >= min_size), key=lambda c: c[0])
    return [{"text": t, "label": f"intent_{i:03d}"} for i, c in enumerate(kept) for t in c]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "demo"))
    args = ap.parse_args()
    shared, out, rng = Path(args.shared), Path(args.out), random.Random(0)

    llm = alpaca_pairs(shared / "llm-zh/alpaca_zh_demo.json")
    llm += [{k: v for k, v in r.items() if k != "neg"} for r in dpo_pairs(shared / "llm-zh/dpo_zh_demo.json")]
    rng.shuffle(llm)
    # sized so that `deepspeed train/pretrain.py` (e5-small, 1 CPU rank, ~5 s a step) runs its 80
    # steps in under 10 minutes on 2 cores
    write_jsonl(out / "pretrain/llm_pairs.jsonl", llm[:800])
    write_jsonl(out / "pretrain/question_pairs.jsonl",
                afqmc_question_pairs(shared / "afqmc/train.jsonl", 480, rng))
    # fine-tuning tasks, sized so `deepspeed train/finetune.py` runs in well under 15 minutes
    write_jsonl(out / "finetune/retrieval.jsonl", retrieval_triples(shared / "retrieval-zh/train.jsonl", 320, rng))
    write_jsonl(out / "finetune/sts.jsonl", sts_pairs(shared / "stsb-zh/train.jsonl", 640, rng))
    write_jsonl(out / "finetune/intent.jsonl", afqmc_intents(shared / "afqmc/train.jsonl", min_size=3))


if __name__ == "__main__":
    main()
