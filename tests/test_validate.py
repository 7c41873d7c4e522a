"""data_prep/validate.py: every bad line by file:line and reason, in parallel, as training would find them."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.validate import main as validate_main
from train.run.validation import reason_key, validate
from tests.conftest import ROOT
from train.input.records import pair_maker


def reference(path: Path, num_negatives: int = 0) -> list[tuple[int, str]]:
    """What the training loop's own parser says of each line, read one line at a time."""
    bad = []
    make = pair_maker(num_negatives)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                make(raw.rstrip(b"\r\n").decode("utf-8"), random.Random(0), "")
            except UnicodeDecodeError:
                bad.append((line_no, "not valid UTF-8"))
            except ValueError as e:
                bad.append((line_no, str(e)))
    return bad


def corrupted_copy(path: Path, seed: int = 1, newline: str = "\n", final_newline: bool = True) -> Path:
    """Demo pairs x3 with every kind of bad line mixed in, blank lines, and a non-UTF-8 line."""
    rng = random.Random(seed)
    good = (ROOT / "data/demo/pretrain/question_pairs.jsonl").read_text(encoding="utf-8").splitlines() * 3
    bad_kinds = ['{"query": "x", "pos": ', json.dumps({"query": "", "pos": ["a"]}), "",
                 json.dumps({"query": "q", "pos": ["a", ""]}), json.dumps(["not", "an", "object"]),
                 json.dumps({"query": "q"}), json.dumps({"query": "q", "pos": "p", "neg_scores": [1]})]
    lines = [rng.choice(bad_kinds) if rng.random() < 0.05 else line for line in good]
    data = newline.join(lines).encode("utf-8") + b"\n{\"query\": \"\xff\", \"pos\": \"a\"}"
    path.write_bytes(data + (newline.encode() if final_newline else b""))
    return path


@pytest.mark.parametrize("newline,final_newline", [("\n", True), ("\r\n", False)])
def test_every_bad_line_is_found_with_its_line_number_across_chunks(tmp_path, newline, final_newline):
    path = corrupted_copy(tmp_path / "pairs.jsonl", newline=newline, final_newline=final_newline)
    expected = reference(path)
    assert len(expected) > 50 and {r for _, r in expected} >= {"not valid UTF-8", "'query' is empty"}
    # chunks of ~4 KB: dozens of byte ranges whose edges fall inside lines, checked by 2 processes
    report = validate([(path, "pairs", 0)], workers=2, chunk_mb=4096 / (1 << 20))
    assert [(line, reason) for _, line, reason in report.bad] == expected
    assert report.lines == len(path.read_bytes().splitlines()) and report.bytes == path.stat().st_size
    assert sum(report.by_reason.values()) == len(expected)
    assert report.by_reason["'pos[i]' is empty"] == sum(r.startswith("'pos[") for _, r in expected)


def test_a_chunk_edge_on_a_line_start_loses_and_repeats_nothing(tmp_path):
    lines = [json.dumps({"query": f"q{i}", "pos": "p" if i % 7 else ""}) for i in range(200)]
    path = tmp_path / "fixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    width = len(lines[0]) + 1  # q0..q9 lines have the same width: edges land exactly on line starts
    report = validate([(path, "pairs", 0)], workers=1, chunk_mb=width * 5 / (1 << 20))
    assert [line for _, line, _ in report.bad] == [i + 1 for i in range(200) if i % 7 == 0]
    assert report.lines == 200


def test_negatives_required_and_task_kinds_follow_the_config(tmp_path):
    path = corrupted_copy(tmp_path / "pairs.jsonl")
    with_neg = validate([(path, "pairs", 3)], workers=1)
    assert [(line, r) for _, line, r in with_neg.bad] == reference(path, 3)
    assert reason_key("no 'neg' texts, but 3 hard negatives per example were asked for") in with_neg.by_reason
    # the demo task config: every task's files by its type, all clean
    demo = validate_main(["--data-config", str(ROOT / "data/demo/finetune/tasks.yaml"), "--workers", "2"])
    assert demo.bad == [] and demo.files == 3
    sts = tmp_path / "sts.jsonl"
    sts.write_text('{"sentence1": "a", "sentence2": "b", "score": "high"}\n{"sentence1": "a", "sentence2": "b", "score": 1}\n')
    report = validate([(sts, "sts", 0)])
    assert [(line, r) for _, line, r in report.bad] == [(1, "'score' must be a number, got 'high'")]


def test_cli_reports_counts_writes_every_bad_line_and_fails(tmp_path):
    path = corrupted_copy(tmp_path / "pairs.jsonl")
    proc = subprocess.run([sys.executable, str(ROOT / "data_prep/validate.py"), str(tmp_path), "--chunk-mb", "0.01",
                           "--report", str(tmp_path / "bad.tsv")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    expected = reference(path)
    assert f"{len(expected):,} bad lines" in proc.stdout and f"{path}:{expected[0][0]}: {expected[0][1]}" in proc.stdout
    rows = (tmp_path / "bad.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert [(int(r.split("\t")[1]), r.split("\t")[2]) for r in rows] == expected
    clean = subprocess.run([sys.executable, str(ROOT / "data_prep/validate.py"), str(ROOT / "data/demo/pretrain")],
                           cwd=ROOT, capture_output=True, text=True)
    assert clean.returncode == 0 and "no bad lines" in clean.stdout
