"""The guarded optimizer step: a NaN or Inf loss on any rank skips the step on every rank together
(one all-reduce of a flag), and after --max-bad-steps such losses in a row the run stops, naming the
step and the batch. The fault-injection seam (train/fault_injection.py) sits at its door."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from train import fault_injection
from train.models.model import densify_embedding_gradients


def finite_on_all_ranks(loss: torch.Tensor) -> bool:
    """False if the loss is NaN or Inf on any rank (one all-reduce of a flag): then every rank skips the step."""
    flag = torch.isfinite(loss.detach()).all().float().reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class StepGuard:
    def __init__(self, engine, max_bad_steps: int, timed: Callable, say: Callable[[str], None]):
        self.engine, self.max_bad_steps, self.timed, self.say = engine, max_bad_steps, timed, say
        self.rank = dist.get_rank()
        self.attempt = self.bad_in_a_row = self.skipped_steps = 0

    def optimize(self, loss: torch.Tensor, step: int, sources: list[str], backward: Callable | None = None) -> bool:
        """Backward and optimizer step for step `step + 1`; False (and nothing stepped, on any rank) if the
        loss is NaN/Inf on some rank. `backward(loss)` replaces engine.backward (GradCache's)."""
        self.attempt += 1
        loss = fault_injection.at_step(self.attempt, self.rank, loss)
        if not finite_on_all_ranks(loss):
            self.bad_in_a_row, self.skipped_steps = self.bad_in_a_row + 1, self.skipped_steps + 1
            if self.bad_in_a_row >= self.max_bad_steps:
                raise SystemExit(f"loss is NaN or Inf for {self.bad_in_a_row} batches in a row (step {step + 1}); "
                                 f"this rank's last batch: {', '.join(sources[:20])}")
            self.say(f"step {step + 1}: NaN/Inf loss, step skipped on all ranks ({self.skipped_steps} so far)")
            return False
        self.bad_in_a_row = 0
        with self.timed("backward", device_work=True):  # with ZeRO, the gradient reduction overlaps it
            (backward or self.engine.backward)(loss)
            densify_embedding_gradients(self.engine.module)  # where they stayed sparse through the all-reduce
        with self.timed("step", device_work=True):  # the optimizer, and ZeRO's gather of updated weights
            self.engine.step()
        return True
