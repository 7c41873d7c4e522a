"""A rank's texts in a fixed number of length-bucketed forwards: the same embeddings as encoding each
group alone, exactly `buckets` forwards whatever the texts (ZeRO-3), and less padding than one
forward per text kind on the demo tasks."""
import itertools
import random

import pytest
import torch
from sentence_transformers import SentenceTransformer

from tests.conftest import ROOT
from train.step.encoding import encode_groups, length_buckets


def padded(lengths, groups) -> int:
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


@pytest.mark.parametrize("seed", range(5))
def test_length_buckets_are_the_exact_optimum(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(3, 60) for _ in range(9)]
    order = sorted(range(9), key=lengths.__getitem__)
    for k in (1, 2, 3):
        got = length_buckets(lengths, k)
        assert len(got) == k and all(got) and sorted(i for g in got for i in g) == list(range(9))
        brute = min(padded(lengths, [order[a:b] for a, b in zip((0, *cuts), (*cuts, 9))])
                    for cuts in itertools.combinations(range(1, 9), k - 1))
        assert padded(lengths, got) == brute


def test_equal_lengths_still_give_exactly_k_forwards():
    assert [len(g) for g in length_buckets([5] * 4, 3)] in ([1, 1, 2], [1, 2, 1], [2, 1, 1])
    with pytest.raises(ValueError):
        length_buckets([5], 2)


def test_bucketed_forwards_equal_encoding_each_group(tiny_model):
    model = SentenceTransformer(str(tiny_model), device="cpu")
    groups = [(["短问题？", "一个长得多的问题，里面有很多很多的字。"], "query: "),
              (["一段很长很长的文章，讲的是如何训练中文向量模型，以及为什么要先预训练再微调。", "短文。", "中等长度的一句话。"], "passage: "),
              ([], "passage: "), (["单独一句"], "")]
    want = [model.encode(texts, prompt=prompt or None, convert_to_tensor=True) for texts, prompt in groups if texts]
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    for buckets in (1, 2, 3, 7):  # 7 > 6 texts: one is repeated to keep the count
        calls.clear()
        with torch.no_grad():
            got, tokens = encode_groups(model, model, groups, "cpu", buckets)
        assert len(calls) == buckets and got[2].shape[0] == 0
        assert all((g - w).abs().max() < 1e-5 for g, w in zip([g for g in got if len(g)], want))


def test_two_buckets_pad_less_than_one_forward_per_text_kind(tiny_model):
    """The demo tasks on 1 rank (all three tasks in one step), 10 steps: padded tokens of the model's input."""
    from train.kinds.task_data import task_stream
    from train.kinds.multitask import task_texts
    from train.kinds.tasks import assign_ranks, load_data_config
    model = SentenceTransformer(str(tiny_model), device="cpu")
    config = load_data_config(ROOT / "data/demo/finetune/tasks.yaml")
    assign_ranks(config.tasks, 1)
    for t in config.tasks:
        t.query_prompt, t.passage_prompt = "query: ", "passage: "
    streams = {t.name: task_stream(t, 42, 128, False).epoch(0) for t in config.tasks}
    per_kind = bucketed = one = real = 0
    for _ in range(10):
        groups = [g for t in config.tasks for g in task_texts(t, next(streams[t.name]), 0)]
        lengths = [[int(m.sum()) for m in model.preprocess(texts, prompt=p)["attention_mask"]] for texts, p in groups]
        flat = [x for lens in lengths for x in lens]
        real += sum(flat)
        per_kind += sum(len(lens) * max(lens) for lens in lengths)
        bucketed += padded(flat, length_buckets(flat, 2))
        one += len(flat) * max(flat)
    assert bucketed < per_kind < one, (real, bucketed, per_kind, one)
