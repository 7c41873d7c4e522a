"""Checkpoints that a kill cannot corrupt: DeepSpeed's state, every rank's RNG, then a marker.

A checkpoint counts only once its `complete` marker exists (written last, after a barrier), so a
run killed mid-save resumes from the previous one. DeepSpeed's own `latest` file is not trusted:
it is written before the save has finished.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def complete_checkpoints(ckpt_dir: Path) -> list[str]:
    """Tags of the checkpoints whose save finished (marker written last), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [d.name for d in ckpt_dir.iterdir() if d.is_dir() and (d / "complete").is_file()]
    return sorted(tags, key=lambda t: int(t.removeprefix("step")) if t.removeprefix("step").isdigit() else -1)


def latest_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint."""
    tags = complete_checkpoints(ckpt_dir)
    return tags[-1] if tags else None


def save_checkpoint(engine, ckpt_dir: Path, tag: str, client_state: dict, keep: int = 0) -> None:
    """DeepSpeed checkpoint + every rank's RNG states, then a 'complete' marker; keeps the newest `keep`."""
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    torch.save(rng_states(), ckpt_dir / tag / f"rng_rank{engine.global_rank}.pt")
    dist.barrier()
    if engine.global_rank == 0:
        (ckpt_dir / tag / "complete").write_text("ok\n")
        if keep > 0:
            for old in complete_checkpoints(ckpt_dir)[:-keep]:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng_states(ckpt_dir: Path, tag: str, rank: int) -> None:
    """Put back this rank's RNG states (dropout, sampling) as they were when the checkpoint was saved."""
    path = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if not path.is_file():
        raise SystemExit(f"--resume: {path} is missing: the checkpoint was saved with another number of ranks")
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume(engine, ckpt_dir: Path, resume_arg: str | None) -> dict | None:
    """Load the checkpoint named by --resume ('auto': the newest complete one); returns its client state."""
    if not resume_arg:
        return None
    if resume_arg == "auto":
        tag = latest_checkpoint(ckpt_dir)
        if tag is None:
            return None  # nothing saved yet: a fresh start
        load_dir = ckpt_dir
    else:
        path = Path(resume_arg)
        if not (path / "complete").is_file():
            raise SystemExit(f"--resume {path}: not a complete checkpoint (no 'complete' marker)")
        load_dir, tag = path.parent, path.name
    _, client = engine.load_checkpoint(str(load_dir), tag=tag)
    restore_rng_states(load_dir, tag, engine.global_rank)
    if engine.global_rank == 0:
        print(f"resumed from {load_dir / tag} at step {client['step']}")
    return client
