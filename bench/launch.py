"""One way to run a training script as a bench row: torchrun on local ranks, offline, the repo
importable, its log kept beside the results, and what it did read from the file it wrote
(OUTPUT_DIR/summary.json: steps, examples, tokens, seconds, shares, false negatives, mining,
peak memory), never parsed from its printed output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# a CPU row stays on the CPU on a GPU machine too: DeepSpeed would pick CUDA there (on one GPU the second
# rank binds cuda:1, which does not exist; on two, --precision auto turns bf16)
CPU_ONLY = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


def script_env(threads: int | None = 1) -> dict:
    """Offline, this checkout's packages first, and either a CPU run with `threads` per rank, pinned to
    the CPU accelerator, or (threads None) a GPU run: the device and threads left to the launcher."""
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            **({"OMP_NUM_THREADS": str(threads), **CPU_ONLY} if threads else {}),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def train(script: str, args: list[str], output_dir: Path, log: Path, ranks: int = 2, threads: int | None = 1,
          timeout: int | None = None) -> dict:
    """Run train/pretrain.py or train/finetune.py (`script`) with `args` and --output-dir `output_dir` on
    `ranks` local ranks; returns its summary.json. A failed run stops the bench, naming its log."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port",
           str(29300 + os.getpid() % 500), str(ROOT / script), *args, "--output-dir", str(output_dir)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=script_env(threads), stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    summary = Path(output_dir) / "summary.json"
    if code or not summary.is_file():
        raise SystemExit(f"{script} failed ({code}); see {log}")
    return json.loads(summary.read_text())
