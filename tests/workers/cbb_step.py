"""N-rank worker: one CBB fine-tuning step under DeepSpeed (ZeRO 2, fp32); saves the full gradients.

    torchrun --nproc_per_node N tests/workers/cbb_step.py MODEL_DIR TASKS_YAML OUT_FILE

It runs the same code path as train/finetune.py (task assignment, groups, task_loss, CBB scaling).
"""
import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from train.distributed import LOCAL  # noqa: E402
from train.engine import encode, load_ds_config  # noqa: E402
from train.finetune import task_loss, tasks_this_step  # noqa: E402
from train.finetune_data import task_stream  # noqa: E402
from train.losses import cbb  # noqa: E402
from train.tasks import assign_ranks, load_data_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARGS = Namespace(temperature=0.05, cosent_scale=20.0, seed=42, task_schedule="cbb")


def main() -> None:
    model_dir, config_path, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tasks = load_data_config(config_path).tasks
    assign_ranks(tasks, world)
    groups = {t.name: LOCAL if len(t.assigned) == 1 else dist.new_group(t.assigned) if len(t.assigned) < world else None
              for t in tasks}
    for t in tasks:
        t.query_prompt, t.passage_prompt = "", ""
    model = SentenceTransformer(model_dir, device="cpu")
    cfg = load_ds_config(ROOT / "ds_configs/zero2.json", 1, world, grad_clip=0.0, precision="fp32")
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=cfg)

    def embed(texts, prompt):
        return encode(engine, model, texts, prompt, "cpu")

    total, losses = None, {}
    for task in tasks_this_step(tasks, rank, 0, ARGS):
        batch = next(task_stream(task, ARGS.seed, 128, False).epoch(0))
        loss, _, _ = task_loss(task, batch, embed, groups[task.name], rank, None, None, ARGS)
        losses[task.name] = loss.item()
        scaled = cbb.task_scale(task.weight, world, len(task.assigned)) * loss
        total = scaled if total is None else total + scaled
    engine.backward(total)
    grads = {}
    for n, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)
        grads[n] = torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape) if g is None else g.clone()
    gathered = [None] * world
    dist.all_gather_object(gathered, losses)
    if rank == 0:
        torch.save({"grads": grads, "losses": gathered, "assigned": {t.name: t.assigned for t in tasks}}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
