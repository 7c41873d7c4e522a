import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
# one thread per rank on 2 cores, no hub, and this checkout's packages first (whatever `pip install -e` points at)
RANK_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tests.tiny_model import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
