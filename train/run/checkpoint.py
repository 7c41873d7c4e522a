"""Checkpoints that a kill cannot corrupt, on one shared disk or on each node's own disk.

A checkpoint counts only once its `complete` marker exists (written last, after a barrier), so a
run killed mid-save resumes from the previous one. DeepSpeed's own `latest` file is not trusted:
it is written before the save has finished. The marker records the run's shape (ranks, global
batch, ZeRO stage), so a resume with another shape is refused before anything is loaded.

Two layouts (--checkpoint-storage):
  shared      OUTPUT_DIR is one filesystem seen by every node: rank 0 writes the marker and the
              model states, each rank its own optimizer partition and RNG state.
  node-local  each node has its own OUTPUT_DIR (local NVMe): DeepSpeed's use_node_local_storage,
              each node's local rank 0 writes the marker and the model states its node loads.
Either way rank 0 decides which checkpoint to resume, and every rank checks, before loading, that
its own disk holds what it will read; one that cannot stops every rank with the same message.
"""
from __future__ import annotations

import json
import random
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from train.run.cluster import accelerator_is_gpu, agree, from_rank_zero, host_barrier, host_group, local_rank

STORAGES = ("shared", "node-local")


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


def saved_shape(tag_dir: Path) -> dict | None:
    """The run shape a checkpoint's marker records (None for a marker written before it did)."""
    try:
        shape = json.loads((tag_dir / "complete").read_text())
    except (OSError, ValueError):
        return None
    return shape if isinstance(shape, dict) else None


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's RNGs from one seed (at start-up, and per rank on a resume whose
    ranks have no saved state)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """This rank's RNG states; on a GPU, its own device's generator only (the one its dropout draws from):
    the states of all visible devices would not restore where a node shows another number of them."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if accelerator_is_gpu() else None}


def restore_rng_states(path: Path) -> None:
    """Put back this rank's RNG states (dropout, sampling) as they were when the checkpoint was saved."""
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):  # saved by an older version: every visible device's state
        cuda = cuda[torch.cuda.current_device()] if accelerator_is_gpu() and torch.cuda.current_device() < len(cuda) else None
    if cuda is not None and accelerator_is_gpu():
        torch.cuda.set_rng_state(cuda)


def files_this_rank_reads(tag_dir: Path, rank: int, stage: int, same_world: bool) -> list[Path]:
    """What DeepSpeed's load_checkpoint and our RNG restore read on this rank (no model parallelism):
    the marker, the model states (one file below ZeRO-3, a partition per rank at ZeRO-3), this
    rank's optimizer partition under ZeRO 1-3, its RNG state when the world is unchanged."""
    files = [tag_dir / "complete"]
    files.append(tag_dir / (f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"))
    if same_world:
        files.append(tag_dir / f"rng_rank{rank}.pt")
    return files


def optimizer_partition(tag_dir: Path, rank: int) -> list[Path]:
    """This rank's ZeRO optimizer partition ("bf16_" prefixed under DeepSpeed's bf16 optimizer)."""
    return sorted(tag_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))


class Checkpoints:
    """Saving and resuming this run's checkpoints in OUTPUT_DIR/checkpoints (a collective: every
    rank makes one, at start-up, and calls save and resume together).

    `shape`: what must match for a resume to continue the same run: {"global_batch": ...} (an int
    for pre-training, each task's batch for fine-tuning); the world size and ZeRO stage are added.
    """

    def __init__(self, out_dir: Path, storage: str, keep: int, shape: dict):
        if storage not in STORAGES:
            raise SystemExit(f"--checkpoint-storage {storage}: one of {', '.join(STORAGES)}")
        self.dir, self.storage, self.keep = Path(out_dir) / "checkpoints", storage, keep
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.shape = {**shape, "world": self.world}
        # the rank that writes markers and rotates old checkpoints on its disk
        self.writer = (local_rank() if storage == "node-local" else self.rank) == 0
        check_storage_layout(Path(out_dir), storage)

    def save(self, engine, tag: str, client_state: dict) -> None:
        """DeepSpeed checkpoint + every rank's RNG states, then the 'complete' marker; keeps the newest `keep`."""
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state)
        torch.save(rng_states(), self.dir / tag / f"rng_rank{self.rank}.pt")
        host_barrier()
        if self.writer:
            marker = {**self.shape, "zero_stage": engine.zero_optimization_stage(), "storage": self.storage}
            (self.dir / tag / "complete").write_text(json.dumps(marker) + "\n")
            if self.keep > 0:
                for old in complete_checkpoints(self.dir)[:-self.keep]:
                    shutil.rmtree(self.dir / old, ignore_errors=True)
        host_barrier()

    def latest(self) -> str | None:
        """The newest complete checkpoint as rank 0 sees it, on every rank."""
        return from_rank_zero(lambda: latest_checkpoint(self.dir))

    def save_unless_saved(self, engine, step: int, client_state: dict) -> None:
        if step and self.latest() != f"step{step}":
            self.save(engine, f"step{step}", client_state)

    def resume(self, engine, resume_arg: str | None, seed: int = 0) -> dict | None:
        """Load the checkpoint named by --resume ('auto': the newest complete one rank 0 sees); returns its
        client state. Refused on every rank, before loading, where the run's shape changed in a way that
        cannot continue, or where some rank's disk lacks what it must read."""
        if not resume_arg:
            return None
        if resume_arg == "auto":
            load_dir, tag = self.dir, self.latest()
            if tag is None:
                return None  # nothing saved yet: a fresh start
        else:
            path = Path(resume_arg)
            load_dir, tag = path.parent, path.name
        tag_dir = load_dir / tag
        stage = engine.zero_optimization_stage()
        saved = from_rank_zero(lambda: _read_marker(tag_dir))
        same_world = saved is None or saved.get("world", self.world) == self.world
        fp32_accumulation = (getattr(engine, "config", None) or {}).get("data_types", {}).get("grad_accum_dtype") == "fp32"
        refusal = self.shape_refusal(saved, stage, fp32_accumulation) if saved else None
        if refusal:
            raise SystemExit(f"--resume: {tag_dir}: {refusal}")
        agree(lambda: self._check_readable(tag_dir, stage, same_world), f"--resume {tag_dir}")
        _, client = engine.load_checkpoint(str(load_dir), tag=tag)
        if same_world:
            restore_rng_states(tag_dir / f"rng_rank{self.rank}.pt")
        else:  # no RNG state was saved for this layout of ranks: a fresh, reproducible one per rank
            seed_everything(seed * 1_000_003 + client["step"] * 1009 + self.rank)
        if self.rank == 0:
            note = "" if same_world else (f" ({saved['world']} ranks then, {self.world} now: the same global batches, "
                                          "data position and schedule; dropout reseeded per rank)")
            print(f"resumed from {tag_dir} at step {client['step']}{note}", flush=True)
        return client

    def shape_refusal(self, saved: dict, stage: int, fp32_accumulation: bool = False) -> str | None:
        """Why a checkpoint of `saved` shape cannot continue in this run, with what to pass instead; None if it can.
        fp32_accumulation: this run accumulates bf16 gradients in fp32 (GradCache in bf16), which DeepSpeed
        does at ZeRO 1-3 only, so even zero0.json runs at ZeRO-1 (ds_config.py's accumulate_in_fp32)."""
        old_world, new_world = saved.get("world"), self.world
        old_batch, new_batch = saved.get("global_batch"), self.shape.get("global_batch")
        old_stage = saved.get("zero_stage", stage)
        if old_stage != stage:
            return (f"saved under ZeRO-{old_stage}, this run uses ZeRO-{stage}; resume with the same "
                    f"--deepspeed-config (the checkpoint's optimizer layout depends on it)")
        if old_batch != new_batch:
            hint = ""
            if isinstance(old_batch, int) and old_batch % new_world == 0:
                hint = f"; on {new_world} ranks pass --batch-size {old_batch // new_world} to keep it"
            elif isinstance(old_batch, dict):
                hint = "; resume with the task config the run started with"
            return (f"the global batch changed from {old_batch} to {new_batch} ({old_world} ranks then, {new_world} now): "
                    f"the data order, the saved data position and the LR schedule are counted in global batches, "
                    f"so examples would repeat or be skipped{hint}")
        if old_world != new_world and stage != 0:
            instead = ("a run in bf16 with --mini-batch accumulates gradients in fp32, which DeepSpeed does at ZeRO 1-3 "
                       "only, so it runs at ZeRO-1 even under ds_configs/zero0.json; to train on a number of ranks "
                       "that may change, use zero0.json with --precision fp32 or without --mini-batch" if fp32_accumulation
                       else "or train under ds_configs/zero0.json, which any number of ranks can resume at the same "
                            "global batch")
            return (f"saved by {old_world} ranks under ZeRO-{stage}, whose optimizer state is partitioned over "
                    f"{old_world} ranks; resume on {old_world} ranks ({instead})")
        return None

    def _check_readable(self, tag_dir: Path, stage: int, same_world: bool) -> None:
        missing = [p for p in files_this_rank_reads(tag_dir, self.rank, stage, same_world) if not p.is_file()]
        if stage >= 1 and not optimizer_partition(tag_dir, self.rank):
            missing.append(tag_dir / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt")
        if missing:
            hint = ("this node's disk does not hold the checkpoint rank 0 resumes from: copy it there, or put "
                    "OUTPUT_DIR on a shared filesystem" if self.storage == "node-local" else
                    "OUTPUT_DIR looks node-local on this node: put it on a shared filesystem, or train with "
                    "--checkpoint-storage node-local")
            raise SystemExit(f"missing {', '.join(p.name for p in missing[:4])} in {tag_dir} ({hint})")


def _read_marker(tag_dir: Path) -> dict | None:
    if not (tag_dir / "complete").is_file():
        raise SystemExit(f"{tag_dir}: not a complete checkpoint (no 'complete' marker)")
    return saved_shape(tag_dir)


def check_storage_layout(out_dir: Path, storage: str) -> None:
    """Refuse at start-up, on every rank, a --checkpoint-storage that does not fit the disks: `shared`
    where some node does not see what rank 0 writes (its checkpoints would be lost on resume), or
    `node-local` where the nodes share one disk (several writers of one file). Each node's local
    rank 0 leaves a token; every rank then lists the tokens it sees."""
    world = dist.get_world_size()
    nodes = torch.tensor([1.0 if local_rank() == 0 else 0.0])
    dist.all_reduce(nodes, group=host_group())
    if world == 1 or nodes.item() == 1:  # one node: one disk, both layouts are the same
        return
    probe = out_dir / ".storage_probe"
    if dist.get_rank() == 0:
        shutil.rmtree(probe, ignore_errors=True)
    host_barrier()
    if local_rank() == 0:
        probe.mkdir(parents=True, exist_ok=True)
        (probe / f"rank{dist.get_rank()}").write_text(socket.gethostname())
    host_barrier()

    def check() -> None:
        seen = {p.name for p in probe.glob("rank*")} if probe.is_dir() else set()
        if storage == "shared" and "rank0" not in seen:
            raise SystemExit(f"--checkpoint-storage shared, but {out_dir} on this node is not the disk rank 0 writes "
                             f"to; pass --checkpoint-storage node-local (each node keeps its own checkpoints) or put "
                             f"--output-dir on a shared filesystem")
        if storage == "node-local" and len(seen) > 1:
            raise SystemExit(f"--checkpoint-storage node-local, but {out_dir} is shared by several nodes "
                             f"({len(seen)} nodes' tokens seen); pass --checkpoint-storage shared")
    agree(check, "--checkpoint-storage")
    host_barrier()
    if local_rank() == 0:
        shutil.rmtree(probe, ignore_errors=True)

