"""Weakly supervised pre-training (Conan-embedding §2.1): InfoNCE over pairs, negatives from all ranks.

    deepspeed train/pretrain.py                                   # demo data, default base model
    deepspeed --num_gpus 8 train/pretrain.py --train-data pairs/*.jsonl --model BAAI/bge-base-zh-v1.5 \
        --deepspeed-config ds_configs/zero0.json --batch-size 128 --output-dir output/pretrain

The loop: read a global batch, encode this rank's queries and passages, take the gathered InfoNCE
loss, step, log, checkpoint; at the end, export a sentence-transformers folder. What is not the
maths (the guarded step, logs, checkpoints, export) is train/run/runner.py's.
"""
from __future__ import annotations

import argparse

from pathlib import Path

from train.args import ROOT, add_stream_args, base_parser, run_config, stream_options
from train.run.checkpoint import Checkpoints
from train.input.data import DataError, PairStream, rank_slice
from train.step.encoding import Tokenized, allow_mixed_prompts, encode_groups, encode_tokenized, tokenize_groups
from train.losses import InfoNCELoss
from train.kinds import KINDS
from train.models.decoder import check_prompt_room, instruction_prompt
from train.models.model import DEFAULT_MODEL, open_sentence_transformer, release_kernel, set_pooling
from train.input.prefetch import close_prefetch, prefetched
from train.run.rank_zero_data import shared_index, validate_data
from train.run.runner import Run, build_engine, end_run, open_backbone, start_run
from train.losses.text_ids import retrieval_ids

DEMO_DATA = [ROOT / "data/demo/pretrain/llm_pairs.jsonl", ROOT / "data/demo/pretrain/question_pairs.jsonl"]


def build_parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.split("\n\n")[0])
    data = p.add_argument_group("data")
    data.add_argument("--train-data", nargs="+", default=[str(p) for p in DEMO_DATA],
                      help="JSONL files or folders of them: {query, pos[, neg]}")
    data.add_argument("--batch-size", type=int, default=16, help="examples per rank per step")
    data.add_argument("--num-negatives", type=int, default=0, help="hard negatives per example (data needs 'neg')")
    add_stream_args(data)
    prompts = p.add_argument_group("prompts")
    prompts.add_argument("--query-prompt", default=None, help="default: the model's 'query' prompt (e5: 'query: ')")
    prompts.add_argument("--passage-prompt", default=None, help="default: the model's 'passage' prompt")
    prompts.add_argument("--instruction", default=None,
                         help="a task instruction for the queries, as LLM embedders take one: the query prompt becomes "
                              "'Instruct: {instruction}\\nQuery: ' and passages go bare (unless --passage-prompt)")
    p.set_defaults(model=DEFAULT_MODEL, output_dir="output/pretrain", lr=2e-5, warmup_ratio=0.05)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def expand_files(items: list[str]) -> list[Path]:
    files = []
    for item in items:
        path = Path(item)
        files.extend(sorted(path.glob("*.jsonl")) if path.is_dir() else [path])
    return files


def open_stream(args, world: int):
    """The same global stream on every rank (each keeps its slice), and the number of steps to train."""
    if args.validate_data:
        validate_data([(f, "pairs", args.num_negatives) for f in expand_files(args.train_data) if f.is_file()],
                      args.skip_bad_lines)
    try:
        stream = PairStream(expand_files(args.train_data), global_batch=args.batch_size * world,
                            num_negatives=args.num_negatives, seed=args.seed, skip_bad_lines=args.skip_bad_lines,
                            max_chars=args.max_length, indexer=shared_index(Path(args.output_dir) / "data_index"),
                            **stream_options(args))
    except DataError as e:
        raise SystemExit(f"data error: {e}") from None
    if stream.batches_per_epoch() == 0:
        raise SystemExit(f"data error: {stream.num_lines} lines cannot fill one global batch of "
                         f"{args.batch_size} x {world} ranks; lower --batch-size")
    return stream, args.max_steps or stream.batches_per_epoch() * args.epochs


def pair_prompts(args, model) -> tuple[str, str]:
    """(query prompt, passage prompt): the flags', else the instruction's (passages bare), else the model's."""
    instructed = instruction_prompt(args.instruction)
    query = next(p for p in (args.query_prompt, instructed, model.prompts.get("query", "")) if p is not None)
    bare = "" if instructed is not None else None
    passage = next(p for p in (args.passage_prompt, bare, model.prompts.get("passage", "")) if p is not None)
    return query, passage


def saved_position(client: dict | None) -> dict:
    """The data position a checkpoint saved (older checkpoints counted batches only)."""
    if not client:
        return {"epoch": 0, "batch": 0}
    return client.get("position") or {"epoch": client["epoch"], "batch": client["batch_in_epoch"]}


def report_data(stream) -> None:
    if stream.skipped.total:
        print(f"skipped {stream.skipped.total} bad lines: {dict(stream.skipped.reasons)}; "
              f"first: {stream.skipped.examples[:3]}")
    if stream.dropped:
        print(f"the last {stream.dropped} examples of the epoch did not fill a global batch of "
              f"{stream.global_batch} and were not used")


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world = start_run(args.seed, args.dist_timeout)

    # --- data and model (an LLM backbone set up for embedding: train/models/backbone.py)
    stream, total_steps = open_stream(args, world)
    config = run_config(args)
    model, model_source, local_only, backbone = open_backbone(args.model, config, args.batch_size, world)
    allow_mixed_prompts(model)
    query_prompt, passage_prompt = pair_prompts(args, model)
    check_prompt_room(model, {"query": query_prompt, "passage": passage_prompt}, args.max_length)

    # --- engine, resumed state
    engine, scheduler = build_engine(model, config, args.batch_size, world, total_steps)
    checkpoints = Checkpoints(Path(args.output_dir), args.checkpoint_storage, args.keep,
                              shape={"global_batch": args.batch_size * world})
    client = checkpoints.resume(engine, args.resume, args.seed)
    position = saved_position(client)  # where in the data: epoch, and block and batch within it
    run = Run(engine, scheduler, config, total_steps, metrics=["infonce"], desc="pretrain", checkpoints=checkpoints,
              client=client)
    loss_fn = InfoNCELoss(args.temperature, args.false_negative_margin)
    for note in backbone.notes:
        run.say(note)
    run.say(f"pre-training {model_source} on {stream.num_lines} lines from {len(stream.paths)} files, "
            f"{world} ranks x {args.batch_size} = {args.batch_size * world} per step, {total_steps} steps, "
            f"ZeRO {engine.zero_optimization_stage()}, {'bf16' if engine.bfloat16_enabled() else 'fp32'}")

    def embed(texts: list[str], prompt: str):  # for the export check
        return encode_groups(engine, model, [(texts, prompt)], engine.device, buckets=1)[0][0]

    def tokenize(global_batch: list) -> tuple[list, Tokenized]:  # runs in the prefetch thread
        batch = rank_slice(global_batch, rank, world)
        groups = [([ex.query for ex in batch], query_prompt), ([ex.pos for ex in batch], passage_prompt)]
        if args.num_negatives:
            groups.append(([t for ex in batch for t in ex.neg], passage_prompt))
        return global_batch, tokenize_groups(model, groups)

    # Queries, passages and negatives differ a lot in length (a prompt vs a response), so a rank's
    # texts are sorted by length and cut into as many forwards as there are text kinds, the cuts
    # placed to waste the fewest padded tokens. Every rank runs the same forwards, so ZeRO-3's
    # collective parameter gathers stay in step. With --mini-batch, GradCache encodes them instead.
    cache = run.grad_cache()
    buckets = 3 if args.num_negatives else 2

    def client_state() -> dict:
        return dict(step=run.step, position=dict(position))

    # --- the loop
    probe_texts = None
    while not run.done and (args.max_steps or position["epoch"] < args.epochs):
        batches = prefetched(stream.batches, position, args.prefetch, prepare=tokenize)  # keeps `position` up to date
        while not run.done:
            fetched = run.fetch(lambda: next(batches, None), client_state)  # a bad line stops every rank
            if fetched is None:  # the epoch ran out
                position = {"epoch": position["epoch"] + 1, "batch": 0}
                break
            global_batch, tokenized = fetched
            probe_texts = probe_texts or [ex.query for ex in global_batch[:8]]  # for the export check
            batch = rank_slice(global_batch, rank, world)
            backbone.at_step(run.step, total_steps)  # soft masking's alpha (--attention soft)
            with run.timed("forward", device_work=True):  # the forwards and the gathered loss
                (q, p, *n), tokens = cache.encode(tokenized) if cache else \
                    encode_tokenized(engine, tokenized, engine.device, buckets)
                ids = retrieval_ids(batch, [ex.pos for ex in batch], [t for ex in batch for t in ex.neg], q.device) \
                    if args.mask_false_negatives else None
                loss = loss_fn(q, p, n[0] if n else None, ids)
            sources = [ex.source for ex in batch]
            if not run.optimize(loss, sources, backward=cache.backward if cache else None):
                continue
            run.record("infonce", loss, tokens=tokens)
            run.after_step(sources, client_state)
        close_prefetch(batches)  # no tokenizing in the background while the export encodes

    # every collective before the export: the other ranks must not wait in one while rank 0 writes
    false_negatives = run.report_false_negatives(loss_fn.excluded)
    score_guarded = run.report_score_guarded(loss_fn.guarded)

    # --- export: a final checkpoint, its fp32 weights, a sentence-transformers folder, checked
    backbone.at_step(total_steps, total_steps)  # the engine encodes the probes as training ended
    prompts = {"query": query_prompt, "passage": passage_prompt, "document": passage_prompt}
    if args.instruction is not None:
        prompts.update(KINDS["pairs"].release_prompts(query_prompt, passage_prompt))

    def rebuild():  # the base again, shaped as trained (LoRA layers, the decoder's tokenizer and pooling)
        base = open_sentence_transformer(model_source, local_only, attn_implementation=release_kernel(args.attn_implementation))
        return backbone.shaped_as_trained(set_pooling(base, args.pooling))
    adapter_dir = Path(args.output_dir) / "final_adapter" if args.save_adapter else None
    final = run.export(client_state(), embed=embed,
                       probe_texts=probe_texts or ["导出检查：这句话用来比较训练引擎和导出的模型。"],
                       probe_prompt=query_prompt, rebuild=rebuild, prompts=prompts,
                       finalize=lambda m: backbone.finalize(m, adapter_dir, model_source))
    run.finish(examples=run.step * args.batch_size * world, false_negatives=false_negatives,
               score_guarded=score_guarded,
               skipped_lines=stream.skipped.total, release=str(final))
    if run.is_main:
        report_data(stream)
        print(f"done: {run.step} steps; model saved to {final}")
    run.close()
    end_run()


if __name__ == "__main__":
    main()
