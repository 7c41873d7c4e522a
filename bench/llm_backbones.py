"""Decoder-only backbones on this machine: does the pipeline learn, and what memory does each setup take.

    python -m bench.llm_backbones learning [--quick]   # held-out retrieval before and after training
    python -m bench.llm_backbones memory               # peak memory per rank: ZeRO-0/3, +/- checkpointing

learning: a tiny random Qwen3-style decoder (bench/tiny_model.py, no weights from anywhere) is
pre-trained by train/pretrain.py on the demo pairs, then fine-tuned by train/finetune.py on the demo
tasks (a retrieval task with an instruction, STS, intent) with LoRA and, separately, with soft-masked
full fine-tuning. Scored on held-out demo question pairs no row trained on (the last HELD_OUT lines
of data/demo/pretrain/question_pairs.jsonl, left out of pre-training, and any fine-tuning line that
holds one of their texts left out too): MRR@10 of each question's pair among all held-out pairs; and
on the last HELD_OUT_RETRIEVAL examples of the demo retrieval task, kept back from fine-tuning:
MRR@10 of each query's positive among all their positives and negatives. Queries are encoded with
the release's retrieval prompt. A random model's numbers say only that the pipeline learns, not how an LLM does.

memory: larger random decoders trained for 3 steps on 2 CPU ranks, in two regimes (ACTIVATIONS: long
texts, activations dominate; WEIGHTS: a wide model on short texts, weights and optimizer state
dominate); summary.json's peak resident memory of every rank, at the end of training. On CPU the figure includes torch itself (~0.4 GB
per process), and ZeRO-3 keeps its partitions in the same RAM, so the differences, not the totals,
are the result. A GPU shows them in peak_gpu_mb (bench/gpu_check.sh).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from bench.launch import ROOT, train
from bench.tiny_model import make_tiny_decoder

HELD_OUT = 80             # question pairs (pre-training's domain)
HELD_OUT_RETRIEVAL = 64   # retrieval examples (fine-tuning's): each query's positive among all their texts
INSTRUCTION = "检索意思相同的问题"  # short: the tiny char-level tokenizer spells English out letter by letter


def split_pairs(work: Path) -> tuple[Path, list[dict]]:
    """(the pre-training pairs less the held-out ones, the held-out question pairs)."""
    demo = ROOT / "data/demo/pretrain"
    questions = (demo / "question_pairs.jsonl").read_text(encoding="utf-8").splitlines()
    pairs = work / "pretrain_pairs.jsonl"
    pairs.write_text((demo / "llm_pairs.jsonl").read_text(encoding="utf-8") + "\n".join(questions[:-HELD_OUT]) + "\n",
                     encoding="utf-8")
    held_out = [json.loads(line) for line in questions[-HELD_OUT:]]
    return pairs, [{"query": ex["query"], "pos": [ex["pos"]] if isinstance(ex["pos"], str) else ex["pos"]}
                   for ex in held_out]


def task_config(work: Path, held_out: list[dict]) -> tuple[Path, list[dict]]:
    """The demo tasks, the retrieval one with an instruction and its last HELD_OUT_RETRIEVAL examples
    kept back (returned); no task holds a held-out text."""
    demo = ROOT / "data/demo/finetune"
    retrieval = (demo / "retrieval.jsonl").read_text(encoding="utf-8").splitlines()
    kept_back = [json.loads(line) for line in retrieval[-HELD_OUT_RETRIEVAL:]]
    unseen = {t for ex in held_out + kept_back for t in [ex["query"], *ex["pos"]]}
    files = {}
    for name in ("retrieval", "sts", "intent"):
        lines = (demo / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        lines = [line for line in (lines[:-HELD_OUT_RETRIEVAL] if name == "retrieval" else lines)
                 if not any(t in line for t in unseen)]
        files[name] = work / f"{name}.jsonl"
        files[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {"tasks": {
        "retrieval": {"type": "retrieval", "files": [str(files["retrieval"])], "batch_size": 8, "num_negatives": 6,
                      "ranks": 1, "instruction": INSTRUCTION},
        "sts": {"type": "sts", "files": [str(files["sts"])], "batch_size": 16, "ranks": 1, "weight": 0.8},
        "intent": {"type": "classification", "files": [str(files["intent"])], "batch_size": 8,
                   "num_negatives": 3, "ranks": 1}}}
    path = work / "tasks.json"
    path.write_text(json.dumps(config, ensure_ascii=False))
    return path, kept_back


def mrr_at_10(model_dir: Path | str, examples: list[dict]) -> float:
    """MRR@10 of each held-out query's positive among every held-out positive (and negative)."""
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    if "Retrieval-query" in model.prompts:
        query_prompt, doc_prompt = model.prompts["Retrieval-query"], model.prompts.get("Retrieval-document", "")
    else:  # a model without release prompts (the untrained base)
        query_prompt, doc_prompt = f"Instruct: {INSTRUCTION}\nQuery: ", ""
    docs = sorted({t for ex in examples for t in ex["pos"] + ex.get("neg", [])})
    index = {t: i for i, t in enumerate(docs)}
    q = model.encode([ex["query"] for ex in examples], prompt=query_prompt, normalize_embeddings=True)
    d = model.encode(docs, prompt=doc_prompt, normalize_embeddings=True)
    ranks = np.argsort(-(q @ d.T), axis=1)[:, :10]
    total = 0.0
    for row, ex in zip(ranks, examples):
        positives = {index[t] for t in ex["pos"]}
        hit = next((r for r, j in enumerate(row) if j in positives), None)
        total += 0.0 if hit is None else 1.0 / (hit + 1)
    return total / len(examples)


def as_release(base: Path) -> Path:
    """The untrained base as a sentence-transformers folder set up as training sets it up (EOS, pooling)."""
    from train.models.backbone import BackboneOptions, prepare_backbone
    from train.models.model import open_sentence_transformer
    model = open_sentence_transformer(str(base), local_only=True)
    prepare_backbone(model, False, BackboneOptions())
    out = base.parent / "base_release"
    model.save(str(out))
    return out


def learning(work: Path, quick: bool) -> list[dict]:
    base = make_tiny_decoder(work / "tiny_qwen3", "qwen3", hidden=128, layers=2, heads=4, kv_heads=2)
    pairs, held_out = split_pairs(work)
    tasks, retrieval_held_out = task_config(work, held_out)

    def scores(folder: Path) -> dict:
        return {"pairs mrr@10": round(mrr_at_10(folder, held_out), 4),
                "retrieval mrr@10": round(mrr_at_10(folder, retrieval_held_out), 4)}
    pre_steps, ft_steps = (40, 40) if quick else (160, 200)
    # a random model collapses to one embedding at lr 1e-3 (InfoNCE falls to ln(batch) and stays); these
    # rates learn. Temperature 0.05: the random model's embeddings start close together
    common = ["--max-length", "64", "--save-steps", "100000", "--seed", "42", "--temperature", "0.05"]
    rows = [{"row": "initial weights", **scores(as_release(base))}]
    pre = train("train/pretrain.py", ["--model", str(base), "--train-data", str(pairs), "--batch-size", "16",
                                      "--max-steps", str(pre_steps),
                                      "--lr", "3e-4", "--instruction", INSTRUCTION, *common],
                work / "pretrain", work / "pretrain.log")
    rows.append({"row": "pre-trained (full, causal)", "steps": pre["steps"], **scores(work / "pretrain/final")})
    finetune = ["--data-config", str(tasks), "--max-steps", str(ft_steps), "--merge-weight", "1",
                "--expand-dim", "0", "--mrl-dims", "none", *common]
    for name, extra in [("+ fine-tuned, LoRA r=16", ["--lora-rank", "16", "--lora-alpha", "32", "--lr", "1e-3"]),
                        ("+ fine-tuned, soft mask (full)", ["--attention", "soft", "--lr", "2e-4"])]:
        out = work / name.split(",")[1].split()[0].lower()
        summary = train("train/finetune.py", ["--model", str(work / "pretrain/final"), *extra, *finetune],
                        out, work / f"{out.name}.log")
        rows.append({"row": name, "steps": summary["steps"], **scores(out / "final")})
    return rows


# Two regimes, as on a GPU: long sequences, where activations dominate (what checkpointing saves), and
# a wide model on short ones, where weights, gradients and Adam's state dominate (what ZeRO-3 and LoRA save)
ACTIVATIONS = dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1536)   # 26M weights, 256 tokens
WEIGHTS = dict(hidden=1024, layers=12, heads=16, kv_heads=4, intermediate=2816)    # 126M weights, 32 tokens
MEMORY_ROWS = [("long texts: ZeRO-0", "activations", "zero0", []),
               ("long texts: ZeRO-0 + checkpointing", "activations", "zero0", ["--gradient-checkpointing"]),
               ("long texts: ZeRO-3", "activations", "zero3", []),
               ("long texts: ZeRO-3 + checkpointing", "activations", "zero3", ["--gradient-checkpointing"]),
               ("wide model: ZeRO-0", "weights", "zero0", []),
               ("wide model: ZeRO-3", "weights", "zero3", []),
               ("wide model: ZeRO-3 + LoRA r=16", "weights", "zero3", ["--lora-rank", "16"])]


def memory(work: Path, quick: bool) -> list[dict]:
    models = {"activations": make_tiny_decoder(work / "long", "qwen3", **ACTIVATIONS),
              "weights": make_tiny_decoder(work / "wide", "qwen3", **WEIGHTS)}
    shapes = {"activations": ["--batch-size", "16", "--max-length", "256"],
              "weights": ["--batch-size", "4", "--max-length", "32"]}
    rows = []
    for name, regime, stage, extra in MEMORY_ROWS[:2] if quick else MEMORY_ROWS:
        out = work / f"mem_{len(rows)}"
        summary = train("train/pretrain.py", ["--model", str(models[regime]), *shapes[regime], "--max-steps", "3",
                                              "--deepspeed-config", str(ROOT / f"ds_configs/{stage}.json"),
                                              "--save-steps", "100000", *extra], out, work / f"mem_{len(rows)}.log")
        rows.append({"row": name, "peak_rss_mb_per_rank": summary["peak_rss_mb_per_rank"],
                     "seconds": summary["seconds"]})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["learning", "memory"])
    p.add_argument("--quick", action="store_true", help="fewer steps (CI)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = learning(work, args.quick) if args.what == "learning" else memory(work, args.quick)
    for row in rows:
        print(" | ".join(f"{k}: {v}" for k, v in row.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
