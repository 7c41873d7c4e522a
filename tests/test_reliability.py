"""Reliability: SIGKILL and resume, NaN/Inf losses, half-written checkpoints, rotation."""
import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, deepspeed_launch
from train.run.checkpoint import complete_checkpoints, latest_checkpoint

PRETRAIN = ROOT / "train/pretrain.py"
DATA = str(ROOT / "data/demo/pretrain/question_pairs.jsonl")


def pretrain(tiny_model, out: Path, *extra, env=None, check=True, stage=2):
    return deepspeed_launch(PRETRAIN, "--model", str(tiny_model), "--train-data", DATA, "--output-dir", str(out),
                            "--deepspeed-config", f"ds_configs/zero{stage}.json", "--batch-size", "4",
                            "--max-steps", "12", "--save-steps", "3", "--lr", "1e-3", "--trace-examples",
                            "--log-steps", "4", *extra, env=env, check=check)


def trace(out: Path) -> dict[str, list[str]]:
    """{rank: ["step<TAB>file:line", ...]} in the order the examples were trained on."""
    return {f.stem: f.read_text().splitlines() for f in sorted((out / "trace").glob("rank*.tsv"))}


# ZeRO-2 and 3 here; ZeRO-0 (plain data parallel, the default) is killed and resumed on two nodes in test_cluster.py
@pytest.mark.parametrize("stage", [2, 3])
def test_sigkill_at_a_random_step_then_resume_gives_the_same_model(tiny_model, tmp_path, stage):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    pretrain(tiny_model, whole, stage=stage)
    kill_step = random.Random(stage).randint(4, 11)  # a step that is not a checkpoint boundary, or is

    t0 = time.time()
    killed = pretrain(tiny_model, cut, env={"CONAN_TEST_FAULTS": f"kill@1:{kill_step}"}, check=False, stage=stage)
    assert killed.returncode != 0, f"rank 1 was to be killed at step {kill_step}"
    assert time.time() - t0 < 120  # the surviving rank did not hang
    saved = int(latest_checkpoint(cut / "checkpoints").removeprefix("step"))
    assert saved == (kill_step - 1) // 3 * 3 and not (cut / "final").exists()

    resumed = pretrain(tiny_model, cut, "--resume", "auto", stage=stage)
    assert f"at step {saved}" in resumed.stdout
    a, b = load_file(whole / "final/model.safetensors"), load_file(cut / "final/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    # the same examples at the same steps on the same ranks, none repeated or skipped
    assert trace(cut) == trace(whole)
    seen = [line.split("\t")[1] for lines in trace(whole).values() for line in lines]
    assert len(seen) == len(set(seen)) == 12 * 2 * 4


def test_nan_on_one_rank_skips_the_step_on_every_rank(tiny_model, tmp_path):
    proc = pretrain(tiny_model, tmp_path / "o", env={"CONAN_TEST_FAULTS": "nan@1:5"})
    assert "NaN/Inf loss, step skipped on all ranks (1 so far)" in proc.stdout
    assert "skipped 1 steps with a NaN or Inf loss" in proc.stdout and "done: 12 steps" in proc.stdout
    weights = load_file(tmp_path / "o/final/model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nan_losses_in_a_row_stop_with_the_step_and_the_batch(tiny_model, tmp_path):
    proc = pretrain(tiny_model, tmp_path / "o", "--max-bad-steps", "2", env={"CONAN_TEST_FAULTS": "nan@0:3,nan@0:4,nan@1:4"}, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "loss is NaN or Inf for 2 batches in a row (step 3)" in output
    assert "question_pairs.jsonl:" in output and "Traceback" not in output


def test_half_written_checkpoint_is_ignored_and_old_ones_rotate(tiny_model, tmp_path):
    out = tmp_path / "o"
    pretrain(tiny_model, out, "--keep", "2")
    ckpts = out / "checkpoints"
    assert complete_checkpoints(ckpts) == ["step9", "step12"]  # step3, step6 rotated away
    # a kill during a save: the folder and DeepSpeed's 'latest' exist, the 'complete' marker does not
    (ckpts / "step15").mkdir()
    (ckpts / "latest").write_text("step15")
    assert latest_checkpoint(ckpts) == "step12"
    proc = pretrain(tiny_model, out, "--resume", "auto", "--max-steps", "14")
    assert "at step 12" in proc.stdout


# --- a bad line met mid-run: every rank stops the same way, after a checkpoint; resume skips it --------

def bad_copy(src: Path, dest: Path, n: int, bad_line: int) -> Path:
    rows = open(src, encoding="utf-8").read().splitlines()[:n]
    rows[bad_line - 1] = rows[bad_line - 1][:-5]  # cut off the closing of the JSON object
    dest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return dest


def stopped_cleanly_on_every_rank(proc, where: str, ranks: int = 2) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count(f"data error: {where}: malformed JSON") == ranks, output[-3000:]
    assert "Traceback" not in output and "Connection closed" not in output
    return output


def test_pretraining_stops_every_rank_at_a_late_bad_line_and_resumes_past_it(tiny_model, tmp_path):
    bad = bad_copy(ROOT / "data/demo/pretrain/question_pairs.jsonl", tmp_path / "bad.jsonl", 40, 23)
    args = ["--train-data", str(bad), "--group-buffer", "1", "--max-steps", "8", "--batch-size", "2",
            "--save-steps", "100"]

    def run(out, *extra, check=True):
        return deepspeed_launch(PRETRAIN, "--model", str(tiny_model), "--output-dir", str(out), "--lr", "1e-3",
                                "--trace-examples", *args, *extra, check=check)

    stopped = stopped_cleanly_on_every_rank(run(tmp_path / "cut", check=False), f"{bad}:23")
    assert "saved step 5; continue with --resume auto --skip-bad-lines" in stopped  # lines 21-24 are batch 6
    assert latest_checkpoint(tmp_path / "cut/checkpoints") == "step5"
    resumed = run(tmp_path / "cut", "--resume", "auto", "--skip-bad-lines")
    assert "at step 5" in resumed.stdout and "done: 8 steps" in resumed.stdout
    run(tmp_path / "whole", "--skip-bad-lines")
    assert trace(tmp_path / "cut") == trace(tmp_path / "whole")  # no example lost or repeated


def test_a_bad_line_in_a_task_held_by_one_rank_stops_both_ranks(tiny_model, tmp_path):
    """CBB: the STS task lives on rank 1 only; rank 0 never reads its file, and still stops with the same message."""
    import json
    demo = ROOT / "data/demo/finetune"
    sts = bad_copy(demo / "sts.jsonl", tmp_path / "sts.jsonl", 48, 30)
    config = tmp_path / "tasks.json"
    config.write_text(json.dumps({"tasks": {
        "retrieval": {"type": "retrieval", "files": [str(demo / "retrieval.jsonl")], "batch_size": 4, "num_negatives": 2},
        "sts": {"type": "sts", "files": [str(sts)], "batch_size": 8}}}))

    def run(out, *extra, check=True):
        return deepspeed_launch(ROOT / "train/finetune.py", "--model", str(tiny_model), "--data-config", str(config),
                                "--output-dir", str(out), "--max-steps", "5", "--group-buffer", "1", "--save-steps",
                                "100", "--expand-dim", "0", "--mrl-dims", "none", "--trace-examples", *extra, check=check)

    stopped = stopped_cleanly_on_every_rank(run(tmp_path / "cut", check=False), f"{sts}:30")
    assert "saved step 3" in stopped  # sts lines 25-32 are its 4th batch
    resumed = run(tmp_path / "cut", "--resume", "auto", "--skip-bad-lines")
    assert "at step 3" in resumed.stdout and "done: 5 steps" in resumed.stdout
    run(tmp_path / "whole", "--skip-bad-lines")
    assert trace(tmp_path / "cut") == trace(tmp_path / "whole")


def test_validate_data_stops_every_rank_before_training_and_names_every_bad_line(tiny_model, tmp_path):
    """--validate-data: two bad lines late in the file stop both ranks at step 0 with the same list."""
    bad = bad_copy(ROOT / "data/demo/pretrain/question_pairs.jsonl", tmp_path / "bad.jsonl", 400, 390)
    rows = bad.read_text(encoding="utf-8").splitlines()
    rows[299] = '{"query": "", "pos": "x"}'
    bad.write_text("\n".join(rows) + "\n", encoding="utf-8")
    args = ["--model", str(tiny_model), "--train-data", str(bad), "--batch-size", "2", "--max-steps", "2",
            "--validate-data"]
    proc = deepspeed_launch(PRETRAIN, *args, "--output-dir", str(tmp_path / "out"), check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in output
    assert output.count("data error: --validate-data: checked 400 lines") == 2, output[-3000:]
    assert output.count(f"{bad}:300: 'query' is empty") == 2 and output.count(f"{bad}:390: malformed JSON") == 2
    assert "pre-training" not in output and not (tmp_path / "out/checkpoints").exists()  # stopped before the model
    # with --skip-bad-lines the verdict is a count, and training goes on
    ok = deepspeed_launch(PRETRAIN, *args, "--skip-bad-lines", "--output-dir", str(tmp_path / "ok"))
    assert "2 bad lines" in ok.stdout and "those 2 lines will be skipped" in ok.stdout and "done: 2 steps" in ok.stdout
