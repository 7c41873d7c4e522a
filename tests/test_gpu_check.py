"""bench/gpu_check.sh is for the day a GPU is lent; its checks run here on CPU with a tiny model
(--quick), so the script itself is known to work before a GPU's minutes are spent on it."""
import sys

from tests.conftest import ROOT, RANK_ENV


def test_gpu_check_quick_passes_and_reports_each_check(tmp_path):
    import os
    import subprocess
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--quick", "--out", str(tmp_path),
                           "--skip", "pretrain_zero3,finetune,llm"], cwd=ROOT, env={**os.environ, **RANK_ENV},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text().splitlines()
    assert [line.split()[:2] for line in report] == [["PASS", "pretrain"], ["PASS", "grad"]], report
    assert "export check: reloaded model matches the engine" in report[0]
    assert "relative L2 difference" in report[1] and "gpu check: 2 passed, 0 failed" in proc.stdout
