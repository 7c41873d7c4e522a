"""The ablation's data: train, dev and tune files split once from ../shared/data, the base model's
mined negatives, our task config, and the Budget that sizes every row (bench/ablation.py says what
each split holds and why)."""
from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

@dataclass
class Budget:
    """Everything that sizes a run; the rows differ only in the recipe. The full budget fits the
    whole table in about an hour on 2 CPU cores (most of it CMRC paragraphs at 128 tokens)."""
    steps: int = 50             # CBB steps; one-task-per-step rows take 2x as many
    batch: int = 16             # examples per task per step
    negatives: int = 1          # hard negatives per query
    max_length: int = 128       # training length (the release keeps the base's 512)
    lr: float = 2e-5
    temperature: float | None = None  # InfoNCE's; None: each trainer's own (ours 0.02, the peer's MNRL scale 20 = 0.05)
    seed: int = 42
    mask_false_negatives: bool = True  # ours leaves copies of a query's positive out of InfoNCE (the peer: no-duplicates batches)
    matryoshka: bool = True     # ours adds the expansion layer and trains every Matryoshka prefix (finetune.py's defaults)
    retrieval_rows: int = 400   # queries trained on: 800 seen = 2 epochs, so mining gets its second visit
    extra_retrieval: int = 0    # --scale: more queries, from what the draw left out and further retrieval-zh / SNLI rows
    cmrc_train: int = 0         # 0: every query not held out
    cmrc_dev: int = 402
    retrieval_zh: int = 100
    snli: int = 100
    stsb_train: int = 0         # 0: all
    afqmc_train: int = 5000
    afqmc_dev: int = 2000
    stsb_dev: int = 0           # 0: all
    alpaca_dev: int = 300
    stsb_tune: int = 500        # the tune split: row f's merge weight is chosen on it, nothing else
    afqmc_tune: int = 1000
    cmrc_tune: int = 100
    alpaca_tune: int = 300
    merge_weights: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
    max_drop: float = 1.0       # points a tune task may lose against the base (issue #12's target)
    eval_batch: int = 32
    perc_pos: float = 0.95      # mining's false-negative filter (TopK-PercPos)


QUICK = Budget(steps=3, batch=4, negatives=2, max_length=32, lr=1e-4, retrieval_rows=16, cmrc_train=12, cmrc_dev=20,
               retrieval_zh=4, snli=4, stsb_train=40, afqmc_train=40, afqmc_dev=40, stsb_dev=40, alpaca_dev=20,
               stsb_tune=20, afqmc_tune=20, cmrc_tune=8, alpaca_tune=10, merge_weights=(0.3, 0.7), eval_batch=16,
               perc_pos=100.0)  # a random tiny model scores everything alike: no filter



def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_beir(folder: Path, corpus: list[dict], queries: list[dict], qrels: dict[str, list[str]]) -> Path:
    write_jsonl(folder / "corpus.jsonl", corpus)
    write_jsonl(folder / "queries.jsonl", queries)
    with open(folder / "qrels.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, docs in qrels.items():
            for doc in docs:
                f.write(f"{qid}\t{doc}\t1\n")
    return folder


def read_qrels(path: Path) -> dict[str, list[str]]:
    """{query id: [relevant doc ids]} of a BEIR qrels.tsv (header row skipped)."""
    qrels: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t"):
            if row and row[0] != "query-id":
                qrels.setdefault(row[0], []).append(row[1])
    return qrels


def take(rows: list, n: int) -> list:
    return rows if n == 0 else rows[:n]


def split_data(data_dir: Path, b: Budget) -> dict:
    """Train and dev files from ../shared/data, split once by a fixed seed. Returns what was skipped."""
    rng = random.Random(0)
    skipped = {}
    # CMRC trial: queries split into train / dev; the dev set searches the full corpus
    cmrc = SHARED / "cmrc2018-trial"
    corpus = read_jsonl(cmrc / "corpus.jsonl")
    text_of = {d["_id"]: d["text"] for d in corpus}
    qrels = read_qrels(cmrc / "qrels.tsv")
    queries = read_jsonl(cmrc / "queries.jsonl")
    empty = [q["_id"] for q in queries if not q["text"].strip()]
    skipped["cmrc empty queries"] = len(empty)
    queries = [q for q in queries if q["text"].strip() and q["_id"] in qrels]
    rng.shuffle(queries)
    dev_q, tune_q = queries[:b.cmrc_dev], queries[b.cmrc_dev:b.cmrc_dev + b.cmrc_tune]
    train_q = take(queries[b.cmrc_dev + b.cmrc_tune:], b.cmrc_train)
    for split, split_q in (("dev", dev_q), ("tune", tune_q)):
        write_beir(data_dir / split / "cmrc", corpus, split_q, {q["_id"]: qrels[q["_id"]] for q in split_q})
    retrieval = [{"query": q["text"], "pos": [text_of[d] for d in qrels[q["_id"]]]} for q in train_q]
    extra_negatives = [d["text"] for d in corpus]
    unused = []  # rows of the sources left out of the draw: where --scale takes more queries from
    for name, n in (("retrieval-zh/train.jsonl", b.retrieval_zh), ("nli-zh/snli_zh_triplets.jsonl", b.snli)):
        rows = read_jsonl(SHARED / name)
        rng.shuffle(rows)
        for row in rows[:n]:  # negatives go to the mining corpus: every row trains on the same mined ones
            retrieval.append({"query": row["query"], "pos": row["pos"]})
            extra_negatives += row.get("neg", [])
        unused += rows[n:]
    rng.shuffle(retrieval)
    unused = (retrieval[b.retrieval_rows:] if b.retrieval_rows else []) + [{"query": r["query"], "pos": r["pos"], "neg": r.get("neg", [])} for r in unused]
    retrieval = take(retrieval, b.retrieval_rows)  # a random slice of every source
    if b.extra_retrieval:  # drawn by an RNG of their own: the split below (dev and tune sets) stays the same
        random.Random(1).shuffle(unused)
        for row in unused[:b.extra_retrieval]:
            retrieval.append({"query": row["query"], "pos": row["pos"]})
            extra_negatives += row.pop("neg", None) or []
    write_jsonl(data_dir / "train/retrieval_raw.jsonl", retrieval)
    write_jsonl(data_dir / "train/mining_corpus.jsonl", [{"text": t} for t in dict.fromkeys(extra_negatives)])
    # STS: STS-B train + an AFQMC train slice; another AFQMC slice is the dev set
    stsb = read_jsonl(SHARED / "stsb-zh/train.jsonl")
    afqmc = read_jsonl(SHARED / "afqmc/train.jsonl")
    rng.shuffle(stsb)
    rng.shuffle(afqmc)
    afqmc_used = b.afqmc_dev + b.afqmc_train
    sts = take(stsb[b.stsb_tune:], b.stsb_train) + afqmc[b.afqmc_dev:afqmc_used]
    rng.shuffle(sts)
    write_jsonl(data_dir / "train/sts.jsonl", [{k: r[k] for k in ("sentence1", "sentence2", "score")} for r in sts])
    write_jsonl(data_dir / "dev/afqmc.jsonl", afqmc[:b.afqmc_dev])
    write_jsonl(data_dir / "dev/stsb.jsonl", take(read_jsonl(SHARED / "stsb-zh/validation.jsonl"), b.stsb_dev))
    write_jsonl(data_dir / "tune/afqmc.jsonl", afqmc[afqmc_used:afqmc_used + b.afqmc_tune])
    write_jsonl(data_dir / "tune/stsb.jsonl", stsb[:b.stsb_tune])
    # out of domain: LLM instruction -> response retrieval (no row trains on LLM data)
    alpaca = json.load(open(SHARED / "llm-zh/alpaca_zh_demo.json", encoding="utf-8"))
    write_pair_retrieval(data_dir / "dev/alpaca", alpaca[:b.alpaca_dev])
    write_pair_retrieval(data_dir / "tune/alpaca", alpaca[b.alpaca_dev:b.alpaca_dev + b.alpaca_tune])
    return {"retrieval": len(retrieval), "sts": len(sts), "cmrc dev queries": len(dev_q),
            "cmrc tune queries": len(tune_q), **skipped}


def write_pair_retrieval(folder: Path, rows: list[dict]) -> Path:
    """Alpaca-style instruction -> response pairs as a BEIR folder: each instruction's one relevant document."""
    queries = [{"_id": f"q{i}", "text": (r["instruction"] + "\n" + r["input"]).strip()} for i, r in enumerate(rows)]
    return write_beir(folder, [{"_id": f"d{i}", "text": r["output"]} for i, r in enumerate(rows)], queries,
                      {f"q{i}": [f"d{i}"] for i in range(len(rows))})


def mine(data_dir: Path, base: str, b: Budget, env: dict) -> int:
    """Ranked pools and S0 scores from the base model; `neg` = the first `negatives` of the pool.
    Returns how many queries were left out because fewer than `negatives` candidates survived the filter."""
    out, mined = data_dir / "train/retrieval.jsonl", data_dir / "train/retrieval_mined.jsonl"
    if not mined.is_file():
        subprocess.run([sys.executable, str(ROOT / "data_prep/mine_negatives.py"), "--model", base,
                        "--input", str(data_dir / "train/retrieval_raw.jsonl"), "--output", str(mined),
                        "--corpus", str(data_dir / "train/mining_corpus.jsonl"), "--top-k", "64",
                        "--perc-pos", str(b.perc_pos), "--num-negatives", str(b.negatives)],
                       check=True, env=env, cwd=ROOT)
    rows = read_jsonl(mined)
    kept = [r for r in rows if len(r["neg"]) >= b.negatives]  # every row needs the same number for the peer's columns
    write_jsonl(out, kept)
    return len(rows) - len(kept)


def score_with_base(data_dir: Path, base: str, env: dict) -> Path:
    """The base model as its own teacher (self-distillation): data_prep/score_teacher.py writes its cosine of
    every positive, negative and pool candidate of train/retrieval.jsonl, at the base's own length, once."""
    scored = data_dir / "train/retrieval_teacher.jsonl"
    if not scored.is_file():
        subprocess.run([sys.executable, str(ROOT / "data_prep/score_teacher.py"), "--model", base, "--kind", "embedder",
                        "--input", str(data_dir / "train/retrieval.jsonl"), "--output", str(scored)],
                       check=True, env=env, cwd=ROOT)
    return scored


# Self-distillation's settings (rows g, h), fixed before any row ran: KL over each query's own candidates,
# the teacher's cosines sharpened by the student's own temperature (ours 0.02), so the base starts at its
# own distribution and the term only acts as the student moves away from it. Nothing here was tuned.
SELF_DISTILL = {"loss": "kl", "weight": 1.0, "teacher_temperature": 0.02}


def task_config(data_dir: Path, b: Budget, mining: bool | str, distill: dict | None = None) -> Path:
    """Our data config: retrieval on one rank, STS on the other (the random schedule uses both for each).
    mining: True for the paper's v1 rule, or a rule's name (train/step/mining.py); distill: the retrieval
    task's distillation (train/kinds/tasks.py), from the base's scores (score_with_base)."""
    retrieval = {"type": "retrieval", "files": ["train/retrieval.jsonl"], "batch_size": b.batch,
                 "num_negatives": b.negatives, "ranks": 1}
    rule = "v1" if mining is True else mining or None
    if rule:
        retrieval["mining"] = rule
    if distill:
        retrieval.update(files=["train/retrieval_teacher.jsonl"], distill=distill)
    config = {"tasks": {"retrieval": retrieval,
                        "sts": {"type": "sts", "files": ["train/sts.jsonl"], "batch_size": b.batch, "ranks": 1}}}
    name = "tasks" if not rule else "tasks_mining" if rule == "v1" else f"tasks_mining_{rule}"
    path = data_dir / f"{name}{'_distill' if distill else ''}.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def dev_tasks(data_dir: Path, split: str = "dev") -> list:
    """The four scored sets of a split: "dev" (the table) or "tune" (row f's merge weight)."""
    from eval.local_tasks import local_retrieval, local_sts
    d = data_dir / split
    return [local_sts(d / "stsb.jsonl", f"STSB-zh-{split}"), local_sts(d / "afqmc.jsonl", f"AFQMC-{split}"),
            local_retrieval(d / "cmrc", f"CMRC-{split}"),
            local_retrieval(d / "alpaca", "Alpaca-OOD" if split == "dev" else "Alpaca-tune")]
