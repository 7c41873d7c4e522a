"""False negatives in InfoNCE: a copy of a query's own positive among its candidates (another query
on the same CMRC paragraph, or that paragraph mined as another query's hard negative) is left out of
its denominator, in every layout the losses use; the ids that find them agree across processes."""
import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ROOT, SHARED, deepspeed_launch
from train.losses import InfoNCELoss
from train.losses.cbb import retrieval_cbb
from train.losses.infonce import false_negatives
from train.input.records import pair_maker
from train.losses.text_ids import retrieval_ids, text_ids

TEMPERATURE = 0.05


def cmrc_by_paragraph(count: int) -> tuple[dict, dict, dict, list[str]]:
    """CMRC trial's paragraph texts, query texts, {paragraph: its non-empty queries}, and the first
    `count` paragraphs (by id) that two or more queries ask about."""
    cmrc = SHARED / "cmrc2018-trial"
    text = {d["_id"]: d["text"] for d in map(json.loads, open(cmrc / "corpus.jsonl", encoding="utf-8"))}
    query = {q["_id"]: q["text"] for q in map(json.loads, open(cmrc / "queries.jsonl", encoding="utf-8"))}
    by_doc = defaultdict(list)
    for line in open(cmrc / "qrels.tsv", encoding="utf-8").read().splitlines()[1:]:
        qid, doc, _ = line.split("\t")
        if query[qid].strip():
            by_doc[doc].append(qid)
    return text, query, by_doc, sorted(d for d, qs in by_doc.items() if len(qs) >= 2)[:count]


def cmrc_lines() -> tuple[list[str], list[str]]:
    """JSONL lines of CMRC-trial queries: two on the same paragraph, then four on four other paragraphs,
    each with a hard negative that is none of their own paragraphs; and the paragraphs of the first two."""
    text, query, by_doc, docs = cmrc_by_paragraph(6)
    chosen = [(by_doc[docs[0]][0], docs[0]), (by_doc[docs[0]][1], docs[0])] + [(by_doc[d][0], d) for d in docs[1:5]]
    lines = [json.dumps({"query": query[q], "pos": [text[d]], "neg": [text[docs[5]]]}, ensure_ascii=False)
             for q, d in chosen]
    return lines, [text[docs[0]]]


def examples(lines: list[str]) -> list:
    make = pair_maker(num_negatives=1, sample=False)
    return [make(line, random.Random(0), f"cmrc:{i + 1}") for i, line in enumerate(lines)]


def by_hand(q, candidates, candidate_texts, labels, positives) -> torch.Tensor:
    """Each query's cross-entropy over the candidates that are not one of its positives (its own column kept)."""
    q, c = F.normalize(q, dim=-1), F.normalize(candidates, dim=-1)
    losses = []
    for i, label in enumerate(labels):
        keep = [j for j, t in enumerate(candidate_texts) if j == label or t not in positives[i]]
        logits = (q[i] @ c[keep].T) / TEMPERATURE
        losses.append(-torch.log_softmax(logits, 0)[keep.index(label)])
    return torch.stack(losses).mean()


def test_a_second_query_on_the_same_paragraph_is_not_its_negative():
    lines, shared = cmrc_lines()
    batch = examples(lines)
    assert batch[0].pos == batch[1].pos == shared[0] and len({ex.pos for ex in batch}) == 5
    torch.manual_seed(0)
    q, p, n = torch.randn(6, 16), torch.randn(6, 16), torch.randn(6, 16)
    ids = retrieval_ids(batch, [ex.pos for ex in batch], [t for ex in batch for t in ex.neg])
    loss_fn = InfoNCELoss(TEMPERATURE)
    masked = loss_fn(q, p, n, ids)
    texts = [ex.pos for ex in batch] + [t for ex in batch for t in ex.neg]
    expected = by_hand(q, torch.cat([p, n]), texts, list(range(6)), [set(ex.positives) for ex in batch])
    assert masked.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss_fn.excluded == 2  # query 0 sees query 1's copy of its paragraph, and query 1 sees query 0's
    assert abs(InfoNCELoss(TEMPERATURE)(q, p, n).item() - masked.item()) > 1e-3  # without ids the copies count


def test_a_paragraph_mined_as_another_query_s_negative_is_left_out_under_cbb():
    """CBB's layout: positives local, every retrieval rank's negatives gathered; here one rank, and
    query 2's hard negative is query 0's paragraph."""
    lines, shared = cmrc_lines()
    rows = [json.loads(line) for line in lines[1:]]  # queries 1..5: no two on one paragraph now
    rows[1]["neg"] = shared
    batch = examples([json.dumps(r, ensure_ascii=False) for r in rows])
    torch.manual_seed(1)
    q, p, neg = torch.randn(5, 16, requires_grad=True), torch.randn(5, 16), torch.randn(5, 16)
    labels = torch.arange(5)
    exclude = false_negatives(retrieval_ids(batch, [ex.pos for ex in batch], [t for ex in batch for t in ex.neg]),
                              labels, gather_pos=False)
    assert exclude.nonzero().tolist() == [[0, 5 + 1]]  # query 1's paragraph as query 2's negative (column B + 1)
    texts = [ex.pos for ex in batch] + [t for ex in batch for t in ex.neg]
    expected = by_hand(q, torch.cat([p, neg]), texts, labels.tolist(), [set(ex.positives) for ex in batch])
    got = retrieval_cbb(q, p, neg, TEMPERATURE, exclude)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    got.backward()
    assert q.grad.abs().sum() > 0


def test_every_listed_positive_counts_not_only_the_one_trained_on():
    """A line with two positives trains on one of them per epoch; the other, met as another query's
    positive in the batch, is not its negative either."""
    lines, _ = cmrc_lines()
    first, other = json.loads(lines[0]), json.loads(lines[2])
    first["pos"] = first["pos"] + other["pos"]
    make = pair_maker(num_negatives=1, sample=False)
    rng = random.Random(3)
    ex = next(e for e in (make(json.dumps(first, ensure_ascii=False), rng, "x:1") for _ in range(20))
              if e.pos == first["pos"][0])
    batch = [ex, make(lines[2], rng, "x:3")]
    ids = retrieval_ids(batch, [e.pos for e in batch], [t for e in batch for t in e.neg])
    exclude = false_negatives(ids, torch.arange(2))
    assert exclude.tolist() == [[False, True, False, False], [False, False, False, False]]


def test_text_ids_do_not_depend_on_the_process_hash_seed():
    texts = ["如何训练中文向量模型？", "passage: 一架飞机正在起飞。", ""]
    code = "import json,sys; from train.losses.text_ids import text_ids; print(json.dumps(text_ids(json.loads(sys.argv[1])).tolist()))"
    outs = [subprocess.run([sys.executable, "-c", code, json.dumps(texts)], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}, check=True).stdout
            for seed in ("1", "2")]
    assert json.loads(outs[0]) == json.loads(outs[1]) == text_ids(texts).tolist()
    assert len(set(json.loads(outs[0]))) == 3


def paired_cmrc_task(folder: Path, pairs: int = 4) -> Path:
    """A retrieval task of 2 x `pairs` CMRC queries, two on each paragraph, each with two hard
    negatives from paragraphs none of them has: every query has one false negative in a full batch."""
    text, query, by_doc, docs = cmrc_by_paragraph(pairs + 2)
    negatives = [text[d] for d in docs[pairs:]]
    rows = [{"query": query[q], "pos": [text[d]], "neg": negatives} for d in docs[:pairs] for q in by_doc[d][:2]]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "retrieval.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    config = {"tasks": {"r": {"type": "retrieval", "files": ["retrieval.jsonl"], "batch_size": 2 * pairs,
                              "num_negatives": 2, "ranks": 2}}}
    (folder / "tasks.json").write_text(json.dumps(config))
    return folder / "tasks.json"


@pytest.mark.parametrize("schedule", ["cbb", "random"])
def test_finetune_leaves_out_and_reports_every_false_negative(tiny_model, tmp_path, schedule):
    """2 ranks, 2 steps of all 8 queries: CBB (both ranks hold every query, each half the negatives) and
    the random schedule (each rank its 4 queries, candidates gathered) both find 8 copies per step,
    on whichever rank the partner lives; --no-mask-false-negatives keeps them and says nothing."""
    config = paired_cmrc_task(tmp_path / "data")
    common = ["--model", str(tiny_model), "--data-config", str(config), "--max-steps", "2", "--expand-dim", "0",
              "--mrl-dims", "none", "--max-length", "32", "--task-schedule", schedule, "--merge-weight", "1"]
    masked = deepspeed_launch(ROOT / "train/finetune.py", *common, "--output-dir", str(tmp_path / "masked"),
                              "--false-negative-margin", "0.0")
    assert "false negatives left out of InfoNCE (a query's positive among its candidates again): 16" in masked.stdout
    summary = json.loads((tmp_path / "masked/summary.json").read_text())  # the score guard, counted beside them
    assert summary["false_negatives"] == 16
    assert f"(above the positive by more than 0): {summary['score_guarded']}" in masked.stdout
    kept = deepspeed_launch(ROOT / "train/finetune.py", *common, "--output-dir", str(tmp_path / "kept"),
                            "--no-mask-false-negatives")
    assert "false negatives left out" not in kept.stdout and "done: 2 steps" in kept.stdout
    assert "kept as negatives" in (tmp_path / "kept/final/README.md").read_text()


def test_the_score_guard_leaves_out_what_outscores_the_positive_by_the_margin():
    from train.losses.infonce import guarded, info_nce, score_guard
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    cands = F.normalize(torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.05], [0.8, 0.6]]), dim=-1)
    labels = torch.tensor([0, 1])
    guard = score_guard(q, cands, labels, margin=0.1)
    # query 0: positive 0.6; candidate 2 (0.999) and 3 (0.8) are above 0.7; query 1: positive 1.0, none above
    assert guard.tolist() == [[False, False, True, True], [False, False, False, False]]
    copies = torch.tensor([[False, False, True, False], [False, False, False, False]])
    exclude, added = guarded(copies, guard)
    assert added == 1 and exclude.tolist() == [[False, False, True, True], [False, False, False, False]]
    s = q @ cands.T / TEMPERATURE
    want = torch.stack([torch.logsumexp(s[0, :2], 0) - s[0, 0], torch.logsumexp(s[1], 0) - s[1, 1]]).mean()
    assert info_nce(q, cands, labels, TEMPERATURE, exclude).item() == pytest.approx(want.item(), rel=1e-3)
    loss = InfoNCELoss(TEMPERATURE, margin=0.1)
    loss(q, cands[:2], cands[2:])
    assert loss.guarded == 2
