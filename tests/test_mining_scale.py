"""Mining at corpus scale (data_prep/mine_negatives.py, data_prep/corpus_store.py): the corpus on disk and
read back by position, embedding shards that a killed run does not encode twice, an output that a kill
anywhere does not change, approximate indexes with their measured recall, and ranks that share the encoding.
The sizes are small; bench/mining_scale.py runs the same code on 100k-1M passages."""
import json
import os
import subprocess
import sys

import pytest

from data_prep.corpus_store import TextStore
from tests.conftest import RANK_ENV, ROOT, SHARED, launch

MINE = ROOT / "data_prep/mine_negatives.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    rows = open(SHARED / "retrieval-zh/train.jsonl", encoding="utf-8").read().splitlines()[:120]
    path = tmp / "retrieval.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    corpus = tmp / "extra.txt"  # plain lines, some of them texts the data has already
    corpus.write_text("\n".join(json.loads(r)["neg"][0] for r in rows[:30]) + "\n一只猫坐在垫子上。\n", encoding="utf-8")
    return path, corpus


def mine(tiny_model, data, out, *extra, env=None, check=True) -> subprocess.CompletedProcess:
    path, corpus = data
    cmd = [sys.executable, str(MINE), "--model", str(tiny_model), "--input", str(path), "--corpus", str(corpus),
           "--output", str(out), "--top-k", "20", "--perc-pos", "100", "--shard-rows", "100", "--query-chunk", "40",
           *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **RANK_ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "mined.jsonl"
    proc = mine(tiny_model, data, out)
    return out, proc


def test_the_text_store_keeps_unique_texts_in_first_seen_order_and_reads_them_back(tmp_path):
    texts = ["一架飞机", "b", "一架飞机", "émoji 🙂", "b", ""]
    store = TextStore.build(tmp_path / "s", ["x"], iter(texts))
    assert len(store) == 4 and [store[i] for i in range(4)] == ["一架飞机", "b", "émoji 🙂", ""]
    assert TextStore.build(tmp_path / "s", ["x"], iter(["never read"]))[0] == "一架飞机"  # built: not again


def test_a_run_killed_while_encoding_and_again_while_writing_ends_as_the_uninterrupted_one(
        tiny_model, data, uninterrupted, tmp_path):
    whole, first = uninterrupted
    store = json.loads((whole.with_name("mined.jsonl.work") / "texts/store.json").read_text())
    shards = -(-store["unique"] // 100)
    assert shards >= 5 and store["texts"] > store["unique"]  # duplicates were stored once
    out = tmp_path / "mined.jsonl"
    killed = mine(tiny_model, data, out, env={"CONAN_MINE_CRASH_AFTER_SHARD": "2"}, check=False)
    assert killed.returncode == 137 and not out.exists()
    killed = mine(tiny_model, data, out, env={"CONAN_FILTER_CRASH_AFTER_CHUNK": "2"}, check=False)
    assert killed.returncode == 137
    assert f"({shards - 2} encoded now)" in killed.stdout  # the 2 shards on disk were not encoded again
    assert 0 < len(out.read_text().splitlines()) < 120   # the first chunk was written, then the kill
    resumed = mine(tiny_model, data, out)
    assert "(0 encoded now)" in resumed.stdout
    assert out.read_bytes() == whole.read_bytes()
    assert "wrote" in first.stdout and json.loads(out.with_name("mined.jsonl.report.json").read_text())["queries"] == 120


@pytest.mark.parametrize("index", ["ivf"])  # hnsw takes the same path (build_index, search); CI time
def test_approximate_indexes_report_their_recall_against_exact_search(tiny_model, data, uninterrupted, tmp_path, index):
    whole, _ = uninterrupted
    out = tmp_path / "mined.jsonl"
    proc = mine(tiny_model, data, out, "--index", index, "--recall-queries", "60")
    report = json.loads(out.with_name("mined.jsonl.report.json").read_text())
    assert report["index"] == index and f"index {index}: recall@20 " in proc.stdout
    assert report["recall_at_20"] >= 0.9, report  # a small corpus: near exact
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    exact = [json.loads(line) for line in whole.read_text().splitlines()]
    assert len(rows) == 120 and all(len(r["neg_pool"]) == 20 for r in rows)
    overlap = sum(len(set(a["neg_pool"]) & set(b["neg_pool"])) for a, b in zip(rows, exact)) / (20 * len(rows))
    assert overlap >= 0.9 * report["recall_at_20"] - 0.05, overlap


def test_two_ranks_share_the_encoding_and_write_what_one_process_writes(tiny_model, data, uninterrupted, tmp_path):
    whole, _ = uninterrupted
    path, corpus = data
    out = tmp_path / "mined.jsonl"
    proc = launch(MINE, "--model", str(tiny_model), "--input", str(path), "--corpus", str(corpus), "--output", str(out),
                  "--top-k", "20", "--perc-pos", "100", "--shard-rows", "100", "--query-chunk", "40")
    encoded = [line for line in proc.stdout.splitlines() if line.startswith("corpus shard")]
    assert encoded and out.read_bytes() == whole.read_bytes()
