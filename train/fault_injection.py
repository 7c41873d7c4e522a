"""Test-only fault injection: the single seam the reliability tests use to break a run on purpose.

Production runs never set CONAN_TEST_FAULTS, and then nothing here fires. The variable is a
comma-separated list:

    kill@R:A          SIGKILL rank R at its A-th step attempt (a kill mid-run)
    nan@R:A           rank R's loss is NaN at its A-th step attempt
    no_zero_to_fp32   the fp32 reconstruction from the checkpoint fails (the export must fall back)
    oom@R:B           rank R's prefetch thread raises MemoryError while preparing its B-th batch
    exit@R:B          rank R's prefetch thread raises SystemExit (a BaseException) at its B-th batch
    slow_export:S     rank 0 takes S seconds longer to write the release (a large model on a slow disk)
"""
from __future__ import annotations

import os
import signal
import time

import torch

ENV = "CONAN_TEST_FAULTS"


def fault(name: str, rank: int | None = None, attempt: int | None = None) -> bool:
    """Whether the named fault is switched on (for this rank and step attempt, if given)."""
    wanted = {f.strip() for f in os.environ.get(ENV, "").split(",") if f.strip()}
    return (name if rank is None else f"{name}@{rank}:{attempt}") in wanted


def at_step(attempt: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
    """Called once per step attempt with the loss about to be checked and stepped."""
    if fault("kill", rank, attempt):
        os.kill(os.getpid(), signal.SIGKILL)
    if fault("nan", rank, attempt):
        return loss * float("nan")
    return loss


def in_prefetch(batch: int) -> None:
    """Called by the prefetch thread before preparing its `batch`-th batch (1-based)."""
    rank = int(os.environ.get("RANK", 0))
    if fault("oom", rank, batch):
        raise MemoryError("injected: out of memory while tokenizing")
    if fault("exit", rank, batch):
        raise SystemExit("injected: the prefetch thread exited")


def while_exporting() -> None:
    """Called by rank 0 before it writes the release."""
    wanted = [f.strip() for f in os.environ.get(ENV, "").split(",") if f.strip().startswith("slow_export:")]
    for f in wanted:
        time.sleep(float(f.split(":", 1)[1]))
