"""What both training loops share that is not the maths (nanoGPT keeps this inline; two loops made
it worth one place): process setup, the engine, and `Run`, the step counter with the concerns each
loop calls on (the input rule, the guarded step, logs, trace, checkpoints, the release).

    rank, world = start_run(seed, timeout)
    config = run_config(args)                       # typed, grouped flags (train/args.py)
    engine, scheduler = build_engine(model, config, micro_batch, world, total_steps)
    checkpoints = Checkpoints(out_dir, storage, keep, shape); client = checkpoints.resume(engine, ...)
    run = Run(engine, scheduler, config, total_steps, metrics=["loss"], desc=..., checkpoints=checkpoints, client=client)
    while not run.done:
        batch = run.fetch(read, client_state)       # a failure of the input on any rank stops every rank
        loss = ...                                  # the script's maths
        if run.optimize(loss, sources):             # NaN/Inf on any rank: every rank skips the step
            run.record("loss", loss); run.after_step(sources, client_state)
    run.export(...); run.finish(**facts); end_run()   # the release, OUTPUT_DIR/summary.json
"""
from __future__ import annotations

import math
import os
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from train.args import RunConfig
from train.run.checkpoint import Checkpoints, seed_everything
from train.run.cluster import (accelerator_is_gpu, agree, bind_device, host_barrier, host_group, local_rank,
                               open_host_group, refuse_unreachable_gloo, run_device, wait_for_rank_zero)
from train.losses.distributed import all_reduce_sum
from train.run.ds_config import (build_optimizer, computes_in_half_precision, load_ds_config, reduces_sparse_gradients,
                                 refuse_unworkable_reduce, setup_notes)
from train.run.placement import refuse_misplaced
from train.run.export import export_release
from train.run.input_guard import read_or_stop
from train.run.run_log import RunLog
from train.run.step_guard import StepGuard
from train.run.trace import ExampleTrace


def set_cpu_threads() -> None:
    """On CPU, share the cores between the local ranks instead of oversubscribing them."""
    if accelerator_is_gpu() or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def start_run(seed: int, timeout_minutes: float = 30) -> tuple[int, int]:
    """CPU threads, this process's device, the process group (DeepSpeed picks nccl or gloo), the
    host-side gloo group, seeds; returns (rank, world). train/run/cluster.py says why each is needed.

    The timeout bounds how long a collective waits for a rank that died (the launchers also stop
    every rank when one exits, on one node).
    """
    import deepspeed
    set_cpu_threads()
    bind_device()  # before any collective: NCCL and every object collective use the current device
    deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes))
    refuse_unreachable_gloo()
    open_host_group(timedelta(minutes=timeout_minutes))
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


def open_backbone(name: str, config: RunConfig, micro_batch: int, world: int):
    """(model, source, local_only, Backbone): the model to train, set up as the flags say
    (train/models/backbone.py). Each node's local rank 0 loads first (it may build the offline model
    copy). Under ZeRO-3 every rank instead builds the model inside deepspeed.zero.Init, which
    transformers enters while an HfDeepSpeedConfig of the run's config is alive: each weight is
    partitioned as it is made and loaded shard by shard, so no rank ever holds the whole model
    (construction is collective then, so the ranks first agree that every one of them can reach it).
    There the model is opened on this rank's device, not the CPU: sentence-transformers moves every
    weight placeholder and buffer to the device it is given, DeepSpeed does not move a model built
    under zero.Init (engine.py, _configure_distributed_model), and a gathered weight lands on its
    placeholder's device (partition_parameters.py), so a CPU load fails at the first forward on a GPU."""
    from train.models.backbone import backbone_options, has_sentence_transformers_config, prepare_backbone
    from train.models.model import load_model, resolve_model
    training, m = config.training, config.model
    load = partial(load_model, max_length=m.max_length, pooling=m.pooling, dtype=m.model_dtype,
                   attn_implementation=m.attn_implementation)
    ds_config = load_ds_config(training.deepspeed_config, micro_batch, world, training.max_grad_norm,
                               training.precision, config.reliability.checkpoint_storage, training.mini_batch)
    refuse_unworkable_kernel(m.attn_implementation, ds_config)
    refuse_unworkable_reduce(ds_config, training.mini_batch, training.grad_cache_reduce)
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        local_rank_zero_first(resolve_model, name)
        from transformers.integrations import HfDeepSpeedConfig
        zero_init = HfDeepSpeedConfig(ds_config)  # transformers reads it through a weak reference
        try:
            model, source, local_only = load(name, device=str(run_device()))
        finally:
            del zero_init  # later loads (the export's rebuild) build whole models again
    else:
        model, source, local_only = local_rank_zero_first(load, name)
    backbone = prepare_backbone(model, has_sentence_transformers_config(source, local_only), backbone_options(m))
    return model, source, local_only, backbone


def refuse_unworkable_kernel(attn_implementation: str | None, ds_config: dict) -> None:
    """flash-attn has CUDA kernels for fp16 and bf16 only: anything else would crash inside it at the
    first forward, after the model was loaded and the engine built. Said at start-up instead."""
    if attn_implementation != "flash_attention_2":
        return
    if not accelerator_is_gpu():
        raise SystemExit("--attn-implementation flash_attention_2: flash-attn runs on CUDA GPUs only and this run "
                         "is on the CPU; pass --attn-implementation sdpa")
    if not computes_in_half_precision(ds_config):
        raise SystemExit("--attn-implementation flash_attention_2: flash-attn computes in bf16 or fp16 only and this "
                         "run computes in fp32 (--precision fp32, or auto on a GPU without bf16); pass --precision "
                         "bf16, or --attn-implementation sdpa")


def trained_weights(model: torch.nn.Module) -> int:
    """How many weights train (under ZeRO-3 a parameter's own numel is 0: its ds_numel counts)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def end_run() -> None:
    """Leave together and exit now: a ZeRO-3 run resumed from a checkpoint can otherwise abort in
    interpreter teardown and turn a finished run into a failed one. The other ranks wait for rank 0
    with no --dist-timeout: it may still be writing, merging or uploading the release."""
    wait_for_rank_zero()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def use_sparse_embedding_gradients(model, ds_config: dict) -> int:
    """Embedding gradients of the used rows only (train/models/model.py's sparse_embedding_gradients), made dense
    once per backward, or, where this DeepSpeed config all-reduces sparse gradients, after the all-reduce.
    Before deepspeed.initialize: the densifying hook must run before ZeRO's own."""
    from train.models.model import sparse_embedding_gradients
    return sparse_embedding_gradients(model, dense_on_accumulate=not reduces_sparse_gradients(ds_config))


def build_engine(model, config: RunConfig, micro_batch: int, world: int, total_steps: int):
    """DeepSpeed engine and LR schedule (linear warmup and decay, every group alike) from the shared flags."""
    import deepspeed
    from transformers import get_linear_schedule_with_warmup

    from train.models.model import parameter_groups
    training, dtype = config.training, config.model.model_dtype
    ds_config = load_ds_config(training.deepspeed_config, micro_batch, world, training.max_grad_norm,
                               training.precision, config.reliability.checkpoint_storage, training.mini_batch)
    if dtype != "float32" and not ds_config["bf16"]["enabled"]:
        raise SystemExit(f"--model-dtype {dtype} without --precision bf16: the optimizer would update "
                         f"{dtype} weights directly and small updates round away; pass --precision bf16 "
                         f"(fp32 master weights in the optimizer) or --model-dtype float32")
    use_sparse_embedding_gradients(model, ds_config)
    groups = parameter_groups(model, training.lr, training.expansion_lr)
    # every rank stops if one cannot build it (its kernel's build lock left by a killed run: op_build.py)
    optimizer = agree(lambda: build_optimizer(groups, ds_config, training.lr, training.weight_decay),
                      "building the optimizer")
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(training.warmup_ratio * total_steps), total_steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    refuse_misplaced(engine)  # a weight or buffer off the engine's device stops here, not at the first forward
    return engine, scheduler


class Run:
    """A training run around the maths: the step counter, and the concerns each script's loop calls
    on, each in a module of its own: the input rule (input_guard.py), the guarded step
    (step_guard.py), logs and the summary (run_log.py), the example trace (trace.py), checkpoints
    (checkpoint.py) and the release (export.py)."""

    def __init__(self, engine, scheduler, config: RunConfig, total_steps: int, metrics: list[str], desc: str,
                 checkpoints: Checkpoints, client: dict | None = None):
        self.engine, self.scheduler, self.config, self.checkpoints = engine, scheduler, config, checkpoints
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.out_dir = Path(config.training.output_dir)
        self.total_steps = total_steps
        self.step = client["step"] if client else 0
        self.control = host_group()  # control messages go over gloo on the host: no device sync per step
        self.log = RunLog(self.out_dir, metrics, total_steps, self.step, desc, engine.device,
                          config.training.log_steps, self.control)
        self.guard = StepGuard(engine, config.reliability.max_bad_steps, self.log.timed, self.log.say)
        self.trace = ExampleTrace(self.out_dir, self.rank, self.step) if config.reliability.trace_examples else None
        # what DeepSpeed does other than the config file says (a raised ZeRO stage, GradCache's reductions)
        self.setup_notes = setup_notes(config.training.deepspeed_config, engine.config, config.training.mini_batch,
                                       config.training.grad_cache_reduce, trained_weights(engine.module))
        for note in self.setup_notes:
            self.say(note)
        engine.train()

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    # the loop's words, said by the concern that owns them
    def say(self, message: str) -> None:
        self.log.say(message)

    def timed(self, name: str, device_work: bool = False):
        return self.log.timed(name, device_work)

    def record(self, metric: str, value: torch.Tensor, weight: float = 1.0, tokens: int = 0) -> None:
        self.log.record(metric, value, weight, tokens)

    def log_scalar(self, name: str, value: float) -> None:
        self.log.scalar(name, value, self.step)

    def fetch(self, read: Callable, client_state: Callable[[], dict], undo: Callable[[], None] | None = None):
        """`read()` this rank's data for the step; a failure on any rank stops every rank (input_guard.py)."""
        started = self.log.fetch_started()
        try:
            return read_or_stop(read, self.step, self.engine, self.checkpoints, client_state, undo, self.control,
                                before_exit=self.close)
        finally:
            self.log.fetch_ended(started)

    def optimize(self, loss: torch.Tensor, sources: list[str], backward: Callable | None = None) -> bool:
        """Backward and optimizer step; False (nothing stepped, on any rank) for a NaN/Inf loss on some rank."""
        if not self.guard.optimize(loss, self.step, sources, backward):
            return False
        self.step += 1
        return True

    def grad_cache(self):
        """GradCache for --mini-batch N, or None when it is off (train/step/grad_cache.py)."""
        from train.step.grad_cache import GradCache
        n, reduce = self.config.training.mini_batch, self.config.training.grad_cache_reduce
        return GradCache(self.engine, n, self.engine.device, self.control, reduce_once=reduce == "once") if n else None

    def after_step(self, sources: list[str], client_state: Callable[[], dict]) -> None:
        """Trace, log, checkpoint; at --stop-at-step, leave as if preempted (the checkpoint is saved)."""
        if self.trace:
            self.trace.write(self.step, sources)
        self.log.step_ended(self.step, self.scheduler.get_last_lr()[0], last=self.done)
        reliability = self.config.reliability
        stop_here = self.step == reliability.stop_at_step
        if (self.step % reliability.save_steps == 0 or stop_here) and not self.done:
            self.checkpoints.save(self.engine, f"step{self.step}", client_state())
        if stop_here and not self.done:
            self.say(f"stopped at step {self.step} (--stop-at-step); continue with --resume auto")
            self.close()
            end_run()

    def export(self, client_state: dict, embed: Callable, probe_texts: list[str], probe_prompt: str,
               rebuild: Callable, prompts: dict[str, str], finalize: Callable | None = None) -> Path:
        """The end of training: its figures (run_log.py), then the release (export.py's export_release).
        `finalize(model)`: the release form of the rebuilt model holding the trained weights (LoRA merged).
        Every collective of the run must come before: rank 0 writes the release alone, for as long as a
        large model takes, and the other ranks wait for it only in `end_run` (no timeout-bound collective)."""
        stats = self.log.training_ended(self.step)
        model = self.config.model
        final = export_release(self.engine, self.checkpoints, self.step, client_state, embed, probe_texts, probe_prompt,
                               rebuild, prompts, model.release_max_length, model.max_length, finalize)
        if self.is_main:
            if self.guard.skipped_steps:
                print(f"skipped {self.guard.skipped_steps} steps with a NaN or Inf loss")
            print(f"input: {100 * stats['input_share']:.1f}% of the training time went to waiting for data "
                  f"({stats['input_seconds']:.1f} s; --prefetch {self.config.prefetch})", flush=True)
        return final

    def report_false_negatives(self, left_out: int) -> int:
        """Every rank calls it with its count: the run's total of candidates left out of InfoNCE as copies
        of a query's positive (--mask-false-negatives), printed by rank 0, so none is dropped unsaid."""
        total = int(all_reduce_sum(left_out, self.engine.device))
        if self.is_main and self.config.training.mask_false_negatives:
            print(f"false negatives left out of InfoNCE (a query's positive among its candidates again): {total}")
        return total

    def report_score_guarded(self, left_out: int) -> int:
        """Every rank calls it: the run's total of candidates the score guard left out (--false-negative-margin)."""
        total = int(all_reduce_sum(left_out, self.engine.device))
        if self.is_main and self.config.training.false_negative_margin is not None:
            print(f"candidates left out by the score guard (above the positive by more than "
                  f"{self.config.training.false_negative_margin:g}): {total}")
        return total

    def finish(self, **facts) -> None:
        """OUTPUT_DIR/summary.json: the training figures, the steps skipped and what the script adds."""
        path = self.log.write_summary(world=self.world, skipped_steps=self.guard.skipped_steps,
                                      zero_stage=self.engine.zero_optimization_stage(), setup_notes=self.setup_notes,
                                      **facts)
        if path:
            print(f"summary: {path}")

    def close(self) -> None:
        self.log.close()
        if self.trace:
            self.trace.close()
