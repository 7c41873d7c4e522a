"""CoSENT, classification and Matryoshka on hand-made values and the real demo data."""
import math

import pytest
import torch

from tests.conftest import ROOT
from train.kinds.classification import ClassificationStream, parse_labelled
from train.input.data import pair_length
from train.losses.classification import classification
from train.losses.cosent import CoSENTLoss, cosent
from train.losses.matryoshka import matryoshka


def test_cosent_matches_its_formula_on_hand_made_scores():
    cos = torch.tensor([0.9, 0.2, 0.5], dtype=torch.float64)
    gold = torch.tensor([5.0, 1.0, 3.0], dtype=torch.float64)
    # ordered pairs (a above b): (0,1), (0,2), (2,1) -> log(1 + sum exp(20 (cos_b - cos_a)))
    expected = math.log(1 + math.exp(20 * (0.2 - 0.9)) + math.exp(20 * (0.5 - 0.9)) + math.exp(20 * (0.2 - 0.5)))
    assert cosent(cos, gold, scale=20).item() == pytest.approx(expected, rel=1e-6)


def test_cosent_ignores_ties_and_only_the_order_of_gold_matters():
    cos = torch.tensor([0.1, 0.8, 0.4])
    assert cosent(cos, torch.tensor([2.0, 2.0, 2.0])).item() == pytest.approx(0.0)   # nothing to order
    a = cosent(cos, torch.tensor([0.0, 5.0, 2.5]))
    b = cosent(cos, torch.tensor([0.0, 1.0, 0.5]))                                 # same order, other scale
    assert a.item() == pytest.approx(b.item())
    wrong = cosent(cos, torch.tensor([5.0, 0.0, 2.5]))                              # reversed order costs more
    assert wrong > a


def test_cosent_module_uses_cosine_of_embeddings():
    e1, e2 = torch.randn(4, 8), torch.randn(4, 8)
    gold = torch.tensor([1.0, 0.0, 3.0, 2.0])
    cos = torch.nn.functional.cosine_similarity(e1, e2)
    assert CoSENTLoss(20)(e1, e2, gold).item() == pytest.approx(cosent(cos, gold, 20).item(), rel=1e-6)


def test_classification_never_uses_a_same_label_text_as_negative():
    path = ROOT / "data/demo/finetune/intent.jsonl"
    stream = ClassificationStream([path], global_batch=8, make=parse_labelled, length=pair_length, num_negatives=3)
    label_of = {}
    for line in open(path, encoding="utf-8"):
        text, label, _ = parse_labelled(line, None, "")
        label_of[text] = label
    seen = 0
    for epoch in range(2):
        for batch in stream.epoch(epoch):
            for ex in batch:
                assert label_of[ex.pos] == label_of[ex.query] and ex.pos != ex.query
                assert all(label_of[n] != label_of[ex.query] for n in ex.neg)
                seen += 1
    assert seen > 500


def test_classification_loss_has_no_in_batch_negatives():
    """The batch loss is the mean of each query scored against its own candidates only."""
    torch.manual_seed(0)
    q, pos, neg = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3 * 2, 8, requires_grad=True)
    loss = classification(q, pos, neg, temperature=0.05)
    loss.backward()
    per_query = neg.grad.reshape(3, 2, 8)
    rows = [classification(q[i:i + 1], pos[i:i + 1], neg[2 * i:2 * i + 2].detach(), 0.05) for i in range(3)]
    assert loss.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-6)
    assert per_query.abs().sum() > 0


def test_matryoshka_uses_exactly_the_first_d_coordinates():
    torch.manual_seed(0)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16)
    seen = []

    def loss_fn(x, y):
        seen.append(x.shape[-1])
        return torch.nn.functional.cosine_similarity(x, y).sum()

    total = matryoshka(loss_fn, [a, b], dims=[4, 8], weights=[1.0, 0.5])
    assert seen == [4, 8]
    expected = loss_fn(a[:, :4], b[:, :4]) + 0.5 * loss_fn(a[:, :8], b[:, :8])
    assert total.item() == pytest.approx(expected.item())
    total.backward()
    assert a.grad[:, 8:].abs().max() == 0 and a.grad[:, :8].abs().max() > 0
    with pytest.raises(ValueError, match="exceeds the embedding width 16"):
        matryoshka(loss_fn, [a, b], dims=[32])
