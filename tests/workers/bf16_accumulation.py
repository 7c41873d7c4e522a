"""1-rank worker: the rounding that summing GradCache's K mini-batch gradients adds in bf16.

    torchrun --nproc_per_node 1 tests/workers/bf16_accumulation.py MODEL_DIR OUT_FILE K

GradCache backpropagates a step as K mini-batches, which DeepSpeed accumulates like micro-batches.
The reference is the same bf16 computation (the same model in bf16, the same GradCache mini-batches)
with each mini-batch's gradient added into fp32 by hand: what is left between it and a DeepSpeed
engine is the accumulation alone. Cases, from the same weights and texts, one InfoNCE loss:
  bf16_accum:  ds_configs/zero0.json in bf16 as DeepSpeed runs it, gradients summed in bf16
               (what train/run/ds_config.py gave before it asked for fp32 accumulation)
  shipped:     load_ds_config(..., mini_batch=M), as the training scripts call it
Writes {case: relative L2 distance of the whole gradient from the reference}.
"""
import copy
import json
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad
from sentence_transformers import SentenceTransformer

from train.run.ds_config import build_optimizer, load_ds_config
from train.step.encoding import tokenize_groups
from train.step.grad_cache import GradCache
from train.losses import InfoNCELoss

ROOT = Path(__file__).resolve().parents[2]


class Fp32AccumulatingEngine:
    """GradCache's engine interface over a plain bf16 model: each backward's gradient added into fp32."""

    def __init__(self, model):
        self.model, self.device = model, "cpu"
        self.sums = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in model.named_parameters()}

    def __call__(self, features):
        return self.model(features)

    def backward(self, loss):
        loss.backward()
        for n, w in self.model.named_parameters():
            if w.grad is not None:
                self.sums[n] += w.grad.float()
                w.grad = None

    def set_gradient_accumulation_boundary(self, boundary):
        pass


def grad_cache_step(engine, tokenized, mini_batch: int, loss_fn) -> None:
    cache = GradCache(engine, mini_batch, engine.device)
    (q, p), _ = cache.encode(tokenized)
    cache.backward(loss_fn(q, p))


def main() -> None:
    model_dir, out_file, k = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    deepspeed.init_distributed()
    rows = [json.loads(line) for line in open(ROOT / "data/demo/pretrain/question_pairs.jsonl", encoding="utf-8")][:64]
    base = SentenceTransformer(model_dir, device="cpu")
    tokenized = tokenize_groups(base, [([r["query"] for r in rows], ""), ([r["pos"][0] for r in rows], "")])
    mini_batch = -(-len(tokenized.rows) // k)  # k mini-batches
    loss_fn = InfoNCELoss(0.05)

    reference = Fp32AccumulatingEngine(copy.deepcopy(base).to(torch.bfloat16))
    grad_cache_step(reference, tokenized, mini_batch, loss_fn)
    ref = {n: g for n, g in reference.sums.items() if g.abs().sum() > 0}

    def distance(cfg: dict) -> float:
        model = copy.deepcopy(base)
        engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model.parameters(), cfg, 1e-3, 0.0),
                                          config=cfg)
        grad_cache_step(engine, tokenized, mini_batch, loss_fn)
        got = {n: safe_get_full_grad(w) for n, w in engine.module.named_parameters()}
        diff = sum(((got[n].float() - ref[n]) ** 2).sum() for n in ref).sqrt()
        return (diff / sum((g ** 2).sum() for g in ref.values()).sqrt()).item()

    zero0 = ROOT / "ds_configs/zero0.json"
    results = {"bf16_accum": distance(load_ds_config(zero0, 1, 1, 0.0, precision="bf16")),
               "shipped": distance(load_ds_config(zero0, 1, 1, 0.0, precision="bf16", mini_batch=mini_batch)),
               "mini_batches": k}
    torch.save(results, out_file)
    print(results)


if __name__ == "__main__":
    main()
