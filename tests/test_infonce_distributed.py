"""The gathered InfoNCE loss on 2 DeepSpeed ranks equals one process on the concatenated global batch."""
import pytest
import torch
from sentence_transformers import SentenceTransformer

from tests.conftest import ROOT, launch
from tests.workers.infonce_step import LR, PER_RANK, TEMPERATURE, global_batch
from train.losses import InfoNCELoss

TOL = 1e-5


@pytest.fixture(scope="module")
def two_rank_results(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("infonce")
    launch(ROOT / "tests/workers/infonce_step.py", str(tiny_model), str(out))
    return {p.stem: torch.load(p) for p in out.glob("*.pt")}


@pytest.fixture(scope="module")
def reference(tiny_model):
    """One process, the global batch of both ranks, the plain (ungathered) loss, one AdamW step."""
    model = SentenceTransformer(str(tiny_model), device="cpu")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    rows = global_batch()
    assert len(rows) == 2 * PER_RANK

    def emb(texts):
        feats = model.preprocess(texts)
        return model({k: v for k, v in feats.items() if isinstance(v, torch.Tensor)})["sentence_embedding"]

    loss = InfoNCELoss(TEMPERATURE)(emb([r["query"] for r in rows]), emb([r["pos"][0] for r in rows]))
    loss.backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    return {"loss": loss.item(), "grads": grads, "initial": initial, "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_equal_one_process(two_rank_results, reference, stage):
    got = two_rank_results[f"zero{stage}"]
    assert abs(got["loss"] - reference["loss"]) < TOL
    assert max_diff(got["grads"], reference["grads"]) < TOL
    assert max_diff(got["weights"], reference["weights"]) < TOL
    # the step did something: the weights moved by about the learning rate
    assert max_diff(got["weights"], reference["initial"]) > LR / 2


def test_a_gather_that_drops_gradients_is_caught(two_rank_results, reference):
    """The same comparison fails for the classic detached gather: its loss matches, its gradients do not."""
    got = two_rank_results["zero2_detached_gather"]
    assert abs(got["loss"] - reference["loss"]) < TOL
    assert max_diff(got["grads"], reference["grads"]) > 100 * TOL
