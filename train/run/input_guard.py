"""The all-ranks rule for the input: a bad line met on any rank (tasks held by one rank read data the
others never see), or any other failure of the input (the prefetch thread's tokenizer, its memory),
stops every rank the same way, with the steps already trained saved."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from train.run.checkpoint import Checkpoints
from train.input.records import DataError


def read_or_stop(read: Callable, step: int, engine, checkpoints: Checkpoints, client_state: Callable[[], dict],
                 undo: Callable[[], None] | None, control_group, before_exit: Callable[[], None]):
    """`read()` this rank's data for the step, before any forward. If any rank failed: `undo()` puts every
    rank's data position back to the last completed step, a checkpoint is saved there, and every rank
    exits with the same message, so `--resume auto` (with --skip-bad-lines for a bad line) continues
    with no example lost or repeated. One flag all-reduce per step on the host group when all is well."""
    error = None
    try:
        data = read()
    except DataError as e:
        error, data = f"data error: {e}", None
    except Exception as e:  # not the data: the same stop on every rank, the steps trained kept
        error, data = f"input error on rank {dist.get_rank()}: {type(e).__name__}: {e}", None
    flag = torch.tensor([0.0 if error is None else 1.0])
    dist.all_reduce(flag, group=control_group)
    if not flag.item():
        return data
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=control_group)
    message = next(e for e in errors if e)
    if undo:
        undo()
    checkpoints.save_unless_saved(engine, step, client_state())
    data_error = message.startswith("data error")
    if step:
        saved = f"saved step {step}; continue with --resume auto" + (" --skip-bad-lines" if data_error else "")
    else:
        saved = "no step was completed" + ("; pass --skip-bad-lines to skip and count such lines" if data_error else "")
    before_exit()
    raise SystemExit(f"{message}\n({saved})")
