"""bench/ablation.py --quick: every row of the ablation trains, is released at the base's length and is scored."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from bench.ablation_data import read_jsonl
from tests.conftest import RANK_ENV, ROOT


def run_ablation(*args: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench/ablation.py"), "--quick", *args],
                          cwd=ROOT, env={**os.environ, **RANK_ENV}, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def released_difference(a: str, b: str) -> float:
    """The largest |difference| between two releases' weights, over every module's safetensors."""
    from safetensors.torch import load_file
    diffs = []
    for path in sorted(Path(a).rglob("*.safetensors")):
        x, y = load_file(path), load_file(Path(b) / path.relative_to(a))
        diffs += [(x[k] - y[k]).abs().max().item() for k in x]
    assert diffs, f"no weights in {a}"
    return max(diffs)


def test_quick_ablation_runs_every_row_on_equal_terms(tmp_path):
    out = tmp_path / "ablation-quick"
    run_ablation("--out", str(out))
    results = {row: json.loads((out / "results" / f"{row}.json").read_text()) for row in "base a b c d e f g h".split()}
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
    for row in "a c e f g h".split():
        assert results[row]["examples"] == {"retrieval": 12, "sts": 12}, row
    for row in "b d".split():
        assert sum(results[row]["examples"].values()) == 24, row
    # our rows add the expansion layer (auto width) and are also scored at the base width; the peer's does not
    assert results["a"]["width"] == base["width"] == 32
    assert all(results[row]["width"] > 32 for row in "b c d e f g h".split())
    assert results["c"]["scores_base_width"] != results["c"]["scores"]
    assert "mining" in results["d"] and "mining" in results["e"] and "mining" not in results["b"]
    assert all(isinstance(results[row]["false_negatives"], int) for row in "bcdeg")  # read from each run's report
    # row g: e's recipe plus distillation from the base's own scores, written by score_teacher.py for every candidate
    assert results["g"]["distill"]["loss"] == "kl" and "mining" in results["g"]
    # the tiny model's ranks may not move in 3 steps; its weights must: the same run as e but for the term
    assert released_difference(results["e"]["model"], results["g"]["model"]) > 1e-6, "distillation changed nothing"
    teacher = read_jsonl(out / "data/train/retrieval_teacher.jsonl")
    assert [r["neg"] for r in teacher] == [r["neg"] for r in read_jsonl(out / "data/train/retrieval.jsonl")]
    assert all(len(r["pos_scores"]) == len(r["pos"]) and len(r["neg_pool_scores"]) == len(r["neg_pool"]) for r in teacher)
    table = (out / "table.md").read_text()
    assert all(f"| {row}: " in table for row in "base a b c d e f g h".split())
    assert (out / "ablation.png").stat().st_size > 1000
    assert SentenceTransformer(results["f"]["model"], device="cpu").get_embedding_dimension() == results["e"]["width"]
    # row f's merge weight is chosen on the tune split, which no row trains on and the table does not report
    for row in "fh":
        assert results[row]["merge_weight"] in (0.3, 0.7) and set(results[row]["tune"]["weights"]) == {"0.3", "0.7"}
    assert "-tune" not in table.split("Command:")[0]
    data = out / "data"

    def read(path):
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def pairs(path):
        return {(r["sentence1"], r["sentence2"]) for r in read(path)}

    train_sts, train_q = pairs(data / "train/sts.jsonl"), {r["query"] for r in read(data / "train/retrieval_raw.jsonl")}
    tune_sts = pairs(data / "tune/afqmc.jsonl") | pairs(data / "tune/stsb.jsonl")
    assert tune_sts and not tune_sts & (train_sts | pairs(data / "dev/afqmc.jsonl"))
    dev_q, tune_q = ({r["text"] for r in read(data / split / "cmrc/queries.jsonl")} for split in ("dev", "tune"))
    assert tune_q and not tune_q & dev_q and not (tune_q | dev_q) & train_q
    # bench/cmrc_probe.py's probe set: the tune split's CMRC queries and others no row trained on, none of dev's
    from bench.cmrc_probe import write_probe_set
    n = write_probe_set(data, tmp_path / "probe")
    probe_q = {r["text"] for r in read(tmp_path / "probe/queries.jsonl")}
    assert n == len(probe_q) > len(tune_q) and tune_q <= probe_q and not probe_q & (dev_q | train_q)

    # bench/lr_choice.py: each trainer's (lr, temperature) chosen on the tune split, between this run and one at
    # another lr and temperature; the grid's two other settings were not run and are named, not chosen
    other = tmp_path / "ablation-quick-lr0.0003-t0.04"
    run_ablation("--lr", "3e-4", "--temperature", "0.04", "--rows", "a,e,f", "--out", str(other),
                 "--model", str(out / "tiny-base"))
    # both trainers got the temperature: the peer's MNRL at scale 1 / 0.04 (its default: 20), ours' model card
    assert '"scale": 25.0' in (other / "runs/a/final/README.md").read_text()
    assert "| temperature | 0.04 |" in (other / "runs/e/final/README.md").read_text()
    from bench.lr_choice import main as lr_choice
    from eval.merge_sweep import average, choose_weight
    chosen = lr_choice(["--quick", "--lrs", "1e-4,3e-4", "--temperatures", "default,0.04", "--results", str(tmp_path)])
    tune_base = json.loads((out / "results/f.json").read_text())["tune"]["base"]
    text = (tmp_path / "lr_choice.md").read_text()
    assert "Not run, so not chosen from: lr 0.0001, temperature 0.04; lr 0.0003, each trainer's own temperature" in text
    for row, label, own in (("a", "sentence-transformers trainer", 0.05), ("f", "ours, CBB + mining, merged", 0.02)):
        tune = {}  # what the choice must follow: tune scores (the peer's scored once and kept), never dev ones
        for setting, run in (((1e-4, own), out), ((3e-4, 0.04), other)):
            f = json.loads((run / "results/f.json").read_text())
            tune[setting] = (json.loads((run / "tune/a.json").read_text()) if row == "a"
                             else f["tune"]["weights"][str(f["merge_weight"])])
        assert chosen[row] == choose_weight(tune, tune_base, 1.0), row
        [line] = [x for x in text.splitlines() if x.startswith(f"| {row}: {label}") and "**yes**" in x]
        assert line.split(" | ")[1:4] == [f"{chosen[row][0]:g}", f"{chosen[row][1]:g}",
                                          f"{average(tune[chosen[row]]):.2f}"], line


def test_scale_adds_training_queries_and_keeps_every_scored_set(tmp_path):
    """bench/ablation.py --scale K: the 1x draw plus (K - 1) x as many new queries; the dev and tune sets,
    the STS training pairs and the 1x queries are the same files, and no scored query is trained on."""
    from dataclasses import replace

    from bench.ablation_data import Budget, split_data
    one, four = tmp_path / "x1", tmp_path / "x4"
    assert split_data(one, Budget())["retrieval"] == 400
    assert split_data(four, replace(Budget(), extra_retrieval=1200))["retrieval"] == 1600
    scored = [p.relative_to(one) for split in ("dev", "tune") for p in sorted((one / split).rglob("*.*"))]
    assert len(scored) == 16
    for path in scored + [Path("train/sts.jsonl")]:
        assert (one / path).read_bytes() == (four / path).read_bytes(), path
    lines = [(d / "train/retrieval_raw.jsonl").read_text(encoding="utf-8").splitlines() for d in (one, four)]
    assert lines[1][:400] == lines[0] and len(set(lines[1])) == 1600
    queries = {json.loads(line)["text"] for p in scored if p.name == "queries.jsonl"
               for line in (one / p).read_text(encoding="utf-8").splitlines()}
    assert not queries & {json.loads(line)["query"] for line in lines[1]}
