"""Multi-task fine-tuning with the Cross-GPU Batch Balance loss and Matryoshka (Conan-embedding §2.3-2.4).

    deepspeed train/finetune.py                                   # demo tasks, from output/pretrain/final if present
    deepspeed --num_gpus 5 train/finetune.py --data-config my_tasks.yaml --model output/pretrain/final \
        --expand-dim 1792 --mrl-dims 256,512,768,1024,1280,1536,1792

Every step holds every task (train/tasks.py maps ranks to tasks): each rank encodes its task's
batch, takes that task's loss at every Matryoshka dimension, scales it so DeepSpeed's gradient
average equals grad(sum_t w_t L_t), and steps. `--task-schedule random` is the baseline that
trains one random task per step instead.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `deepspeed train/finetune.py` puts train/ on the path, not the root
    sys.path.insert(0, str(ROOT))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import get_linear_schedule_with_warmup  # noqa: E402

from train.data import DataError, rank_slice  # noqa: E402
from train.distributed import LOCAL  # noqa: E402
from train.engine import (build_optimizer, check_export, encode, export_sentence_transformer,  # noqa: E402
                          end_run, finite_on_all_ranks, test_hooks,
                          full_fp32_state_dict, load_ds_config, resume, local_rank_zero_first,
                          save_checkpoint, start_run)
from train.finetune_data import task_stream  # noqa: E402
from train.losses import cbb  # noqa: E402
from train.losses.matryoshka import matryoshka  # noqa: E402
from train.mining import HardNegativeMiner, MiningRule, plot_history  # noqa: E402
from train.model import DEFAULT_MODEL, add_expansion_layer, load_model, set_pooling  # noqa: E402
from train.release import push_to_hub, write_model_card  # noqa: E402
from train.tasks import ConfigError, Task, assign_ranks, load_data_config  # noqa: E402

DEMO_CONFIG = ROOT / "data/demo/finetune/tasks.yaml"
PRETRAINED = ROOT / "output/pretrain/final"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help=f"default: {PRETRAINED.relative_to(ROOT)} if it exists, else {DEFAULT_MODEL}")
    p.add_argument("--data-config", default=str(DEMO_CONFIG), help="YAML/JSON task list (train/tasks.py)")
    p.add_argument("--output-dir", default="output/finetune")
    p.add_argument("--deepspeed-config", default=str(ROOT / "ds_configs/zero2.json"))
    p.add_argument("--task-schedule", default="cbb", choices=["cbb", "random"],
                   help="cbb: every task in every step; random: one random task per step (baseline)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1, help="over the largest task; smaller tasks cycle")
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=0.02)
    p.add_argument("--cosent-scale", type=float, default=20.0, help="lambda of CoSENT")
    p.add_argument("--expand-dim", default="auto",
                   help="width of the expansion layer after pooling: auto (1.75 x the encoder's, as 1024 -> 1792), "
                        "an integer, or 0 for none")
    p.add_argument("--mrl-dims", default="auto", help="comma-separated Matryoshka dims, auto, or none")
    p.add_argument("--mrl-weights", default=None, help="comma-separated weights (default: all 1)")
    p.add_argument("--pooling", default=None, choices=["mean", "cls", "lasttoken"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument("--save-steps", type=int, default=500)
    p.add_argument("--resume", default=None, help="'auto' or a checkpoint dir")
    p.add_argument("--keep", type=int, default=3, help="complete checkpoints to keep (0: all)")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many NaN/Inf losses in a row")
    p.add_argument("--dist-timeout", type=float, default=30, help="minutes a collective waits for a lost rank")
    p.add_argument("--stop-at-step", type=int, default=0,
                   help="stop as if preempted after saving this step's checkpoint (to test --resume)")
    p.add_argument("--log-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the release folder to this Hub repo")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_dims(args, width: int) -> tuple[int, list[int], list[float]]:
    """(expansion width or 0, Matryoshka dims, their weights) from the flags and the encoder width."""
    expand = round(width * 1.75 / 32) * 32 if args.expand_dim == "auto" else int(args.expand_dim)
    out = expand or width
    if args.mrl_dims == "none":
        dims = []
    elif args.mrl_dims == "auto":
        step = 256 if out >= 1024 else 128
        dims = sorted({*range(step, out, step), out})
    else:
        dims = sorted(int(d) for d in args.mrl_dims.split(","))
    if dims and (dims[0] <= 0 or dims[-1] > out):
        raise SystemExit(f"--mrl-dims {dims}: each must be between 1 and the embedding width {out}")
    weights = [float(w) for w in args.mrl_weights.split(",")] if args.mrl_weights else [1.0] * len(dims)
    if len(weights) != len(dims):
        raise SystemExit(f"--mrl-weights has {len(weights)} values for {len(dims)} dims")
    return expand, dims, weights


def task_batches(stream, state: dict):
    """A task's global batches forever, epoch after epoch, from state['batch'] of state['epoch'].

    `state` is updated as batches are taken, so it is the position to save in a checkpoint.
    """
    while True:
        for global_batch in itertools.islice(stream.epoch(state["epoch"]), state["batch"], None):
            state["batch"] += 1
            yield global_batch
        state["epoch"], state["batch"] = state["epoch"] + 1, 0


def task_loss(task: Task, global_batch: list, embed, group, rank: int, dims, weights, args,
              miner: HardNegativeMiner | None = None) -> tuple[torch.Tensor, int, dict]:
    """This rank's share of one task's loss (before CBB scaling), the tokens it encoded, and for mined
    retrieval tasks the mean score of each example's negatives ({id: (score, pool size)}).

    `embed(texts, prompt)` returns (embeddings, tokens); `group` is the task's process group.
    """
    me = task.assigned.index(rank)
    qp, pp = task.query_prompt, task.passage_prompt
    if task.type == "retrieval":  # same queries on every rank of the task, a different slice of negatives
        n = task.negatives_per_rank
        negatives = [miner.negatives(ex.source, ex.neg, ex.pool) if miner else ex.neg for ex in global_batch]
        q, t1 = embed([ex.query for ex in global_batch], qp)
        p, t2 = embed([ex.pos for ex in global_batch], pp)
        neg, t3 = embed([t for negs in negatives for t in negs[me * n:(me + 1) * n]], pp)
        neg_all = cbb.gather_negatives(neg, group)
        loss = matryoshka(cbb.retrieval_cbb, [q, p, neg_all], dims, weights, temperature=args.temperature)
        scores = {}
        if miner:  # the similarities the loss used, read back: no extra forward pass
            own = cbb.own_negative_scores(q.detach(), neg_all.detach(), n, len(task.assigned))
            scores = {ex.source: (float(s), len(ex.pool)) for ex, s in zip(global_batch, own)}
        return loss, t1 + t2 + t3, scores
    batch = rank_slice(global_batch, me, len(task.assigned))
    if task.type == "sts":  # gathered, so CoSENT orders all of the task's pairs, as one process would
        e1, t1 = embed([ex.sentence1 for ex in batch], qp)
        e2, t2 = embed([ex.sentence2 for ex in batch], qp)
        gold = torch.tensor([ex.score for ex in global_batch], device=e1.device)
        e1, e2 = cbb.all_gather_with_grad(e1, group), cbb.all_gather_with_grad(e2, group)
        return matryoshka(cbb.sts_cosent, [e1, e2], dims, weights, gold=gold, scale=args.cosent_scale), t1 + t2, {}
    if task.type == "classification":  # symmetric texts: the query prompt on every side
        q, t1 = embed([ex.query for ex in batch], qp)
        p, t2 = embed([ex.pos for ex in batch], qp)
        neg, t3 = embed([t for ex in batch for t in ex.neg], qp)
        return matryoshka(cbb.classification, [q, p, neg], dims, weights, temperature=args.temperature), t1 + t2 + t3, {}
    q, t1 = embed([ex.query for ex in batch], qp)  # pairs: in-batch negatives over the task's ranks
    p, t2 = embed([ex.pos for ex in batch], pp)
    p_all, labels = cbb.gathered_candidates(q, p, None, group)
    return matryoshka(cbb.pairs_infonce, [q, p_all], dims, weights, labels=labels, temperature=args.temperature), t1 + t2, {}


def assert_same_on_all_ranks(fingerprint: str, what: str, world: int) -> None:
    """Fail loudly if ranks disagree (cheap: one short string per rank)."""
    everyone = [None] * world
    dist.all_gather_object(everyone, fingerprint)
    if len(set(everyone)) != 1:
        raise RuntimeError(f"{what} differs between ranks: {everyone}")


def checkpoint_state(step: int, positions: dict, miners: dict, tasks: list[Task], world: int) -> dict:
    """What a resume needs besides DeepSpeed's own state. Only a task's ranks advance its data
    position, and rank 0 writes the client state, so each task's position comes from its first rank."""
    everyone = [None] * world
    dist.all_gather_object(everyone, positions)
    merged = {t.name: dict(everyone[t.assigned[0]][t.name]) for t in tasks}
    return dict(step=step, positions=merged, mining={n: m.state_dict() for n, m in miners.items()})


def tasks_this_step(tasks: list[Task], rank: int, step: int, args) -> list[Task]:
    if args.task_schedule == "random":  # the same draw on every rank: one task for the whole step
        return [tasks[random.Random(f"{args.seed}-schedule-{step}").randrange(len(tasks))]]
    return [t for t in tasks if rank in t.assigned]


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world = start_run(args.seed, args.dist_timeout)
    is_main = rank == 0
    out_dir, ckpt_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoints"

    # --- tasks: validated, ranks assigned and data opened before the model is even loaded
    try:
        config = load_data_config(args.data_config)
        tasks = config.tasks
        assign_ranks(tasks, world, args.task_schedule)
        streams = {t.name: task_stream(t, args.seed, args.max_length, args.skip_bad_lines) for t in tasks}
    except (ConfigError, DataError) as e:
        raise SystemExit(f"config error: {e}") from None
    # one process group per task (every rank creates every group, in the same order)
    groups = {t.name: LOCAL if len(t.assigned) == 1 else dist.new_group(t.assigned) if len(t.assigned) < world else None
              for t in tasks}

    # --- model (+ expansion layer)
    model_name = args.model or (str(PRETRAINED) if (PRETRAINED / "modules.json").is_file() else DEFAULT_MODEL)
    model, model_source, local_only = local_rank_zero_first(load_model, model_name, max_length=args.max_length,
                                                            pooling=args.pooling)
    expand, dims, weights = resolve_dims(args, model.get_embedding_dimension())
    if expand:
        model = add_expansion_layer(model, expand, seed=args.seed)
    for t in tasks:  # task prompts > config prompts > the model's own
        t.query_prompt = next(p for p in (t.query_prompt, config.query_prompt, model.prompts.get("query", "")) if p is not None)
        t.passage_prompt = next(p for p in (t.passage_prompt, config.passage_prompt, model.prompts.get("passage", "")) if p is not None)

    steps_per_epoch = max(s.batches_per_epoch() for s in streams.values())
    if min(s.batches_per_epoch() for s in streams.values()) == 0:
        raise SystemExit("config error: a task has fewer examples than one batch: " + ", ".join(
            f"{name}: {s.num_lines} lines" for name, s in streams.items() if s.batches_per_epoch() == 0))
    total_steps = args.max_steps or steps_per_epoch * args.epochs

    # --- engine
    ds_config = load_ds_config(args.deepspeed_config, 1, world, args.max_grad_norm, args.precision)
    optimizer = build_optimizer(model.parameters(), ds_config, args.lr, args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_config)
    device = engine.device

    def embed(texts, prompt):
        return encode(engine, model, texts, prompt, device)

    miners = {t.name: HardNegativeMiner(t.num_negatives, MiningRule(**t.mining)) for t in tasks if t.mining}
    step, positions = 0, {t.name: {"epoch": 0, "batch": 0} for t in tasks}
    client = resume(engine, ckpt_dir, args.resume)
    if client:
        step, positions = client["step"], client["positions"]
        miners = {name: HardNegativeMiner.from_state_dict(m) for name, m in client.get("mining", {}).items()}
    batches = {t.name: task_batches(streams[t.name], positions[t.name]) for t in tasks}

    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out_dir / "runs"))
        print(f"fine-tuning {model_source} ({args.task_schedule}), {total_steps} steps on {world} ranks: "
              + "; ".join(f"{t.name} ({t.type}) x{t.batch_size} w={t.weight:g} on ranks {t.assigned}" for t in tasks)
              + f"; embedding {expand or model.get_embedding_dimension()}, MRL dims {dims or 'off'}")
    bar = tqdm(total=total_steps, initial=step, disable=not is_main, desc="finetune", dynamic_ncols=True)

    # --- the loop
    engine.train()
    names = [t.name for t in tasks]
    sums, tokens, t_log = torch.zeros(2 * len(tasks), dtype=torch.float64), 0, time.time()
    bad_in_a_row, skipped_steps, attempt = 0, 0, 0
    try:
        while step < total_steps:
            total, mined, sources = None, {}, []
            attempt += 1
            for task in tasks_this_step(tasks, rank, step, args):
                global_batch = next(batches[task.name])
                sources += [ex.source for ex in global_batch]
                loss, n_tokens, scores = task_loss(task, global_batch, embed, groups[task.name], rank,
                                                   dims, weights, args, miners.get(task.name))
                mined[task.name] = scores
                scaled = cbb.task_scale(task.weight, world, len(task.assigned)) * loss
                total = scaled if total is None else total + scaled
                i = names.index(task.name)
                sums[i] += loss.item() / len(task.assigned)  # each task rank holds 1/N of the task's mean
                sums[len(tasks) + i] += 1.0 / len(task.assigned)
                tokens += n_tokens
            total = test_hooks(attempt, rank, total)
            if not finite_on_all_ranks(total):  # skip the step on every rank together
                bad_in_a_row, skipped_steps = bad_in_a_row + 1, skipped_steps + 1
                if bad_in_a_row >= args.max_bad_steps:
                    raise SystemExit(f"loss is NaN or Inf for {bad_in_a_row} batches in a row (step {step + 1}); "
                                     f"this rank's last batch: {', '.join(sources[:20])}")
                if is_main:
                    bar.write(f"step {step + 1}: NaN/Inf loss, step skipped on all ranks ({skipped_steps} so far)")
                continue
            bad_in_a_row = 0
            engine.backward(total)
            engine.step()
            step += 1
            if miners:  # every rank applies the same scores, so the mining state is the same everywhere
                shared = [None] * world
                dist.all_gather_object(shared, mined)
                for name, miner in miners.items():
                    miner.record(step, {k: v for part in shared for k, v in part.get(name, {}).items()})
                    if miner.due(step):
                        c = miner.check(step)
                        assert_same_on_all_ranks(miner.fingerprint(), f"mining state of '{name}' at step {step}", world)
                        if is_main:
                            writer.add_scalar(f"mining/{name}/replaced", c.replaced, step)
                            writer.add_scalar(f"mining/{name}/mean_negative_score", c.mean_score, step)
                            bar.write(f"step {step} mining {name}: checked {c.checked}, replaced {c.replaced}, "
                                      f"pools exhausted {c.exhausted}, mean negative score {c.mean_score:.3f}")

            if step % args.log_steps == 0 or step == total_steps:
                reduced = sums.to(device)
                dist.all_reduce(reduced)
                tok = torch.tensor(float(tokens), device=device)
                dist.all_reduce(tok)
                means = {n: (reduced[i] / reduced[len(tasks) + i]).item() for i, n in enumerate(names) if reduced[len(tasks) + i] > 0}
                if is_main:
                    tok_s = tok.item() / (time.time() - t_log)
                    bar.set_postfix({**{n: f"{v:.3f}" for n, v in means.items()}, "tok_s": f"{tok_s:,.0f}"})
                    for n, v in means.items():
                        writer.add_scalar(f"loss/{n}", v, step)
                    writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                    writer.add_scalar("train/tokens_per_s", tok_s, step)
                sums.zero_()
                tokens, t_log = 0, time.time()
            bar.update(1)
            if (step % args.save_steps == 0 or step == args.stop_at_step) and step < total_steps:
                save_checkpoint(engine, ckpt_dir, f"step{step}", checkpoint_state(step, positions, miners, tasks, world),
                                args.keep)
            if step == args.stop_at_step:
                if is_main:
                    print(f"stopped at step {step} (--stop-at-step); resume with --resume auto")
                end_run()
    except DataError as e:
        raise SystemExit(f"data error: {e}\n(pass --skip-bad-lines to skip and count such lines)") from None
    bar.close()

    # --- export the release folder
    tag = f"step{step}"
    save_checkpoint(engine, ckpt_dir, tag, checkpoint_state(step, positions, miners, tasks, world), args.keep)
    state_dict = full_fp32_state_dict(engine, ckpt_dir, tag)
    first = tasks[0]
    probe_texts = ["如何训练中文向量模型？", "导出检查：这句话用来比较训练引擎和导出的模型。"]
    engine.eval()
    with torch.no_grad():
        probe, _ = embed(probe_texts, first.query_prompt)
    if is_main:
        def rebuild():
            base = set_pooling(SentenceTransformer(model_source, device="cpu", local_files_only=local_only), args.pooling)
            return add_expansion_layer(base, expand) if expand else base
        prompts = {"query": first.query_prompt, "passage": first.passage_prompt, "document": first.passage_prompt}
        export_sentence_transformer(rebuild, state_dict, out_dir / "final", prompts, args.max_length)
        check_export(out_dir, probe_texts, first.query_prompt, probe.float().cpu(), engine.bfloat16_enabled())
        skipped = {n: s.skipped.total for n, s in streams.items() if s.skipped.total}
        singletons = {n: s.singletons for n, s in streams.items() if getattr(s, "singletons", 0)}
        if skipped:
            print(f"skipped bad lines per task: {skipped}")
        if singletons:
            print(f"classification texts left out because no other text has their label: {singletons}")
        for name, miner in miners.items():
            (out_dir / f"mining_{name}.json").write_text(json.dumps(miner.state_dict()))
            plot_history(miner, out_dir / f"mining_{name}.png")
        write_model_card(out_dir / "final", base_model=model_name, tasks=tasks, dims=dims, expand=expand,
                         args=vars(args), steps=step, world=world)
        if skipped_steps:
            print(f"skipped {skipped_steps} steps with a NaN or Inf loss")
        print(f"done: {step} steps; release folder {out_dir / 'final'}")
        if args.push_to_hub:
            print(f"pushed to {push_to_hub(out_dir / 'final', args.push_to_hub)}")
        writer.close()
    end_run()


if __name__ == "__main__":
    main()
