"""What a GPU-cluster launch needs and a CPU machine never exercises, tested at its seam.

The device binding and the NCCL/gloo split can only run on GPUs: here DeepSpeed's accelerator is
replaced by a fake that says "cuda" and records what it is asked, and the backend name is mocked,
while everything else (the process group, the gloo group, the broadcasts) is real, on one CPU rank.
"""
import queue
import threading
import time

import pytest
import torch.distributed as dist

from tests.conftest import ROOT, deepspeed_launch
from train.run import cluster
from train.input.prefetch import Prefetch, PrefetchError

PRETRAIN = ROOT / "train/pretrain.py"


class FakeCudaAccelerator:
    """DeepSpeed's accelerator interface as a GPU node presents it; records the calls."""

    def __init__(self, calls: list):
        self.calls = calls

    def device_name(self, index=None):
        return "cuda" if index is None else f"cuda:{index}"

    def set_device(self, index):
        self.calls.append(("set_device", index))


def test_start_run_binds_the_process_to_its_local_device_before_the_process_group(one_rank, monkeypatch):
    """On a GPU node rank r of a node must use cuda:LOCAL_RANK before any collective; DeepSpeed's
    init_distributed does not set it, and NCCL then refuses a tensor on cuda:0. Accelerator mocked."""
    import deepspeed
    import deepspeed.accelerator

    from train.run import runner
    calls: list = []
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeCudaAccelerator(calls))

    def init_distributed(**kwargs):
        calls.append("init_process_group")
        dist.init_process_group("gloo")
    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    assert runner.start_run(seed=1) == (0, 1)
    assert calls[:2] == [("set_device", 3), "init_process_group"], calls


def test_object_messages_travel_on_the_host_group_when_the_backend_is_nccl(one_rank, monkeypatch, tmp_path):
    """Every object collective before and around the engine (the data verdict, the shard index, the
    export's fallback verdict, start-up checks) uses the gloo group, not the NCCL default group."""
    from train.run import rank_zero_data
    dist.init_process_group("gloo")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    cluster.open_host_group()
    host = cluster.host_group()
    assert host is not None  # a gloo group beside "NCCL"
    groups = []
    real = dist.broadcast_object_list

    def recording(objects, src=0, group=None, **kwargs):
        groups.append(group)
        return real(objects, src=src, group=group, **kwargs)
    monkeypatch.setattr(dist, "broadcast_object_list", recording)
    data = ROOT / "data/demo/pretrain/question_pairs.jsonl"
    rank_zero_data.validate_data([(data, "pairs", 0)], skip_bad_lines=False)
    rank_zero_data.shared_index(tmp_path / "index")(0, data, 1 << 20)
    assert cluster.from_rank_zero(lambda: 42) == 42
    assert len(groups) == 3 and all(g is host for g in groups), groups
    gathered = []

    def other_rank_fails(out, obj, group=None):  # rank 1, on another node, lacks its checkpoint file
        gathered.append(group)
        out[0], out[1] = obj, ("missing mp_rank_00_model_states.pt", "node2")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather_object", other_rank_fails)
    with pytest.raises(SystemExit) as stop:
        cluster.agree(lambda: "fine on this rank", "--resume")
    assert "--resume failed on 1 of 2 ranks; every rank stops" in str(stop.value)
    assert "rank 1 (node2): missing mp_rank_00_model_states.pt" in str(stop.value)
    assert gathered == [host]


@pytest.mark.parametrize("env, address, problem", [
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1"}, "127.0.1.1", True),
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1", "GLOO_SOCKET_IFNAME": "eth0"}, "127.0.1.1", False),
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1"}, "10.0.0.2", False),
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1"}, "127.0.1.1", False),  # one node
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}, "127.0.1.1", False),  # nodes on one host
])
def test_gloo_on_a_loopback_hostname_across_nodes_is_named_with_what_to_set(env, address, problem):
    def resolve(name):
        return {"node1": address}.get(name, name if name[0].isdigit() else "10.0.0.1")
    found = cluster.gloo_interface_problem(env, resolve=resolve, hostname="node1")
    assert bool(found) == problem, found
    if problem:
        assert "GLOO_SOCKET_IFNAME" in found and "127.0.1.1" in found and "'node1'" in found


def test_a_base_exception_in_the_prefetch_thread_reaches_the_consumer():
    """A SystemExit (or KeyboardInterrupt) in the thread used to end it silently, leaving the step
    waiting in queue.get() forever."""
    def prepare(batch):
        if batch == [3]:
            raise SystemExit("tokenizer gave up")
        return batch
    reader = Prefetch(lambda position: iter([[1], [2], [3], [4]]), {"epoch": 0}, depth=2, prepare=prepare)
    got: queue.Queue = queue.Queue()

    def consume():
        try:
            got.put([next(reader), next(reader)])
            next(reader)
        except BaseException as e:  # noqa: BLE001 - what the consumer sees is the point
            got.put(e)
    threading.Thread(target=consume, daemon=True).start()
    assert got.get(timeout=10) == [[1], [2]]
    error = got.get(timeout=10)
    reader.close()
    assert isinstance(error, PrefetchError) and "SystemExit in the prefetch thread: tokenizer gave up" in str(error)


def test_an_input_failure_on_one_rank_stops_every_rank_with_the_steps_trained_saved(tiny_model, tmp_path):
    """An out-of-memory in rank 1's prefetch thread (not a data error) used to end rank 1 alone; now
    every rank stops with the same message, after a checkpoint of the last completed step."""
    out = tmp_path / "o"
    started = time.time()
    proc = deepspeed_launch(PRETRAIN, "--model", str(tiny_model), "--output-dir", str(out), "--train-data",
                            str(ROOT / "data/demo/pretrain/question_pairs.jsonl"), "--batch-size", "4", "--max-steps", "12",
                            "--save-steps", "100", env={"CONAN_TEST_FAULTS": "oom@1:6"}, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.time() - started < 180
    assert text.count("input error on rank 1: MemoryError: injected: out of memory while tokenizing") == 2, text[-3000:]
    assert text.count("saved step 5; continue with --resume auto") == 2 and "--skip-bad-lines" not in text
    assert "Traceback" not in text
    from train.run.checkpoint import latest_checkpoint
    assert latest_checkpoint(out / "checkpoints") == "step5"
