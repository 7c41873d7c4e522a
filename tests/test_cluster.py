"""A cluster on one machine: two "nodes" (torchrun --nnodes 2 against one rendezvous on localhost), each
in its own mount namespace so that OUTPUT_DIR and the model folder are different disks at the same path,
as node-local NVMe is on a real cluster; or one disk for both (a shared filesystem).

Shown here: pre-training and fine-tuning run; a rank killed mid-run and `--resume auto` continue with
the same examples and weights as an uninterrupted run, on node-local and on shared disks; the release
is written once; a layout that cannot work (shared checkpoints on node-local disks, a model folder on
one node only, a changed world size) is refused on every rank at start-up with what to do instead.
"""
import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT, can_simulate_nodes, launch, launch_nodes

pytestmark = pytest.mark.skipif(not can_simulate_nodes(), reason="two nodes on one machine need root and unshare -m")

PRETRAIN, FINETUNE = ROOT / "train/pretrain.py", ROOT / "train/finetune.py"
DATA = str(ROOT / "data/demo/pretrain/question_pairs.jsonl")


def pretrain(tiny_model, mnt: Path, disks: list[Path] | None, *extra, nproc=1, env=None, storage="node-local"):
    """Pre-training on two nodes, OUTPUT_DIR = mnt/out (node-local: each node's disk bound at mnt)."""
    args = ["--model", str(tiny_model), "--train-data", DATA, "--output-dir", str(mnt / "out"), "--batch-size", "4",
            "--max-steps", "8", "--save-steps", "3", "--lr", "1e-3", "--trace-examples", "--log-steps", "4",
            "--checkpoint-storage", storage, *extra]
    return launch_nodes(PRETRAIN, *args, nproc=nproc, mount=(mnt, disks) if disks else None, env=env)


def output(nodes) -> str:
    return "".join(n.stdout + n.stderr for n in nodes)


def workers(node) -> str:
    """What a node's ranks printed, without torchrun's own report of a failed worker (the agent prints
    its ChildFailedError traceback whatever the worker said)."""
    text = node.stdout + node.stderr
    agent = text.find("elastic/multiprocessing/api.py")
    return text if agent < 0 else text[:text.rfind("\n", 0, agent) + 1]


def trace(*out_dirs: Path) -> dict[str, list[str]]:
    """{rank: ["step<TAB>file:line", ...]} from every node's OUTPUT_DIR."""
    return {f.stem: f.read_text().splitlines() for d in out_dirs for f in sorted((d / "trace").glob("rank*.tsv"))}


def same_weights(a: Path, b: Path) -> float:
    x, y = load_file(a / "final/model.safetensors"), load_file(b / "final/model.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.fixture(scope="module")
def whole(tiny_model, tmp_path_factory) -> Path:
    """An uninterrupted two-node run on node-local disks: node0/out and node1/out."""
    tmp = tmp_path_factory.mktemp("cluster_whole")
    nodes = pretrain(tiny_model, tmp / "mnt", [tmp / "node0", tmp / "node1"])
    assert all(n.returncode == 0 for n in nodes), output(nodes)[-6000:]
    return tmp


def test_node_local_disks_kill_and_resume_give_the_uninterrupted_run(tiny_model, whole, tmp_path):
    disks = [tmp_path / "node0", tmp_path / "node1"]
    started = time.time()
    killed = pretrain(tiny_model, tmp_path / "mnt", disks, env={"CONAN_TEST_FAULTS": "kill@1:5"})
    assert any(n.returncode != 0 for n in killed) and time.time() - started < 120  # no rank hung
    for disk in disks:  # each node kept its own part of the last checkpoint
        assert sorted(p.name for p in (disk / "out/checkpoints").glob("step*")) == ["step3"]
    resumed = pretrain(tiny_model, tmp_path / "mnt", disks, "--resume", "auto")
    assert all(n.returncode == 0 for n in resumed), output(resumed)[-6000:]
    assert "resumed from" in resumed[0].stdout and "at step 3" in resumed[0].stdout
    # the release is written once, by rank 0, on its node
    assert (disks[0] / "out/final/model.safetensors").is_file() and not (disks[1] / "out/final").exists()
    assert same_weights(disks[0] / "out", whole / "node0/out") < 1e-6
    assert trace(disks[0] / "out", disks[1] / "out") == trace(whole / "node0/out", whole / "node1/out")
    seen = [line.split("\t")[1] for lines in trace(whole / "node0/out", whole / "node1/out").values() for line in lines]
    assert len(seen) == len(set(seen)) == 8 * 2 * 4


def test_shared_disk_kill_and_resume_give_the_uninterrupted_run(tiny_model, whole, tmp_path):
    shared = tmp_path / "shared"
    killed = pretrain(tiny_model, shared, None, env={"CONAN_TEST_FAULTS": "kill@0:7"}, storage="shared")
    assert any(n.returncode != 0 for n in killed)
    resumed = pretrain(tiny_model, shared, None, "--resume", "auto", storage="shared")
    assert all(n.returncode == 0 for n in resumed), output(resumed)[-6000:]
    assert "at step 6" in resumed[0].stdout
    assert same_weights(shared / "out", whole / "node0/out") < 1e-6  # the same run as on node-local disks
    assert trace(shared / "out") == trace(whole / "node0/out", whole / "node1/out")


def test_shared_checkpoints_on_node_local_disks_are_refused_on_every_rank(tiny_model, tmp_path):
    nodes = pretrain(tiny_model, tmp_path / "mnt", [tmp_path / "node0", tmp_path / "node1"], storage="shared")
    assert all(n.returncode != 0 for n in nodes)
    for node in nodes:  # each node's rank says why, and what to pass
        text = workers(node)
        assert "--checkpoint-storage failed on 1 of 2 ranks; every rank stops" in text, text[-3000:]
        assert "rank 1" in text and "pass --checkpoint-storage node-local" in text and "Traceback" not in text
    assert not (tmp_path / "node0/out/checkpoints").exists()  # refused before any step


def test_a_changed_world_size_is_refused_on_every_rank(tiny_model, whole, tmp_path):
    for node in ("node0", "node1"):
        shutil.copytree(whole / node, tmp_path / node)
    nodes = pretrain(tiny_model, tmp_path / "mnt", [tmp_path / "node0", tmp_path / "node1"], "--resume", "auto",
                     nproc=2)  # 4 ranks x 4 where the checkpoint has 2 x 4
    assert all(n.returncode != 0 for n in nodes)
    for node in nodes:  # both ranks of each node
        text = workers(node)
        assert text.count("the global batch changed from 8 to 16 (2 ranks then, 4 now)") == 2, text[-3000:]
        assert text.count("on 4 ranks pass --batch-size 2 to keep it") == 2 and "Traceback" not in text


def test_more_ranks_at_the_same_global_batch_continue_with_the_same_examples(tiny_model, whole, tmp_path):
    """ZeRO-0 keeps the whole optimizer on every rank: a 2-rank checkpoint resumes on 4 ranks at
    --batch-size 2 (the same 8 per step), and every later step trains the same examples as before."""
    out = tmp_path / "out"
    shutil.copytree(whole / "node0/out/checkpoints/step3", out / "checkpoints/step3")
    shutil.copy(whole / "node1/out/checkpoints/step3/rng_rank1.pt", out / "checkpoints/step3")
    proc = launch(PRETRAIN, "--model", str(tiny_model), "--train-data", DATA, "--output-dir", str(out),
                  "--batch-size", "2", "--max-steps", "8", "--save-steps", "3", "--lr", "1e-3", "--trace-examples",
                  "--resume", str(out / "checkpoints/step3"), nproc=4)
    assert "at step 3 (2 ranks then, 4 now" in proc.stdout

    def per_step(tr: dict) -> dict[int, set[str]]:
        steps: dict[int, set[str]] = {}
        for lines in tr.values():
            for line in lines:
                step, source = line.split("\t")
                steps.setdefault(int(step), set()).add(source)
        return {s: v for s, v in steps.items() if s > 3}
    after = per_step(trace(out))
    assert sorted(after) == [4, 5, 6, 7, 8]
    assert after == per_step(trace(whole / "node0/out", whole / "node1/out"))


def test_finetuning_on_two_nodes_needs_the_model_on_every_node(tiny_model, tmp_path):
    disks, mnt = [tmp_path / "node0", tmp_path / "node1"], tmp_path / "mnt"
    shutil.copytree(tiny_model, disks[0] / "model")  # the pre-trained model on node 0's disk only
    args = ["--model", str(mnt / "model"), "--output-dir", str(mnt / "out"), "--max-steps", "4", "--save-steps", "2",
            "--expand-dim", "0", "--mrl-dims", "none", "--checkpoint-storage", "node-local", "--merge-weight", "1"]
    refused = launch_nodes(FINETUNE, *args, mount=(mnt, disks))
    assert all(n.returncode != 0 for n in refused)
    for node in refused:
        text = workers(node)
        assert "loading the model failed on 1 of 2 ranks; every rank stops" in text, text[-3000:]
        assert "rank 1" in text and f"--model {mnt / 'model'}" in text and "Traceback" not in text

    shutil.copytree(tiny_model, disks[1] / "model")
    nodes = launch_nodes(FINETUNE, *args, mount=(mnt, disks))
    assert all(n.returncode == 0 for n in nodes), output(nodes)[-6000:]
    assert "done: 4 steps" in nodes[0].stdout
    assert (disks[0] / "out/final/model.safetensors").is_file() and not (disks[1] / "out/final").exists()
