"""Fine-tuning speed against sentence-transformers' trainer: the same model, data, batch, lengths and
losses, every row in its own fresh process, one after the other in this one invocation.

    python bench/throughput.py                 # multilingual-e5-small (offline), 800 examples per row
    python bench/throughput.py --quick         # a tiny model: a smoke run (CI)

Rows, each seeing the same number of examples of the shipped demo data (retrieval triplets with one
hard negative, STS pairs) at --max-length tokens:
  st          sentence-transformers' trainer: MNRL with the hard negative + CoSENT, round robin,
              one process using every core (what a user runs)
  random      train/finetune.py, one task per step, 2 ranks each with its own queries
  cbb         train/finetune.py, CBB: both tasks in every step (retrieval on one rank, STS on the other)
  cbb_every   cbb with --task-placement every-rank: each rank half of each task (the same objective)
  cbb_zero2   cbb_every under ZeRO-2 (the scripts' default config) instead of --deepspeed-config
  cbb_mining  cbb_every with dynamic hard-negative mining (the share of step time it takes)
  cbb_cache   cbb_every with GradCache (--mini-batch): the price of the second forward

Our rows run 2 ranks of one thread under --deepspeed-config (default ds_configs/zero0.json: plain
data parallel, every rank the whole optimizer, which a model this size affords).

Printed per row: examples/s, non-padding tokens/s, peak resident memory of the (rank 0) process,
the ratio to the st row, and for ours the shares of rank 0's training time spent waiting for input,
in the forwards (with the losses), in backward (with ZeRO's gradient reduction, and so the wait for
a slower rank), in the optimizer step (with ZeRO's gather of the updated weights), in mining (its
all-gather of scores included) and in the losses' all-gathers (forward and backward). Timings are
wall clock on whatever else the machine runs: compare rows of one invocation, not figures across
machines.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.base_model import base_model  # noqa: E402  (after the path)
DEMO = ROOT / "data/demo/finetune"
ROWS = ["st", "random", "cbb", "cbb_every", "cbb_zero2", "cbb_mining", "cbb_cache"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="tiny model, few examples")
    p.add_argument("--model", default=None, help="default: multilingual-e5-small (offline); --quick: a tiny model")
    p.add_argument("--examples", type=int, default=800, help="examples each row trains on (half retrieval, half STS)")
    p.add_argument("--batch", type=int, default=16, help="examples per task per step")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--mini-batch", type=int, default=8, help="GradCache mini-batch of the cbb_cache row")
    p.add_argument("--deepspeed-config", default=str(ROOT / "ds_configs/zero0.json"), help="of our rows but cbb_zero2")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--out", default=None, help="default: bench/results/throughput[-quick]")
    p.add_argument("--st-row", default=None, help=argparse.SUPPRESS)  # internal: run the st row in this process
    return p.parse_args(argv)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def write_data(out: Path) -> Path:
    """The demo retrieval set with one hard negative per query, and the demo STS set."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    retrieval = [dict(r, neg=r["neg"][:1]) for r in read_jsonl(DEMO / "retrieval.jsonl") if r.get("neg")]
    (data / "retrieval.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in retrieval),
                                          encoding="utf-8")
    (data / "sts.jsonl").write_text((DEMO / "sts.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    return data


def task_config(data: Path, batch: int, mining: bool) -> Path:
    retrieval = {"type": "retrieval", "files": [str(data / "retrieval.jsonl")], "batch_size": batch,
                 "num_negatives": 1, "ranks": 1}
    if mining:
        retrieval["mining"] = "v1"
    path = data / f"tasks{'_mining' if mining else ''}.json"
    path.write_text(json.dumps({"tasks": {"retrieval": retrieval, "sts": {
        "type": "sts", "files": [str(data / "sts.jsonl")], "batch_size": batch, "ranks": 1}}}))
    return path


def run_ours(row: str, args, base: str, data: Path, out: Path) -> dict:
    schedule = "random" if row == "random" else "cbb"
    steps = args.examples // args.batch if schedule == "random" else args.examples // (2 * args.batch)
    extra = ["--mini-batch", str(args.mini_batch)] if row == "cbb_cache" else []
    extra += ["--task-placement", "every-rank"] if row not in ("random", "cbb") else []
    extra += ["--deepspeed-config", str(ROOT / "ds_configs/zero2.json") if row == "cbb_zero2" else args.deepspeed_config]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
           str(29300 + os.getpid() % 500), str(ROOT / "train/finetune.py"), "--model", base,
           "--data-config", str(task_config(data, args.batch, row == "cbb_mining")), "--task-schedule", schedule,
           "--max-steps", str(steps), "--max-length", str(args.max_length), "--output-dir", str(out / "runs" / row),
           "--save-steps", "100000", "--log-steps", str(max(1, steps // 4)), "--merge-weight", "1", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (out / f"{row}.log").write_text(proc.stdout + proc.stderr)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("train stats: ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"row {row} failed ({proc.returncode}); see {out / f'{row}.log'}")
    stats = json.loads(line[len("train stats: "):])
    return {**stats, "examples": steps * args.batch * (2 if schedule == "cbb" else 1)}


def run_st(args, base: str, data: Path, out: Path) -> dict:
    """The peer as its docs set it up, in this process; tokens counted at the model's forward."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss, MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import (BatchSamplers, MultiDatasetBatchSamplers,
                                                                          SentenceTransformerTrainingArguments)
    torch.set_num_threads(os.cpu_count() or 1)
    model = SentenceTransformer(base, device="cpu", local_files_only=True)
    model.max_seq_length = args.max_length
    tokens = [0]
    model.register_forward_pre_hook(lambda _, inputs: tokens.__setitem__(0, tokens[0] + int(inputs[0]["attention_mask"].sum())))
    qp, pp = model.prompts.get("query", ""), model.prompts.get("passage", "")
    retrieval = read_jsonl(data / "retrieval.jsonl")
    sts = read_jsonl(data / "sts.jsonl")
    datasets = {"retrieval": Dataset.from_dict({"anchor": [r["query"] for r in retrieval],
                                                "positive": [r["pos"][0] for r in retrieval],
                                                "negative_1": [r["neg"][0] for r in retrieval]}),
                "sts": Dataset.from_dict({k: [r[k] for r in sts] for k in ("sentence1", "sentence2", "score")})}
    prompts = {"retrieval": {"anchor": qp, "positive": pp, "negative_1": pp}, "sts": {"sentence1": qp, "sentence2": qp}}
    steps = args.examples // args.batch
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(out / "runs/st"), per_device_train_batch_size=args.batch, max_steps=steps, learning_rate=1e-5,
        warmup_ratio=0.1, weight_decay=0.01, seed=42, use_cpu=True, batch_sampler=BatchSamplers.NO_DUPLICATES,
        multi_dataset_batch_sampler=MultiDatasetBatchSamplers.ROUND_ROBIN, prompts=prompts, save_strategy="no",
        report_to="none", logging_steps=max(1, steps // 4), dataloader_drop_last=True)
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=datasets,
                                         loss={"retrieval": MultipleNegativesRankingLoss(model), "sts": CoSENTLoss(model)})
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"steps": steps, "seconds": round(seconds, 3), "tokens": tokens[0], "examples": steps * args.batch,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def table(results: dict, machine: str) -> str:
    peer = results.get("st")
    lines = ["| row | examples | steps | s | examples/s | tokens/s | vs st | peak MB (rank 0) | input | forward | backward "
             "| step | mining | all-gathers |", "|---" * 14 + "|"]
    for row, r in results.items():
        rate = r["examples"] / r["seconds"]
        ratio = f"{rate / (peer['examples'] / peer['seconds']):.2f}x" if peer else ""
        share = lambda key: f"{100 * r[key]:.1f}%" if key in r else ""  # noqa: E731
        lines.append(f"| {row} | {r['examples']} | {r['steps']} | {r['seconds']:.0f} | {rate:.2f} | "
                     f"{r['tokens'] / r['seconds']:,.0f} | {ratio} | {r['peak_rss_mb']:.0f} | "
                     + " | ".join(share(f"{k}_share") for k in ("input", "forward", "backward", "step", "mining", "gather"))
                     + " |")
    return "\n".join(lines) + f"\n\n{machine}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.examples, args.batch, args.max_length, args.mini_batch = 16, 4, 32, 3
    out = Path(args.out or ROOT / "bench/results" / ("throughput-quick" if args.quick else "throughput"))
    out.mkdir(parents=True, exist_ok=True)
    base = base_model(args.model, args.quick, out)
    data = write_data(out)
    if args.st_row:  # the st row's own process: print its figures for the parent
        print("st stats: " + json.dumps(run_st(args, base, data, out)))
        return {}
    results = {}
    for row in [r.strip() for r in args.rows.split(",")]:
        if row not in ROWS:
            raise SystemExit(f"--rows: unknown row {row}; known: {', '.join(ROWS)}")
        if row == "st":
            proc = subprocess.run([sys.executable, __file__, "--st-row", "1", *(argv or sys.argv[1:])], cwd=ROOT,
                                  capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
            (out / f"{row}.log").write_text(proc.stdout + proc.stderr)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("st stats: ")), None)
            if proc.returncode or line is None:
                raise SystemExit(f"row {row} failed ({proc.returncode}); see {out / f'{row}.log'}")
            results[row] = json.loads(line[len("st stats: "):])
        else:
            results[row] = run_ours(row, args, base, data, out)
        print(f"{row}: {results[row]}", flush=True)
    import torch
    machine = (f"Command: `python bench/throughput.py{' --quick' if args.quick else ''}`; {os.cpu_count()} CPU cores, "
               f"torch {torch.__version__}, {'a tiny model' if args.quick else Path(base).name}, batch {args.batch} "
               f"per task, length {args.max_length}, GradCache mini-batch {args.mini_batch}; our rows under "
               f"{Path(args.deepspeed_config).name} but cbb_zero2.")
    report = table(results, machine)
    (out / "table.md").write_text(report + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(report)
    return results


if __name__ == "__main__":
    main()
