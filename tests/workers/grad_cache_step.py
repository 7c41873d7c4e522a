"""2-rank worker: one training step with and without GradCache, under ZeRO 1, 2 and 3 (fp32).

    torchrun --nproc_per_node 2 tests/workers/grad_cache_step.py MODEL_DIR TASKS_JSON OUT_FILE MINI_BATCH

Cases, each from the same weights with an SGD step (so the weights after it show the gradient, which
Adam's first step would normalise away):
  pretrain: gathered InfoNCE with one hard negative, the code path of train/pretrain.py
  cbb:      the tasks of TASKS_JSON through train.kinds.multitask.step_loss (CBB scaling, Matryoshka dims),
            ranks holding different tasks and so different numbers of texts
and the cbb case again under ZeRO 0-3, with and without GradCache, with sparse embedding gradients
(train/run/runner.py's use_sparse_embedding_gradients, as its build_engine calls it), against the dense step;
and the memory case: pre-training at a global batch of 1,024 pairs with GradCache (mini-batches of
32 texts) against 2 x 32 pairs per rank without, measured as the peak bytes of tensors held for backward.
Each cached step also counts DeepSpeed's gradient reductions (all-reduce, reduce, reduce-scatter through
deepspeed.comm's backend, which every ZeRO stage uses; the loss's own gathers go through torch.distributed
and are not counted) at each mini-batch's backward and in the whole GradCache backward; the pretrain case
runs again under ZeRO-2 and 3 with --grad-cache-reduce once (DeepSpeed's coalesce_grad_reduction).
"""
import sys
import weakref
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
from sentence_transformers import SentenceTransformer

from train.input.data import PairStream, rank_slice
from train.run.ds_config import load_ds_config
from train.step.encoding import encode_tokenized, tokenize_groups
from train.kinds.task_data import task_stream
from train.step.grad_cache import GradCache
from train.losses import InfoNCELoss
from train.models.model import densify_embedding_gradients
from train.kinds import LossSettings
from train.kinds.multitask import step_loss, task_groups, tasks_this_step
from train.run.runner import use_sparse_embedding_gradients
from train.kinds.tasks import assign_ranks, load_data_config

ROOT = Path(__file__).resolve().parents[2]
MEMORY_MINI_BATCH = 32
DEMO = [ROOT / "data/demo/pretrain/question_pairs.jsonl", ROOT / "data/demo/pretrain/llm_pairs.jsonl"]


class HeldForBackward:
    """Peak bytes of the tensors autograd keeps for backward, alive at once (each storage once)."""

    def __init__(self):
        self.live, self.count, self.peak = 0, {}, 0

    def pack(self, t: torch.Tensor):
        key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        if not self.count.get(key):
            self.live += size
            self.peak = max(self.peak, self.live)
        self.count[key] = self.count.get(key, 0) + 1
        holder = _Holder(t)
        weakref.finalize(holder, self._release, key, size)
        return holder

    def _release(self, key, size) -> None:
        self.count[key] -= 1
        if not self.count[key]:
            self.live -= size

    @staticmethod
    def unpack(holder):
        return holder.t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Holder:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter_tensor", "reduce_scatter", "all_reduce_coalesced")
REDUCED = [0]  # DeepSpeed's gradient reductions so far on this rank


def count_reductions() -> None:
    """Wrap the reductions of deepspeed.comm's backend object: ZeRO 1/2 reach it through dist.all_reduce
    and dist.reduce, ZeRO-3 through reduce_scatter_fn, which calls the backend's reduce_scatter_tensor."""
    from deepspeed.comm import comm
    for name in REDUCTIONS:
        if hasattr(comm.cdb, name):
            def counted(*args, __call=getattr(comm.cdb, name), **kwargs):
                REDUCED[0] += 1
                return __call(*args, **kwargs)
            setattr(comm.cdb, name, counted)


def counting_backward(engine, per_backward: list) -> None:
    """engine.backward that appends the reductions each call makes (GradCache calls engine.backward)."""
    backward = engine.backward

    def counted(loss, *args, **kwargs):
        before = REDUCED[0]
        out = backward(loss, *args, **kwargs)
        per_backward.append(REDUCED[0] - before)
        return out
    engine.backward = counted


def engine_for(model_dir: str, stage: int, world: int, sparse: bool = False):
    model = SentenceTransformer(model_dir, device="cpu")
    cfg = load_ds_config(ROOT / f"ds_configs/zero{stage}.json", 1, world, grad_clip=0.0, precision="fp32")
    if sparse:  # what train/run/runner.py's build_engine calls
        use_sparse_embedding_gradients(model, cfg)
    cfg["zero_allow_untested_optimizer"] = True  # SGD: the test's choice, not the scripts'
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), config=cfg)
    return engine, model


def full(engine, read) -> dict:
    out = {}
    for n, p in engine.module.named_parameters():
        v = read(p)  # a collective under ZeRO-3: every rank calls it for every parameter
        out[n] = torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape) if v is None else v.detach().clone()
    return out


def pretrain_loss(engine, model, cache, global_batch, rank, world, negatives=True):
    batch = rank_slice(global_batch, rank, world)
    groups = [([ex.query for ex in batch], "query: "), ([ex.pos for ex in batch], "passage: ")]
    if negatives:
        groups.append(([ex.neg[0] for ex in batch], "passage: "))
    tokenized = tokenize_groups(model, groups)
    (q, p, *n), _ = cache.encode(tokenized) if cache else encode_tokenized(engine, tokenized, engine.device, 3)
    return InfoNCELoss(0.05)(q, p, n[0] if n else None)


def with_negatives(stream):
    """Demo pairs with one hard negative each: another example's positive (the demo has no 'neg')."""
    batch = next(stream.epoch(0))
    for i, ex in enumerate(batch):
        ex.neg = [batch[(i + 5) % len(batch)].pos]
    return batch


def one_step(model_dir, stage, case, mini_batch, config_path, rank, world, sparse=False, once=False) -> dict:
    engine, model = engine_for(model_dir, stage, world, sparse)
    forwards, per_backward = [], []
    engine.module.register_forward_hook(lambda _, args, __: forwards.append(args[0]["input_ids"].shape[0]))
    cache = GradCache(engine, mini_batch, engine.device, reduce_once=once) if mini_batch else None
    counting_backward(engine, per_backward)
    if case == "pretrain":
        loss = pretrain_loss(engine, model, cache, with_negatives(PairStream(DEMO, global_batch=16, seed=1)), rank, world)
        losses = {"infonce": loss.item()}
    else:
        tasks = load_data_config(config_path).tasks
        assign_ranks(tasks, world, "cbb")
        for t in tasks:
            t.query_prompt, t.passage_prompt = "query: ", "passage: "
        batches = {t.name: next(task_stream(t, 42, 128, False).epoch(0)) for t in tasks if rank in t.assigned}
        now = tasks_this_step(tasks, rank, 0, "cbb", 42)

        def encode(groups):
            tokenized = tokenize_groups(model, groups)
            return cache.encode(tokenized) if cache else encode_tokenized(engine, tokenized, engine.device, 2)
        result = step_loss(batches, now, encode, task_groups(tasks), rank, world,
                           LossSettings(0.05, 20.0, dims=[8, 16, 32], weights=[1.0, 0.5, 1.0]), miners={})
        loss, losses = result.total, {k: v.item() for k, v in result.losses.items()}
    before = REDUCED[0]
    (cache.backward if cache else engine.backward)(loss)
    reductions = {"per_backward": per_backward, "total": REDUCED[0] - before}
    word = model[0].auto_model.get_input_embeddings().weight
    sparse_reduced = word.grad is not None and word.grad.is_sparse
    densify_embedding_gradients(engine.module)  # as train/run/runner.py's Run.optimize does
    grads = full(engine, safe_get_full_grad)
    engine.step()
    return {"losses": losses, "grads": grads, "weights": full(engine, safe_get_full_fp32_param), "forwards": len(forwards),
            "sparse_reduced": sparse_reduced, "reductions": reductions}


def memory(model_dir, mini_batch, rank, world) -> dict:
    """Peak bytes held for backward on each rank: a global batch of 1,024 pairs with GradCache in
    mini-batches of N texts, against --batch-size 2N (2N pairs per rank, as sentence-transformers
    counts a batch) without. (The loss on 1,024 pairs keeps its [512 x 1,024] scores on each rank
    whatever N, so N is not tiny here.)"""
    out = {}
    for name, global_batch, cache_on in [("cached_1024", 1024, True), ("plain_2n", 2 * mini_batch * world, False),
                                         ("plain_1024", 1024, False)]:
        engine, model = engine_for(model_dir, 2, world)
        cache = GradCache(engine, mini_batch, engine.device) if cache_on else None
        batch = next(PairStream(DEMO, global_batch=global_batch, seed=1).epoch(0))
        meter = HeldForBackward()
        with meter.hooks():
            loss = pretrain_loss(engine, model, cache, batch, rank, world, negatives=False)
            (cache.backward if cache else engine.backward)(loss)
        engine.step()
        out[name] = meter.peak
    return out


def main() -> None:
    model_dir, config_path, out, mini_batch = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    deepspeed.init_distributed(dist_backend="gloo")
    count_reductions()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for stage in (1, 2, 3):
        for case in ("pretrain", "cbb"):
            for cached in (0, mini_batch):
                results[(stage, case, cached)] = one_step(model_dir, stage, case, cached, config_path, rank, world)
    for stage in (2, 3):  # --grad-cache-reduce once
        results[(stage, "pretrain", mini_batch, "once")] = one_step(model_dir, stage, "pretrain", mini_batch,
                                                                    config_path, rank, world, once=True)
    results[(0, "cbb", 0)] = one_step(model_dir, 0, "cbb", 0, config_path, rank, world)
    for stage in (0, 1, 2, 3):  # sparse embedding gradients (train/models/model.py), against the dense step above
        for cached in (0, mini_batch):
            results[(stage, "cbb", cached, "sparse")] = one_step(model_dir, stage, "cbb", cached, config_path, rank,
                                                                world, sparse=True)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, ({k: (v["losses"], v["forwards"]) for k, v in results.items()},
                                      memory(model_dir, MEMORY_MINI_BATCH, rank, world)))
    if rank == 0:
        torch.save({"results": results, "per_rank": per_rank}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
