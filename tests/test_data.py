"""Streaming pair data on real demo data: validation, skipping, sharding, length grouping."""
import copy
import json
import os
import random
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT
from train.input.data import DataError, PairStream, rank_slice

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
    from train.input.records import parse_record
    line = json.dumps({"query": "q", "pos": ["p"], "neg": ["a", "b"], **extra})
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_record(line, 2)


# --- shards, shuffling and O(1) resume ---------------------------------------------------------------

def test_shard_index_counts_every_line_once_at_any_cut(tmp_path):
    """Byte ranges own the lines that start in them: checked against a brute-force count on random
    files, with cuts and read chunks that fall anywhere (inside lines, on newlines, at the end)."""
    from train.input.data import index_shards
    rng = random.Random(0)
    for _ in range(200):
        data = "\n".join("x" * rng.randint(0, 7) for _ in range(rng.randint(0, 30)))
        data = (data + ("\n" if rng.random() < 0.5 else "")).encode()
        (tmp_path / "f.txt").write_bytes(data)
        step = rng.randint(1, 40)
        starts = ([0] if data else []) + [i + 1 for i, c in enumerate(data) if c == 10 and i + 1 < len(data)]
        want: dict[int, list[int]] = {}
        for number, at in enumerate(starts, start=1):
            want.setdefault(at // step, [number, 0])[1] += 1
        got = index_shards(0, tmp_path / "f.txt", step, chunk=rng.randint(1, 16))
        assert [(s.start, s.first_line, s.lines) for s in got] == [(k * step, *v) for k, v in sorted(want.items())]


def topic_file(path: Path, topics: int = 20, per_topic: int = 100) -> Path:
    """A file sorted by topic, the layout that a plain file-order read turns into one-topic batches."""
    rng = random.Random(1)
    rows = [json.dumps({"query": f"主题{t} 问题{i} " + "字" * rng.randint(5, 60), "pos": f"主题{t} 答案{i}"},
                       ensure_ascii=False) for t in range(topics) for i in range(per_topic)]
    return write(path, rows)


def topics_per_batch(stream: PairStream) -> float:
    batches = list(stream.epoch(0))
    return sum(len({ex.query.split()[0] for ex in b}) for b in batches) / len(batches)


def test_a_file_sorted_by_topic_gives_mixed_batches(tmp_path):
    path = topic_file(tmp_path / "sorted.jsonl")  # 2,000 lines, 310 kB: 77 shards of 4 kB
    shuffled = PairStream([path], global_batch=16, shard_bytes=4096, open_shards=8, shuffle_buffer=256)
    in_order = PairStream([path], global_batch=16, shard_bytes=1 << 30, open_shards=1, shuffle_buffer=16)
    assert topics_per_batch(in_order) < 2.1
    assert topics_per_batch(shuffled) > 4, topics_per_batch(shuffled)  # 5.5 here; a full shuffle: 10.5
    # still deterministic from the seed, so every rank builds the same batches; new order each epoch
    again = PairStream([path], global_batch=16, shard_bytes=4096, open_shards=8, shuffle_buffer=256)
    sources = lambda s, e: [ex.source for b in s.epoch(e) for ex in b]  # noqa: E731
    assert sources(shuffled, 0) == sources(again, 0) != sources(again, 1)
    # and still length-grouped within the shuffle buffer
    assert padding_fraction(shuffled) < 0.5 * padding_fraction(
        PairStream([path], global_batch=16, shard_bytes=4096, open_shards=8, shuffle_buffer=256, group_buffer=1))


def test_every_line_once_per_epoch_with_many_shards_and_few_open_files(tmp_path):
    # 5,000 files (the usual sharded layout), some cut into several shards, 4 open at a time
    long = GOOD.replace("？", "?" * 400)  # every 50th file is long enough to be cut into shards
    files = [write(tmp_path / f"part{i:04d}.jsonl", [GOOD] * (1 + i % 3) + [long] * (i % 50 == 0))
             for i in range(5000)]
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    stream = PairStream(files, global_batch=8, shard_bytes=256, open_shards=4)
    assert len(stream.shards) > len(files)
    before, most, seen = fds(), 0, []
    for batch in stream.epoch(0):
        most = max(most, fds() - before)
        seen += [ex.source for ex in batch]
    lines = {f"{p}:{i}" for p in files for i in range(1, sum(1 for _ in open(p)) + 1)}
    assert len(seen) == len(set(seen)) and set(seen) <= lines and len(seen) + stream.dropped == len(lines)
    assert most <= 4, most


def counting(stream: PairStream) -> list[int]:
    """Wrap the stream's line parser to count the lines it parses."""
    calls, make = [0], stream.make

    def counted(*a):
        calls[0] += 1
        return make(*a)
    stream.make = counted
    return calls


def test_resume_from_any_position_reads_only_what_is_left(tmp_path):
    path = topic_file(tmp_path / "sorted.jsonl", topics=10, per_topic=60)  # 600 lines
    options = dict(global_batch=8, shard_bytes=2048, open_shards=3, shuffle_buffer=64)
    whole = [[ex.source for ex in b] for b in PairStream([path], **options).epoch(0)]
    saved, position = [], {"epoch": 0, "batch": 0}
    for _ in PairStream([path], **options).batches(position):
        saved.append(copy.deepcopy(position))  # what a checkpoint after this batch holds
    assert len(saved) == len(whole) == 75
    for n in (1, 7, 8, 9, 40, 74):
        stream = PairStream([path], **options)
        parsed = counting(stream)
        rest = [[ex.source for ex in b] for b in stream.batches(copy.deepcopy(saved[n - 1]))]
        assert rest == whole[n:], n
        # a resume re-reads at most the block it stopped in: never the part of the epoch before it
        assert parsed[0] <= 600 - 64 * ((n - 1) // 8), (n, parsed[0])
    # a position from before blocks existed (batches counted only) still resumes exactly, by re-reading
    assert [[ex.source for ex in b] for b in PairStream([path], **options).batches({"epoch": 0, "batch": 9})] == whole[9:]


def test_prefetch_gives_the_same_batches_and_positions_and_the_error_in_its_place(tmp_path):
    from train.input.prefetch import prefetched
    rows = [json.dumps({"query": f"问题{i}", "pos": f"答案{i}" * (i % 7 + 1)}, ensure_ascii=False) for i in range(200)]
    path = write(tmp_path / "p.jsonl", rows[:150] + ["{oops"] + rows[150:])
    options = dict(global_batch=4, shard_bytes=512, open_shards=2, shuffle_buffer=40)
    plain, plain_positions, position = [], [], {"epoch": 0, "batch": 0}
    with pytest.raises(DataError, match="p.jsonl:151: malformed JSON"):
        for batch in PairStream([path], **options).batches(position):
            plain.append([ex.source for ex in batch])
            plain_positions.append(copy.deepcopy(position))
    error_position = copy.deepcopy(position)
    ahead, position = [], {"epoch": 0, "batch": 0}
    batches = prefetched(PairStream([path], **options).batches, position, depth=3)
    with pytest.raises(DataError, match="p.jsonl:151: malformed JSON"):
        for i, batch in enumerate(batches):
            ahead.append([ex.source for ex in batch])
            assert position == plain_positions[i]  # the batch taken, not the ones read ahead
    assert ahead == plain and len(plain) >= 10
    assert position == error_position  # a checkpoint now resumes at the block that holds the bad line


def test_shared_index_reads_each_file_once_per_run_and_equals_a_fresh_index(tmp_path, monkeypatch):
    """In training, rank 0 indexes (or loads the run's saved index) and broadcasts: checked here on
    a one-process gloo group; the 2-rank training tests go through the same function."""
    import torch.distributed as dist

    import train.input.data
    from train.input.data import index_shards
    from train.run.rank_zero_data import shared_index
    path = topic_file(tmp_path / "t.jsonl", topics=3, per_topic=50)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        fresh = PairStream([path], global_batch=4, shard_bytes=1000, indexer=shared_index(tmp_path / "index"))
        assert fresh.shards == index_shards(0, path, 1000) and len(list((tmp_path / "index").glob("*.json"))) == 1

        def no_reading(*a):
            raise AssertionError("indexed the file again")
        monkeypatch.setattr(train.input.data, "index_shards", no_reading)
        again = PairStream([path], global_batch=4, shard_bytes=1000, indexer=shared_index(tmp_path / "index"))
        assert again.shards == fresh.shards
        path.write_text(path.read_text() + GOOD + "\n")  # a changed file is indexed anew
        with pytest.raises(AssertionError, match="indexed the file again"):
            PairStream([path], global_batch=4, shard_bytes=1000, indexer=shared_index(tmp_path / "index"))
    finally:
        dist.destroy_process_group()
