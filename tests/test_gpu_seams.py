"""What only a GPU machine would show, tested here at one seam each (issue: the first GPU run must work).

No GPU runs here. Each test names the seam it mocks: DeepSpeed's accelerator (a fake that says
"cuda"), the device a rank trains on (cluster.run_device, "meta" standing for cuda:N), a process group
whose backend carries no CPU tensors ("cuda:gloo", as NCCL), torch.cuda's answers, or a CUDA
out-of-memory error. Everything else is real.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from tests.conftest import RANK_ENV, ROOT, launch


class FakeCudaAccelerator:
    """DeepSpeed's accelerator as a GPU node presents it."""

    def device_name(self, index=None):
        return "cuda" if index is None else f"cuda:{index}"


def on_a_gpu_accelerator(monkeypatch):
    import deepspeed.accelerator
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeCudaAccelerator())


# --- ZeRO-3 placement ------------------------------------------------------------------------------

def test_zero3_backbone_is_only_ever_moved_to_the_ranks_gpu(tiny_model, tmp_path):
    """Under ZeRO-3 DeepSpeed never moves the model (built inside zero.Init), so sentence-transformers must
    be given the rank's device: loaded "on the CPU", every buffer (BERT's position_ids) and every weight
    placeholder lands on the CPU and the first forward on a GPU fails (cuda:N vs cpu). Seams: run_device
    and SentenceTransformer.to (tests/workers/zero3_placement.py); the expansion layer moves nothing."""
    launch(ROOT / "tests/workers/zero3_placement.py", str(tiny_model), str(tmp_path / "out.json"), nproc=1)
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["zero3_parameters"] == result["parameters"] - 2 > 0  # built partitioned; + the layer's 2
    assert result["expansion"] == 64
    assert result["moves_at_load"] and set(result["moves_at_load"]) == {"cuda:3"}, result
    assert result["moves_at_expansion"] == [], result


class FakeEngine:
    def __init__(self, module, device="cpu", offload_param=None):
        self.module, self.device, self.offload = module, torch.device(device), offload_param

    def zero_offload_param(self):  # as DeepSpeed's engine parses it (None: no parameter offload)
        from types import SimpleNamespace
        return SimpleNamespace(device=self.offload) if self.offload else None


def test_placement_check_names_each_tensor_off_the_engines_device():
    from train.run.placement import refuse_misplaced
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    model.register_buffer("position_ids", torch.arange(10, device="meta"))
    model[1].weight = torch.nn.Parameter(torch.empty(4, 4, device="meta"))
    with pytest.raises(SystemExit) as stop:
        refuse_misplaced(FakeEngine(model))
    message = str(stop.value)
    assert "placement error: 2 tensors are not on cpu" in message
    assert "1.weight on meta" in message and "position_ids (buffer) on meta" in message
    refuse_misplaced(FakeEngine(torch.nn.Linear(2, 2)))  # all on the device: nothing said


def test_placement_check_reads_zero3_placeholders_and_partitions():
    from train.run.placement import misplaced_tensors, partition_device
    weight = torch.nn.Parameter(torch.empty(0))
    weight.ds_tensor = torch.zeros(3, device="meta")  # a ZeRO-3 parameter: placeholder on cpu, partition elsewhere
    module = torch.nn.Module()
    module.weight = weight
    assert misplaced_tensors(module, torch.device("cpu"), torch.device("cpu")) == \
        ["weight (ZeRO-3 partition) on meta, expected cpu"]
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
    offload = FakeEngine(module, offload_param=OffloadDeviceEnum.cpu)
    assert partition_device(offload) == torch.device("cpu")  # offload_param keeps partitions on the host
    assert misplaced_tensors(module, torch.device("meta"), torch.device("meta")) == \
        ["weight (ZeRO-3 placeholder, where its gathered weight lands) on cpu"]


# --- GradCache on a group without CPU tensors ------------------------------------------------------

def test_gpu_grad_cache_bench_counts_mini_batches_on_the_host_group(one_rank):
    """bench/gpu_grad_cache.py on a GPU: the default group is NCCL, which refuses the CPU tensor of
    GradCache's chunk count ("No backend type associated with device type cpu"). Seam: a "cuda:gloo"
    default group, which refuses CPU tensors just as NCCL does."""
    from bench.gpu_grad_cache import grad_cache
    from train.run import cluster
    from train.step.grad_cache import carries_cpu_tensors
    dist.init_process_group("cuda:gloo")
    assert not carries_cpu_tensors()
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.zeros(1))  # the failure the seam stands for
    cluster.open_host_group()
    cache = grad_cache(FakeEngine(torch.nn.Linear(2, 2)))
    assert cache._chunk_count(10) == 3  # 10 texts in mini-batches of 4


@pytest.mark.parametrize("backend, cpu", [("gloo", True), ("nccl", False), ("cpu:gloo,cuda:nccl", True),
                                          ("cuda:gloo", False)])
def test_which_groups_carry_cpu_tensors(monkeypatch, backend, cpu):
    from train.step.grad_cache import carries_cpu_tensors
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    assert carries_cpu_tensors() is cpu


# --- the test suite on a GPU machine ---------------------------------------------------------------

def test_the_suite_and_the_cpu_benches_pin_the_cpu_accelerator():
    """README's `python -m pytest -q tests` on a GPU machine: every rank it starts must use the CPU, as here."""
    from bench.launch import script_env
    for env in (RANK_ENV, script_env(1), os.environ):
        assert env["DS_ACCELERATOR"] == "cpu" and env["CUDA_VISIBLE_DEVICES"] == "", env
    assert "DS_ACCELERATOR" not in script_env(None) or os.environ.get("DS_ACCELERATOR")  # GPU rows: the launcher's
    probe = "from deepspeed.accelerator import get_accelerator; import torch; " \
            "print(get_accelerator().device_name(), torch.cuda.is_available())"
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **RANK_ENV}, capture_output=True, text=True)
    assert out.stdout.split() == ["cpu", "False"], out.stderr[-2000:]


def test_choices_follow_the_accelerator_not_torch_cuda(monkeypatch):
    """The deepspeed launcher hands its ranks CUDA_VISIBLE_DEVICES again, so on a GPU machine torch sees
    the GPU while DeepSpeed runs on the CPU: bf16, the optimizer and the threads must follow DeepSpeed.
    Seam: torch.cuda says a bf16 GPU is there."""
    from train.run import runner
    from train.run.ds_config import build_optimizer, load_ds_config
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg = load_ds_config(ROOT / "ds_configs/zero0.json", 8, 2, 1.0, precision="auto")
    assert cfg["bf16"]["enabled"] is False
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg, 1e-3, 0.0)
    assert not optimizer.defaults.get("fused")  # torch's fused AdamW is a CUDA kernel
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(64)
        runner.set_cpu_threads()
        assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 2)
    finally:
        torch.set_num_threads(threads)


# --- start-up refusals and notes -------------------------------------------------------------------

def test_flash_attention_is_refused_at_start_up_where_it_cannot_run(monkeypatch):
    from train.run.runner import refuse_unworkable_kernel
    bf16, fp32 = {"bf16": {"enabled": True}}, {"bf16": {"enabled": False}}
    with pytest.raises(SystemExit, match="CUDA GPUs only"):
        refuse_unworkable_kernel("flash_attention_2", bf16)  # this machine: the CPU accelerator
    on_a_gpu_accelerator(monkeypatch)
    with pytest.raises(SystemExit, match="bf16 or fp16 only .* pass --precision bf16"):
        refuse_unworkable_kernel("flash_attention_2", fp32)
    refuse_unworkable_kernel("flash_attention_2", bf16)
    refuse_unworkable_kernel("sdpa", fp32)


def test_reducing_once_in_bf16_is_refused_at_start_up():
    """Inside DeepSpeed's coalesce_grad_reduction ZeRO-2/3 skip their fp32 accumulation: bf16 sums would follow."""
    from train.run.ds_config import load_ds_config, refuse_unworkable_reduce
    bf16 = load_ds_config(ROOT / "ds_configs/zero2.json", 8, 2, 1.0, precision="bf16", mini_batch=4)
    with pytest.raises(SystemExit, match="summed in bf16"):
        refuse_unworkable_reduce(bf16, 4, "once")
    refuse_unworkable_reduce(bf16, 4, "per-mini-batch")
    refuse_unworkable_reduce(load_ds_config(ROOT / "ds_configs/zero2.json", 8, 2, 1.0, precision="fp32", mini_batch=4),
                             4, "once")


def test_zero0_raised_to_zero1_for_bf16_grad_cache_is_said_and_the_resume_hint_is_true():
    from train.run.checkpoint import Checkpoints
    from train.run.ds_config import load_ds_config, setup_notes
    path = ROOT / "ds_configs/zero0.json"
    cfg = load_ds_config(path, 8, 2, 1.0, precision="bf16", mini_batch=16)
    notes = setup_notes(path, cfg, 16)
    assert len(notes) == 1 and notes[0].startswith("ZeRO-1, not the ZeRO-0 of zero0.json") and "same number of ranks" in notes[0]
    assert setup_notes(path, load_ds_config(path, 8, 2, 1.0, precision="fp32", mini_batch=16), 16) == []
    checkpoints = Checkpoints.__new__(Checkpoints)  # the refusal alone: no process group needed
    checkpoints.world, checkpoints.shape = 4, {"global_batch": 32, "world": 4}
    saved = {"world": 2, "global_batch": 32, "zero_stage": 1}
    raised = checkpoints.shape_refusal(saved, 1, fp32_accumulation=True)
    assert "resume on 2 ranks" in raised and "--precision fp32 or without --mini-batch" in raised
    assert "train under ds_configs/zero0.json, which any number" not in raised
    assert "train under ds_configs/zero0.json" in checkpoints.shape_refusal(saved, 1, fp32_accumulation=False)


# --- the export check on the engine's device -------------------------------------------------------

def test_export_check_runs_on_the_engines_device_and_falls_back_to_every_core(monkeypatch, tmp_path):
    """A large row's rank 0 encoded the probes in fp32 and bf16 on one CPU thread (torchrun's
    OMP_NUM_THREADS=1 with several ranks); the check now runs on the engine's device, and where the
    release does not fit there, on the CPU with every core. Seam: a CUDA out-of-memory error."""
    from train.run import export
    asked, threads = [], []

    def encode_check(final_dir, texts, prompt, reference, bf16, length, device):
        asked.append(device)
        threads.append(torch.get_num_threads())
        if device != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory (mocked)")
        return 0.0, 1e-4, 512
    monkeypatch.setattr(export, "_encode_check", encode_check)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with export.all_cores():
            export.check_export(tmp_path / "final", ["a"], "", torch.zeros(1, 4), bf16=True, train_max_length=32,
                                device="cuda:0")
        assert torch.get_num_threads() == 1  # restored
    finally:
        torch.set_num_threads(before)
    assert asked == ["cuda:0", "cpu"]
    assert threads[-1] == len(os.sched_getaffinity(0))
    assert torch.load(tmp_path / "export_check.pt")["max_abs_diff"] == 0.0


# --- a build lock left by a killed run -------------------------------------------------------------

def test_a_stale_extension_build_lock_is_said_and_stops_the_run_naming_it(tmp_path):
    """A run killed while DeepSpeed JIT-compiled cpu_adam left torch's lock file; every later run waited in
    torch's FileBaton.wait, silently, forever. Now: a message while waiting, then a stop naming the file."""
    lock = tmp_path / "ext/cpu_adam/lock"
    lock.parent.mkdir(parents=True)
    lock.touch()  # as a SIGKILLed build leaves it; no process holds it
    probe = ("import torch; from train.run.ds_config import build_optimizer; "
             "build_optimizer([torch.nn.Parameter(torch.zeros(2))], {}, 1e-3, 0.0)")
    env = {**os.environ, **RANK_ENV, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "CONAN_EXTENSION_LOCK_TIMEOUT": "2"}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"waiting 0 s for torch's extension build lock {lock}" in proc.stdout
    assert "no process on this machine holds it" in proc.stdout
    assert f"rm {lock}" in proc.stderr and "Traceback" not in proc.stderr
    assert lock.exists()  # never deleted by the run


def test_a_build_in_progress_is_waited_for_past_the_timeout(tmp_path):
    """The bound counts only time with no holder: a rank building right now (here, this process holding
    the lock open, as torch does) is waited for, and the wait returns once the lock goes."""
    import threading

    from train.run.op_build import lock_holders, wait_for_lock
    lock = tmp_path / "lock"
    held = open(lock, "w")
    assert lock_holders(str(lock)) == [os.getpid()]
    release = threading.Timer(1.5, lambda: (held.close(), lock.unlink()))
    release.start()
    wait_for_lock(str(lock), timeout_s=0.2, every_s=0.5)  # returns: held, then gone
    assert not lock.exists()
