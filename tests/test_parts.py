"""data_prep jobs split over machines (data_prep/chunked.py parts): filter_pairs.py and score_teacher.py with
--part I/N or one part per rank of a launch, shown on the two-node simulation (tests/conftest.py launch_nodes):
each part writes and resumes its own file, the folder trains as one data set, and the joined parts are the
one-machine output byte for byte."""
import json
import os
import subprocess
import sys

import pytest

from data_prep.chunked import count_lines, part_lines
from tests.conftest import RANK_ENV, ROOT, launch_nodes

SCORE, JOIN = (ROOT / f"data_prep/{name}.py" for name in ("score_teacher", "join_parts"))
PAIRS = ROOT / "data/demo/pretrain/question_pairs.jsonl"
RETRIEVAL = ROOT / "data/demo/finetune/retrieval.jsonl"


def run(script, *args, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **RANK_ENV, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_parts_are_contiguous_runs_of_whole_chunks(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("a\n" * 10 + "b")  # 11 lines, the last without a newline
    assert count_lines([path]) == 11
    ranges = [part_lines([path], 3, (i, 3)) for i in range(3)]  # 4 chunks of 3 over 3 parts
    assert ranges == [(0, 3), (3, 6), (6, 11)] and all(start % 3 == 0 for start, _ in ranges)


def test_filter_parts_join_into_the_one_machine_output(tiny_model, tmp_path, capsys):
    from data_prep import filter_pairs
    from data_prep.join_parts import main as join
    args = ["--model", str(tiny_model), "--input", str(PAIRS), "--threshold", "0.5", "--chunk-size", "64",
            "--devices", "cpu"]
    filter_pairs.main([*args, "--output", str(tmp_path / "whole.jsonl")])
    joined = tmp_path / "joined.jsonl"
    filter_pairs.main([*args, "--output", str(tmp_path / "parts"), "--part", "0/3"])
    with pytest.raises(SystemExit, match="part-00001-of-00003.jsonl, part-00002-of-00003.jsonl"):
        join([str(tmp_path / "parts"), str(joined)])
    for i in (2, 1):
        filter_pairs.main([*args, "--output", str(tmp_path / "parts"), "--part", f"{i}/3"])
    assert join([str(tmp_path / "parts"), str(joined)]) == len(joined.read_text().splitlines()) > 0
    assert joined.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert all((tmp_path / "parts" / f"part-0000{i}-of-00003.jsonl").stat().st_size for i in range(3))


@pytest.mark.skipif(not (os.geteuid() == 0), reason="the two-node simulation runs as root")
def test_teacher_scoring_on_two_nodes_is_killed_resumed_and_joined(tiny_model, tmp_path):
    """Two torchrun "nodes" (one rank each) score their parts; both die after their first chunk's output
    (before its progress), the same command resumes them, and the joined parts are the one-machine output."""
    data = tmp_path / "in.jsonl"
    data.write_text("".join(open(RETRIEVAL, encoding="utf-8").readlines()[:40]), encoding="utf-8")
    args = ["--model", str(tiny_model), "--input", str(data), "--chunk-size", "8"]
    run(SCORE, *args, "--output", str(tmp_path / "whole.jsonl"))
    parts = tmp_path / "parts"
    killed = launch_nodes(SCORE, *args, "--output", str(parts), env={"CONAN_FILTER_CRASH_AFTER_CHUNK": "2"})
    assert all(p.returncode != 0 for p in killed)
    progress = [json.loads((parts / f"part-0000{i}-of-00002.jsonl.progress.json").read_text()) for i in range(2)]
    assert [p["chunks"] for p in progress] == [1, 1] and progress[1]["lines"] == [16, 40]
    resumed = launch_nodes(SCORE, *args, "--output", str(parts))
    assert all(p.returncode == 0 for p in resumed), [p.stderr[-2000:] for p in resumed]
    assert all("resuming after" in p.stdout for p in resumed)
    run(JOIN, str(parts), str(tmp_path / "joined.jsonl"))
    assert (tmp_path / "joined.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_a_folder_of_parts_trains_as_one_data_set(tmp_path):
    """A task's `files` may name the parts' folder (its *.jsonl in name order), as --train-data may."""
    from train.kinds.tasks import ConfigError, load_data_config
    parts = tmp_path / "parts"
    parts.mkdir()
    lines = open(RETRIEVAL, encoding="utf-8").read().splitlines()
    for i in (1, 0):
        (parts / f"part-0000{i}-of-00002.jsonl").write_text("\n".join(lines[i * 10:(i + 1) * 10]) + "\n", encoding="utf-8")
    (parts / "part-00000-of-00002.jsonl.progress.json").write_text("{}")
    config = tmp_path / "tasks.json"
    config.write_text(json.dumps({"tasks": {"retrieval": {"type": "retrieval", "files": ["parts"], "batch_size": 4,
                                                          "num_negatives": 2}}}))
    task = load_data_config(config).tasks[0]
    assert [f.name for f in task.files] == ["part-00000-of-00002.jsonl", "part-00001-of-00002.jsonl"]
    (tmp_path / "empty").mkdir()
    config.write_text(json.dumps({"tasks": {"retrieval": {"type": "retrieval", "files": ["empty"], "batch_size": 4,
                                                          "num_negatives": 2}}}))
    with pytest.raises(ConfigError, match="a folder without .jsonl files"):
        load_data_config(config)
