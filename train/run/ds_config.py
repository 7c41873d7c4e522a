"""DeepSpeed config resolution and the optimizer the training scripts hand to DeepSpeed."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from train.run.cluster import accelerator_is_gpu
from train.run.op_build import bounded_extension_wait


def bf16_supported() -> bool:
    """The run's GPU computes in bf16 (never on the CPU accelerator, even where torch sees a GPU)."""
    return accelerator_is_gpu() and torch.cuda.is_bf16_supported()


def computes_in_half_precision(cfg: dict) -> bool:
    return any(cfg.get(k, {}).get("enabled") is True for k in ("bf16", "fp16"))


def load_ds_config(path: str | Path, micro_batch: int, world: int, grad_clip: float,
                   precision: str = "auto", storage: str = "shared", mini_batch: int = 0) -> dict:
    """A ds_configs/*.json file with its "auto" values filled in; precision: auto | bf16 | fp32.

    DeepSpeed has no "auto" of its own (that is the HF Trainer's): batch sizes come from the flags
    and the rank count, gradient_clipping from --max-grad-norm, bf16 from --precision, node-local
    checkpoints from --checkpoint-storage, fp32 gradient accumulation from --mini-batch (below).
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
    if use_bf16 and mini_batch:
        accumulate_in_fp32(cfg)
    if storage == "node-local":
        cfg.setdefault("checkpoint", {})["use_node_local_storage"] = True
    if offloads_optimizer(cfg) and not accelerator_is_gpu():
        cfg["zero_force_ds_cpu_optimizer"] = False  # on a CPU machine torch's AdamW may stand in (build_optimizer)
    return cfg


def accumulate_in_fp32(cfg: dict) -> None:
    """GradCache backpropagates a step in k mini-batches, which DeepSpeed sees as k micro-batches of
    gradient accumulation. In bf16 the sum would be rounded k times (on CPU, relative to the fp32
    gradient: 0.5% at k=16, 1% at k=64, against 0.17% for one backward), so it is kept in fp32
    (DeepSpeed's grad_accum_dtype). DeepSpeed has fp32 accumulation under ZeRO 1-3 only (its
    BF16_Optimizer at stage 1); plain data parallel in bf16 accumulates in bf16, so a zero0 config
    runs at stage 1 here: the same update, the optimizer state partitioned over the ranks."""
    zero = cfg.setdefault("zero_optimization", {})
    if zero.get("stage", 0) == 0:
        zero["stage"] = 1
    cfg.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"


def configured_stage(path: str | Path) -> int:
    """The ZeRO stage the config file asks for (0 where it names none)."""
    return json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0)


def refuse_unworkable_reduce(cfg: dict, mini_batch: int, grad_cache_reduce: str) -> None:
    """--grad-cache-reduce once where it would change the gradient: in bf16, DeepSpeed's coalesce_grad_reduction
    bypasses its fp32 gradient accumulation (ZeRO-2's and 3's hooks return early inside it), so autograd would
    sum the mini-batches' gradients in bf16."""
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if mini_batch and grad_cache_reduce == "once" and stage >= 2 and computes_in_half_precision(cfg):
        raise SystemExit("--grad-cache-reduce once in bf16: DeepSpeed's coalesce_grad_reduction bypasses its fp32 "
                         "gradient accumulation, so the mini-batches' gradients would be summed in bf16 (0.5-1% off "
                         "at 16-64 mini-batches); in bf16 keep the default per-mini-batch, or use ZeRO-1, which "
                         "reduces once per step and accumulates in fp32")


def setup_notes(path: str | Path, cfg: dict, mini_batch: int, grad_cache_reduce: str = "per-mini-batch",
                trained_weights: int = 0) -> list[str]:
    """What the run does that its config file does not say, for the start-up log and summary.json:
    a ZeRO stage raised for fp32 gradient accumulation, and what GradCache costs under ZeRO-2 and 3."""
    notes, stage, asked = [], cfg.get("zero_optimization", {}).get("stage", 0), configured_stage(path)
    if stage != asked:
        notes.append(f"ZeRO-{stage}, not the ZeRO-{asked} of {Path(path).name}: bf16 with --mini-batch accumulates "
                     "gradients in fp32, which DeepSpeed does at ZeRO 1-3 only; the optimizer state is then "
                     "partitioned, so a resume needs the same number of ranks (--precision fp32, or no "
                     "--mini-batch, keeps ZeRO-0, which any number of ranks can resume)")
    if mini_batch and stage >= 2:
        # coalescing holds .grad in the weights' dtype (fp32 here: bf16 is refused above); what the per-mini-batch
        # default would hold instead, in bf16, are bf16 gradients
        size = trained_weights * (2 if computes_in_half_precision(cfg) else 4)
        whole = f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
        if grad_cache_reduce == "once":
            notes.append(f"GradCache under ZeRO-{stage}, --grad-cache-reduce once: one gradient reduction per step; "
                         f"every rank holds whole gradients of the trained weights until it ({whole})")
        else:
            notes.append(f"GradCache under ZeRO-{stage}: DeepSpeed reduces the partitioned gradients at every "
                         "mini-batch's backward, so a step of k mini-batches communicates k times what one backward "
                         "does; ZeRO-1 (ds_configs/zero1.json) reduces once per step, and so does "
                         f"--grad-cache-reduce once, holding whole gradients on every rank ({whole} here)")
    return notes


def reduces_sparse_gradients(cfg: dict) -> bool:
    """Plain data parallel in fp32 (ZeRO-0, no bf16/fp16 optimizer): DeepSpeed's all-reduce takes a
    sparse gradient as it is (gathering its rows); every other setup needs dense gradients as they land."""
    return cfg.get("zero_optimization", {}).get("stage", 0) == 0 and not computes_in_half_precision(cfg)


def offloads_optimizer(cfg: dict) -> bool:
    off = cfg.get("zero_optimization", {}).get("offload_optimizer", {})
    return off.get("device", "none") == "cpu"


def build_optimizer(params, cfg: dict, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """torch's fused AdamW on a GPU; DeepSpeed's vectorised CPU Adam (DeepSpeedCPUAdam, AdamW mode)
    wherever the optimizer runs on the CPU: offloaded from a GPU, or on a CPU-only machine. There it
    is the same update at about 4x the speed of torch's AdamW (59M fp32 parameters, one thread:
    0.23 s against 0.94 s a step), and on CPU the optimizer step is a tenth of a small model's step.
    Its kernel is compiled once per machine (about a minute, cached); where that fails (no compiler)
    torch's AdamW takes over, with a warning. `params`: parameters, or groups with their own "lr"."""
    on_gpu = accelerator_is_gpu()
    if on_gpu and not offloads_optimizer(cfg):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    params = list(params)  # both optimizers below may need to read it
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        with bounded_extension_wait():  # a lock left by a killed build: said, and bounded (op_build.py)
            return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
    except Exception as e:  # the JIT build of the kernel: no compiler, no headers
        if on_gpu:
            raise  # ZeRO-Offload needs it
        import warnings
        warnings.warn(f"DeepSpeedCPUAdam unavailable ({type(e).__name__}: {str(e)[:200]}); using torch's AdamW, "
                      "about 4x slower on CPU")
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
