"""One rank: the gradient of one pre-training step through GradCache against the plain step, on the
device this process gets (cuda when there is one), in fp32 under ZeRO-1. bench/gpu_check.py runs it.

    torchrun --nproc_per_node 1 bench/gpu_grad_cache.py MODEL_DIR OUT_JSON
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad
from sentence_transformers import SentenceTransformer

from train.run.cluster import bind_device, host_group, open_host_group
from train.run.ds_config import build_optimizer, load_ds_config
from train.step.encoding import encode_tokenized, tokenize_groups
from train.step.grad_cache import GradCache
from train.losses import InfoNCELoss
from train.models.model import set_pooling

ROOT = Path(__file__).resolve().parent.parent
PAIRS, MINI_BATCH = 16, 4


def grad_cache(engine) -> GradCache:
    """GradCache as a training run builds it: its chunk count travels on the host (gloo) group, which
    carries CPU tensors; the default group on a GPU is NCCL, which refuses them."""
    return GradCache(engine, MINI_BATCH, engine.device, host_group())


def step_gradient(base, tokenized, cached: bool) -> tuple[dict, str]:
    model = copy.deepcopy(base)
    cfg = load_ds_config(ROOT / "ds_configs/zero1.json", PAIRS, 1, 0.0, precision="fp32")
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model.parameters(), cfg, 1e-5, 0.0),
                                      config=cfg)
    loss_fn = InfoNCELoss(0.02)
    if cached:
        cache = grad_cache(engine)
        (q, p), _ = cache.encode(tokenized)
        cache.backward(loss_fn(q, p))
    else:
        (q, p), _ = encode_tokenized(engine, tokenized, engine.device, 1)
        engine.backward(loss_fn(q, p))
    grads = {n: safe_get_full_grad(w) for n, w in engine.module.named_parameters()}
    return {n: g.float().cpu() for n, g in grads.items() if g is not None}, str(engine.device)


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    bind_device()
    deepspeed.init_distributed()
    open_host_group()
    torch.backends.cuda.matmul.allow_tf32 = False  # equality in fp32: no TF32 matmuls on either side
    rows = [json.loads(line) for line in open(ROOT / "data/demo/pretrain/question_pairs.jsonl", encoding="utf-8")][:PAIRS]
    # mean pooling: a random-weight model's CLS embeddings are nearly alike, so its loss gradient is
    # near zero and float cancellation, not GradCache, would decide the comparison
    base = set_pooling(SentenceTransformer(model_dir, device="cpu"), "mean")
    base.max_seq_length = 128
    tokenized = tokenize_groups(base, [([r["query"] for r in rows], ""), ([r["pos"][0] for r in rows], "")])
    plain, device = step_gradient(base, tokenized, cached=False)
    cached, _ = step_gradient(base, tokenized, cached=True)
    diff = sum(((cached[n] - g) ** 2).sum() for n, g in plain.items()).sqrt()
    norm = sum((g ** 2).sum() for g in plain.values()).sqrt()
    out.write_text(json.dumps({"relative_difference": (diff / norm).item(), "device": device,
                               "parameters": sum(g.numel() for g in plain.values()),
                               "mini_batches": -(-2 * PAIRS // MINI_BATCH)}))


if __name__ == "__main__":
    main()
