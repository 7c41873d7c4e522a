"""Weakly supervised pre-training (Conan-embedding §2.1): InfoNCE over pairs, negatives from all ranks.

    deepspeed train/pretrain.py                                   # demo data, default base model
    deepspeed --num_gpus 8 train/pretrain.py --train-data pairs/*.jsonl --model BAAI/bge-base-zh-v1.5 \
        --deepspeed-config ds_configs/zero2.json --batch-size 128 --output-dir output/pretrain

The whole loop is in main(): read a global batch, encode this rank's queries and passages, take the
gathered InfoNCE loss, step, log, checkpoint; at the end, export a sentence-transformers folder.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `deepspeed train/pretrain.py` puts train/ on the path, not the root
    sys.path.insert(0, str(ROOT))

import deepspeed  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import get_linear_schedule_with_warmup  # noqa: E402

from train.data import DataError, PairStream, rank_slice  # noqa: E402
from train.distributed import all_reduce_sum  # noqa: E402
from train.engine import (build_optimizer, check_export, encode, export_sentence_transformer,  # noqa: E402
                          end_run, finite_on_all_ranks, test_hooks,
                          full_fp32_state_dict, load_ds_config, resume, local_rank_zero_first,
                          save_checkpoint, start_run)
from train.losses import InfoNCELoss  # noqa: E402
from train.model import DEFAULT_MODEL, load_model, set_pooling  # noqa: E402

DEMO_DATA = [ROOT / "data/demo/pretrain/llm_pairs.jsonl", ROOT / "data/demo/pretrain/question_pairs.jsonl"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="local folder or hub id; the default works offline")
    p.add_argument("--train-data", nargs="+", default=[str(p) for p in DEMO_DATA],
                   help="JSONL files or folders of them: {query, pos[, neg]}")
    p.add_argument("--output-dir", default="output/pretrain")
    p.add_argument("--deepspeed-config", default=str(ROOT / "ds_configs/zero2.json"))
    p.add_argument("--batch-size", type=int, default=16, help="examples per rank per step")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: whole epochs)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="fills gradient_clipping: auto")
    p.add_argument("--temperature", type=float, default=0.02)
    p.add_argument("--num-negatives", type=int, default=0, help="hard negatives per example (data needs 'neg')")
    p.add_argument("--query-prompt", default=None, help="default: the model's 'query' prompt (e5: 'query: ')")
    p.add_argument("--passage-prompt", default=None, help="default: the model's 'passage' prompt")
    p.add_argument("--pooling", default=None, choices=["mean", "cls", "lasttoken"], help="default: the model's")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on GPUs that have it")
    p.add_argument("--group-buffer", type=int, default=64, help="global batches sorted by length together (1: off)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count bad JSONL lines instead of stopping")
    p.add_argument("--save-steps", type=int, default=500)
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in the output dir) or a checkpoint dir")
    p.add_argument("--keep", type=int, default=3, help="complete checkpoints to keep (0: all)")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many NaN/Inf losses in a row")
    p.add_argument("--dist-timeout", type=float, default=30, help="minutes a collective waits for a lost rank")
    p.add_argument("--trace-examples", action="store_true", help="write the examples of every step to OUTPUT_DIR/trace/")
    p.add_argument("--log-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    return p.parse_args(argv)


def expand_files(items: list[str]) -> list[Path]:
    files = []
    for item in items:
        path = Path(item)
        files.extend(sorted(path.glob("*.jsonl")) if path.is_dir() else [path])
    return files


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world = start_run(args.seed, args.dist_timeout)
    is_main = rank == 0
    out_dir, ckpt_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoints"

    # --- model: the first local rank builds any offline copy, the others then load it
    model, model_source, local_only = local_rank_zero_first(load_model, args.model, max_length=args.max_length,
                                                            pooling=args.pooling)
    query_prompt = args.query_prompt if args.query_prompt is not None else model.prompts.get("query", "")
    passage_prompt = args.passage_prompt if args.passage_prompt is not None else model.prompts.get("passage", "")

    # --- data: the same global stream on every rank; each rank keeps its slice
    try:
        stream = PairStream(expand_files(args.train_data), global_batch=args.batch_size * world,
                            num_negatives=args.num_negatives, seed=args.seed,
                            group_buffer=args.group_buffer, skip_bad_lines=args.skip_bad_lines,
                            max_chars=args.max_length)
    except DataError as e:
        raise SystemExit(f"data error: {e}") from None
    steps_per_epoch = stream.batches_per_epoch()
    if steps_per_epoch == 0:
        raise SystemExit(f"data error: {stream.num_lines} lines cannot fill one global batch of "
                         f"{args.batch_size} x {world} ranks; lower --batch-size")
    total_steps = args.max_steps or steps_per_epoch * args.epochs

    # --- engine
    ds_config = load_ds_config(args.deepspeed_config, args.batch_size, world, args.max_grad_norm, args.precision)
    optimizer = build_optimizer(model.parameters(), ds_config, args.lr, args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_config)
    device = engine.device
    loss_fn = InfoNCELoss(args.temperature)

    step, epoch, batch_in_epoch = 0, 0, 0
    client = resume(engine, ckpt_dir, args.resume)
    if client:
        step, epoch, batch_in_epoch = client["step"], client["epoch"], client["batch_in_epoch"]

    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out_dir / "runs"))
        print(f"pre-training {model_source} on {stream.num_lines} lines from {len(stream.paths)} files, "
              f"{world} ranks x {args.batch_size} = {args.batch_size * world} per step, {total_steps} steps, "
              f"ZeRO {engine.zero_optimization_stage()}, {'bf16' if engine.bfloat16_enabled() else 'fp32'}")
    bar = tqdm(total=total_steps, initial=step, disable=not is_main, desc="pretrain", dynamic_ncols=True)

    # --- the loop
    engine.train()
    tokens, t_log, loss_sum, probe_texts = 0, time.time(), 0.0, None
    bad_in_a_row, skipped_steps, attempt = 0, 0, 0
    trace = None
    if args.trace_examples:  # which examples each step trained on; cut back to the checkpoint on resume
        path = out_dir / "trace" / f"rank{rank}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if int(line.split("\t")[0]) <= step] if path.is_file() else []
        path.write_text("".join(kept))
        trace = open(path, "a", encoding="utf-8")
    try:
        while step < total_steps and (args.max_steps or epoch < args.epochs):
            for global_batch in itertools.islice(stream.epoch(epoch), batch_in_epoch, None):
                batch = rank_slice(global_batch, rank, world)
                probe_texts = probe_texts or [ex.query for ex in global_batch[:8]]  # for the export check
                q, q_tokens = encode(engine, model, [ex.query for ex in batch], query_prompt, device)
                p, p_tokens = encode(engine, model, [ex.pos for ex in batch], passage_prompt, device)
                n, n_tokens = (encode(engine, model, [t for ex in batch for t in ex.neg], passage_prompt, device)
                               if args.num_negatives else (None, 0))
                attempt, batch_in_epoch = attempt + 1, batch_in_epoch + 1
                loss = test_hooks(attempt, rank, loss_fn(q, p, n))
                if not finite_on_all_ranks(loss):  # skip the step on every rank together
                    bad_in_a_row, skipped_steps = bad_in_a_row + 1, skipped_steps + 1
                    if bad_in_a_row >= args.max_bad_steps:
                        raise SystemExit(f"loss is NaN or Inf for {bad_in_a_row} batches in a row (step {step + 1}); "
                                         f"this rank's last batch: {', '.join(ex.source for ex in batch)}")
                    if is_main:
                        bar.write(f"step {step + 1}: NaN/Inf loss, step skipped on all ranks ({skipped_steps} so far)")
                    continue
                bad_in_a_row = 0
                engine.backward(loss)
                engine.step()
                step += 1
                if trace:
                    trace.write("".join(f"{step}\t{ex.source}\n" for ex in batch))
                    trace.flush()
                tokens += q_tokens + p_tokens + n_tokens
                loss_sum += loss.item()

                if step % args.log_steps == 0 or step == total_steps:
                    n_steps = (step - 1) % args.log_steps + 1
                    global_tokens = all_reduce_sum(tokens, device)
                    mean_loss = all_reduce_sum(loss_sum, device) / world / n_steps
                    tok_s = global_tokens / (time.time() - t_log)
                    lr = scheduler.get_last_lr()[0]
                    if is_main:
                        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                        writer.add_scalar("train/loss", mean_loss, step)
                        writer.add_scalar("train/lr", lr, step)
                        writer.add_scalar("train/tokens_per_s", tok_s, step)
                    tokens, loss_sum, t_log = 0, 0.0, time.time()
                bar.update(1)
                if step % args.save_steps == 0 and step < total_steps:
                    save_checkpoint(engine, ckpt_dir, f"step{step}",
                                    dict(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch), args.keep)
                if step >= total_steps:
                    break
            else:  # the epoch ran out
                epoch, batch_in_epoch = epoch + 1, 0
    except DataError as e:  # every rank reads the same stream, so every rank stops here
        raise SystemExit(f"data error: {e}\n(pass --skip-bad-lines to skip and count such lines)") from None
    bar.close()

    # --- export: a final checkpoint, its fp32 weights, a sentence-transformers folder
    tag = f"step{step}"
    save_checkpoint(engine, ckpt_dir, tag, dict(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch), args.keep)
    state_dict = full_fp32_state_dict(engine, ckpt_dir, tag)
    probe_texts = probe_texts or ["导出检查：这句话用来比较训练引擎和导出的模型。"]  # resumed with no step left
    engine.eval()
    with torch.no_grad():  # every rank takes part (ZeRO-3 gathers weights in forward)
        probe, _ = encode(engine, model, probe_texts, query_prompt, device)
    if is_main:
        prompts = {"query": query_prompt, "passage": passage_prompt, "document": passage_prompt}
        rebuild = lambda: set_pooling(SentenceTransformer(model_source, device="cpu", local_files_only=local_only),  # noqa: E731
                                      args.pooling)
        export_sentence_transformer(rebuild, state_dict, out_dir / "final", prompts, args.max_length)
        check_export(out_dir, probe_texts, query_prompt, probe.float().cpu(), engine.bfloat16_enabled())
        if stream.skipped.total:
            print(f"skipped {stream.skipped.total} bad lines: {dict(stream.skipped.reasons)}; "
                  f"first: {stream.skipped.examples[:3]}")
        if stream.dropped:
            print(f"the last {stream.dropped} examples of the epoch did not fill a global batch of "
                  f"{stream.global_batch} and were not used")
        if skipped_steps:
            print(f"skipped {skipped_steps} steps with a NaN or Inf loss")
        print(f"done: {step} steps; model saved to {out_dir / 'final'}")
        writer.close()
    end_run()


if __name__ == "__main__":
    main()
