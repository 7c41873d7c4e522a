"""bench/ablation.py --quick: every row of the ablation trains, is released at the base's length and is scored."""
import json
import math
import os
import subprocess
import sys

from tests.conftest import RANK_ENV, ROOT


def test_quick_ablation_runs_every_row_on_equal_terms(tmp_path):
    out = tmp_path / "ablation"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/ablation.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, env={**os.environ, **RANK_ENV}, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = {row: json.loads((out / "results" / f"{row}.json").read_text()) for row in "base a b c d e f".split()}
    base = results["base"]
    from sentence_transformers import SentenceTransformer
    for row, r in results.items():
        assert set(r["scores"]) == {"STSB-zh-dev", "AFQMC-dev", "CMRC-dev", "Alpaca-OOD"}, row
        assert all(math.isfinite(v) for v in r["scores"].values()), row
        # the release encodes at the base model's length (64), whatever length training used (32 here)
        assert r["max_seq_length"] == base["max_seq_length"] == 64, row
        if row != "base":
            assert r["scores"] != base["scores"], f"row {row} scores exactly as the base: it did not train"
    # the same work for every trained row: 3 steps x (4 + 4) examples, or the random schedule's 6 draws of 4
    for row in "a c e f".split():
        assert results[row]["examples"] == {"retrieval": 12, "sts": 12}, row
    for row in "b d".split():
        assert sum(results[row]["examples"].values()) == 24, row
    # our rows add the expansion layer (auto width) and are also scored at the base width; the peer's does not
    assert results["a"]["width"] == base["width"] == 32
    assert all(results[row]["width"] > 32 for row in "b c d e f".split())
    assert results["c"]["scores_base_width"] != results["c"]["scores"]
    assert "mining" in results["d"] and "mining" in results["e"] and "mining" not in results["b"]
    table = (out / "table.md").read_text()
    assert all(f"| {row}: " in table for row in "base a b c d e f".split())
    assert (out / "ablation.png").stat().st_size > 1000
    assert SentenceTransformer(results["f"]["model"], device="cpu").get_embedding_dimension() == results["e"]["width"]
