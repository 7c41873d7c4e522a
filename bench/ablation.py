"""The paper's ablation on our data, against the sentence-transformers trainer, in one command.

    python bench/ablation.py            # the full table on multilingual-e5-small (offline), into docs/ablation.md
    python bench/ablation.py --quick    # a tiny model, a few steps, tiny dev sets: the wiring, in CI time
    python bench/ablation.py --scale 4 --rows a,e,f   # 4x the examples per row (more steps, more queries)

Rows, all from the same base, on the same training data, with the same examples seen and seed:
  base  the base model, untouched
  a     sentence-transformers' trainer as a user sets it up: MultipleNegativesRankingLoss with the
        hard negatives + CoSENTLoss, round-robin over the two data sets, no-duplicates batches
  b     train/finetune.py, one random task per step (the FlagEmbedding / Piccolo baseline), static negatives
  c     + CBB: every task in every step, ranks split between tasks
  d     b + dynamic hard-negative mining (paper's v1 rule)
  e     CBB + dynamic mining: the full recipe
  f     e merged with the base (LM-Cocktail), to keep general ability: the weight is chosen by
        eval/merge_sweep.py on the tune split below (best average with no task more than 1.0 below
        the base), never on the dev sets
  g     e + self-distillation: the base model's own scores of each query's candidates (computed once,
        offline, at its own length, by data_prep/score_teacher.py) as a KL term beside InfoNCE, a
        forgetting guard during training (ablation_data.SELF_DISTILL; issue #31)
  h     g merged with the base, the weight chosen on the tune split as for f

Training data (../shared/data, split once with a fixed seed; nothing here is tuned on the dev sets):
  retrieval  the 498 CMRC-trial queries not held out (2 of 1,002 are empty and left out, counted)
             -> their paragraph, 100 retrieval-zh and 100 SNLI-zh queries, shuffled; hard negatives
             mined by the base model (data_prep/mine_negatives.py) from the 256 paragraphs and the
             sets' own negatives, so every row trains on the same negatives. 400 queries are drawn,
             those with no candidate left after the false-negative filter are left out (counted in
             the report), so 800 seen is 2+ epochs and dynamic mining gets its second visit.
             --scale K adds (K - 1) x 400 queries (what the draw left out, then further retrieval-zh
             and SNLI rows, by a seed of their own) and trains K x the steps: the same scored sets.
  sts        STS-B-zh train (5,231 pairs, less the 500 of the tune split) + 5,000 AFQMC train pairs
Dev sets (no row trains on them), scored by eval/cmteb.py (mteb):
  STS-B-zh validation (Spearman), a held-out AFQMC split (2,000 pairs, Spearman), the 402 held-out
  CMRC queries against the full 256-paragraph corpus (nDCG@10), and out of domain: alpaca-zh
  instruction -> response retrieval (300 pairs, nDCG@10).
Tune split (no row trains on it, the table does not report it; only rows f and h's merge weights are
  chosen on it): the same four kinds, from other items: 500 STS-B-zh train pairs, 1,000 other AFQMC pairs,
  100 other CMRC queries against the full corpus, the next 300 alpaca-zh pairs.
Each row's result is cached in OUT/results/<row>.json; a re-run only runs the rows that are missing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from bench.ablation_data import (QUICK, SELF_DISTILL, Budget, dev_tasks, mine, read_jsonl, score_with_base, split_data,
                                 task_config)
from bench.ablation_report import plot, table, write_doc
from bench import launch
from bench.base_model import base_model

ROOT = Path(__file__).resolve().parent.parent

ROWS = {
    "base": "base model",
    "a": "sentence-transformers trainer (MNRL + hard negatives, CoSENT, round robin)",
    "b": "ours, random task per step, static negatives",
    "c": "ours, CBB, static negatives",
    "d": "ours, random task per step + dynamic mining",
    "e": "ours, CBB + dynamic mining",
    "f": "(e) merged with the base (LM-Cocktail), weight chosen on the tune split",
    "g": "(e) + self-distillation from the base's scores",
    "h": "(g) merged with the base, weight chosen on the tune split",
}
MERGED = {"f": "e", "h": "g"}  # a merged row: the row it merges with the base


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--quick", action="store_true", help="tiny model and data: a smoke run of every row")
    p.add_argument("--out", default=None, help="default: bench/results/ablation[-quick]")
    p.add_argument("--model", default=None, help="base model (default: multilingual-e5-small; --quick: a tiny model)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    p.add_argument("--force", action="store_true", help="re-run rows that already have a result")
    p.add_argument("--seed", type=int, default=None,
                   help="another training seed (same data and split): the spread between seeds; default 42, "
                        "written to bench/results/ablation-seed<N>, not to docs/ablation.md")
    p.add_argument("--lr", type=float, default=None,
                   help="another learning rate for every trained row (same data, split and seed); default 2e-5, "
                        "written to bench/results/ablation-lr<LR>, not to docs/ablation.md (bench/lr_choice.py picks "
                        "each trainer's lr and temperature on the tune split)")
    p.add_argument("--temperature", type=float, default=None,
                   help="one InfoNCE temperature for both trainers (ours --temperature, the peer's MNRL scale 1/T); "
                        "default: each trainer's own (ours 0.02, the peer's scale 20 = 0.05); written to "
                        "bench/results/ablation-t<T>, not to docs/ablation.md (bench/lr_choice.py --temperatures)")
    p.add_argument("--scale", type=int, default=1,
                   help="K times the examples per row: K x the steps and K x the retrieval queries (the new ones from "
                        "what the draw left out and further retrieval-zh / SNLI rows), the same dev and tune sets; "
                        "written to bench/results/ablation[..]-x<K>")
    p.add_argument("--keep-false-negatives", action="store_true",
                   help="our rows count copies of a query's positive among its candidates as negatives (train/finetune.py "
                        "--no-mask-false-negatives), as before the mask; written to bench/results/ablation[..]-keepfn")
    p.add_argument("--no-matryoshka", action="store_true",
                   help="our rows without the expansion layer and the Matryoshka prefixes (finetune.py --expand-dim 0 "
                        "--mrl-dims none), the full width alone as the peer trains it; written to "
                        "bench/results/ablation[..]-nomrl")
    p.add_argument("--no-doc", "--no-readme", dest="no_doc", action="store_true",
                   help="do not write the table into docs/ablation.md")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- rows

def train_ours(row: str, out: Path, data_dir: Path, base: str, b: Budget, schedule: str, mining: bool,
               distill: dict | None = None) -> dict:
    steps = b.steps if schedule == "cbb" else 2 * b.steps
    run_dir = out / "runs" / row
    args = ["--model", base, "--data-config", str(task_config(data_dir, b, mining, distill)), "--task-schedule", schedule,
            "--max-steps", str(steps), "--lr", str(b.lr), "--max-length", str(b.max_length), "--seed", str(b.seed),
            "--log-steps", str(max(1, steps // 10)), "--save-steps", "100000",
            "--merge-weight", "1"]  # the trained rows are the recipe as trained; f and h are the merges
    if b.temperature is not None:
        args += ["--temperature", str(b.temperature)]
    if not b.mask_false_negatives:
        args += ["--no-mask-false-negatives"]
    if not b.matryoshka:
        args += ["--expand-dim", "0", "--mrl-dims", "none"]
    summary = launch.train("train/finetune.py", args, run_dir, out / "logs" / f"{row}.log")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # 2.3 GB a row; the release is in final/
    info = {"model": str(run_dir / "final"), "examples": summary["examples"], "steps": summary["steps"],
            "false_negatives": summary["false_negatives"] if b.mask_false_negatives else None}
    if mining:
        info["mining"] = summary["mining"]["retrieval"]
    if distill:
        info["distill"] = distill
    return info


def own_temperature(row: str) -> float:
    """A trainer's default InfoNCE temperature, read from the trainer: the peer's MultipleNegativesRankingLoss
    scale (1 / temperature), ours train/args.py's --temperature."""
    if row == "a":
        import inspect

        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        return 1 / inspect.signature(MultipleNegativesRankingLoss.__init__).parameters["scale"].default
    from train.args import add_training_args
    parser = argparse.ArgumentParser()
    add_training_args(parser)
    return parser.get_default("temperature")


def train_sentence_transformers(row: str, out: Path, data_dir: Path, base: str, b: Budget) -> dict:
    """The peer, as its docs set it up; same prompts, length, lr, warmup and weight decay as ours."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss, MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import (BatchSamplers, MultiDatasetBatchSamplers,
                                                                          SentenceTransformerTrainingArguments)
    torch.set_num_threads(2)
    model = SentenceTransformer(base, device="cpu", local_files_only=True)
    release_length = model.max_seq_length
    model.max_seq_length = b.max_length
    qp, pp = model.prompts.get("query", ""), model.prompts.get("passage", "")
    retrieval = read_jsonl(data_dir / "train/retrieval.jsonl")
    columns = {"anchor": [r["query"] for r in retrieval], "positive": [r["pos"][0] for r in retrieval]}
    for i in range(b.negatives):
        columns[f"negative_{i + 1}"] = [r["neg"][i] for r in retrieval]
    sts = read_jsonl(data_dir / "train/sts.jsonl")
    data = {"retrieval": Dataset.from_dict(columns),
            "sts": Dataset.from_dict({k: [r[k] for r in sts] for k in ("sentence1", "sentence2", "score")})}
    prompts = {"retrieval": {"anchor": qp, **{c: pp for c in columns if c != "anchor"}},
               "sts": {"sentence1": qp, "sentence2": qp}}
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "runs" / row), per_device_train_batch_size=b.batch, max_steps=2 * b.steps,
        learning_rate=b.lr, warmup_ratio=0.1, weight_decay=0.01, seed=b.seed, use_cpu=True,
        batch_sampler=BatchSamplers.NO_DUPLICATES, multi_dataset_batch_sampler=MultiDatasetBatchSamplers.ROUND_ROBIN,
        prompts=prompts, save_strategy="no", report_to="none", logging_steps=max(1, b.steps // 5),
        dataloader_drop_last=True)
    mnrl = {} if b.temperature is None else {"scale": 1 / b.temperature}  # its default scale: 20
    losses = {"retrieval": MultipleNegativesRankingLoss(model, **mnrl), "sts": CoSENTLoss(model)}
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=losses)
    trainer.train()
    if trainer.state.global_step != 2 * b.steps:  # e.g. no-duplicates batches could not be formed from the data
        raise SystemExit(f"row {row}: the sentence-transformers trainer ran {trainer.state.global_step} of "
                         f"{2 * b.steps} steps")
    model.max_seq_length = release_length  # the same release rule as ours: the base's inference length
    final = out / "runs" / row / "final"
    model.save(str(final))
    return {"model": str(final), "examples": {"retrieval": b.steps * b.batch, "sts": b.steps * b.batch},
            "steps": 2 * b.steps}


def merge_row(row: str, out: Path, data_dir: Path, base: str, b: Budget, source: dict) -> dict:
    """Rows f and h: the merge weight that eval/merge_sweep.py's rule picks on the tune split, then that merge."""
    from eval.merge_sweep import sweep
    from train.run.merge import merge_release
    start = time.perf_counter()
    tune = sweep(source["model"], base, dev_tasks(data_dir, "tune"), b.merge_weights, b.max_drop, b.eval_batch,
                 out / "tune" / row)
    final = merge_release(source["model"], base, tune["weight"], out / "runs" / row / "final")
    return {"model": str(final), "examples": source["examples"], "steps": source["steps"], "mining": source.get("mining"),
            "distill": source.get("distill"), "merge_weight": tune["weight"], "tune": tune, "sweep_seconds": time.perf_counter() - start}


def train_row(row: str, out: Path, data_dir: Path, base: str, b: Budget, results: dict, force: bool) -> dict:
    """Train (or merge) one row. What a finished training returns is kept in runs/<row>/trained.json, so a
    run stopped during evaluation starts again at the evaluation, not at step 0."""
    trained = out / "runs" / row / "trained.json"
    if trained.is_file() and not force:
        return json.loads(trained.read_text())
    start = time.perf_counter()
    if row == "base":
        return {"model": base, "examples": {}, "steps": 0, "seconds": None}
    if row == "a":
        info = train_sentence_transformers(row, out, data_dir, base, b)
    elif row in MERGED:
        source = MERGED[row]
        info = merge_row(row, out, data_dir, base, b,
                         results.get(source) or json.loads((out / f"results/{source}.json").read_text()))
    else:
        schedule = "cbb" if row in ("c", "e", "g") else "random"
        info = train_ours(row, out, data_dir, base, b, schedule, mining=row in ("d", "e", "g"),
                          distill=SELF_DISTILL if row == "g" else None)
    info["seconds"] = time.perf_counter() - start if row not in MERGED else None
    trained.write_text(json.dumps(info, indent=1))
    return info


def evaluate_row(info: dict, data_dir: Path, out: Path, row: str, b: Budget) -> dict:
    from sentence_transformers import SentenceTransformer

    from eval.cmteb import evaluate
    model = SentenceTransformer(info["model"], device="cpu", local_files_only=True)
    width = model.get_embedding_dimension()
    base_width = info.get("base_width", width)
    dims = [None] if width == base_width else [base_width, None]
    scores = evaluate(model, dev_tasks(data_dir), dims, b.eval_batch, f"ablation-{row}", out / "eval" / row)
    return {"scores": scores[None], "scores_base_width": scores[dims[0]], "width": width,
            "max_seq_length": model.max_seq_length}


def false_negative_summary(results: dict) -> str:
    """How many candidates each of our rows left out of InfoNCE as copies of a query's positive."""
    counts = {r: results[r].get("false_negatives") for r in "bcdeg" if r in results}
    if not any(v is not None for v in counts.values()):
        return ""
    return (" Candidates left out of InfoNCE as copies of the query's positive (another query's copy of the same "
            "passage, in its batch): " + ", ".join(f"{r} {v if v is not None else '-'}" for r, v in counts.items()) + ".")


def tune_summary(row: str, merged: dict) -> str:
    """A merged row's choice on the tune split: each weight's average and worst drop there (not dev scores)."""
    from eval.merge_sweep import average, worst_drop
    tune = merged["tune"]
    per_weight = "; ".join(f"{w}: {average(s):.2f} ({worst_drop(s, tune['base']):+.2f})"
                           for w, s in tune["weights"].items())
    return (f" Row {row}'s merge weight, chosen on the tune split (best average with no task below the base by more "
            f"than {tune['max_drop']:g}): {merged['merge_weight']:g}; tune average (worst vs base) per weight: "
            f"base {average(tune['base']):.2f}; {per_weight}; the sweep took {merged['sweep_seconds']:.0f} s.")


# --------------------------------------------------------------------------- main

def variant_suffix(seed: int | None, lr: float | None, temperature: float | None, *, keep_false_negatives: bool = False,
                   scale: int = 1, matryoshka: bool = True) -> str:
    """The output folder's suffix for a run off the main table's settings (bench/lr_choice.py reads the same)."""
    return ((f"-seed{seed}" if seed is not None else "") + (f"-lr{lr:g}" if lr is not None else "")
            + (f"-t{temperature:g}" if temperature is not None else "") + ("-keepfn" if keep_false_negatives else "")
            + ("-nomrl" if not matryoshka else "") + (f"-x{scale}" if scale != 1 else ""))


def main(argv=None) -> dict:
    args = parse_args(argv)
    budget = QUICK if args.quick else Budget()
    if args.seed is not None:
        budget = replace(budget, seed=args.seed)
    if args.lr is not None:
        budget = replace(budget, lr=args.lr)
    if args.temperature is not None:
        budget = replace(budget, temperature=args.temperature)
    budget = replace(budget, mask_false_negatives=not args.keep_false_negatives, matryoshka=not args.no_matryoshka)
    if args.scale < 1:
        raise SystemExit(f"--scale must be a positive integer, got {args.scale}")
    budget = replace(budget, steps=budget.steps * args.scale, extra_retrieval=(args.scale - 1) * budget.retrieval_rows)
    variant = variant_suffix(args.seed, args.lr, args.temperature, keep_false_negatives=args.keep_false_negatives,
                             scale=args.scale, matryoshka=not args.no_matryoshka)
    name = ("ablation-quick" if args.quick else "ablation") + variant
    out = Path(args.out or ROOT / "bench/results" / name).resolve()  # our rows run with the repo as cwd
    rows = [r.strip() for r in args.rows.split(",")]
    if set(rows) - set(ROWS):
        raise SystemExit(f"--rows: unknown {sorted(set(rows) - set(ROWS))}; known: {', '.join(ROWS)}")
    rows = ["base"] + [r for r in ROWS if r in rows and r != "base"]  # every table is relative to the base
    out.mkdir(parents=True, exist_ok=True)
    base = base_model(args.model, args.quick, out)
    data_dir = out / "data"
    counts = split_data(data_dir, budget)
    counts["retrieval left out: too few negatives after filtering"] = mine(data_dir, base, budget, launch.script_env())
    if "g" in rows:
        score_with_base(data_dir, base, launch.script_env())
    print(f"data: {counts}; budget: {asdict(budget)}")

    from sentence_transformers import SentenceTransformer
    base_width = SentenceTransformer(base, device="cpu", local_files_only=True).get_embedding_dimension()
    results: dict[str, dict] = {}
    for row in rows:
        cached = out / "results" / f"{row}.json"
        if cached.is_file() and not args.force:
            results[row] = json.loads(cached.read_text())
            continue
        info = train_row(row, out, data_dir, base, budget, results, args.force)
        info["base_width"] = base_width
        info.update(evaluate_row(info, data_dir, out, row, budget))
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(info, indent=1))
        results[row] = info
        print(f"row {row}: {ROWS[row]}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in info["scores"].items()), flush=True)

    machine = f"{os.cpu_count()} CPU cores, torch {__import__('torch').__version__}, no GPU"
    labels = dict(ROWS)
    for row in MERGED:
        if row in results:
            labels[row] = ROWS[row] + f" ({results[row]['merge_weight']:g})"
    text = table(results, labels, machine)
    plot(results, out / "ablation.png")
    seen = {r: results[r]["examples"] for r in rows if r != "base"}
    flags = [" --quick" * args.quick] + [f" --{k} {v:g}" for k, v in
                                          (("seed", args.seed), ("lr", args.lr), ("temperature", args.temperature))
                                          if v is not None] + [" --keep-false-negatives" * args.keep_false_negatives]
    flags += [" --no-matryoshka"] if args.no_matryoshka else []
    flags += [f" --scale {args.scale}"] if args.scale != 1 else []
    command = "python bench/ablation.py" + "".join(flags)
    report = (f"{text}\n\nCommand: `{command}` ({machine}). Examples seen per row (retrieval, sts): "
              + "; ".join(f"{r} {s.get('retrieval', 0)}+{s.get('sts', 0)}" for r, s in seen.items())
              + f". Budget: {budget.steps} CBB steps x ({budget.batch} retrieval + {budget.batch} sts), "
              f"{budget.negatives} hard negatives per query, training length {budget.max_length}, lr {budget.lr:g}, "
              + (f"temperature {budget.temperature:g} (both trainers), " if budget.temperature is not None else "")
              + ("ours without the false-negative mask, " if not budget.mask_false_negatives else "")
              + ("ours without the expansion layer and Matryoshka, " if not budget.matryoshka else "")
              + f"seed {budget.seed}. Data: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + "."
              + false_negative_summary(results)
              + (f" Self-distillation (g, h): {json.dumps(SELF_DISTILL)} over the base's cosines." if "g" in results else "")
              + "".join(tune_summary(row, results[row]) for row in MERGED if row in results))
    (out / "table.md").write_text(report + "\n")
    print(report)
    if not args.quick and not args.no_doc and not variant and set(rows) == set(ROWS):
        shutil.copy(out / "ablation.png", ROOT / "docs/ablation.png")
        write_doc(report + "\n\n![per-task dev scores](ablation.png)")
        print("docs/ablation.md updated")
    return results


if __name__ == "__main__":
    main()
