"""bench/throughput.py --quick: the peer and our step measured side by side in one invocation."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import RANK_ENV, ROOT


def test_quick_throughput_prints_the_ratio_and_the_mining_share(tmp_path):
    out = tmp_path / "throughput"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/throughput.py"), "--quick", "--rows", "st,cbb_mining",
                           "--out", str(out)], cwd=ROOT, env={**os.environ, **RANK_ENV}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    for row in ("st", "cbb_mining"):  # the same examples, real time and real (non-padding) tokens
        assert results[row]["examples"] == 16 and results[row]["seconds"] > 0 and results[row]["tokens"] > 16, row
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


def test_large_rows_are_not_mixed_with_the_fine_tuning_rows(tmp_path):
    from bench.throughput import main
    with pytest.raises(SystemExit, match="make a table of their own"):
        main(["--quick", "--rows", "st,large", "--out", str(tmp_path)])
