"""The release: the trained weights in fp32, a sentence-transformers folder, and a check that it
encodes as the engine did.

Training settings chosen for cost stay out of the release: the folder keeps the base model's own
`max_seq_length` (what it encodes at) unless the user asks for another (--release-max-length).
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from train import fault_injection
from train.run.cluster import host_group

FP32_TOLERANCE = 1e-4   # fp32 engine vs fp32 export: only summation order differs
BF16_MARGIN = 4.0       # bf16 engine vs fp32 export: this many times bf16's own error on the probes


def fp32_weights(engine, ckpt_dir: Path, tag: str, from_checkpoint: bool = True) -> dict[str, torch.Tensor] | None:
    """The trained weights in fp32 on rank 0 (None elsewhere), whatever the ZeRO stage and precision.

    First choice: DeepSpeed's zero_to_fp32 over the checkpoint just saved (rank 0 alone, no extra
    memory on the other ranks). If that cannot run (e.g. a checkpoint layout it does not know), or
    `from_checkpoint` is False (node-local disks: rank 0's holds only its own node's partitions),
    every rank joins in gathering the fp32 master weights from the live engine instead.
    """
    if engine.zero_optimization_stage() == 0:  # no ZeRO checkpoint layout for zero_to_fp32 to read
        if engine.bfloat16_enabled():
            return engine_fp32_weights(engine)  # the optimizer's masters; no collective at stage 0
        return _module_weights(engine) if engine.global_rank == 0 else None
    if not from_checkpoint or type(engine.optimizer).__name__ == "BF16_Optimizer":
        # zero_to_fp32 does not read BF16_Optimizer's checkpoints (ZeRO-1 with fp32 gradient
        # accumulation, GradCache in bf16): "... is not a zero checkpoint" in DeepSpeed 0.19
        return engine_fp32_weights(engine)
    weights, error = None, None
    if engine.global_rank == 0:
        try:
            if fault_injection.fault("no_zero_to_fp32"):
                raise ValueError("zero_to_fp32 disabled by CONAN_TEST_FAULTS")
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except Exception as e:  # any failure of the reconstruction: fall back, say why
            error = f"{type(e).__name__}: {e}"
    verdict = [error]
    dist.broadcast_object_list(verdict, src=0, group=host_group())
    if verdict[0] is None:
        return weights
    if engine.global_rank == 0:
        print(f"export: zero_to_fp32 could not rebuild the weights ({verdict[0]}); "
              "gathering the fp32 master weights from the engine instead")
    return engine_fp32_weights(engine)


def engine_fp32_weights(engine) -> dict[str, torch.Tensor] | None:
    """fp32 master weights gathered from the live engine; a collective (every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param
    is_main = engine.global_rank == 0
    stage0_masters = _stage0_bf16_masters(engine) if is_main else {}
    weights = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)  # all ranks, same order: it all-reduces / all-gathers
        if full is None:  # no ZeRO: the module's own weights, or the mixed-precision optimizer's master
            full = stage0_masters.get(id(param), param)
        if is_main:
            weights[name] = full.detach().float().cpu().clone()
    if not is_main:
        return None
    for name, value in engine.module.state_dict().items():  # persistent buffers: what a state dict holds
        if name not in weights:
            weights[name] = value.detach().cpu().clone()
    return weights


def _stage0_bf16_masters(engine) -> dict[int, torch.Tensor]:
    """bf16 without ZeRO: DeepSpeed's mixed-precision optimizer keeps the fp32 master weights of its
    `fp16_groups` (the module holds bf16 copies, and safe_get_full_fp32_param gives None): one flat
    tensor per group (`fp32_groups_flat`, the wrapper around DeepSpeed's own FusedAdam) or one tensor
    per parameter (`fp32_groups`, the unfused wrapper it uses for any other optimizer: torch's AdamW,
    DeepSpeedCPUAdam). {id(module parameter): master}; empty under ZeRO (ZeRO-3's optimizer has
    `fp16_groups` too, but its masters are what safe_get_full_fp32_param reads) and in fp32."""
    if engine.zero_optimization_stage() != 0 or not engine.bfloat16_enabled():
        return {}
    from torch._utils import _unflatten_dense_tensors
    opt = engine.optimizer
    if hasattr(opt, "fp32_groups_flat"):
        fp32 = [_unflatten_dense_tensors(flat.detach(), group) for group, flat in zip(opt.fp16_groups, opt.fp32_groups_flat)]
    else:
        fp32 = opt.fp32_groups
    return {id(p): m for group, ms in zip(opt.fp16_groups, fp32) for p, m in zip(group, ms)}


def _module_weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def export_sentence_transformer(rebuild, state_dict: dict, out_dir: Path, prompts: dict[str, str],
                                max_length: int | None = None, finalize=None):
    """Rebuild the model on CPU (`rebuild()`: the same modules as trained), load the weights, put it in
    its release form (`finalize`: a LoRA adapter merged into the weights), save it.

    max_length None keeps the rebuilt model's own max_seq_length (the base model's), not the
    training length.
    """
    model = rebuild()
    # weights training froze (a LoRA run's backbone) keep the base's own values, as loaded: ZeRO 1-2's
    # zero_to_fp32 leaves them out, and in bf16 the engine holds only rounded copies of them
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    state_dict = {k: v for k, v in state_dict.items() if k not in frozen}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    real_missing = [k for k in missing if not k.endswith("position_ids") and k not in frozen]
    if real_missing or unexpected:
        raise RuntimeError(f"export: weights do not match the model (missing {real_missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    if finalize is not None:
        model = finalize(model)
    if max_length:
        model.max_seq_length = max_length
    model.prompts = dict(prompts)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return model


def bf16_error(model, texts: list[str], prompt: str, reference: torch.Tensor) -> float:
    """How far bf16 arithmetic moves this model's embeddings of `texts` from fp32 (max |diff|)."""
    model.to(torch.bfloat16)
    try:
        low = model.encode(texts, prompt=prompt, convert_to_tensor=True, batch_size=len(texts))
    finally:
        model.to(torch.float32)
    return (low.float().cpu() - reference).abs().max().item()


@contextmanager
def all_cores():
    """Every core of this process's CPU set while rank 0 works alone (the release's CPU work): a launcher
    gives each rank one thread (torchrun's OMP_NUM_THREADS=1 with several ranks), and the other ranks
    are idle, waiting for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else os.cpu_count() or 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _encode_check(final_dir: Path, texts: list[str], prompt: str, reference: torch.Tensor, bf16: bool,
                  train_max_length: int, device: str) -> tuple[float, float, int]:
    """(max |diff| to `reference`, tolerance, the release's max_seq_length), the release encoded on `device`."""
    from train.models.model import open_sentence_transformer
    exported = open_sentence_transformer(str(final_dir), local_only=True, device=device)  # fp32, as the masters
    release_length = exported.max_seq_length
    exported.max_seq_length = train_max_length  # compare like with like; the release keeps its own length
    got = exported.encode(texts, prompt=prompt, convert_to_tensor=True, batch_size=len(texts)).float().cpu()
    diff = (got - reference).abs().max().item()
    tolerance = max(BF16_MARGIN * bf16_error(exported, texts, prompt, got), FP32_TOLERANCE) if bf16 else FP32_TOLERANCE
    del exported
    return diff, tolerance, release_length


def check_export(final_dir: Path, texts: list[str], prompt: str, engine_emb: torch.Tensor, bf16: bool,
                 train_max_length: int, device: str = "cpu") -> float:
    """Reload the release folder, encode as the engine did (same prompt, training length) and compare.

    fp32: the two differ only by summation order. bf16: the engine ran in bf16 and the release is
    its fp32 master copy, so the tolerance is derived from this model: BF16_MARGIN times the change
    that bf16 arithmetic itself makes to these embeddings. Keeps the evidence in export_check.pt.
    On the engine's `device` (a GPU encodes an LLM's 512-token probes in fp32 and bf16 in seconds where
    one CPU thread takes minutes); where the release does not fit beside the engine, on the CPU (run
    inside `all_cores`, as export_release does).
    """
    try:
        diff, tolerance, release_length = _encode_check(final_dir, texts, prompt, engine_emb, bf16,
                                                         train_max_length, device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        print(f"export check: the release does not fit on {device} beside the engine; checking on the CPU")
        diff, tolerance, release_length = _encode_check(final_dir, texts, prompt, engine_emb, bf16,
                                                         train_max_length, "cpu")
    torch.save({"texts": texts, "prompt": prompt, "embeddings": engine_emb, "max_abs_diff": diff,
                "tolerance": tolerance, "train_max_length": train_max_length, "release_max_length": release_length},
               final_dir.parent / "export_check.pt")
    if diff > tolerance:
        raise SystemExit(f"export check failed: the saved model differs from the trained engine by {diff:.2e} "
                         f"(tolerance {tolerance:.1e})")
    print(f"export check: reloaded model matches the engine (max |diff| {diff:.1e}, tolerance {tolerance:.1e}); "
          f"trained at {train_max_length} tokens, the release encodes at {release_length}")
    return diff


def export_release(engine, checkpoints, step: int, client_state: dict, embed, probe_texts: list[str],
                   probe_prompt: str, rebuild, prompts: dict[str, str], release_max_length: int | None,
                   train_max_length: int, finalize=None) -> Path:
    """Final checkpoint, its fp32 weights, the release folder, and the check that it encodes as the engine.

    `embed(texts, prompt)` encodes through the engine (every rank takes part: ZeRO-3 gathers weights in
    forward); `rebuild()` makes the untrained model with the same modules, on CPU. Rank 0 writes the
    release once, in OUTPUT_DIR/final.
    """
    tag = f"step{step}"
    checkpoints.save(engine, tag, client_state)
    # on node-local disks rank 0's disk holds its own ZeRO partitions only: gather from the engine
    weights = fp32_weights(engine, checkpoints.dir, tag, from_checkpoint=checkpoints.storage == "shared")
    engine.eval()
    with torch.no_grad():
        probe = embed(probe_texts, probe_prompt)
    final = checkpoints.dir.parent / "final"
    if engine.global_rank == 0:
        fault_injection.while_exporting()
        with all_cores():  # the rebuild, the LoRA merge and the save run on the CPU
            export_sentence_transformer(rebuild, weights, final, prompts, release_max_length, finalize)
            check_export(final, probe_texts, probe_prompt, probe.float().cpu(), engine.bfloat16_enabled(),
                         train_max_length, device=str(engine.device))
    return final
