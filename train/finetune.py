"""Multi-task fine-tuning with the Cross-GPU Batch Balance loss and Matryoshka (Conan-embedding §2.3-2.4).

    deepspeed train/finetune.py                                   # demo tasks, from output/pretrain/final if present
    deepspeed --num_gpus 5 train/finetune.py --data-config my_tasks.yaml --model output/pretrain/final \
        --expand-dim 1792 --mrl-dims 256,512,768,1024,1280,1536,1792

Every step holds every task (train/kinds/tasks.py maps ranks to tasks): each rank encodes all of its
tasks' texts in one forward, takes each task's loss at every Matryoshka dimension, scales it so
DeepSpeed's gradient average equals grad(sum_t w_t L_t), and steps (train/kinds/multitask.py).
`--task-schedule random` is the baseline that trains one random task per step instead.
"""
from __future__ import annotations

import argparse

import json
import shutil
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch.distributed as dist
from sentence_transformers import SentenceTransformer

from train.args import ROOT, add_stream_args, base_parser, run_config, stream_options
from train.run.checkpoint import Checkpoints
from train.run.cluster import from_rank_zero, host_group
from train.input.data import DataError
from train.step.encoding import allow_mixed_prompts, encode_groups, encode_tokenized, tokenize_groups
from train.kinds.task_data import task_batches, task_stream
from train.run.merge import merge_release
from train.step.mining import HardNegativeMiner, MiningRule, plot_history
from train.models.decoder import check_prompt_room, instruction_prompt
from train.models.model import (DEFAULT_MODEL, add_expansion_layer, expansion_layer, matryoshka_dims,
                                open_sentence_transformer, release_kernel, set_pooling, with_expansion)
from train.kinds import KINDS, LossSettings
from train.kinds.multitask import step_loss, task_groups, tasks_this_step
from train.input.prefetch import close_prefetch, prefetched
from train.run.rank_zero_data import shared_index, validate_data
from train.run.release import push_to_hub, schedule_name, write_model_card
from train.run.runner import Run, build_engine, end_run, open_backbone, start_run
from train.kinds.tasks import PLACEMENTS, ConfigError, assign_ranks, load_data_config

DEMO_CONFIG = ROOT / "data/demo/finetune/tasks.yaml"
PRETRAINED = ROOT / "output/pretrain/final"


def build_parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.split("\n\n")[0])
    data = p.add_argument_group("tasks")
    data.add_argument("--data-config", default=str(DEMO_CONFIG), help="YAML/JSON task list (train/kinds/tasks.py)")
    data.add_argument("--task-schedule", default="cbb", choices=["cbb", "random"],
                      help="cbb: every task in every step; random: one random task per step (baseline)")
    data.add_argument("--task-placement", default="by-task", choices=PLACEMENTS,
                      help="cbb: by-task (the paper) gives each task its share of the ranks (the config's `ranks`); "
                           "every-rank gives each rank a slice of every task, so ranks with cheap tasks do not wait "
                           "for those with costly ones (the same objective; faster when tasks' text lengths differ)")
    add_stream_args(data)
    data.add_argument("--length-buckets", type=int, default=2,
                      help="forwards per rank per step: a rank's texts sorted by length and cut into this many "
                           "batches (the same on every rank, as ZeRO-3 needs)")
    loss = p.add_argument_group("losses")
    loss.add_argument("--cosent-scale", type=float, default=20.0, help="lambda of CoSENT")
    loss.add_argument("--expand-dim", default="auto",
                      help="width of the expansion layer after pooling: auto (1.75 x the encoder's, as 1024 -> 1792; "
                           "a model that has one keeps it), an integer, or 0 for none")
    loss.add_argument("--expansion-lr", type=float, default=None,
                      help="learning rate of the expansion layer (default: --lr)")
    loss.add_argument("--mrl-dims", default="auto", help="comma-separated Matryoshka dims, auto, or none")
    loss.add_argument("--mrl-weights", default=None, help="comma-separated weights (default: all 1)")
    p.add_argument("--merge-weight", type=float, default=0.5,
                   help="release = w x fine-tuned + (1 - w) x the base model (LM-Cocktail; the ablation's best row, "
                        "0.5 chosen on its tune split; eval/merge_sweep.py chooses on your data); "
                        "the unmerged model is kept in OUTPUT_DIR/final_unmerged; 1: no merge")
    p.add_argument("--hub-model-id", default=None, metavar="REPO",
                   help="the model's Hub id (user/name): its name in the model card and what the card's usage loads "
                        "(default: --push-to-hub, else the output folder's name)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the release folder to this Hub repo")
    p.set_defaults(output_dir="output/finetune", lr=1e-5, warmup_ratio=0.1)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def open_tasks(args, world: int):
    """Tasks validated, ranks assigned and data opened before the model is even loaded."""
    try:
        config = load_data_config(args.data_config)
        if args.validate_data:
            validate_data([(f, t.type, t.num_negatives) for t in config.tasks for f in t.files], args.skip_bad_lines)
        assign_ranks(config.tasks, world, args.task_schedule, args.task_placement)
        streams = {t.name: task_stream(t, args.seed, args.max_length, args.skip_bad_lines, **stream_options(args),
                                       indexer=shared_index(Path(args.output_dir) / "data_index"))
                   for t in config.tasks}
    except (ConfigError, DataError) as e:
        raise SystemExit(f"config error: {e}") from None
    if min(s.batches_per_epoch() for s in streams.values()) == 0:
        raise SystemExit("config error: a task has fewer examples than one batch: " + ", ".join(
            f"{name}: {s.num_lines} lines" for name, s in streams.items() if s.batches_per_epoch() == 0))
    total_steps = args.max_steps or max(s.batches_per_epoch() for s in streams.values()) * args.epochs
    return config, streams, total_steps


def open_model(args, config, run_settings, world: int):
    """The model (+ expansion layer), its Matryoshka dims, and each task's prompts (task > its
    instruction > config > model), with the Backbone that set it up (train/models/backbone.py)."""
    # rank 0 decides the default (its own pre-training output, else the base model); every rank then
    # loads that, and one that cannot (a node-local disk without it) stops them all
    name = args.model or from_rank_zero(
        lambda: str(PRETRAINED) if (PRETRAINED / "modules.json").is_file() else DEFAULT_MODEL)
    model, source, local_only, backbone = open_backbone(name, run_settings, 1, world)
    model, added, what = with_expansion(allow_mixed_prompts(model), args.expand_dim, seed=args.seed)
    dims, weights = matryoshka_dims(args.mrl_dims, args.mrl_weights, model.get_embedding_dimension())
    for t in config.tasks:
        instructed = instruction_prompt(t.instruction)
        bare = "" if instructed is not None else None  # documents go without the instruction
        t.query_prompt = next(p for p in (t.query_prompt, instructed, config.query_prompt,
                                          model.prompts.get("query", "")) if p is not None)
        t.passage_prompt = next(p for p in (t.passage_prompt, bare, config.passage_prompt,
                                            model.prompts.get("passage", "")) if p is not None)
        check_prompt_room(model, {f"{t.name} query": t.query_prompt, f"{t.name} passage": t.passage_prompt},
                          args.max_length)

    def rebuild() -> SentenceTransformer:  # the untrained model with the same modules, for the export
        base = open_sentence_transformer(source, local_only, attn_implementation=release_kernel(args.attn_implementation))
        base = backbone.shaped_as_trained(set_pooling(base, args.pooling))
        return add_expansion_layer(base, added) if added else base
    return model, name, rebuild, backbone, f"{what}; MRL dims {dims or 'off'}", \
        LossSettings(args.temperature, args.cosent_scale, dims, weights, args.mask_false_negatives,
                     args.false_negative_margin)


def release_prompts(tasks: list) -> dict[str, str]:
    """The release's prompts: query / passage / document of the first task; with instructions, also each
    task's under its name and its C-MTEB task types (the first task of a type names it)."""
    first = tasks[0]
    prompts = {"query": first.query_prompt, "passage": first.passage_prompt, "document": first.passage_prompt}
    for t in tasks:
        if t.instruction is not None:
            for key, value in {t.name: t.query_prompt, **KINDS[t.type].release_prompts(t.query_prompt,
                                                                                      t.passage_prompt)}.items():
                prompts.setdefault(key, value)
    return prompts


def update_miners(miners: dict, scores: dict, run: Run) -> None:
    """Every rank applies every rank's scores, so the mining state is the same everywhere."""
    shared = [None] * run.world
    dist.all_gather_object(shared, scores, group=host_group())
    for name, miner in miners.items():
        miner.record(run.step, {k: v for part in shared for k, v in part.get(name, {}).items()})
        if miner.due(run.step):
            c = miner.check(run.step)
            everyone = [None] * run.world
            dist.all_gather_object(everyone, miner.fingerprint(), group=host_group())
            if len(set(everyone)) != 1:
                raise RuntimeError(f"mining state of '{name}' differs between ranks at step {run.step}: {everyone}")
            run.log_scalar(f"mining/{name}/replaced", c.replaced)
            run.log_scalar(f"mining/{name}/mean_negative_score", c.mean_score)
            run.say(f"step {run.step} mining {name}: checked {c.checked}, replaced {c.replaced}, "
                    f"pools exhausted {c.exhausted}, mean negative score {c.mean_score:.3f}")


def checkpoint_state(run: Run, positions: dict, miners: dict, tasks: list) -> dict:
    """What a resume needs besides DeepSpeed's own state. Only a task's ranks advance its data
    position, and rank 0 writes the client state, so each task's position comes from its first rank."""
    everyone = [None] * run.world
    dist.all_gather_object(everyone, positions, group=host_group())
    merged = {t.name: dict(everyone[t.assigned[0]][t.name]) for t in tasks}
    return dict(step=run.step, positions=merged, mining={n: m.state_dict() for n, m in miners.items()})


def write_release_extras(run: Run, final: Path, streams: dict, miners: dict, tasks: list, base: str, dims: list[int],
                         args) -> None:
    skipped = {n: s.skipped.total for n, s in streams.items() if s.skipped.total}
    singletons = {n: s.singletons for n, s in streams.items() if getattr(s, "singletons", 0)}
    if skipped:
        print(f"skipped bad lines per task: {skipped}")
    if singletons:
        print(f"classification texts left out because no other text has their label: {singletons}")
    for name, miner in miners.items():
        (run.out_dir / f"mining_{name}.json").write_text(json.dumps(miner.state_dict()))
        plot_history(miner, run.out_dir / f"mining_{name}.png")
    model = SentenceTransformer(str(final), device="cpu", local_files_only=True)
    write_model_card(final, base_model=base, tasks=tasks, dims=dims, width=model.get_embedding_dimension(),
                     expanded=expansion_layer(model) is not None, args=vars(args), steps=run.step, world=run.world,
                     release_length=model.max_seq_length)


def examples_trained(tasks: list, steps: int, schedule: str, seed: int) -> dict[str, int]:
    """Examples of each task in `steps` steps (the random schedule's draw is the loop's own)."""
    seen = {t.name: 0 for t in tasks}
    for step in range(steps):
        for t in (tasks_this_step(tasks, 0, step, schedule, seed) if schedule == "random" else tasks):
            seen[t.name] += t.batch_size
    return seen


def merge_with_base(final: Path, base: str, weight: float) -> None:
    """The release keeps general ability: the fine-tuned folder moves to final_unmerged and `final`
    becomes its LM-Cocktail merge with the base (bench/ablation.py, row f against row e)."""
    unmerged = final.parent / "final_unmerged"
    shutil.rmtree(unmerged, ignore_errors=True)
    final.rename(unmerged)
    merge_release(unmerged, base, weight, final)
    print(f"release: {weight:g} x fine-tuned + {1 - weight:g} x {base} in {final}; "
          f"the fine-tuned model as trained: {unmerged} (--merge-weight 1: no merge)")


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world = start_run(args.seed, args.dist_timeout)

    # --- tasks and data, model, engine
    config, streams, total_steps = open_tasks(args, world)
    tasks, groups = config.tasks, task_groups(config.tasks, timedelta(minutes=args.dist_timeout))
    model, base_name, rebuild, backbone, shape, loss_settings = open_model(args, config, run_config(args), world)
    config = run_config(args)
    engine, scheduler = build_engine(model, config, 1, world, total_steps)

    # --- resumed state: step, each task's data position, the mining state
    checkpoints = Checkpoints(Path(args.output_dir), args.checkpoint_storage, args.keep,
                              shape={"global_batch": {t.name: t.batch_size for t in tasks}})
    client = checkpoints.resume(engine, args.resume, args.seed)
    positions = client["positions"] if client else {t.name: {"epoch": 0, "batch": 0} for t in tasks}
    miners = ({n: HardNegativeMiner.from_state_dict(m) for n, m in client.get("mining", {}).items()} if client else
              {t.name: HardNegativeMiner(t.num_negatives, MiningRule(**t.mining)) for t in tasks if t.mining})
    batches = {t.name: prefetched(partial(task_batches, streams[t.name]), positions[t.name], args.prefetch)
               for t in tasks if rank in t.assigned}  # a rank reads only its own tasks
    run = Run(engine, scheduler, config, total_steps, metrics=[t.name for t in tasks], desc="finetune",
              checkpoints=checkpoints, client=client)
    run.say(f"fine-tuning {base_name} ({schedule_name(vars(args))}), {total_steps} steps on {world} ranks: "
            + "; ".join(f"{t.name} ({t.type}) x{t.batch_size} w={t.weight:g} on ranks {t.assigned}" for t in tasks)
            + f"; {shape}")
    for note in backbone.notes:
        run.say(note)

    cache = run.grad_cache()  # --mini-batch: GradCache

    def encode(text_groups):  # tokenized here, not in the prefetch thread: mining may swap a negative up to this step
        tokenized = tokenize_groups(model, text_groups)
        return cache.encode(tokenized) if cache else \
            encode_tokenized(engine, tokenized, engine.device, args.length_buckets)

    def client_state() -> dict:
        return checkpoint_state(run, positions, miners, tasks)

    before: dict = {}  # the data positions at the start of the step being read

    def read_step(now) -> dict:
        before.update({name: dict(p) for name, p in positions.items()})
        return {t.name: next(batches[t.name]) for t in now}

    def undo_read() -> None:  # a bad line on some rank: every rank back to the last completed step
        for name, p in before.items():
            positions[name].clear()
            positions[name].update(p)

    # --- the loop: every task of this rank in the same number of forwards, CBB-scaled, one optimizer step
    false_negatives = 0  # left out of InfoNCE in this process's steps (copies of a query's positive)
    score_guarded = 0    # ... and by the score guard (--false-negative-margin)
    while not run.done:
        now = tasks_this_step(tasks, rank, run.step, args.task_schedule, args.seed)
        step_batches = run.fetch(lambda: read_step(now), client_state, undo_read)
        backbone.at_step(run.step, total_steps)  # soft masking's alpha (--attention soft)
        with run.timed("forward", device_work=True):  # the forwards, losses and their gathers
            result = step_loss(step_batches, now, encode, groups, rank, world, loss_settings, miners)
        if not run.optimize(result.total, result.sources, backward=cache.backward if cache else None):
            continue
        false_negatives += result.false_negatives
        score_guarded += result.guarded
        for t in now:  # each task rank holds 1/|R_t| of the task's mean
            run.record(t.name, result.losses[t.name], weight=1.0 / len(t.assigned))
        run.record(now[0].name, result.total.new_zeros(()), weight=0.0, tokens=result.tokens)
        if miners:
            with run.timed("mining"):
                update_miners(miners, result.scores, run)
        run.after_step(result.sources, client_state)

    for reader in batches.values():
        close_prefetch(reader)
    false_negatives = run.report_false_negatives(false_negatives)
    score_guarded = run.report_score_guarded(score_guarded)

    # --- the release folder
    backbone.at_step(total_steps, total_steps)  # the engine encodes the probes as training ended
    adapter_dir = Path(args.output_dir) / "final_adapter" if args.save_adapter else None
    final = run.export(client_state(), embed=lambda texts, prompt: encode_groups(engine, model, [(texts, prompt)],
                                                                                engine.device, 1)[0][0],
                       probe_texts=["如何训练中文向量模型？", "导出检查：这句话用来比较训练引擎和导出的模型。"],
                       probe_prompt=tasks[0].query_prompt, rebuild=rebuild, prompts=release_prompts(tasks),
                       finalize=lambda m: backbone.finalize(m, adapter_dir, base_name))
    run.finish(examples=examples_trained(tasks, run.step, args.task_schedule, args.seed),
               false_negatives=false_negatives, score_guarded=score_guarded, release=str(final),
               skipped_lines={n: s.skipped.total for n, s in streams.items()},
               mining={name: miner.summary(run.step) for name, miner in miners.items()})
    if run.is_main:
        write_release_extras(run, final, streams, miners, tasks, base_name, loss_settings.dims, args)
        if args.merge_weight < 1:
            merge_with_base(final, base_name, args.merge_weight)
        print(f"done: {run.step} steps; release folder {final}")
        if args.push_to_hub:
            print(f"pushed to {push_to_hub(final, args.push_to_hub)}")
    run.close()
    end_run()


if __name__ == "__main__":
    main()
