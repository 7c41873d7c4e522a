"""CBB on 2 DeepSpeed ranks equals the summed objective computed by hand on one process."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from tests.conftest import ROOT, launch
from tests.workers.cbb_step import ARGS
from train.kinds.task_data import task_stream
from train.kinds.tasks import load_data_config

DEMO = ROOT / "data/demo/finetune"
BETA = 0.8


def write_config(path: Path, tasks: dict) -> Path:
    for spec in tasks.values():
        spec["files"] = [str(DEMO / f) for f in spec["files"]]
    path.write_text(json.dumps({"tasks": tasks}))
    return path


RETRIEVAL = {"type": "retrieval", "files": ["retrieval.jsonl"], "batch_size": 4, "num_negatives": 4, "ranks": 1}
STS = {"type": "sts", "files": ["sts.jsonl"], "batch_size": 6, "ranks": 1, "weight": BETA}
INTENT = {"type": "classification", "files": ["intent.jsonl"], "batch_size": 4, "num_negatives": 2, "ranks": 1}
LAYOUTS = {
    "retrieval_split_over_2_ranks": {"retrieval": dict(RETRIEVAL)},
    "retrieval_rank0_sts_rank1": {"retrieval": dict(RETRIEVAL), "sts": dict(STS)},
    "three_tasks_on_2_ranks": {"retrieval": dict(RETRIEVAL), "sts": dict(STS), "intent": dict(INTENT)},
}


def embed(model, texts):
    feats = model.preprocess(texts)
    return F.normalize(model({k: v for k, v in feats.items() if isinstance(v, torch.Tensor)})["sentence_embedding"], dim=-1)


def reference_objective(model, config_path: Path) -> torch.Tensor:
    """sum_t w_t L_t written out directly: InfoNCE over [positives; every negative] less the copies of the
    query's own positives, CoSENT by its double sum."""
    total = torch.zeros(())
    for task in load_data_config(config_path).tasks:
        batch = next(task_stream(task, ARGS.seed, 128, False).epoch(0))
        if task.type == "retrieval":
            q, p = embed(model, [ex.query for ex in batch]), embed(model, [ex.pos for ex in batch])
            negs = embed(model, [t for ex in batch for t in ex.neg])            # all num_negatives of every query
            scores = q @ torch.cat([p, negs]).T / ARGS.temperature
            texts = [ex.pos for ex in batch] + [t for ex in batch for t in ex.neg]
            # a candidate that is one of the query's own positives (outside its column) is no negative of it
            keep = [torch.tensor([j == i or t not in ex.positives for j, t in enumerate(texts)]) for i, ex in enumerate(batch)]
            loss = -torch.stack([scores[i, i] - torch.logsumexp(scores[i][keep[i]], 0) for i in range(len(batch))]).mean()
        elif task.type == "sts":
            cos = (embed(model, [ex.sentence1 for ex in batch]) * embed(model, [ex.sentence2 for ex in batch])).sum(-1)
            terms = [ARGS.cosent_scale * (cos[b] - cos[a]) for a, ea in enumerate(batch) for b, eb in enumerate(batch)
                     if ea.score > eb.score]
            loss = torch.log(1 + torch.stack(terms).exp().sum())
        else:
            losses = []
            for ex in batch:
                q, cands = embed(model, [ex.query]), embed(model, [ex.pos, *ex.neg])
                s = (q @ cands.T)[0] / ARGS.temperature
                losses.append(torch.logsumexp(s, 0) - s[0])
            loss = torch.stack(losses).mean()
        total = total + task.weight * loss
    return total


@pytest.mark.parametrize("stage, layout", [(2, name) for name in LAYOUTS] + [
    (3, "retrieval_rank0_sts_rank1"), (3, "three_tasks_on_2_ranks")])
def test_cbb_gradients_on_2_ranks_equal_one_process(tiny_model, tmp_path, stage, layout):
    """ZeRO-3 gathers parameters collectively in every forward: ranks holding different tasks must still
    run the same number of forwards (two length buckets each), or the step hangs; the gradients must not change."""
    config = write_config(tmp_path / "tasks.json", LAYOUTS[layout])
    launch(ROOT / "tests/workers/cbb_step.py", str(tiny_model), str(config), str(tmp_path / "out.pt"), str(stage),
           timeout=300)
    got = torch.load(tmp_path / "out.pt")
    assert got["forwards"] == [2, 2]  # the same forwards on every rank (2 length buckets), whatever tasks it holds

    model = SentenceTransformer(str(tiny_model), device="cpu")
    reference_objective(model, config).backward()
    want = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}
    worst = max((got["grads"][n] - want[n]).abs().max().item() for n in want)
    scale = max(w.abs().max().item() for w in want.values())
    assert scale > 1e-3
    assert worst < 1e-5 * max(1.0, scale), (layout, worst, got["assigned"])
    if layout == "retrieval_split_over_2_ranks":  # both ranks really held the task, with the same loss
        assert got["assigned"]["retrieval"] == [0, 1]
        assert math.isclose(got["losses"][0]["retrieval"], got["losses"][1]["retrieval"], rel_tol=1e-6)
    if layout == "retrieval_split_over_2_ranks":  # CBB: 4 queries + 4 positives + 2 of each query's 4 negatives
        assert got["rows"] == [16, 16]
    if layout == "retrieval_rank0_sts_rank1":
        assert got["losses"][0].keys() == {"retrieval"} and got["losses"][1].keys() == {"sts"}


def test_every_rank_placement_gives_each_rank_the_same_mix_and_the_same_gradients(tiny_model, tmp_path):
    """--task-placement every-rank: each rank holds half of every task (retrieval: its own queries with
    all their negatives), so both ranks encode the same number of rows; the gradient is still that of
    the one-process objective sum_t w_t L_t."""
    config = write_config(tmp_path / "tasks.json", LAYOUTS["three_tasks_on_2_ranks"])
    launch(ROOT / "tests/workers/cbb_step.py", str(tiny_model), str(config), str(tmp_path / "out.pt"), "2", "cbb",
           "every-rank", timeout=300)
    got = torch.load(tmp_path / "out.pt")
    assert got["assigned"] == {"retrieval": [0, 1], "sts": [0, 1], "intent": [0, 1]}
    # retrieval 2 queries + 2 positives + 2 x 4 negatives, sts 3 + 3, intent 2 + 2 positives + 2 x 2 negatives
    assert got["rows"] == [26, 26]
    assert all(losses.keys() == {"retrieval", "sts", "intent"} for losses in got["losses"])
    model = SentenceTransformer(str(tiny_model), device="cpu")
    reference_objective(model, config).backward()
    want = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}
    scale = max(w.abs().max().item() for w in want.values())
    assert scale > 1e-3
    assert max((got["grads"][n] - want[n]).abs().max().item() for n in want) < 1e-5 * max(1.0, scale)


def test_random_schedule_baseline_gives_each_rank_its_own_queries(tiny_model, tmp_path):
    """The FlagEmbedding / Piccolo baseline: one task per step, each rank its own queries with all their
    negatives, candidates gathered from every rank; the same objective as one process on the step's batch."""
    config = write_config(tmp_path / "tasks.json", {"retrieval": dict(RETRIEVAL)})
    launch(ROOT / "tests/workers/cbb_step.py", str(tiny_model), str(config), str(tmp_path / "out.pt"), "2", "random",
           timeout=300)
    got = torch.load(tmp_path / "out.pt")
    assert got["rows"] == [12, 12]  # 2 queries + 2 positives + 2 x 4 negatives on each rank
    model = SentenceTransformer(str(tiny_model), device="cpu")
    reference_objective(model, config).backward()
    want = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}
    scale = max(w.abs().max().item() for w in want.values())
    assert max((got["grads"][n] - want[n]).abs().max().item() for n in want) < 1e-5 * max(1.0, scale)
