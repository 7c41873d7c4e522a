"""bench/throughput.py --quick: the peer and our step measured side by side in one invocation."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import RANK_ENV, ROOT, SHARED


def long_text_data(folder):
    """A --data folder where every text is a CMRC paragraph (each longer than the quick length of 32)."""
    paragraphs = [json.loads(line)["text"] for line in open(SHARED / "cmrc2018-trial/corpus.jsonl", encoding="utf-8")]
    folder.mkdir()
    with open(folder / "retrieval.jsonl", "w", encoding="utf-8") as f:
        for i in range(0, 96, 3):
            f.write(json.dumps({"query": paragraphs[i], "pos": [paragraphs[i + 1]], "neg": [paragraphs[i + 2]]},
                               ensure_ascii=False) + "\n")
    with open(folder / "sts.jsonl", "w", encoding="utf-8") as f:
        for i in range(100, 164, 2):
            f.write(json.dumps({"sentence1": paragraphs[i], "sentence2": paragraphs[i + 1], "score": i % 5},
                               ensure_ascii=False) + "\n")
    return folder


def test_quick_throughput_prints_the_ratio_and_the_mining_share(tmp_path):
    out = tmp_path / "throughput"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/throughput.py"), "--quick", "--rows", "st,cbb_mining",
                           "--data", str(long_text_data(tmp_path / "long")), "--out", str(out)], cwd=ROOT,
                          env={**os.environ, **RANK_ENV}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    for row in ("st", "cbb_mining"):  # the same examples of --data's folder, every text filling the 32 tokens
        assert results[row]["examples"] == 16 and results[row]["seconds"] > 0, row
        assert results[row]["tokens"] == (8 * 3 + 8 * 2) * 32, row  # 8 triplets and 8 pairs, no padding counted
    ours = results["cbb_mining"]
    parts = ("input", "forward", "backward", "step", "mining")
    assert all(0 <= ours[f"{k}_share"] < 1 for k in (*parts, "gather"))
    assert all(ours[f"{k}_share"] > 0 for k in ("forward", "backward", "step"))
    assert sum(ours[f"{k}_share"] for k in parts) <= 1.0  # disjoint parts of the same training time
    assert "| st | 16 |" in proc.stdout and "1.00x" in proc.stdout and "| cbb_mining | 16 |" in proc.stdout


def test_large_rows_report_steady_tokens_and_mfu_of_full_length_texts(tmp_path):
    """The hardware rows (--device cuda on a GPU) on CPU with the tiny shape: every text fills the
    length, the steady-state figures leave the first step out, MFU is 6 x layer parameters x tokens/s."""
    out = tmp_path / "large"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/throughput.py"), "--quick", "--rows", "large_cache",
                           "--peak-tflops", "1", "--out", str(out)], cwd=ROOT, env={**os.environ, **RANK_ENV},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads((out / "results.json").read_text())["large_cache"]
    assert r["steps"] == 3 and r["warm_steps"] == 2 and r["mini_batch"] == 3
    assert r["warm_tokens"] == 2 * 4 * 2 * 32  # 2 timed steps x 4 pairs x 2 texts x 32 tokens: no padding
    assert r["tokens"] == 3 * 4 * 2 * 32 and 0 < r["warm_seconds"] < r["seconds"]
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(out / "random-2x32"), device="cpu")
    layers = sum(p.numel() for name, p in model.named_parameters() if ".encoder.layer." in name)
    assert layers == 2 * (4 * 32 * 32 + 4 * 32 + 2 * 32 * 64 + 64 + 32 + 4 * 32)  # attention, FFN, 2 layer norms
    assert abs(r["tflops_per_gpu"] - 6 * layers * r["warm_tokens"] / r["warm_seconds"] / 1e12) < 1e-12
    assert r["mfu"] == r["tflops_per_gpu"]  # against a peak of 1 TFLOP/s
    assert "| large_cache | 4 | 3 | 2 |" in proc.stdout


def test_a_data_folder_without_its_files_is_named(tmp_path):
    from bench.throughput import main
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit, match=f"--data: {tmp_path / 'data' / 'retrieval.jsonl'} not found"):
        main(["--quick", "--rows", "st", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])


def test_large_rows_are_not_mixed_with_the_fine_tuning_rows(tmp_path):
    from bench.throughput import main
    with pytest.raises(SystemExit, match="make a table of their own"):
        main(["--quick", "--rows", "st,large", "--out", str(tmp_path)])


def test_repeated_rows_report_their_median_run_and_keep_every_time():
    from bench.throughput import median_run
    runs = [{"seconds": 3.0, "tokens": 1}, {"seconds": 1.0, "tokens": 2}, {"seconds": 2.0, "tokens": 3}]
    assert median_run(runs) == {"seconds": 2.0, "tokens": 3, "seconds_all": [3.0, 1.0, 2.0]}
    assert median_run(runs[:2])["seconds"] == 1.0  # an even count: the lower middle
