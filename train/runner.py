"""What both training loops share that is not the maths (nanoGPT keeps this inline; two loops made
it worth one place): process setup, the engine, the guarded optimizer step, logging, checkpoints,
stopping, and the release export.

    rank, world = start_run(seed, timeout)
    engine, scheduler = build_engine(model, args, micro_batch, world, total_steps)
    run = Run(engine, scheduler, args, total_steps, metrics=["loss"], client=resume(...))
    while not run.done:
        loss = ...                                  # the script's maths
        if run.optimize(loss, sources):             # NaN/Inf on any rank: every rank skips the step
            run.record("loss", loss); run.after_step(sources, client_state)
    run.export(...); end_run()
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import fault_injection
from .cluster import agree, bind_device, host_barrier, host_group, local_rank, open_host_group, refuse_unreachable_gloo
from .checkpoint import Checkpoints
from .data import DataError
from .distributed import all_reduce_sum
from .ds_config import build_optimizer, load_ds_config, reduces_sparse_gradients
from .export import check_export, export_sentence_transformer, fp32_weights
from .model import densify_embedding_gradients


def set_cpu_threads() -> None:
    """On CPU, share the cores between the local ranks instead of oversubscribing them."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_run(seed: int, timeout_minutes: float = 30) -> tuple[int, int]:
    """CPU threads, this process's device, the process group (DeepSpeed picks nccl or gloo), the
    host-side gloo group, seeds; returns (rank, world). train/cluster.py says why each is needed.

    The timeout bounds how long a collective waits for a rank that died (the launchers also stop
    every rank when one exits, on one node).
    """
    import deepspeed
    set_cpu_threads()
    bind_device()  # before any collective: NCCL and every object collective use the current device
    deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes))
    refuse_unreachable_gloo()
    open_host_group()
    seed_everything(seed)
    return dist.get_rank(), dist.get_world_size()


def local_rank_zero_first(fn, *args, **kwargs):
    """fn(...) on each node's local rank 0 first (it may build the offline model copy), then the rest.
    A failure on any rank (a model folder missing on one node) stops every rank with its message."""
    def attempt() -> Callable[[], object]:
        try:
            value = fn(*args, **kwargs)
            return lambda: value
        except (Exception, SystemExit) as e:
            def fail(error=e):
                raise error
            return fail
    outcome = attempt() if local_rank() == 0 else None
    host_barrier()
    outcome = outcome or attempt()
    return agree(outcome, "loading the model")


def end_run() -> None:
    """Leave together and exit now: a ZeRO-3 run resumed from a checkpoint can otherwise abort in
    interpreter teardown and turn a finished run into a failed one."""
    host_barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def finite_on_all_ranks(loss: torch.Tensor) -> bool:
    """False if the loss is NaN or Inf on any rank (one all-reduce of a flag): then every rank skips the step."""
    flag = torch.isfinite(loss.detach()).all().float().reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def use_sparse_embedding_gradients(model, ds_config: dict) -> int:
    """Embedding gradients of the used rows only (train/model.py's sparse_embedding_gradients), made dense
    once per backward, or, where this DeepSpeed config all-reduces sparse gradients, after the all-reduce.
    Before deepspeed.initialize: the densifying hook must run before ZeRO's own."""
    from .model import sparse_embedding_gradients
    return sparse_embedding_gradients(model, dense_on_accumulate=not reduces_sparse_gradients(ds_config))


def build_engine(model, args, micro_batch: int, world: int, total_steps: int):
    """DeepSpeed engine and LR schedule (linear warmup and decay, every group alike) from the shared flags."""
    import deepspeed
    from transformers import get_linear_schedule_with_warmup

    from .model import parameter_groups
    ds_config = load_ds_config(args.deepspeed_config, micro_batch, world, args.max_grad_norm, args.precision,
                               args.checkpoint_storage, args.mini_batch)
    bf16 = ds_config["bf16"]["enabled"]
    if args.model_dtype != "float32" and not bf16:
        raise SystemExit(f"--model-dtype {args.model_dtype} without --precision bf16: the optimizer would update "
                         f"{args.model_dtype} weights directly and small updates round away; pass --precision bf16 "
                         f"(fp32 master weights in the optimizer) or --model-dtype float32")
    use_sparse_embedding_gradients(model, ds_config)
    groups = parameter_groups(model, args.lr, getattr(args, "expansion_lr", None))
    optimizer = build_optimizer(groups, ds_config, args.lr, args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    return engine, scheduler


class Run:
    """The state of a training run around the maths: step counter, bad-step guard, logs, checkpoints."""

    def __init__(self, engine, scheduler, args, total_steps: int, metrics: list[str], desc: str,
                 checkpoints: Checkpoints, client: dict | None = None):
        self.engine, self.scheduler, self.args, self.checkpoints = engine, scheduler, args, checkpoints
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.on_gpu = torch.device(engine.device).type == "cuda"
        self.is_main = self.rank == 0
        self.out_dir = Path(args.output_dir)
        self.total_steps, self.metrics = total_steps, list(metrics)
        self.step = client["step"] if client else 0
        self.attempt = self.bad_in_a_row = self.skipped_steps = 0
        # per metric: sum of values and of weights since the last log, kept on the device: no sync per step
        self._sums = torch.zeros(2 * len(self.metrics), dtype=torch.float64, device=engine.device)
        self._tokens, self._t_log = 0, time.time()
        # time spent waiting for data, against the whole time since the first fetch (the input share)
        self.input_s, self._t_first_fetch, self._t_train_end = 0.0, None, None
        self.tokens_total, self.timings = 0, {}  # for the end-of-run figures (bench/throughput.py reads them)
        self._warm = None  # (time, tokens, step) when this process's first step ended: the steady rate leaves out warm-up
        self.writer = None
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out_dir / "runs"))
        self.bar = tqdm(total=total_steps, initial=self.step, disable=not self.is_main, desc=desc, dynamic_ncols=True)
        self.trace = self._open_trace() if args.trace_examples else None
        # control messages (a data error on some rank) go over gloo on the host: no device sync per step
        self.control = host_group()
        engine.train()

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def say(self, message: str) -> None:
        if self.is_main:
            self.bar.write(message)

    def fetch(self, read: Callable, client_state: Callable[[], dict], undo: Callable[[], None] | None = None):
        """`read()` this rank's data for the step, before any forward. A bad line met on any rank
        (tasks held by one rank read data the others never see), or any other failure of the input
        (the prefetch thread's tokenizer, its memory), stops every rank the same way: `undo()` puts
        every rank's data position back to the last completed step, a checkpoint is saved there, and
        every rank exits with the same message, so `--resume auto` (with --skip-bad-lines for a bad
        line) continues with no example lost or repeated."""
        error, started = None, time.perf_counter()
        self._t_first_fetch = self._t_first_fetch or started
        try:
            data = read()
        except DataError as e:
            error, data = f"data error: {e}", None
        except Exception as e:  # not the data: the same stop on every rank, the steps trained kept
            error, data = f"input error on rank {self.rank}: {type(e).__name__}: {e}", None
        self.input_s += time.perf_counter() - started
        flag = torch.tensor([0.0 if error is None else 1.0])
        dist.all_reduce(flag, group=self.control)
        if not flag.item():
            return data
        errors = [None] * self.world
        dist.all_gather_object(errors, error, group=self.control)
        message = next(e for e in errors if e)
        if undo:
            undo()
        self.checkpoints.save_unless_saved(self.engine, self.step, client_state())
        data_error = message.startswith("data error")
        if self.step:
            saved = f"saved step {self.step}; continue with --resume auto" + (" --skip-bad-lines" if data_error else "")
        else:
            saved = "no step was completed" + ("; pass --skip-bad-lines to skip and count such lines" if data_error else "")
        self.close()
        raise SystemExit(f"{message}\n({saved})")

    def optimize(self, loss: torch.Tensor, sources: list[str], backward: Callable | None = None) -> bool:
        """Backward and optimizer step; False (and nothing stepped, on any rank) if the loss is NaN/Inf
        on some rank. After --max-bad-steps such losses in a row the run stops, naming the batch.
        `backward(loss)` replaces engine.backward (GradCache's)."""
        self.attempt += 1
        loss = fault_injection.at_step(self.attempt, self.rank, loss)
        if not finite_on_all_ranks(loss):
            self.bad_in_a_row, self.skipped_steps = self.bad_in_a_row + 1, self.skipped_steps + 1
            if self.bad_in_a_row >= self.args.max_bad_steps:
                raise SystemExit(f"loss is NaN or Inf for {self.bad_in_a_row} batches in a row (step {self.step + 1}); "
                                 f"this rank's last batch: {', '.join(sources[:20])}")
            self.say(f"step {self.step + 1}: NaN/Inf loss, step skipped on all ranks ({self.skipped_steps} so far)")
            return False
        self.bad_in_a_row = 0
        with self.timed("backward", device_work=True):  # with ZeRO, the gradient reduction overlaps it
            (backward or self.engine.backward)(loss)
            densify_embedding_gradients(self.engine.module)  # where they stayed sparse through the all-reduce
        with self.timed("step", device_work=True):  # the optimizer, and ZeRO's gather of updated weights
            self.engine.step()
        self.step += 1
        return True

    def grad_cache(self):
        """GradCache for --mini-batch N, or None when it is off (train/grad_cache.py)."""
        from .grad_cache import GradCache
        n = self.args.mini_batch
        return GradCache(self.engine, n, self.engine.device, self.control) if n else None

    def record(self, metric: str, value: torch.Tensor, weight: float = 1.0, tokens: int = 0) -> None:
        """Add to a logged mean: value * weight over weight, summed over ranks and steps until the next log."""
        i = self.metrics.index(metric)
        self._sums[i] += value.detach().double() * weight
        self._sums[len(self.metrics) + i] += weight
        self._tokens += tokens
        self.tokens_total += tokens

    def after_step(self, sources: list[str], client_state: Callable[[], dict]) -> None:
        """Trace, log, checkpoint; at --stop-at-step, leave as if preempted (the checkpoint is saved)."""
        if self._warm is None:
            self._warm = (self._device_synced_time(), self.tokens_total, self.step)
        if self.trace:
            self.trace.write("".join(f"{self.step}\t{s}\n" for s in sources))
            self.trace.flush()
        if self.step % self.args.log_steps == 0 or self.done:
            self._log()
        self.bar.update(1)
        stop_here = self.step == self.args.stop_at_step
        if (self.step % self.args.save_steps == 0 or stop_here) and not self.done:
            self.checkpoints.save(self.engine, f"step{self.step}", client_state())
        if stop_here and not self.done:
            self.say(f"stopped at step {self.step} (--stop-at-step); continue with --resume auto")
            self.close()
            end_run()

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

    def log_scalar(self, name: str, value: float) -> None:
        if self.writer:
            self.writer.add_scalar(name, value, self.step)

    def _log(self) -> None:
        sums = self._sums.clone()
        tokens = torch.tensor([float(self._tokens)], dtype=torch.float64, device=sums.device)
        both = torch.cat([sums, tokens])
        dist.all_reduce(both)
        n = len(self.metrics)
        means = {m: (both[i] / both[n + i]).item() for i, m in enumerate(self.metrics) if both[n + i] > 0}
        tok_s = both[-1].item() / max(time.time() - self._t_log, 1e-9)
        if self.is_main:
            lr = self.scheduler.get_last_lr()[0]
            self.bar.set_postfix({**{m: f"{v:.4f}" for m, v in means.items()}, "lr": f"{lr:.2e}", "tok_s": f"{tok_s:,.0f}"})
            for m, v in means.items():
                self.writer.add_scalar(f"loss/{m}", v, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)
            self.writer.add_scalar("train/tokens_per_s", tok_s, self.step)
            self.writer.add_scalar("train/input_share", self.input_share, self.step)
        self._sums.zero_()
        self._tokens, self._t_log = 0, time.time()

    @property
    def input_share(self) -> float:
        """The fraction of the time since the first step that this rank waited for its data."""
        if self._t_first_fetch is None:
            return 0.0
        end = self._t_train_end or time.perf_counter()
        return self.input_s / max(end - self._t_first_fetch, 1e-9)

    def _open_trace(self):
        """Which examples each step trained on; on resume cut back to the checkpoint's step."""
        path = self.out_dir / "trace" / f"rank{self.rank}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if int(line.split("\t")[0]) <= self.step] if path.is_file() else []
        path.write_text("".join(kept))
        return open(path, "a", encoding="utf-8")

    def export(self, client_state: dict, embed: Callable, probe_texts: list[str], probe_prompt: str,
               rebuild: Callable, prompts: dict[str, str]) -> Path:
        """Final checkpoint, its fp32 weights, the release folder, and the check that it encodes as the engine.

        `embed(texts, prompt)` encodes through the engine (every rank takes part: ZeRO-3 gathers
        weights in forward); `rebuild()` makes the untrained model with the same modules, on CPU.
        """
        self._t_train_end = self._device_synced_time()  # the input share is of the training time, not the export's
        stats = self.train_stats()
        self.bar.close()
        tag = f"step{self.step}"
        self.checkpoints.save(self.engine, tag, client_state)
        # on node-local disks rank 0's disk holds its own ZeRO partitions only: gather from the engine
        weights = fp32_weights(self.engine, self.checkpoints.dir, tag,
                               from_checkpoint=self.checkpoints.storage == "shared")
        self.engine.eval()
        with torch.no_grad():
            probe = embed(probe_texts, probe_prompt)
        final = self.out_dir / "final"
        if self.is_main:
            export_sentence_transformer(rebuild, weights, final, prompts, self.args.release_max_length)
            check_export(final, probe_texts, probe_prompt, probe.float().cpu(), self.engine.bfloat16_enabled(),
                         self.args.max_length)
            if self.skipped_steps:
                print(f"skipped {self.skipped_steps} steps with a NaN or Inf loss")
            print(f"input: {100 * self.input_share:.1f}% of the training time went to waiting for data "
                  f"({self.input_s:.1f} s; --prefetch {self.args.prefetch})")
            print(f"train stats: {json.dumps(stats)}", flush=True)
        return final

    def _device_synced_time(self) -> float:
        """The wall clock once the device has finished the queued work (kernels run behind the host)."""
        if self.on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter()

    def train_stats(self) -> dict:
        """Steps, training seconds, non-padding tokens of all ranks, rank 0's input and timed shares
        and its peak resident (and GPU) memory; `warm_*`: the same after the first step, whose
        compilation and allocator warm-up are not the steady rate (a collective: every rank calls it)."""
        import resource

        from .distributed import gather_seconds
        end = self._t_train_end or time.perf_counter()
        warm_t, warm_tokens, warm_step = self._warm or (end, self.tokens_total, self.step)
        tokens = torch.tensor([float(self.tokens_total), float(self.tokens_total - warm_tokens)], dtype=torch.float64)
        dist.all_reduce(tokens, group=self.control)
        seconds = end - (self._t_first_fetch or end)
        return {"steps": self.step, "seconds": round(seconds, 3), "tokens": int(tokens[0].item()),
                "warm_steps": self.step - warm_step, "warm_seconds": round(end - warm_t, 3),
                "warm_tokens": int(tokens[1].item()), "input_share": round(self.input_share, 4),
                **{f"{k}_share": round(v / max(seconds, 1e-9), 4) for k, v in self.timings.items()},
                **({"gather_share": round(gather_seconds() / max(seconds, 1e-9), 4)} if not self.on_gpu else {}),
                **({"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if self.on_gpu else {}),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}

    def report_false_negatives(self, left_out: int) -> None:
        """Every rank calls it with its count: rank 0 prints the run's total of candidates left out of
        InfoNCE as copies of a query's positive (--mask-false-negatives), so none is dropped unsaid."""
        total = all_reduce_sum(left_out, self.engine.device)
        if self.is_main and self.args.mask_false_negatives:
            print(f"false negatives left out of InfoNCE (a query's positive among its candidates again): {total:.0f}")

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.trace:
            self.trace.close()
