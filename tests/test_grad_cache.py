"""GradCache (train/step/grad_cache.py): the same step as without it, on 2 ranks under ZeRO 1/2/3, with the
activation memory of one mini-batch; and sparse embedding gradients (train/models/model.py): the same step
as dense ones under ZeRO 0-3, with and without GradCache."""
import json

import pytest
import torch

from tests.conftest import ROOT, launch
from tests.test_cbb import RETRIEVAL, STS, write_config
from train.step.encoding import merge_features, tokenize_groups
from train.step.grad_cache import GradCache
from train.losses import InfoNCELoss

MINI_BATCH = 3


@pytest.fixture(scope="module")
def two_rank_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grad_cache")
    # retrieval on rank 0 (4 queries + 4 positives + 16 negatives), STS on rank 1 (12 texts): the ranks
    # need 8 and 4 mini-batches of 3, and must still run the same number of forwards (ZeRO-3)
    config = write_config(tmp / "tasks.json", {"retrieval": dict(RETRIEVAL), "sts": dict(STS)})
    launch(ROOT / "tests/workers/grad_cache_step.py", str(tiny_model), str(config), str(tmp / "out.pt"),
           str(MINI_BATCH), timeout=600)
    return torch.load(tmp / "out.pt")


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("case", ["pretrain", "cbb"])
def test_grad_cache_step_equals_the_uncached_step(two_rank_run, stage, case):
    plain, cached = (two_rank_run["results"][(stage, case, m)] for m in (0, MINI_BATCH))
    assert plain["losses"].keys() == cached["losses"].keys()
    for name, value in plain["losses"].items():
        assert cached["losses"][name] == pytest.approx(value, rel=1e-5), name
    scale = max(g.abs().max().item() for g in plain["grads"].values())
    assert scale > 1e-3  # the step really moves the weights
    for name, grad in plain["grads"].items():
        assert (cached["grads"][name] - grad).abs().max().item() < 1e-5 * max(1.0, scale), name
        assert (cached["weights"][name] - plain["weights"][name]).abs().max().item() < 1e-5 * max(1.0, scale), name
    # mini-batches of 3: the forward runs twice per mini-batch, and as often on every rank
    per_rank = [losses_forwards[0][(stage, case, MINI_BATCH)][1] for losses_forwards in two_rank_run["per_rank"]]
    assert len(set(per_rank)) == 1 and per_rank[0] >= 2 * 4, per_rank


@pytest.mark.parametrize("stage", [2, 3])
def test_grad_cache_reduce_once_gives_the_uncached_step(two_rank_run, stage):
    """--grad-cache-reduce once (DeepSpeed's coalesce_grad_reduction) changes when the gradient is
    reduced, never what it is."""
    plain, once = two_rank_run["results"][(stage, "pretrain", 0)], two_rank_run["results"][(stage, "pretrain", MINI_BATCH, "once")]
    scale = max(g.abs().max().item() for g in plain["grads"].values())
    for name, grad in plain["grads"].items():
        assert (once["grads"][name] - grad).abs().max().item() < 1e-5 * max(1.0, scale), name
        assert (once["weights"][name] - plain["weights"][name]).abs().max().item() < 1e-5 * max(1.0, scale), name


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_grad_cache_reduces_once_per_step_where_deepspeed_allows(two_rank_run, stage):
    """How often GradCache's gradient crosses the network (counted in DeepSpeed's comm backend): ZeRO-1 once,
    at the last mini-batch; ZeRO-2/3 at every mini-batch (DeepSpeed flushes partitioned gradients at each
    backward), and once with --grad-cache-reduce once. The start-up note says which (ds_config.setup_notes)."""
    from train.run.ds_config import setup_notes
    per_mini_batch = two_rank_run["results"][(stage, "pretrain", MINI_BATCH)]["reductions"]
    k = len(per_mini_batch["per_backward"])
    assert k >= 4, per_mini_batch  # the pretrain case takes several mini-batches of 3
    if stage == 1:
        assert per_mini_batch["per_backward"][:-1] == [0] * (k - 1) and per_mini_batch["per_backward"][-1] >= 1
    else:
        assert all(n >= 1 for n in per_mini_batch["per_backward"]), per_mini_batch
        once = two_rank_run["results"][(stage, "pretrain", MINI_BATCH, "once")]["reductions"]
        assert once["per_backward"] == [0] * k and 1 <= once["total"] < per_mini_batch["total"], (once, per_mini_batch)
    cfg = {"zero_optimization": {"stage": stage}, "bf16": {"enabled": False}}
    notes = " ".join(setup_notes(ROOT / f"ds_configs/zero{stage}.json", cfg, MINI_BATCH, "per-mini-batch", 10**6))
    assert ("k times" in notes) == (stage >= 2), notes


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("cached", [0, MINI_BATCH])
def test_sparse_embedding_gradients_give_the_dense_step(two_rank_run, stage, cached):
    dense, sparse = two_rank_run["results"][(stage, "cbb", 0)], two_rank_run["results"][(stage, "cbb", cached, "sparse")]
    for name, value in dense["losses"].items():
        assert sparse["losses"][name] == pytest.approx(value, rel=1e-5), name
    word = next(n for n in dense["grads"] if n.endswith("word_embeddings.weight"))
    used = int((dense["grads"][word].abs().sum(1) > 0).sum())
    assert 0 < used < dense["grads"][word].shape[0]  # some rows, not all: the case sparse rows are for
    scale = max(g.abs().max().item() for g in dense["grads"].values())
    for name, grad in dense["grads"].items():
        assert (sparse["grads"][name] - grad).abs().max().item() < 1e-5 * max(1.0, scale), name
        assert (sparse["weights"][name] - dense["weights"][name]).abs().max().item() < 1e-5 * max(1.0, scale), name
    # plain data parallel all-reduces the rows as they are; every ZeRO stage gets them dense as they land
    assert sparse["sparse_reduced"] == (stage == 0) and not dense["sparse_reduced"]


def test_grad_cache_batch_of_1024_holds_no_more_than_an_uncached_batch_of_2n(two_rank_run):
    """Tensors held for backward, peak per rank: GradCache at a global batch of 1,024 pairs in mini-batches
    of 32 texts, against 2 x 32 pairs per rank without GradCache, and against 1,024 pairs without."""
    for _, memory in two_rank_run["per_rank"]:
        assert 0 < memory["cached_1024"] <= memory["plain_2n"], memory
        assert memory["cached_1024"] < memory["plain_1024"] / 4, memory


class RecordingEngine:
    """The engine interface GradCache uses, on one process, keeping every forward's output."""

    def __init__(self, model):
        self.model, self.device, self.outputs = model, "cpu", []

    def __call__(self, features):
        out = self.model(features)
        self.outputs.append(out["sentence_embedding"].detach().clone())
        return out

    def backward(self, loss):
        loss.backward()

    def set_gradient_accumulation_boundary(self, boundary):
        pass


def test_grad_cache_replays_the_same_dropout_masks(tiny_model):
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(tiny_model), device="cpu")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
    model.train()
    texts = [json.loads(line) for line in open(ROOT / "data/demo/pretrain/question_pairs.jsonl", encoding="utf-8")][:5]
    tokenized = tokenize_groups(model, [([t["query"] for t in texts], ""), ([t["pos"] if isinstance(t["pos"], str) else t["pos"][0] for t in texts], "")])
    features = merge_features(tokenized.rows[:3], tokenized.pad_id, tokenized.left_pad)
    assert not torch.equal(model(dict(features))["sentence_embedding"], model(dict(features))["sentence_embedding"])
    engine = RecordingEngine(model)  # dropout is on: only a replayed RNG gives the same output twice
    cache = GradCache(engine, MINI_BATCH, "cpu")
    q, p = cache.encode(tokenized)[0]
    first = list(engine.outputs)
    cache.backward(InfoNCELoss(0.05)(q, p))
    again = engine.outputs[len(first):]
    assert len(first) == len(again) == 4  # 10 texts in mini-batches of 3
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the gradient is of the embeddings the loss saw
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())



@pytest.mark.parametrize("on_accumulate", [True, False])
def test_sparse_embedding_gradients_match_dense_ones_step_after_step(tiny_model, on_accumulate):
    """Three SGD steps in one process, each encoding in two forwards: the same gradients and weights as
    dense gradients at every step (the dense buffer is reused from step to step). SGD, because Adam
    turns float-rounding noise in a near-zero gradient into a whole learning-rate step."""
    from sentence_transformers import SentenceTransformer

    from train.step.encoding import encode_groups
    from train.models.model import densify_embedding_gradients, sparse_embedding_gradients
    texts = [["短", "一个稍长一点的句子", "第三个句子，比前两个都长得多，用来分桶"], ["另一组", "长度不一的文本，看看怎样"]]
    runs = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = SentenceTransformer(str(tiny_model), device="cpu")
        if sparse:
            assert sparse_embedding_gradients(model, dense_on_accumulate=on_accumulate) >= 1
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        weights = []
        for step in range(3):
            groups = [(texts[0][step:] + texts[1], "query: "), (texts[1][::-1], "passage: ")]
            (q, p), _ = encode_groups(model, model, groups, "cpu", buckets=2)
            (q.sum() * (step + 1) + p.pow(2).sum()).backward()
            densify_embedding_gradients(model)
            word = model[0].auto_model.get_input_embeddings().weight
            assert word.grad is not None and not word.grad.is_sparse
            grads = {"grad " + n: w.grad.clone() for n, w in model.named_parameters() if w.grad is not None}
            optimizer.step()
            optimizer.zero_grad()
            weights.append({**grads, **{n: w.detach().clone() for n, w in model.named_parameters()}})
        runs.append(weights)
    for step, (dense, sparse) in enumerate(zip(*runs)):
        for name, w in dense.items():
            assert torch.allclose(sparse[name], w, atol=1e-5), (step, name)
    word = next(n for n in runs[0][0] if n.endswith("word_embeddings.weight") and not n.startswith("grad"))
    assert not torch.equal(runs[0][0][word], runs[0][2][word])  # the steps moved the weights


def test_bf16_grad_cache_sums_its_mini_batches_in_fp32(tiny_model, tmp_path):
    """GradCache's 64 mini-batch backwards, as DeepSpeed accumulates them, against the same bf16
    computation summed in fp32 by hand: under zero0's bf16 accumulation the sum drifts by about 1%
    of the gradient; as the scripts configure DeepSpeed (fp32 accumulation) it stays within one
    bf16 rounding of the total."""
    launch(ROOT / "tests/workers/bf16_accumulation.py", str(tiny_model), str(tmp_path / "out.pt"), "64", nproc=1)
    result = torch.load(tmp_path / "out.pt")
    assert result["shipped"] < 4e-3 < result["bf16_accum"], result
    assert result["bf16_accum"] > 2.5 * result["shipped"], result
