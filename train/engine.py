"""DeepSpeed glue: config resolution, optimizer choice, checkpoints, and export to sentence-transformers."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def load_ds_config(path: str | Path, micro_batch: int, world: int, grad_clip: float,
                   precision: str = "auto") -> dict:
    """A ds_configs/*.json file with its "auto" values filled in; precision: auto | bf16 | fp32.

    DeepSpeed has no "auto" of its own (that is the HF Trainer's): batch sizes come from the flags
    and the rank count, gradient_clipping from --max-grad-norm, bf16 from --precision.
    """
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"--deepspeed-config {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"--deepspeed-config {path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if "optimizer" in cfg:
        # DeepSpeed's "AdamW" type builds FusedAdam (needs a CUDA build); the script passes torch's.
        raise SystemExit(f"{path}: remove the 'optimizer' section; the training script builds the "
                         "optimizer (torch AdamW, or DeepSpeedCPUAdam with CPU offload)")
    accum = cfg.get("gradient_accumulation_steps", "auto")
    if accum not in ("auto", 1):
        # in-batch negatives are the global micro-batch: accumulation would not enlarge them
        raise SystemExit(f"{path}: gradient_accumulation_steps must be 1 or auto for contrastive "
                         "training; raise the batch size or the number of ranks instead")
    cfg.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1,
               train_batch_size=micro_batch * world)
    if cfg.get("gradient_clipping", "auto") == "auto":
        cfg["gradient_clipping"] = grad_clip  # explicit: DeepSpeed 0.19 silently defaults to 1.0
    use_bf16 = {"auto": bf16_supported(), "bf16": True, "fp32": False}[precision]
    if cfg.get("bf16", {}).get("enabled", "auto") == "auto" or precision != "auto":
        cfg["bf16"] = {"enabled": use_bf16}
    if use_bf16:
        cfg.pop("fp16", None)  # DeepSpeed refuses a config with both enabled
    if offloads_optimizer(cfg) and not torch.cuda.is_available():
        cfg["zero_force_ds_cpu_optimizer"] = False  # on a CPU machine torch's AdamW is the CPU optimizer
    return cfg


def offloads_optimizer(cfg: dict) -> bool:
    off = cfg.get("zero_optimization", {}).get("offload_optimizer", {})
    return off.get("device", "none") == "cpu"


def build_optimizer(params, cfg: dict, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """torch AdamW (fused on GPU), or DeepSpeedCPUAdam when the optimizer lives in CPU memory on a GPU box."""
    if offloads_optimizer(cfg) and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=torch.cuda.is_available())


def complete_checkpoints(ckpt_dir: Path) -> list[str]:
    """Tags of the checkpoints whose save finished (marker written last), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [d.name for d in ckpt_dir.iterdir() if d.is_dir() and (d / "complete").is_file()]
    return sorted(tags, key=lambda t: int(t.removeprefix("step")) if t.removeprefix("step").isdigit() else -1)


def latest_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint. DeepSpeed's own `latest` file is not trusted: it is written
    before a save has finished, so after a kill mid-save it can name a half-written checkpoint."""
    tags = complete_checkpoints(ckpt_dir)
    return tags[-1] if tags else None


def save_checkpoint(engine, ckpt_dir: Path, tag: str, client_state: dict, keep: int = 0) -> None:
    """DeepSpeed checkpoint + every rank's RNG states, then a 'complete' marker; keeps the newest `keep`."""
    import shutil
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    torch.save(rng_states(), ckpt_dir / tag / f"rng_rank{engine.global_rank}.pt")
    torch.distributed.barrier()
    if engine.global_rank == 0:
        (ckpt_dir / tag / "complete").write_text("ok\n")
        if keep > 0:
            for old in complete_checkpoints(ckpt_dir)[:-keep]:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    torch.distributed.barrier()


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


def full_fp32_state_dict(engine, ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor] | None:
    """The trained weights in fp32 on rank 0 (None elsewhere), whatever the ZeRO stage and precision."""
    if engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
        return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()} if engine.global_rank == 0 else None
    if engine.global_rank != 0:
        return None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def export_sentence_transformer(rebuild, state_dict: dict, out_dir: Path, prompts: dict[str, str],
                                max_length: int):
    """Rebuild the model on CPU (`rebuild()`: same modules as trained), load the trained weights, save it."""
    model = rebuild()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    real_missing = [k for k in missing if not k.endswith("position_ids")]
    if real_missing or unexpected:
        raise RuntimeError(f"export: weights do not match the model (missing {real_missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    model.max_seq_length = max_length
    model.prompts = dict(prompts)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save(str(tmp))
    if out_dir.exists():
        import shutil
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return model


def set_cpu_threads() -> None:
    """On CPU, share the cores between the local ranks instead of oversubscribing them."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def start_run(seed: int, timeout_minutes: float = 30) -> tuple[int, int]:
    """CPU threads, the process group (DeepSpeed picks nccl or gloo), seeds; returns (rank, world).

    The timeout bounds how long a collective waits for a rank that died (the launchers also stop
    every rank when one exits, on one node).
    """
    from datetime import timedelta

    import deepspeed
    import torch.distributed as dist
    set_cpu_threads()
    deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes))
    seed_everything(seed)
    return dist.get_rank(), dist.get_world_size()


def local_rank_zero_first(fn, *args, **kwargs):
    """fn(...) on each node's local rank 0 first (it may build the offline model copy), then the rest."""
    import torch.distributed as dist
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if not first:
        dist.barrier()
    result = fn(*args, **kwargs)
    if first:
        dist.barrier()
    return result


def end_run() -> None:
    """Leave together and exit now: a ZeRO-3 run resumed from a checkpoint can otherwise abort in
    interpreter teardown and turn a finished run into a failed one."""
    import sys

    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def finite_on_all_ranks(loss: torch.Tensor) -> bool:
    """False if the loss is NaN or Inf on any rank (one all-reduce of a flag): then every rank skips the step."""
    import torch.distributed as dist
    flag = torch.tensor(float(torch.isfinite(loss.detach()).all()), device=loss.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def test_hooks(step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
    """Fault injection for the reliability tests (environment variables; no effect otherwise)."""
    if os.environ.get("CONAN_TEST_KILL") == f"{rank}:{step}":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
    nan_steps = os.environ.get("CONAN_TEST_NAN", "")
    if nan_steps and f"{rank}:{step}" in nan_steps.split(","):
        return loss * float("nan")
    return loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encode(engine, model, texts: list[str], prompt: str, device) -> tuple[torch.Tensor, int]:
    """Sentence embeddings of prompt+text through the DeepSpeed engine, and the non-pad token count."""
    features = model.preprocess([prompt + t for t in texts])
    features = {k: v.to(device) for k, v in features.items() if isinstance(v, torch.Tensor)}
    return engine(features)["sentence_embedding"], int(features["attention_mask"].sum())


def check_export(out_dir: Path, texts: list[str], prompt: str, engine_emb: torch.Tensor, bf16: bool) -> None:
    """Reload the exported folder and compare its embeddings with the engine's; keep both for tests."""
    from sentence_transformers import SentenceTransformer
    exported = SentenceTransformer(str(out_dir / "final"), device="cpu", local_files_only=True)
    got = exported.encode(texts, prompt=prompt, convert_to_tensor=True, batch_size=len(texts))
    diff = (got.cpu() - engine_emb).abs().max().item()
    torch.save({"texts": texts, "prompt": prompt, "embeddings": engine_emb, "max_abs_diff": diff},
               out_dir / "export_check.pt")
    tolerance = 5e-2 if bf16 else 1e-4  # the engine ran in bf16; the export is its fp32 master copy
    if diff > tolerance:
        raise SystemExit(f"export check failed: the saved model differs from the trained engine by {diff:.2e}")
    print(f"export check: reloaded model matches the engine (max |diff| {diff:.1e})")
