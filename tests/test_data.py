"""Streaming pair data on real demo data: validation, skipping, sharding, length grouping."""
import json
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT
from train.data import DataError, PairStream, rank_slice

DEMO = [ROOT / "data/demo/pretrain/llm_pairs.jsonl", ROOT / "data/demo/pretrain/question_pairs.jsonl"]


def write(path: Path, lines: list[str]) -> Path:
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return path


GOOD = json.dumps({"query": "什么是向量检索？", "pos": "向量检索是用向量相似度找文档。"}, ensure_ascii=False)


@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "pos": ["p"]', "malformed JSON"),
    ('["q", "p"]', "expected a JSON object"),
    ('{"pos": ["p"]}', "missing field 'query'"),
    ('{"query": "q"}', "missing field 'pos'"),
    ('{"query": "  ", "pos": ["p"]}', "'query' is empty"),
    ('{"query": "q", "pos": [""]}', "'pos[0]' is empty"),
    ('{"query": "q", "pos": []}', "'pos' is an empty list"),
    ('{"query": 3, "pos": ["p"]}', "'query' must be a string"),
    ('{"query": "q", "pos": ["p"], "neg": "n"}', "'neg' must be a list"),
    ('{"query": "q", "pos": ["p"], "neg": [null]}', "'neg[0]' must be a string"),
])
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", [GOOD, GOOD, line, GOOD])
    stream = PairStream([path], global_batch=1, group_buffer=1)
    with pytest.raises(DataError, match=rf"bad.jsonl:3: .*{re.escape(message)}"):
        list(stream.epoch(0))


def test_non_utf8_line(tmp_path):
    path = write(tmp_path / "latin.jsonl", [GOOD, '{"query": "caf\xe9", "pos": "x"}'.encode("latin-1")])
    with pytest.raises(DataError, match="latin.jsonl:2: not valid UTF-8"):
        list(PairStream([path], global_batch=1).epoch(0))


def test_empty_negatives_when_negatives_are_asked_for(tmp_path):
    path = write(tmp_path / "n.jsonl", ['{"query": "q", "pos": ["p"], "neg": []}'])
    with pytest.raises(DataError, match="n.jsonl:1: no 'neg' texts, but 2 hard negatives"):
        list(PairStream([path], global_batch=1, num_negatives=2).epoch(0))


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="empty.jsonl: the file is empty"):
        PairStream([write(tmp_path / "empty.jsonl", [])], global_batch=1)
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        PairStream([tmp_path / "nope.jsonl"], global_batch=1)


def test_skip_bad_lines_counts_what_it_skips(tmp_path):
    path = write(tmp_path / "mixed.jsonl", [GOOD, "{oops", GOOD, '{"query": "q"}', GOOD])
    stream = PairStream([path], global_batch=1, skip_bad_lines=True, group_buffer=1)
    examples = [ex for batch in stream.epoch(0) for ex in batch]
    assert len(examples) == 3 and {ex.source for ex in examples} == {f"{path}:1", f"{path}:3", f"{path}:5"}
    assert stream.skipped.total == 2
    assert stream.skipped.examples[0].startswith(f"{path}:2: malformed JSON")


def test_pos_string_and_negative_sampling(tmp_path):
    path = write(tmp_path / "n.jsonl", [json.dumps({"query": "q", "pos": "p", "neg": ["a", "b", "c"]})])
    ex = next(PairStream([path], global_batch=1, num_negatives=2).epoch(0))[0]
    assert ex.pos == "p" and len(ex.neg) == 2 and set(ex.neg) <= {"a", "b", "c"}


def all_lines() -> set[str]:
    return {f"{p}:{i}" for p in DEMO for i in range(1, sum(1 for _ in open(p)) + 1)}


def test_ranks_split_an_epoch_without_repeats():
    world, per_rank = 2, 16
    stream = PairStream(DEMO, global_batch=world * per_rank)
    seen = [[ex.source for batch in stream.epoch(0) for ex in rank_slice(batch, r, world)] for r in range(world)]
    everything = seen[0] + seen[1]
    assert len(everything) == len(set(everything))            # no example twice
    assert set(everything) <= all_lines()
    assert len(everything) + stream.dropped == len(all_lines())  # and none lost but the counted tail
    assert len(seen[0]) == len(seen[1])                      # ranks agree on the number of steps


def test_stream_is_deterministic_and_reshuffles_per_epoch():
    a = [ex.source for b in PairStream(DEMO, global_batch=8).epoch(0) for ex in b]
    b = [ex.source for b in PairStream(DEMO, global_batch=8).epoch(0) for ex in b]
    c = [ex.source for b in PairStream(DEMO, global_batch=8).epoch(1) for ex in b]
    assert a == b and a != c
    # both files are mixed from the start, not read one after the other
    first = a[:100]
    assert any("llm_pairs" in s for s in first) and any("question_pairs" in s for s in first)


def padding_fraction(stream: PairStream) -> float:
    pad = total = 0
    for batch in stream.epoch(0):
        for texts in ([ex.query for ex in batch], [ex.pos for ex in batch]):
            lengths = [min(len(t), 128) for t in texts]  # characters, capped like max_length
            pad += max(lengths) * len(lengths) - sum(lengths)
            total += max(lengths) * len(lengths)
    return pad / total


def test_length_grouping_cuts_padding():
    grouped = padding_fraction(PairStream(DEMO, global_batch=16, group_buffer=64, max_chars=128))
    plain = padding_fraction(PairStream(DEMO, global_batch=16, group_buffer=1))
    assert grouped < 0.5 * plain, (grouped, plain)


@pytest.mark.parametrize("extra, message", [
    ({"neg_scores": [0.5]}, "'neg_scores' has 1 scores for 2 'neg' texts"),
    ({"neg_pool": ["c"], "neg_pool_scores": ["high"]}, "'neg_pool_scores' must be a list of numbers"),
])
def test_mining_scores_must_match_their_texts(extra, message):
    from train.data import parse_record
    line = json.dumps({"query": "q", "pos": ["p"], "neg": ["a", "b"], **extra})
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_record(line, 2)
