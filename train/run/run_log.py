"""What a run tells: the progress bar, TensorBoard scalars, the logged means of the losses, where the
time went (input, forward, backward, step, mining) and, at the end, OUTPUT_DIR/summary.json, the
file benches and users read to learn what a run did (steps, examples, tokens, seconds, shares, false
negatives, replaced negatives, peak memory)."""
from __future__ import annotations

import json
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from train.losses.distributed import gather_seconds


class RunLog:
    """Logs and timings of one rank (rank 0 writes and prints); `record` and `log` are per step."""

    def __init__(self, out_dir: Path, metrics: list[str], total_steps: int, step: int, desc: str, device,
                 log_steps: int, control_group=None):
        self.out_dir, self.metrics, self.log_steps, self.control = out_dir, list(metrics), log_steps, control_group
        self.rank = dist.get_rank()
        self.on_gpu = torch.device(device).type == "cuda"
        # per metric: sum of values and of weights since the last log, kept on the device: no sync per step
        self._sums = torch.zeros(2 * len(self.metrics), dtype=torch.float64, device=device)
        self._tokens, self._t_log = 0, time.time()
        # time spent waiting for data, against the whole time since the first fetch (the input share)
        self.input_s, self._t_first_fetch, self._t_train_end = 0.0, None, None
        self.tokens_total, self.timings = 0, {}
        self._warm = None  # (time, tokens, step) when this process's first step ended: the steady rate leaves out warm-up
        self.writer = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out_dir / "runs"))
        self.bar = tqdm(total=total_steps, initial=step, disable=self.rank != 0, desc=desc, dynamic_ncols=True)
        self.stats: dict = {}

    def say(self, message: str) -> None:
        if self.rank == 0:
            self.bar.write(message)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer:
            self.writer.add_scalar(name, value, step)

    def record(self, metric: str, value: torch.Tensor, weight: float = 1.0, tokens: int = 0) -> None:
        """Add to a logged mean: value * weight over weight, summed over ranks and steps until the next log."""
        i = self.metrics.index(metric)
        self._sums[i] += value.detach().double() * weight
        self._sums[len(self.metrics) + i] += weight
        self._tokens += tokens
        self.tokens_total += tokens

    def fetch_started(self) -> float:
        started = time.perf_counter()
        self._t_first_fetch = self._t_first_fetch or started
        return started

    def fetch_ended(self, started: float) -> None:
        self.input_s += time.perf_counter() - started

    def step_ended(self, step: int, lr: float, last: bool) -> None:
        """After each optimizer step: the warm-up mark, the periodic log, the bar."""
        if self._warm is None:
            self._warm = (self.device_synced_time(), self.tokens_total, step)
        if step % self.log_steps == 0 or last:
            self._log(step, lr)
        self.bar.update(1)

    @contextmanager
    def timed(self, name: str, device_work: bool = False):
        """Add the block's wall time to `timings[name]` (reported with the input share at the end).
        A block of `device_work` is timed on CPU only: on a GPU its wall time would be the kernel
        launches, and syncing to time it would slow the step it measures."""
        if device_work and self.on_gpu:
            yield
            return
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started

    def _log(self, step: int, lr: float) -> None:
        sums = self._sums.clone()
        tokens = torch.tensor([float(self._tokens)], dtype=torch.float64, device=sums.device)
        both = torch.cat([sums, tokens])
        dist.all_reduce(both)
        n = len(self.metrics)
        means = {m: (both[i] / both[n + i]).item() for i, m in enumerate(self.metrics) if both[n + i] > 0}
        tok_s = both[-1].item() / max(time.time() - self._t_log, 1e-9)
        if self.writer:
            self.bar.set_postfix({**{m: f"{v:.4f}" for m, v in means.items()}, "lr": f"{lr:.2e}", "tok_s": f"{tok_s:,.0f}"})
            for m, v in means.items():
                self.writer.add_scalar(f"loss/{m}", v, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/tokens_per_s", tok_s, step)
            self.writer.add_scalar("train/input_share", self.input_share, step)
        self._sums.zero_()
        self._tokens, self._t_log = 0, time.time()

    @property
    def input_share(self) -> float:
        """The fraction of the time since the first step that this rank waited for its data."""
        if self._t_first_fetch is None:
            return 0.0
        end = self._t_train_end or time.perf_counter()
        return self.input_s / max(end - self._t_first_fetch, 1e-9)

    def device_synced_time(self) -> float:
        """The wall clock once the device has finished the queued work (kernels run behind the host)."""
        if self.on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter()

    def training_ended(self, step: int) -> dict:
        """Steps, training seconds, non-padding tokens of all ranks, rank 0's input and timed shares
        and its peak resident (and GPU) memory; `warm_*`: the same after the first step, whose
        compilation and allocator warm-up are not the steady rate (a collective: every rank calls it)."""
        self._t_train_end = end = self.device_synced_time()  # the shares are of the training time, not the export's
        self.bar.close()
        warm_t, warm_tokens, warm_step = self._warm or (end, self.tokens_total, step)
        tokens = torch.tensor([float(self.tokens_total), float(self.tokens_total - warm_tokens)], dtype=torch.float64)
        dist.all_reduce(tokens, group=self.control)
        seconds = end - (self._t_first_fetch or end)
        self.stats = {
            "steps": step, "seconds": round(seconds, 3), "tokens": int(tokens[0].item()),
            "warm_steps": step - warm_step, "warm_seconds": round(end - warm_t, 3),
            "warm_tokens": int(tokens[1].item()), "input_share": round(self.input_share, 4),
            "input_seconds": round(self.input_s, 3),
            **{f"{k}_share": round(v / max(seconds, 1e-9), 4) for k, v in self.timings.items()},
            **({"gather_share": round(gather_seconds() / max(seconds, 1e-9), 4)} if not self.on_gpu else {}),
            **({"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if self.on_gpu else {}),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        mine = {k: v for k, v in self.stats.items() if k.startswith("peak_")}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine, group=self.control)
        for key in mine:  # every rank's peak: ZeRO-3 and offload differ between ranks, and rank 0 exports
            self.stats[f"{key}_per_rank"] = [e[key] for e in everyone]
        return self.stats

    def write_summary(self, **facts) -> Path | None:
        """OUTPUT_DIR/summary.json (rank 0): the end-of-training figures and what the script adds."""
        if self.rank != 0:
            return None
        path = self.out_dir / "summary.json"
        path.write_text(json.dumps({**self.stats, **facts}, indent=1) + "\n")
        return path

    def close(self) -> None:
        self.bar.close()
        if self.writer:
            self.writer.close()
