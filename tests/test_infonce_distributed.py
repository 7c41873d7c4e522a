"""The gathered InfoNCE loss on 2 DeepSpeed ranks equals one process on the concatenated global batch."""
import pytest
import torch
from sentence_transformers import SentenceTransformer

from tests.conftest import ROOT, launch
from tests.workers.infonce_step import LR, PER_RANK, TEMPERATURE, global_batch, masked_loss
from train.losses import InfoNCELoss

TOL = 1e-5


@pytest.fixture(scope="module")
def two_rank_results(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("infonce")
    launch(ROOT / "tests/workers/infonce_step.py", str(tiny_model), str(out))
    return {p.stem: torch.load(p) for p in out.glob("*.pt")}


def one_process(tiny_model, duplicate: bool = False, mask: bool = True) -> dict:
    """One process, the global batch of both ranks, the plain (ungathered) loss, one AdamW step."""
    model = SentenceTransformer(str(tiny_model), device="cpu")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    rows = global_batch(duplicate)
    assert len(rows) == 2 * PER_RANK

    def emb(texts):
        feats = model.preprocess(texts)
        return model({k: v for k, v in feats.items() if isinstance(v, torch.Tensor)})["sentence_embedding"]

    loss = masked_loss(emb, rows) if mask and duplicate else \
        InfoNCELoss(TEMPERATURE)(emb([r["query"] for r in rows]), emb([r["pos"][0] for r in rows]))
    loss.backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    return {"loss": loss.item(), "grads": grads, "initial": initial, "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def reference(tiny_model):
    return one_process(tiny_model)


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


def test_a_positive_repeated_on_another_rank_is_masked_as_one_process_would(two_rank_results, tiny_model):
    """Rank 1's last query has rank 0's second positive: the gathered ids find the copy on the other
    rank, and loss, gradients and step equal one process masking it; without the mask the loss differs."""
    got = two_rank_results["zero2_false_negative"]
    masked, kept = one_process(tiny_model, duplicate=True), one_process(tiny_model, duplicate=True, mask=False)
    assert abs(got["loss"] - masked["loss"]) < TOL
    assert max_diff(got["grads"], masked["grads"]) < TOL
    assert max_diff(got["weights"], masked["weights"]) < TOL
    assert abs(got["loss"] - kept["loss"]) > 100 * TOL
