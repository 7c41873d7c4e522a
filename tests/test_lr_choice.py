"""bench/lr_choice.py on hand-written run folders (no model): a setting one trainer ran and the other did
not is chosen from for the first and named for the second; a half-finished run is an error."""
import json

import pytest

from bench.lr_choice import main as lr_choice

TASKS = ("STS", "Retrieval")


def scores(sts: float, retrieval: float) -> dict:
    return dict(zip(TASKS, (sts, retrieval)))


def write_run(folder, rows: dict) -> None:
    """A bench/ablation.py output folder holding `rows` ({row: (dev scores, tune scores)}) and the base."""
    (folder / "results").mkdir(parents=True)
    (folder / "tune").mkdir()
    base = {"model": "tiny-base", "scores": scores(0.80, 0.90)}
    (folder / "results/base.json").write_text(json.dumps(base))
    for row, (dev, tune) in rows.items():
        (folder / "runs" / row).mkdir(parents=True)
        result = {"model": f"{folder}/runs/{row}", "scores": dev}
        if row == "f":
            result |= {"merge_weight": 0.5, "tune": {"base": scores(0.70, 0.80), "weights": {"0.5": tune}}}
        else:
            (folder / "tune" / f"{row}.json").write_text(json.dumps(tune))
        (folder / "results" / f"{row}.json").write_text(json.dumps(result))


def test_a_setting_run_by_one_trainer_is_chosen_from_for_it_alone(tmp_path):
    # the main table's setting (lr 1e-4 in --quick, each trainer's own temperature): both trainers
    write_run(tmp_path / "ablation-quick", {"a": (scores(0.81, 0.88), scores(0.71, 0.78)),
                                            "f": (scores(0.82, 0.89), scores(0.72, 0.79))})
    # lr 3e-4: the peer alone, and its best tune average: it must be the peer's choice
    write_run(tmp_path / "ablation-quick-lr0.0003", {"a": (scores(0.79, 0.91), scores(0.71, 0.80))})
    chosen = lr_choice(["--quick", "--lrs", "1e-4,3e-4", "--results", str(tmp_path)])
    assert chosen == {"a": (3e-4, 0.05), "f": (1e-4, 0.02)}
    text = (tmp_path / "lr_choice.md").read_text()
    assert "Not run for ours, so not chosen from: lr 0.0003, each trainer's own temperature." in text
    assert "Not run, so not chosen from" not in text and "Not run for the peer" not in text
    # ours minus the peer on dev, at each one's choice: 85.50 - 85.00
    assert "ours minus the peer: +0.50 points" in text

    # a row whose run folder exists without its result is a run still going (or killed): an error, not a skip
    (tmp_path / "ablation-quick-lr0.0003/runs/f").mkdir()
    with pytest.raises(SystemExit, match="finish this run.*ablation-quick-lr0.0003/results/f.json"):
        lr_choice(["--quick", "--lrs", "1e-4,3e-4", "--results", str(tmp_path)])
