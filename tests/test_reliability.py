"""Reliability: SIGKILL and resume, NaN/Inf losses, half-written checkpoints, rotation."""
import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, deepspeed_launch
from train.checkpoint import complete_checkpoints, latest_checkpoint

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
