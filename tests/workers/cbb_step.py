"""N-rank worker: one CBB fine-tuning step under DeepSpeed (fp32, ZeRO stage given); saves the full gradients.

    torchrun --nproc_per_node N tests/workers/cbb_step.py MODEL_DIR TASKS_JSON OUT_FILE STAGE [SCHEDULE [PLACEMENT [MINI_BATCH]]]

It runs the code path of train/finetune.py: task assignment, groups, every task of a rank encoded in
one forward (train.kinds.multitask.step_loss), CBB scaling, DeepSpeed's backward; with MINI_BATCH > 0,
through GradCache (train/step/grad_cache.py) in mini-batches of that many texts, as --mini-batch does.
"""
import sys
from argparse import Namespace
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from sentence_transformers import SentenceTransformer

from train.run.ds_config import load_ds_config
from train.step.encoding import encode_groups, tokenize_groups
from train.step.grad_cache import GradCache
from train.kinds.task_data import task_stream
from train.kinds import LossSettings
from train.kinds.multitask import step_loss, task_groups, tasks_this_step
from train.kinds.tasks import assign_ranks, load_data_config

ROOT = Path(__file__).resolve().parents[2]
ARGS = Namespace(temperature=0.05, cosent_scale=20.0, seed=42)


def main() -> None:
    model_dir, config_path, out, stage = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    schedule = sys.argv[5] if len(sys.argv) > 5 else "cbb"
    placement = sys.argv[6] if len(sys.argv) > 6 else "by-task"
    mini_batch = int(sys.argv[7]) if len(sys.argv) > 7 else 0
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tasks = load_data_config(config_path).tasks
    assign_ranks(tasks, world, schedule, placement)
    groups = task_groups(tasks)
    for t in tasks:
        t.query_prompt, t.passage_prompt = "", ""
    model = SentenceTransformer(model_dir, device="cpu")
    cfg = load_ds_config(ROOT / f"ds_configs/zero{stage}.json", 1, world, grad_clip=0.0, precision="fp32")
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=cfg)

    forwards = []
    engine.module.register_forward_hook(lambda _, args, __: forwards.append(args[0]["input_ids"].shape[0]))
    now = tasks_this_step(tasks, rank, 0, schedule, ARGS.seed)
    batches = {t.name: next(task_stream(t, ARGS.seed, 128, False).epoch(0)) for t in now}
    cache = GradCache(engine, mini_batch, engine.device) if mini_batch else None

    def encode(groups):
        return cache.encode(tokenize_groups(model, groups)) if cache else encode_groups(engine, model, groups, engine.device)
    result = step_loss(batches, now, encode, groups, rank, world, LossSettings(ARGS.temperature, ARGS.cosent_scale),
                       miners={})
    (cache.backward if cache else engine.backward)(result.total)
    grads = {}
    for n, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)  # a collective under ZeRO-3: every rank calls it for every parameter
        grads[n] = torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape) if g is None else g.clone()
    gathered = [None] * world
    dist.all_gather_object(gathered, ({n: v.item() for n, v in result.losses.items()}, forwards))
    if rank == 0:
        torch.save({"grads": grads, "losses": [g[0] for g in gathered], "forwards": [len(g[1]) for g in gathered],
                    "rows": [sum(g[1]) for g in gathered],
                    "assigned": {t.name: t.assigned for t in tasks}}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
