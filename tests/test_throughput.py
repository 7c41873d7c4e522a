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


FAULTS = """
import resource, sys, torch
from train.runner import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "on" else None
faults = []
for step in range(4):  # each step allocates and frees a 128 MB buffer (its gradient), every page touched
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(32 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x
print(applied, faults[-1])
"""


def test_cpu_runs_reuse_freed_gradient_buffers_instead_of_faulting_them_in_again():
    """reuse_freed_memory (CPU runs under zero0): a large buffer freed and allocated again (each step's gradient)
    is reused once the heap has grown, not unmapped and faulted back in page by page every step (32k
    faults for 128 MB by default)."""
    def last_step_faults(mode: str) -> tuple[str, int]:
        proc = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        applied, count = proc.stdout.split()
        return applied, int(count)
    applied, reused = last_step_faults("on")
    _, default = last_step_faults("off")
    assert applied == "True"
    assert default > 20_000 and reused < default / 10, (default, reused)
