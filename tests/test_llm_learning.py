"""The learning check of decoder-only backbones (bench/llm_backbones.py learning --quick): a tiny random
Qwen3-style decoder pre-trained by train/pretrain.py, then fine-tuned by train/finetune.py with LoRA and,
separately, with soft masking, retrieves held-out demo pairs better than its initial weights did."""
import json
import subprocess
import sys

from tests.conftest import ROOT, RANK_ENV


def test_a_tiny_decoder_learns_through_pretraining_and_both_fine_tuning_modes(tmp_path):
    import os
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "bench.llm_backbones", "learning", "--quick", "--json", str(out),
                           "--work-dir", str(tmp_path / "work")], cwd=ROOT, env={**os.environ, **RANK_ENV},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())}
    initial = rows.pop("initial weights")
    assert len(rows) == 3
    for name, row in rows.items():  # every trained row, on both held-out sets
        for metric in ("pairs mrr@10", "retrieval mrr@10"):
            assert row[metric] > initial[metric] + 0.05, (name, metric, row, initial)
