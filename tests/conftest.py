import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
# The suite runs on the CPU on any machine, this process and every rank it starts: on a GPU machine
# DeepSpeed would pick CUDA (on one GPU rank 1 binds cuda:1, which does not exist; on two, --precision
# auto turns bf16 against the fp32 tolerances asserted here). Set before torch is imported anywhere.
# The deepspeed launcher gives its ranks CUDA_VISIBLE_DEVICES again; DS_ACCELERATOR=cpu still holds
# there, and the code follows DeepSpeed's accelerator, never torch.cuda.is_available().
from bench.launch import CPU_ONLY  # noqa: E402

os.environ.update(CPU_ONLY)
# one thread per rank on 2 cores, no hub, and this checkout's packages first (whatever `pip install -e` points at)
RANK_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **CPU_ONLY,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def launch(script: str | Path, *args: str, nproc: int = 2, timeout: int = 600, check: bool = True,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a script on `nproc` CPU ranks (torchrun, gloo), one thread each."""
    full_env = {**os.environ, **RANK_ENV, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_port", str(29500 + os.getpid() % 1000), str(script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def deepspeed_launch(script: str | Path, *args: str, num_gpus: int = 2, timeout: int = 600,
                     check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N script ...`, exactly as a user runs it (CPU ranks here)."""
    env = {**os.environ, **RANK_ENV, **(env or {})}
    cmd = ["deepspeed", "--num_gpus", str(num_gpus), "--master_port", str(29500 + os.getpid() % 1000),
           str(script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def one_rank(monkeypatch):
    """A one-rank process group's environment in this process (the test calls init_process_group with the
    backend it needs); the group and the project's host groups are torn down after the test."""
    import torch.distributed as dist

    from train.run import cluster
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29000 + os.getpid() % 1000))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    cluster._HOST_GROUP[0] = cluster._PATIENT_GROUP[0] = None


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from bench.tiny_model import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def can_simulate_nodes() -> bool:
    """Two "nodes" on this machine need mount namespaces: root and util-linux's unshare."""
    import shutil
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def launch_nodes(script: str | Path, *args: str, nodes: int = 2, nproc: int = 1, mount: tuple[Path, list[Path]] | None = None,
                 timeout: int = 600, env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """A cluster on one machine: `nodes` torchrun agents (--nnodes, --node-rank) against one rendezvous on
    localhost, `nproc` CPU ranks each. With `mount` = (path, [disk of node 0, disk of node 1, ...]) each node
    runs in its own mount namespace with its own disk bound at `path`: the same path, a different disk per
    node, as node-local NVMe is on a cluster. Returns each node's completed process."""
    full_env = {**os.environ, **RANK_ENV, "PYTHONUNBUFFERED": "1", **(env or {})}
    port = str(29500 + (os.getpid() + 500) % 1000)
    procs = []
    for node in range(nodes):
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={nproc}",
                    f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}", str(script), *args]
        if mount:
            path, disks = mount
            Path(path).mkdir(parents=True, exist_ok=True)
            Path(disks[node]).mkdir(parents=True, exist_ok=True)
            inner = f'mount --bind "{disks[node]}" "{path}" && exec "$@"'
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", inner, "node", *torchrun]
        else:
            cmd = torchrun
        files = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # not pipes: one node must not block the other
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=files[0], stderr=files[1], text=True), files))
    results = []
    for p, (out, err) in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            raise
        out.seek(0)
        err.seek(0)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read()))
    return results
