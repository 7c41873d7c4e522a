"""Fine-tuning speed against sentence-transformers' trainer: the same model, data, batch, lengths and
losses, every row in its own fresh process, one after the other in this one invocation.

    python bench/throughput.py                 # multilingual-e5-small (offline), 800 examples per row
    python bench/throughput.py --quick         # a tiny model: a smoke run (CI)

Rows, each seeing the same number of examples of the shipped demo data or --data's (retrieval triplets with one
hard negative, STS pairs) at --max-length tokens:
  st          sentence-transformers' trainer: MNRL with the hard negative + CoSENT, round robin,
              one process using every core (what a user runs)
  random      train/finetune.py, one task per step, 2 ranks each with its own queries
  cbb         train/finetune.py, CBB: both tasks in every step (retrieval on one rank, STS on the other)
  cbb_every   cbb with --task-placement every-rank: each rank half of each task (the same objective)
  cbb_zero2   cbb_every under ZeRO-2 (zero2.json) instead of --deepspeed-config
  cbb_mining  cbb_every with dynamic hard-negative mining (the share of step time it takes)
  cbb_cache   cbb_every with GradCache (--mini-batch): the price of the second forward

Our rows run 2 ranks of one thread under --deepspeed-config (default ds_configs/zero0.json: plain
data parallel, every rank the whole optimizer, which a model this size affords).

    python bench/throughput.py --device cuda   # the hardware: tokens/s and MFU of a BERT-large step

With --device cuda the rows are pre-training steps (train/pretrain.py, gathered InfoNCE) of a model
of bge-large-zh's shape with random weights (24 x 1024, 326M parameters, 302M in the layers) on
pairs that fill --max-length (512) tokens, bf16, ZeRO-1, one rank per GPU:
  large        --batch pairs per GPU, no GradCache
  large_cache  the same batch through GradCache (--mini-batch texts per forward): its price
  large_32k    a global batch of --big-batch (32,768) pairs with GradCache: it fits, peak memory
MFU counts 6 x the layers' parameters x non-padding tokens per second (attention's own FLOPs and
GradCache's second forward are not counted: they are cost, not model work) against the GPU's dense
bf16 peak (--peak-tflops, or known for H100/H200/A100), over the steps after the first.

With --repeat N the rows run in N rounds, each row in turn, and each row's figures are those of
its run of median time (the table gives the range of its times). Printed per row: examples/s, non-padding tokens/s, peak resident memory of the (rank 0) process,
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
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import launch
from bench.base_model import LARGE, TINY, base_model, matmul_parameters, random_model

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data/demo/finetune"
ROWS = ["st", "random", "cbb", "cbb_every", "cbb_zero2", "cbb_mining", "cbb_cache"]
LARGE_ROWS = ["large", "large_cache", "large_32k"]
# dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets); the first name contained in the device's wins
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="tiny model, few examples")
    p.add_argument("--model", default=None, help="default: multilingual-e5-small (offline); --quick: a tiny model")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the BERT-large rows")
    p.add_argument("--data", default=str(DEMO), help="folder with retrieval.jsonl (query, pos, neg) and sts.jsonl "
                                                     "(default: the shipped demo data); e.g. the ablation's "
                                                     "bench/results/ablation/data/train, whose CMRC paragraphs fill "
                                                     "the length")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the rows; each row's figures are from its run "
                                                         "of median time, the table shows the range")
    p.add_argument("--examples", type=int, default=800, help="examples each row trains on (half retrieval, half STS)")
    p.add_argument("--batch", type=int, default=None, help="examples per task per step (default 16); cuda: pairs "
                                                           "per GPU of the large rows (default 32)")
    p.add_argument("--max-length", type=int, default=None, help="default 128; cuda: 512")
    p.add_argument("--mini-batch", type=int, default=None, help="GradCache mini-batch (texts) of the cbb_cache "
                                                                "(default 8) and large_cache (64) rows")
    p.add_argument("--steps", type=int, default=20, help="steps of the large rows (the first is not timed)")
    p.add_argument("--big-batch", type=int, default=32768, help="pairs per step of the large_32k row")
    p.add_argument("--big-mini-batch", type=int, default=256, help="GradCache mini-batch of the large_32k row")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak per GPU, for MFU")
    p.add_argument("--deepspeed-config", default=str(ROOT / "ds_configs/zero0.json"), help="of our rows but cbb_zero2")
    p.add_argument("--rows", default=None, help=f"default: {','.join(ROWS)}; cuda: {','.join(LARGE_ROWS)}")
    p.add_argument("--out", default=None, help="default: bench/results/throughput[-quick]")
    p.add_argument("--st-row", default=None, help=argparse.SUPPRESS)  # internal: run the st row in this process
    return p.parse_args(argv)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def write_data(out: Path, source: Path = DEMO) -> Path:
    """`source`'s retrieval set (those queries with a hard negative, the first one kept) and its STS set."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in ("retrieval.jsonl", "sts.jsonl"):
        if not (source / name).is_file():
            raise SystemExit(f"--data: {source / name} not found (the folder needs retrieval.jsonl and sts.jsonl)")
    retrieval = [dict(r, neg=r["neg"][:1]) for r in read_jsonl(source / "retrieval.jsonl") if r.get("neg")]
    (data / "retrieval.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in retrieval),
                                          encoding="utf-8")
    (data / "sts.jsonl").write_text((source / "sts.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
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
    stats = train_row(row, "train/finetune.py", [
        "--model", base, "--data-config", str(task_config(data, args.batch, row == "cbb_mining")), "--task-schedule",
        schedule, "--max-steps", str(steps), "--max-length", str(args.max_length), "--save-steps", "100000",
        "--log-steps", str(max(1, steps // 4)), "--merge-weight", "1", *extra], out, threads=1)
    return {**stats, "examples": steps * args.batch * (2 if schedule == "cbb" else 1)}


def train_row(row: str, script: str, script_args: list[str], out: Path, ranks: int = 2, threads: int | None = 1) -> dict:
    """One of our rows through bench/launch.py: its summary.json. The row's output folder goes once it
    has run: its checkpoint (GBs a row) is not what is measured."""
    try:
        return launch.train(script, script_args, out / "runs" / row, out / f"{row}.log", ranks=ranks, threads=threads)
    finally:
        shutil.rmtree(out / "runs" / row, ignore_errors=True)


def run_peer(argv, out: Path) -> dict:
    """The sentence-transformers trainer's row, in a process of its own (it uses both cores); it writes
    its figures to st_summary.json."""
    summary = out / "st_summary.json"
    summary.unlink(missing_ok=True)
    with open(out / "st.log", "w") as log:
        code = subprocess.run([sys.executable, __file__, "--st-row", "1", *(argv or sys.argv[1:])], cwd=ROOT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT).returncode
    if code or not summary.is_file():
        raise SystemExit(f"row st failed ({code}); see {out / 'st.log'}")
    return json.loads(summary.read_text())


def write_long_pairs(out: Path, lines: int, chars: int) -> Path:
    """Pairs of `chars` Chinese characters a side, cut at seeded offsets from the demo texts' Chinese
    characters joined end to end. A BERT tokenizer makes each a token, so every text fills the length."""
    import random
    from bench.tiny_model import demo_texts
    path = out / "data" / f"long_pairs_{lines}x{chars}.jsonl"
    if path.is_file():
        return path
    text = "".join(ch for ch in "".join(demo_texts()) if "\u4e00" <= ch <= "\u9fff")
    rng = random.Random(0)

    def cut() -> str:
        start = rng.randrange(len(text) - chars)
        return text[start:start + chars]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            f.write(json.dumps({"query": cut(), "pos": cut()}, ensure_ascii=False) + "\n")
    return path


def large_row_size(row: str, args) -> tuple[int, int, int]:
    """(pairs per GPU per step, steps, GradCache mini-batch or 0) of a large row."""
    if row == "large_32k":
        return args.big_batch, 2, args.big_mini_batch
    return args.batch, args.steps, args.mini_batch if row == "large_cache" else 0


def run_large(row: str, args, model: str, data: Path, out: Path, gpus: int) -> dict:
    """A pre-training run of the large rows: bf16 and one rank per GPU on cuda, fp32 on CPU (--quick)."""
    batch, steps, mini_batch = large_row_size(row, args)
    stats = train_row(row, "train/pretrain.py", [
        "--model", model, "--train-data", str(data), "--batch-size", str(batch), "--max-length", str(args.max_length),
        "--max-steps", str(steps), "--deepspeed-config", str(ROOT / "ds_configs/zero1.json"),
        "--precision", "bf16" if args.device == "cuda" else "fp32", "--save-steps", "100000",
        "--log-steps", str(max(1, steps // 4)), "--mini-batch", str(mini_batch)], out, ranks=gpus,
        threads=None if args.device == "cuda" else os.cpu_count())
    return {**stats, "gpus": gpus, "pairs_per_step": batch * gpus, "mini_batch": mini_batch}


def peak_tflops(args) -> float | None:
    """The GPU's dense bf16 peak: --peak-tflops, or from the device's name."""
    if args.peak_tflops or args.device != "cuda":
        return args.peak_tflops
    import torch
    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def large_table(results: dict, n_params: int, peak: float | None, machine: str) -> str:
    """Steady-state figures (after each row's first step) of the large rows."""
    lines = ["| row | pairs/step | GradCache mini-batch | steps timed | s/step | tokens/s | TFLOP/s per GPU | MFU "
             "| peak GPU MB | peak RSS MB |", "|---" * 10 + "|"]
    for row, r in results.items():
        seconds = max(r["warm_seconds"], 1e-9)
        tflops = 6 * n_params * r["warm_tokens"] / seconds / r["gpus"] / 1e12
        r["tflops_per_gpu"], r["mfu"] = tflops, (tflops / peak if peak else None)
        mfu = f"{100 * r['mfu']:.1f}%" if peak else "n/a"
        gpu_mb = f"{r['peak_gpu_mb']:,.0f}" if "peak_gpu_mb" in r else "—"
        lines.append(f"| {row} | {r['pairs_per_step']:,} | {r['mini_batch'] or 'off'} | {r['warm_steps']} | "
                     f"{seconds / max(r['warm_steps'], 1):.3f} | {r['warm_tokens'] / seconds:,.0f} | {tflops:.3g} | "
                     f"{mfu} | {gpu_mb} | {r['peak_rss_mb']:,.0f} |")
    return "\n".join(lines) + f"\n\n{machine}"


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
        def share(key: str, r: dict = r) -> str:
            return f"{100 * r[key]:.1f}%" if key in r else ""
        spread = f" ({min(r['seconds_all']):.0f}–{max(r['seconds_all']):.0f})" if len(r.get("seconds_all", [])) > 1 else ""
        lines.append(f"| {row} | {r['examples']} | {r['steps']} | {r['seconds']:.0f}{spread} | {rate:.2f} | "
                     f"{r['tokens'] / r['seconds']:,.0f} | {ratio} | {r['peak_rss_mb']:.0f} | "
                     + " | ".join(share(f"{k}_share") for k in ("input", "forward", "backward", "step", "mining", "gather"))
                     + " |")
    return "\n".join(lines) + f"\n\n{machine}"


def with_defaults(args) -> argparse.Namespace:
    """The sizes the device asks for; --quick: a smoke run of whichever rows."""
    if args.quick:
        args.examples, args.batch, args.max_length, args.mini_batch = 16, 4, 32, 3
        args.steps, args.big_batch, args.big_mini_batch = 3, 16, 8
    cuda = args.device == "cuda"
    for key, value in dict(batch=32 if cuda else 16, max_length=512 if cuda else 128, mini_batch=64 if cuda else 8).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.rows = args.rows or ",".join(LARGE_ROWS if cuda else ROWS)
    return args


def median_run(runs: list[dict]) -> dict:
    """The run of median time (the lower middle of an even count), with every run's seconds kept."""
    middle = sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]
    return {**middle, "seconds_all": [r["seconds"] for r in runs]}


def run_rows(args, rows: list[str], argv, out: Path) -> tuple[dict, str]:
    """The fine-tuning rows against the peer: their results and the table."""
    data = write_data(out, Path(args.data))
    base = base_model(args.model, args.quick, out)
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    for round_ in range(args.repeat):  # rounds of every row in turn: a slow spell of the machine hits them alike
        for row in rows:
            if row == "st":
                runs[row].append(run_peer(argv, out))
            else:
                runs[row].append(run_ours(row, args, base, data, out))
            print(f"{row} (round {round_ + 1}): {runs[row][-1]}", flush=True)
    results = {row: median_run(r) for row, r in runs.items()}
    import torch
    command = "python bench/throughput.py" + (" --quick" if args.quick else "") + (
        f" --data {args.data}" if Path(args.data) != DEMO else "") + (f" --repeat {args.repeat}" if args.repeat > 1 else "")
    machine = (f"Command: `{command}`; {os.cpu_count()} CPU cores, "
               f"torch {torch.__version__}, {'a tiny model' if args.quick else Path(base).name}, batch {args.batch} "
               f"per task, length {args.max_length}, GradCache mini-batch {args.mini_batch}; our rows under "
               f"{Path(args.deepspeed_config).name} but cbb_zero2.")
    return results, table(results, machine)


def run_large_rows(args, rows: list[str], out: Path) -> tuple[dict, str]:
    """The hardware rows: a BERT-large-shaped pre-training step, tokens/s and MFU."""
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch {torch.__version__} sees no GPU")
    model = args.model or random_model(out, TINY if args.quick else LARGE)
    gpus = max(1, torch.cuda.device_count()) if args.device == "cuda" else 1
    # one epoch covers every step of every row: a new epoch would re-read and tokenize inside a timed step
    pairs = max(batch * steps for batch, steps, _ in (large_row_size(r, args) for r in rows)) * gpus
    data = write_long_pairs(out, pairs, args.max_length)
    results = {}
    for row in rows:
        results[row] = run_large(row, args, model, data, out, gpus)
        print(f"{row}: {results[row]}", flush=True)
    peak = peak_tflops(args)
    device = f"{gpus} x {torch.cuda.get_device_name(0)}" if args.device == "cuda" else f"{os.cpu_count()} CPU cores, 1 rank"
    n_params = matmul_parameters(model)
    machine = (f"Command: `python bench/throughput.py --device {args.device}{' --quick' if args.quick else ''}`; "
               f"{device}, torch {torch.__version__}, {Path(model).name} ({n_params:,} parameters "
               f"in the layers), length {args.max_length}, {'bf16' if args.device == 'cuda' else 'fp32'}, ZeRO-1; "
               f"MFU against {f'{peak:g} TFLOP/s' if peak else 'no known peak (pass --peak-tflops)'} per GPU.")
    return results, large_table(results, n_params, peak, machine)


def main(argv=None) -> dict:
    args = with_defaults(parse_args(argv))
    out = Path(args.out or ROOT / "bench/results" / ("throughput-quick" if args.quick else "throughput")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.st_row:  # the st row's own process: print its figures for the parent
        stats = run_st(args, base_model(args.model, args.quick, out), write_data(out, Path(args.data)), out)
        (out / "st_summary.json").write_text(json.dumps(stats))
        return {}
    rows = [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS + LARGE_ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown row {unknown[0]}; known: {', '.join(ROWS + LARGE_ROWS)}")
    large = [r for r in rows if r in LARGE_ROWS]
    if large and len(large) != len(rows):
        raise SystemExit(f"--rows: {', '.join(LARGE_ROWS)} make a table of their own; run them apart")
    results, report = run_large_rows(args, rows, out) if large else run_rows(args, rows, argv, out)
    (out / "table.md").write_text(report + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(report)
    return results


if __name__ == "__main__":
    main()
