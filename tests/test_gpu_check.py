"""bench/gpu_check.sh is for the day a GPU is lent; its checks run here on CPU with a tiny model (--quick):
every row, in bf16 and on two ranks where the GPU form would, so the script itself is known to work
before a GPU's minutes are spent on it. (Its bf16 ZeRO-3 fine-tuning row found an expansion layer left
in fp32 beside a bf16 backbone built under zero.Init, which DeepSpeed refuses to partition.)"""
import json
import os
import subprocess
import sys

from tests.conftest import ROOT, RANK_ENV

ROWS = ["pretrain zero0 cache x2", "pretrain zero3 cache x2", "finetune zero3 cache x2", "grad cache = plain",
        "llm lora zero3 x2", "llm soft zero3 x2"]


def test_gpu_check_quick_passes_and_reports_each_check(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, env={**os.environ, **RANK_ENV}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text().splitlines()
    assert [line[6:29].strip() for line in report] == ROWS, report
    assert all(line.startswith("PASS") for line in report), report
    training = [line for line in report if "steps in" in line]
    assert len(training) == 5 and all("export check: reloaded model matches the engine" in line for line in training)
    assert "relative L2 difference" in report[3] and "gpu check: 6 passed, 0 failed" in proc.stdout
    # bf16 GradCache under zero0.json runs as ZeRO-1, and the run says so and records it
    summary = json.loads((tmp_path / "runs/pretrain_zero0_cache/summary.json").read_text())
    assert summary["zero_stage"] == 1 and summary["setup_notes"][0].startswith("ZeRO-1, not the ZeRO-0 of zero0.json")
    assert "ZeRO-1, not the ZeRO-0 of zero0.json" in (tmp_path / "pretrain_zero0_cache.log").read_text()
