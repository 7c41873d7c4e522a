"""bench/throughput.py --quick: the peer and our step measured side by side in one invocation."""
import json
import os
import subprocess
import sys

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
