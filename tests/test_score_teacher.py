"""data_prep/score_teacher.py: a teacher's scores of every text, as the training data's score fields,
resumable after a kill; the scored file trains with distillation."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sentence_transformers import CrossEncoder, SentenceTransformer

from tests.conftest import ROOT

SCORE = ROOT / "data_prep/score_teacher.py"
RETRIEVAL = ROOT / "data/demo/finetune/retrieval.jsonl"


def run(*args, env=None, check=True):
    return subprocess.run([sys.executable, str(SCORE), *args], capture_output=True, text=True, check=check, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})})


def rows(path, n=None):
    return [json.loads(line) for line in open(path, encoding="utf-8")][:n]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = open(RETRIEVAL, encoding="utf-8").read().splitlines()[:30]
    lines.insert(7, "")  # a blank line counts as consumed input, and is not written
    first = json.loads(lines[0])
    first["neg_pool"] = first["neg"][::-1]  # a ranked pool, as mine_negatives.py writes one
    lines[0] = json.dumps(first, ensure_ascii=False)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_an_embedder_teacher_writes_the_cosine_of_every_text(tiny_model, data, tmp_path):
    out = tmp_path / "scored.jsonl"
    run("--model", str(tiny_model), "--input", str(data), "--output", str(out), "--chunk-size", "8")
    got = rows(out)
    assert len(got) == 30
    model = SentenceTransformer(str(tiny_model), device="cpu")
    for r in got[:5]:
        q = model.encode(r["query"], normalize_embeddings=True)
        for field, key in (("pos", "pos_scores"), ("neg", "neg_scores"), ("neg_pool", "neg_pool_scores")):
            if field in r:
                want = model.encode(r[field], normalize_embeddings=True) @ q
                assert np.allclose(r[key], want, atol=1e-4), (field, r[key], want)
    assert "neg_pool_scores" in got[0] and "neg_pool_scores" not in got[1]


def test_a_killed_run_resumes_to_the_same_output(tiny_model, data, tmp_path):
    args = ["--model", str(tiny_model), "--input", str(data), "--chunk-size", "8"]
    run(*args, "--output", str(tmp_path / "whole.jsonl"))
    crashed = run(*args, "--output", str(tmp_path / "cut.jsonl"), env={"CONAN_FILTER_CRASH_AFTER_CHUNK": "2"},
                  check=False)
    assert crashed.returncode == 137
    # chunk 2's lines were written, its progress not: the resumed run cuts them and writes them again
    progress = json.loads((tmp_path / "cut.jsonl.progress.json").read_text())
    assert progress["chunks"] == 1 and (tmp_path / "cut.jsonl").stat().st_size > progress["output_bytes"]
    assert "resuming after 8 input lines" in run(*args, "--output", str(tmp_path / "cut.jsonl")).stdout
    assert (tmp_path / "cut.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_a_cross_encoder_teacher_writes_its_pair_scores(tiny_model, data, tmp_path):
    CrossEncoder(str(tiny_model), num_labels=1, device="cpu").save(str(tmp_path / "ce"))
    out = tmp_path / "scored.jsonl"
    run("--model", str(tmp_path / "ce"), "--kind", "cross-encoder", "--input", str(data), "--output", str(out))
    ce = CrossEncoder(str(tmp_path / "ce"), device="cpu")
    r = rows(out, 3)[2]
    assert np.allclose(r["neg_scores"], ce.predict([(r["query"], t) for t in r["neg"]]), atol=1e-4)
    assert np.allclose(r["pos_scores"], ce.predict([(r["query"], t) for t in r["pos"]]), atol=1e-4)


def test_a_bad_line_is_named(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": ["p"]}\n{"query": "q", "pos": ["p"], "neg": "not a list"}\n', encoding="utf-8")
    proc = run("--model", str(tiny_model), "--input", str(bad), "--output", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode != 0 and f"{bad}:2" in proc.stderr
