"""Data configs that cannot be trained stop with a clear message before any training."""
import json

import pytest

from tests.conftest import ROOT
from train.input.data import DataError
from train.kinds.task_data import task_stream
from train.kinds.tasks import ConfigError, assign_ranks, load_data_config

DEMO = ROOT / "data/demo/finetune"


def config(tmp_path, **tasks):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"tasks": tasks}))
    return path


def retrieval(**kw):
    return {"type": "retrieval", "files": [str(DEMO / "retrieval.jsonl")], "batch_size": 4, "num_negatives": 4, **kw}


def sts(**kw):
    return {"type": "sts", "files": [str(DEMO / "sts.jsonl")], "batch_size": 6, **kw}


def test_demo_config_loads_with_paper_defaults():
    tasks = {t.name: t for t in load_data_config(DEMO / "tasks.yaml").tasks}
    assert tasks["sts"].weight == 0.8 and tasks["retrieval"].weight == 1.0
    assert tasks["retrieval"].files[0] == (DEMO / "retrieval.jsonl").resolve()


@pytest.mark.parametrize("spec, message", [
    (retrieval(ranks=0), "'ranks' must be an integer >= 1"),
    (retrieval(num_negatives=0), "'num_negatives' must be an integer >= 1"),
    (retrieval(type="ranking"), "'type' must be one of"),
    (retrieval(files=["nope.jsonl"]), "nope.jsonl: no such file"),
    (retrieval(batchsize=3), "unknown keys"),
    (sts(batch_size=1), "batch_size must be >= 2"),
])
def test_bad_task_specs(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        load_data_config(config(tmp_path, t=spec))


def test_batch_or_negatives_that_do_not_split_over_the_ranks(tmp_path):
    tasks = load_data_config(config(tmp_path, r=retrieval(num_negatives=5, ranks=2), s=sts(batch_size=7, ranks=2))).tasks
    with pytest.raises(ConfigError, match="num_negatives 5 does not split over its 2 ranks"):
        assign_ranks(tasks, 4)
    tasks = load_data_config(config(tmp_path, r=retrieval(ranks=2), s=sts(batch_size=7, ranks=2))).tasks
    with pytest.raises(ConfigError, match="batch_size 7 does not split over its 2 ranks"):
        assign_ranks(tasks, 4)


def test_a_file_of_the_wrong_shape(tmp_path):
    task = load_data_config(config(tmp_path, s={"type": "sts", "files": [str(DEMO / "retrieval.jsonl")], "batch_size": 4})).tasks[0]
    with pytest.raises(DataError, match=r"retrieval.jsonl:1: missing field 'sentence1'.*sts task expects"):
        task_stream(task, 0, 128, False)


def test_malformed_config_file(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("tasks:\n  r: {type: retrieval\n")
    with pytest.raises(ConfigError, match="tasks.yaml: cannot parse"):
        load_data_config(path)


@pytest.mark.parametrize("world, expected", [(1, [[0], [0]]), (2, [[0], [1]]), (5, [[0, 1, 2, 3], [4]])])
def test_ranks_follow_the_shares(tmp_path, world, expected):
    tasks = load_data_config(config(tmp_path, r=retrieval(ranks=4), s=sts(ranks=1, batch_size=8))).tasks
    assign_ranks(tasks, world)
    assert [t.assigned for t in tasks] == expected
