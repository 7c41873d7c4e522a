"""2-rank worker: one InfoNCE step under DeepSpeed; saves loss, full gradients and updated weights.

    torchrun --nproc_per_node 2 tests/workers/infonce_step.py MODEL_DIR OUT_DIR

For each case (ZeRO 1, 2, 3 with the real gather; ZeRO 2 with a gather that drops gradients; ZeRO 2
on a batch where a rank-1 query has a rank-0 query's positive, with the false-negative mask) it
writes OUT_DIR/<case>.pt on rank 0. The test compares them with one process on the global batch.
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
from sentence_transformers import SentenceTransformer

from train.input.data import rank_slice
from train.run.ds_config import load_ds_config
from train.losses import InfoNCELoss
from train.losses import infonce
from train.losses.text_ids import retrieval_ids

ROOT = Path(__file__).resolve().parents[2]
LR, TEMPERATURE, PER_RANK = 1e-3, 0.05, 4


def global_batch(duplicate: bool = False) -> list[dict]:
    """Demo question pairs; `duplicate`: the last query (rank 1) gets the second query's positive (rank 0)."""
    rows = [json.loads(line) for line in open(ROOT / "data/demo/pretrain/question_pairs.jsonl", encoding="utf-8")]
    rows = rows[:PER_RANK * 2]
    if duplicate:
        rows[-1] = {**rows[-1], "pos": rows[1]["pos"]}
    return rows


def masked_loss(emb, rows: list[dict]) -> torch.Tensor:
    """InfoNCE with the false-negative mask, over this rank's rows (ids as train/pretrain.py makes them)."""
    batch = [SimpleNamespace(pos=r["pos"][0], positives=r["pos"]) for r in rows]
    ids = retrieval_ids(batch, [ex.pos for ex in batch])
    return InfoNCELoss(TEMPERATURE)(emb([r["query"] for r in rows]), emb([ex.pos for ex in batch]), None, ids)


def gather_without_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """The classic bug: gather detached copies and re-insert only the local slice."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    parts[dist.get_rank(group)] = x
    return torch.cat(parts)


def full_grad(param: torch.nn.Parameter) -> torch.Tensor:
    grad = safe_get_full_grad(param)  # None for parameters the loss never touched (the BERT pooler)
    return torch.zeros(param.ds_shape if hasattr(param, "ds_shape") else param.shape) if grad is None else grad.clone()


def run_case(model_dir: str, stage: int, out: Path, duplicate: bool = False) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = SentenceTransformer(model_dir, device="cpu")
    cfg = load_ds_config(ROOT / f"ds_configs/zero{stage}.json", PER_RANK, world, grad_clip=0.0, precision="fp32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    batch = rank_slice(global_batch(duplicate), rank, world)

    def emb(texts):
        feats = model.preprocess(texts)
        return engine({k: v for k, v in feats.items() if isinstance(v, torch.Tensor)})["sentence_embedding"]

    loss = masked_loss(emb, batch) if duplicate else \
        InfoNCELoss(TEMPERATURE)(emb([r["query"] for r in batch]), emb([r["pos"][0] for r in batch]))
    engine.backward(loss)
    names = [n for n, _ in engine.module.named_parameters()]
    grads = {n: full_grad(p) for n, p in engine.module.named_parameters()}
    engine.step()
    weights = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    if rank == 0:
        torch.save({"loss": mean_loss.item() / world, "grads": grads, "weights": weights, "names": names}, out)
    dist.barrier()


def main() -> None:
    model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in (1, 2, 3):
        run_case(model_dir, stage, out_dir / f"zero{stage}.pt")
    run_case(model_dir, 2, out_dir / "zero2_false_negative.pt", duplicate=True)
    infonce.all_gather_with_grad = gather_without_grad  # the bug the test must catch
    run_case(model_dir, 2, out_dir / "zero2_detached_gather.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
