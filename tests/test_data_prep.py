"""data_prep: LLM pairs from every format on the shared data; the scoring filter; kill and resume."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from data_prep.llm_pairs import convert
from tests.conftest import ROOT, SHARED
from train.input.data import DataError

LLM = SHARED / "llm-zh"


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_alpaca_pairs(tmp_path):
    counts, _ = convert([LLM / "alpaca_zh_demo.json"], tmp_path / "a.jsonl", max_chars=100_000)
    rows, src = read(tmp_path / "a.jsonl"), json.loads((LLM / "alpaca_zh_demo.json").read_text())
    assert counts["format: alpaca"] == len(src) == 1000
    assert counts["kept"] + counts["dropped: exact duplicate pair"] + counts["dropped: empty or whitespace text"] == 1000
    first = src[0]
    assert rows[0] == {"query": "\n".join(x for x in (first["instruction"], first["input"]) if x.strip()),
                       "pos": [first["output"]]}
    assert all("neg" not in r for r in rows)


def test_dpo_yields_the_rejected_response_as_a_hard_negative(tmp_path):
    counts, _ = convert([LLM / "dpo_zh_demo.json"], tmp_path / "d.jsonl", max_chars=100_000)
    rows, src = read(tmp_path / "d.jsonl"), json.loads((LLM / "dpo_zh_demo.json").read_text())
    expected, seen = [], set()
    for item in src:
        users = [t["value"] for t in item["conversations"] if t["from"] == "human"]
        row = {"query": users[-1], "pos": [item["chosen"]["value"]], "neg": [item["rejected"]["value"]]}
        if (row["query"], row["pos"][0]) not in seen:  # the data repeats some prompts with the same answer
            seen.add((row["query"], row["pos"][0]))
            expected.append(row)
    assert counts["format: dpo"] == 300 and counts["dropped: exact duplicate pair"] == 300 - len(expected)
    assert rows == expected


def test_sharegpt_and_messages_give_every_user_turn_with_the_reply_after_it(tmp_path):
    src = json.loads((LLM / "alpaca_zh_demo.json").read_text())[:4]
    sharegpt = {"conversations": [{"from": "human", "value": src[0]["instruction"]}, {"from": "gpt", "value": src[0]["output"]},
                                  {"from": "human", "value": src[1]["instruction"]}, {"from": "gpt", "value": src[1]["output"]}]}
    messages = {"messages": [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": src[2]["instruction"]},
                             {"role": "assistant", "content": src[2]["output"]}, {"role": "user", "content": src[3]["instruction"]}]}
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(sharegpt, ensure_ascii=False) + "\n" + json.dumps(messages, ensure_ascii=False) + "\n")
    counts, _ = convert([path], tmp_path / "c.jsonl")
    pairs = [(r["query"], r["pos"][0]) for r in read(tmp_path / "c.jsonl")]
    assert pairs == [(src[i]["instruction"], src[i]["output"]) for i in range(3)]  # the last user turn has no reply
    assert counts["format: sharegpt"] == 1 and counts["format: messages"] == 1


def test_cleaning_counts_what_it_drops_and_truncates(tmp_path):
    rows = [{"instruction": "问题一", "input": "", "output": "回答一"}, {"instruction": "问题一", "input": "", "output": "回答一"},
            {"instruction": "  ", "input": "", "output": "回答"}, {"instruction": "长", "input": "", "output": "很" * 50}]
    path = tmp_path / "in.json"
    path.write_text(json.dumps(rows, ensure_ascii=False))
    counts, _ = convert([path], tmp_path / "t.jsonl", max_chars=20, long="truncate")
    assert (counts["kept"], counts["dropped: exact duplicate pair"], counts["dropped: empty or whitespace text"]) == (2, 1, 1)
    assert counts["truncated: text over 20 characters"] == 1 and read(tmp_path / "t.jsonl")[-1]["pos"] == ["很" * 20]
    counts, _ = convert([path], tmp_path / "d.jsonl", max_chars=20, long="drop")
    assert counts["dropped: text over 20 characters"] == 1 and counts["kept"] == 1


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "q", "output": ', "malformed JSON"),
    ('{"instruction": "q", "output": 3}', "'output' must be a string"),
    ('{"text": "q"}', "no known format"),
    ('{"conversations": [{"from": "human"}]}', "turn 0 must be an object with 'from' and 'value'"),
    (b'{"instruction": "caf\xe9", "output": "x"}', "not valid UTF-8"),
])
def test_bad_records_name_file_and_line_or_are_counted(tmp_path, line, message):
    good = json.dumps({"instruction": "问题", "output": "回答"}, ensure_ascii=False).encode()
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good + b"\n" + (line if isinstance(line, bytes) else line.encode()) + b"\n" + good.replace(b"\xe9\x97\xae", b"\xe5\xa5\xbd") + b"\n")
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{message}"):
        convert([path], tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()  # nothing half-written
    counts, bad = convert([path], tmp_path / "o.jsonl", skip_bad=True)
    assert counts["skipped: bad record"] == 1 and counts["kept"] == 2 and "bad.jsonl:2" in bad[0]


# --- the scoring filter ---------------------------------------------------------------------------

FILTER = ROOT / "data_prep/filter_pairs.py"
PAIRS = ROOT / "data/demo/pretrain/question_pairs.jsonl"


def run_filter(*args, env=None, check=True):
    return subprocess.run([sys.executable, str(FILTER), *args], capture_output=True, text=True, check=check,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def direct_scores(tiny_model):
    rows = read(PAIRS)
    model = SentenceTransformer(str(tiny_model), device="cpu")
    q = model.encode([r["query"] for r in rows], normalize_embeddings=True)
    p = model.encode([r["pos"][0] for r in rows], normalize_embeddings=True)
    return rows, (q * p).sum(1)


def test_filter_keeps_exactly_the_pairs_at_or_above_the_threshold(tiny_model, direct_scores, tmp_path):
    rows, scores = direct_scores
    threshold = float(np.median(scores))
    out = tmp_path / "kept.jsonl"
    run_filter("--model", str(tiny_model), "--input", str(PAIRS), "--output", str(out), "--threshold", str(threshold),
               "--chunk-size", "64", "--scores-output", str(tmp_path / "s.jsonl"))
    kept = [(r["query"], r["pos"][0]) for r in read(out)]
    margin = 1e-5  # float noise between batchings: leave out pairs within it of the threshold
    must = [(r["query"], r["pos"][0]) for r, s in zip(rows, scores) if s >= threshold + margin]
    must_not = {(r["query"], r["pos"][0]) for r, s in zip(rows, scores) if s < threshold - margin}
    assert set(must) <= set(kept) and not (set(kept) & must_not)
    assert 0.3 * len(rows) < len(kept) < 0.7 * len(rows)
    report = json.loads((tmp_path / "kept.jsonl.report.json").read_text())
    assert report["pairs"] == len(rows) and sum(report["histogram"]["counts"]) == len(rows)
    assert (tmp_path / "kept.jsonl.scores.png").stat().st_size > 1000
    assert len(read(tmp_path / "s.jsonl")) == len(rows)


def test_a_killed_run_resumes_to_the_same_output(tiny_model, direct_scores, tmp_path):
    _, scores = direct_scores
    args = ["--model", str(tiny_model), "--input", str(PAIRS), "--threshold", str(float(np.median(scores))), "--chunk-size", "100"]
    run_filter(*args, "--output", str(tmp_path / "whole.jsonl"))
    crashed = run_filter(*args, "--output", str(tmp_path / "cut.jsonl"), env={"CONAN_FILTER_CRASH_AFTER_CHUNK": "3"}, check=False)
    assert crashed.returncode == 137
    # the crash left chunk 3's lines in the output but not in the progress file
    progress = json.loads((tmp_path / "cut.jsonl.progress.json").read_text())
    assert progress["chunks"] == 2 and (tmp_path / "cut.jsonl").stat().st_size > progress["output_bytes"]
    resumed = run_filter(*args, "--output", str(tmp_path / "cut.jsonl"))
    assert "resuming after 200 input lines" in resumed.stdout
    assert (tmp_path / "cut.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_filter_bad_line(tiny_model, tmp_path):
    lines = open(PAIRS, encoding="utf-8").read().splitlines()[:10]
    lines[4] = '{"query": "坏"}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = run_filter("--model", str(tiny_model), "--input", str(bad), "--output", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode != 0 and f"{bad}:5: missing field 'pos'" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_filter("--model", str(tiny_model), "--input", str(bad), "--output", str(tmp_path / "o2.jsonl"), "--skip-bad",
                      "--threshold", "-1")
    assert "skipped 1 bad lines" in proc.stdout and len(read(tmp_path / "o2.jsonl")) == 9
