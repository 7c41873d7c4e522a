"""`deepspeed --num_gpus 2 train/pretrain.py` on a tiny model and real demo data, end to end."""
import json
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer

from tests.conftest import ROOT, deepspeed_launch

PRETRAIN = ROOT / "train/pretrain.py"
QUESTIONS = ROOT / "data/demo/pretrain/question_pairs.jsonl"


def with_negatives(tmp_path: Path, n: int = 40) -> Path:
    """Question pairs where another pair's paraphrase is the hard negative (real text, a real 'neg')."""
    rows = [json.loads(line) for line in open(QUESTIONS, encoding="utf-8")][:n]
    path = tmp_path / "with_neg.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({**row, "neg": [rows[(i + 1) % n]["pos"][0]]}, ensure_ascii=False) + "\n")
    return path


def false_negatives_in_trace(trace: Path, data: str) -> int:
    """Counted by hand from the examples each step trained on (--trace-examples, every rank): for each
    query of a step, the step's positives and negatives (all ranks) other than its own that are its positive."""
    rows = [json.loads(line) for line in open(data, encoding="utf-8")]
    steps: dict[int, list[dict]] = {}
    for path in sorted(trace.glob("rank*.tsv")):
        for line in path.read_text().splitlines():
            step, source = line.split("\t")
            steps.setdefault(int(step), []).append(rows[int(source.rsplit(":", 1)[1]) - 1])
    count = 0
    for batch in steps.values():
        candidates = [(i, r["pos"][0]) for i, r in enumerate(batch)] + [(None, n) for r in batch for n in r["neg"]]
        count += sum(text == r["pos"][0] and own != i for i, r in enumerate(batch) for own, text in candidates)
    return count


@pytest.mark.parametrize("stage, negatives, mini_batch", [(2, 0, 0), (3, 1, 3)])
def test_two_rank_pretrain_exports_what_the_engine_trained(tiny_model, tmp_path, stage, negatives, mini_batch):
    """The ZeRO-3 case also writes its release slower than --dist-timeout (rank 0 stalled 10 s past a 6 s
    timeout, as a large LLM release on a slow disk): the other rank must not wait in a collective meanwhile
    (its false-negative count was an all-reduce after the export, which timed out and got rank 0 killed)."""
    out = tmp_path / "run"
    data = [str(with_negatives(tmp_path))] if negatives else [str(p) for p in (ROOT / "data/demo/pretrain").glob("*.jsonl")]
    slow = ["--dist-timeout", "0.1"] if stage == 3 else []
    proc = deepspeed_launch(PRETRAIN, "--model", str(tiny_model), "--train-data", *data,
                            "--output-dir", str(out), "--deepspeed-config", f"ds_configs/zero{stage}.json",
                            "--batch-size", "4", "--max-steps", "6", "--save-steps", "3", "--log-steps", "2",
                            "--num-negatives", str(negatives), "--lr", "1e-3", "--mini-batch", str(mini_batch),
                            "--query-prompt", "query: ", "--passage-prompt", "passage: ", "--trace-examples", *slow,
                            env={"CONAN_TEST_FAULTS": "slow_export:10"} if slow else None)
    assert "export check: reloaded model matches the engine" in proc.stdout
    if negatives:  # row i's negative is row i+1's positive: a false negative of query i+1 wherever both share a step
        left_out = f"false negatives left out of InfoNCE (a query's positive among its candidates again): " \
                   f"{false_negatives_in_trace(out / 'trace', data[0])}"
        assert left_out in proc.stdout and not left_out.endswith(": 0")

    # the released folder loads with plain sentence-transformers and encodes as the engine did
    check = torch.load(out / "export_check.pt")
    model = SentenceTransformer(str(out / "final"), device="cpu")
    got = model.encode(check["texts"], prompt_name="query", convert_to_tensor=True)
    assert (got - check["embeddings"]).abs().max().item() < 1e-5
    assert model.prompts["query"] == "query: " and model.prompts["passage"] == "passage: "

    # and it is the trained model, not the base: the embeddings moved
    base = SentenceTransformer(str(tiny_model), device="cpu").encode(check["texts"], prompt="query: ", convert_to_tensor=True)
    assert (got - base).abs().max().item() > 1e-3

    assert (out / "checkpoints/step3/complete").is_file() and (out / "checkpoints/step6/complete").is_file()
    assert list((out / "runs").glob("events.out.tfevents.*"))


def test_bad_line_stops_every_rank_with_file_and_line(tiny_model, tmp_path):
    rows = open(QUESTIONS, encoding="utf-8").read().splitlines()[:30]
    rows[6] = '{"query": "坏的一行", "pos": ['
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n", encoding="utf-8")
    proc = deepspeed_launch(PRETRAIN, "--model", str(tiny_model), "--train-data", str(bad),
                            "--output-dir", str(tmp_path / "out"), "--batch-size", "2", "--max-steps", "4",
                            check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"data error: {bad}:7: malformed JSON" in output
    assert "--skip-bad-lines" in output
    assert "Traceback" not in output


def test_skip_bad_lines_counts_and_reports(tiny_model, tmp_path):
    rows = open(QUESTIONS, encoding="utf-8").read().splitlines()[:40]
    rows[6], rows[20] = '{"query": "坏的一行", "pos": [', '{"query": "没有正例"}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n", encoding="utf-8")
    proc = deepspeed_launch(PRETRAIN, "--model", str(tiny_model), "--train-data", str(bad), "--skip-bad-lines",
                            "--output-dir", str(tmp_path / "out"), "--batch-size", "2", "--max-steps", "3")
    assert "skipped 2 bad lines" in proc.stdout
    assert f"{bad}:7: malformed JSON" in proc.stdout
