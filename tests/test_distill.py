"""Distillation from teacher scores (train/losses/distill.py): the scores are validated and travel with
their texts through sampling and mining, the losses are their formulas, and a CBB step on 2 ranks (and
the random schedule's gathered layout, and through GradCache) gives the gradient of the one-process
objective written by hand."""
import json
import random
import zlib

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from tests.conftest import ROOT, launch
from tests.test_cbb import embed
from tests.workers.cbb_step import ARGS
from train.input.records import pair_maker
from train.kinds.task_data import task_stream
from train.kinds.tasks import ConfigError, load_data_config
from train.losses.distill import cbb_own_columns, distill
from train.step.mining import HardNegativeMiner, MiningRule

DEMO = ROOT / "data/demo/finetune/retrieval.jsonl"


def teacher_score(query: str, text: str) -> float:
    """A fixed, text-determined stand-in for a teacher's score in [-1, 1]."""
    return (zlib.crc32((query + "\t" + text).encode()) % 2001) / 1000 - 1


def scored(path, n=40):
    rows = [json.loads(line) for line in open(DEMO, encoding="utf-8")][:n]
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            r["pos_scores"] = [teacher_score(r["query"], t) for t in r["pos"]]
            r["neg_scores"] = [teacher_score(r["query"], t) for t in r["neg"]]
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def test_sampled_negatives_and_the_positive_keep_their_own_scores(tmp_path):
    line = open(scored(tmp_path / "s.jsonl"), encoding="utf-8").readline()
    make, plain = pair_maker(3, sample=True, need_scores=True), pair_maker(3, sample=True)
    for seed in range(20):
        ex = make(line, random.Random(seed), "f:1")
        assert ex.neg_scores == [teacher_score(ex.query, t) for t in ex.neg]
        assert ex.pos_score == teacher_score(ex.query, ex.pos)
        old = plain(line, random.Random(seed), "f:1")  # the same draws as without scores: data order unchanged
        assert (old.pos, old.neg) == (ex.pos, ex.neg)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(neg_scores=r["neg_scores"][:-1]), "'neg_scores' has"),
    (lambda r: r.update(pos_scores=[float("nan")] * len(r["pos"])), "not a finite number"),
    (lambda r: r.update(pos_scores=["0.5"] * len(r["pos"])), "'pos_scores' must be a list of numbers"),
    (lambda r: r.pop("pos_scores"), "distillation needs the teacher's 'pos_scores'"),
])
def test_bad_scores_are_named(tmp_path, change, message):
    r = json.loads(open(scored(tmp_path / "s.jsonl"), encoding="utf-8").readline())
    change(r)
    with pytest.raises(ValueError, match=message):
        pair_maker(3, sample=True, need_scores=True)(json.dumps(r), random.Random(0), "f:1")


def test_a_mined_negative_brings_its_score_from_the_pool():
    miner = HardNegativeMiner(2, MiningRule(interval=1, offset=0))
    pool, pool_scores = ["a", "b", "c", "d", "e", "f"], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    assert miner.negative_scores("x", [0.1, 0.2], pool_scores) == [0.1, 0.2]
    miner.record(0, {"x": (0.0, len(pool), 0.9)})  # far easier than when mined: replaced
    miner.check(0)
    got, scores = miner.negatives("x", ["i", "j"], pool), miner.negative_scores("x", [0.1, 0.2], pool_scores)
    assert got != ["i", "j"] and scores == [pool_scores[pool.index(t)] for t in got]


def test_the_losses_are_their_formulas():
    torch.manual_seed(0)
    q, cands, teacher = torch.randn(3, 8), torch.randn(3 + 3 * 4, 8), torch.randn(3, 5)
    own = cbb_own_columns(3, 2, 2, "cpu")
    s = F.normalize(q, dim=-1) @ F.normalize(cands, dim=-1).T
    pt = F.softmax(teacher / 0.5, -1)
    ps = F.softmax(s.gather(1, own) / 0.05, -1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()
    assert distill(q, cands, own, teacher, "kl", 0.05, 0.5).item() == pytest.approx(kl.item(), rel=1e-5)
    m3 = -(pt * F.log_softmax(s / 0.05, -1).gather(1, own)).sum(1).mean()
    assert distill(q, cands, own, teacher, "m3", 0.05, 0.5).item() == pytest.approx(m3.item(), rel=1e-5)
    # a student that ranks its candidates as the teacher does, at the teacher's temperature: no KL left
    assert distill(q, cands, own, s.gather(1, own), "kl", 0.05, 0.05).item() == pytest.approx(0, abs=1e-6)


def test_config_errors_are_named(tmp_path):
    for spec, message in [({"loss": "mse"}, "must be kl or m3"), ({"loss": "kl", "weight": -1}, "weight must be"),
                          ({"loss": "kl", "tau": 1}, "unknown distill keys")]:
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"tasks": {"r": {"type": "retrieval", "files": [str(DEMO)], "batch_size": 4,
                                                    "num_negatives": 2, "distill": spec}}}))
        with pytest.raises(ConfigError, match=message):
            load_data_config(path)


def reference(model, config) -> torch.Tensor:
    """InfoNCE (less copies of the positive) + weight x distillation, written out on one process."""
    task = load_data_config(config).tasks[0]
    batch = next(task_stream(task, ARGS.seed, 128, False).epoch(0))
    q, p = embed(model, [ex.query for ex in batch]), embed(model, [ex.pos for ex in batch])
    negs = embed(model, [t for ex in batch for t in ex.neg])
    scores = torch.cat([p, negs]) @ q.T
    scores = scores.T
    texts = [ex.pos for ex in batch] + [t for ex in batch for t in ex.neg]
    keep = [torch.tensor([j == i or t not in ex.positives for j, t in enumerate(texts)]) for i, ex in enumerate(batch)]
    tau, n, spec = ARGS.temperature, task.num_negatives, task.distill
    infonce = -torch.stack([scores[i, i] / tau - torch.logsumexp(scores[i][keep[i]] / tau, 0) for i in range(len(batch))]).mean()
    terms = []
    for i, ex in enumerate(batch):
        own = [i] + [len(batch) + i * n + j for j in range(n)]
        target = F.softmax(torch.tensor([ex.pos_score] + ex.neg_scores) / spec["teacher_temperature"], -1)
        if spec["loss"] == "kl":
            terms.append((target * (target.log() - F.log_softmax(scores[i, own] / tau, -1))).sum())
        else:
            keep_i = keep[i].clone()
            keep_i[own] = True
            logp = scores[i] / tau - torch.logsumexp(scores[i][keep_i] / tau, 0)
            terms.append(-(target * logp[own]).sum())
    return infonce + spec["weight"] * torch.stack(terms).mean()


# kl and m3 under CBB; the random schedule's gathered candidates with m3 (which reads all of them) through GradCache
@pytest.mark.parametrize("loss, schedule, mini_batch", [("kl", "cbb", 0), ("m3", "cbb", 0), ("m3", "random", 3)])
def test_distillation_on_2_ranks_equals_one_process(tiny_model, tmp_path, loss, schedule, mini_batch):
    config = tmp_path / "tasks.json"
    config.write_text(json.dumps({"tasks": {"retrieval": {
        "type": "retrieval", "files": [str(scored(tmp_path / "scored.jsonl"))], "batch_size": 4, "num_negatives": 4,
        "distill": {"loss": loss, "weight": 0.7, "teacher_temperature": 0.2}}}}))
    launch(ROOT / "tests/workers/cbb_step.py", str(tiny_model), str(config), str(tmp_path / "out.pt"), "2", schedule,
           "by-task", str(mini_batch), timeout=300)
    got = torch.load(tmp_path / "out.pt")
    assert got["assigned"]["retrieval"] == [0, 1]
    if mini_batch:  # GradCache: each rank's 12 texts in mini-batches of 3, each forward twice (no grad, then replay)
        assert got["forwards"] == [8, 8], got["forwards"]
    model = SentenceTransformer(str(tiny_model), device="cpu")
    reference(model, config).backward()
    want = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}
    scale = max(w.abs().max().item() for w in want.values())
    assert scale > 1e-3
    assert max((got["grads"][n] - want[n]).abs().max().item() for n in want) < 1e-5 * max(1.0, scale)
