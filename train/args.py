"""Command-line arguments both training scripts share, declared once, in groups (as FlagEmbedding's
ModelArguments / DataArguments / TrainingArguments). Each script adds its own and sets its defaults."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_DTYPES = ("float32", "bfloat16", "float16")


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p.add_argument_group("model"))
    add_lora_args(p.add_argument_group("LoRA (peft)"))
    add_training_args(p.add_argument_group("training"))
    add_reliability_args(p.add_argument_group("reliability"))
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    return p


def add_model_args(g) -> None:
    g.add_argument("--model", default=None, help="local folder or hub id")
    g.add_argument("--pooling", default=None, choices=["mean", "cls", "lasttoken"], help="default: the model's")
    g.add_argument("--max-length", type=int, default=128,
                   help="tokens per text in training (a compute choice: the release keeps the model's own length)")
    g.add_argument("--release-max-length", type=int, default=None,
                   help="max_seq_length of the released model (default: the base model's own)")
    g.add_argument("--model-dtype", default="float32", choices=MODEL_DTYPES,
                   help="dtype the weights are loaded in. float32: fp32 master weights whatever the checkpoint's "
                        "own dtype (LLM backbones are saved in bf16; --precision bf16 still computes in bf16); "
                        "bfloat16 halves the weights' memory and needs --precision bf16")
    g.add_argument("--attn-implementation", default=None, choices=["sdpa", "eager", "flash_attention_2"],
                   help="transformers' attention kernel (default: transformers' own, sdpa; flash_attention_2 needs "
                        "the flash-attn package and --precision bf16)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer's activations in backward instead of keeping them (less memory, "
                        "about a third more compute); for LLM backbones")
    g.add_argument("--attention", default="auto", choices=["auto", "causal", "bidirectional", "soft"],
                   help="decoder-only backbones: auto keeps the model's own (causal for an LLM); bidirectional attends "
                        "both ways from the start; soft moves from causal to bidirectional over the run (Conan-v2's "
                        "soft mask, train/models/attention.py). The release attends as training ended")


def add_lora_args(g) -> None:
    g.add_argument("--lora-rank", type=int, default=0, help="train a LoRA adapter of this rank on a frozen backbone "
                                                            "(0: full fine-tuning); the release is the merged model")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scale alpha (the update is B A x alpha / rank)")
    g.add_argument("--lora-targets", default="all-linear",
                   help="modules to adapt: all-linear, or comma-separated names such as q_proj,k_proj,v_proj,o_proj")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter's input")
    g.add_argument("--save-adapter", action="store_true",
                   help="also write the adapter alone (peft format) to OUTPUT_DIR/final_adapter")


def add_training_args(g) -> None:
    g.add_argument("--output-dir", default="output/run", help="checkpoints, logs, summary.json and the release (final/)")
    g.add_argument("--deepspeed-config", default=str(ROOT / "ds_configs/zero0.json"),
                   help="default: plain data parallel (a model of e5/BGE size fits on every device); "
                        "ds_configs/zero1-3 for bigger models")
    g.add_argument("--epochs", type=int, default=1, help="passes over the data (pre-training; fine-tuning: of its largest task)")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: whole epochs)")
    g.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (AdamW; linear warmup and decay)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--warmup-ratio", type=float, default=0.05, help="share of the steps the learning rate warms up over")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="fills gradient_clipping: auto")
    g.add_argument("--temperature", type=float, default=0.02,
                   help="InfoNCE temperature (default 0.02, BGE's and the paper's); a base trained at another may "
                        "prefer its own (e5: 0.01; README's ablation)")
    g.add_argument("--mask-false-negatives", action=argparse.BooleanOptionalAction, default=True,
                   help="leave out of each query's InfoNCE denominator the candidates whose text is one of its "
                        "positives (another query's copy of the same passage), as sentence-transformers' "
                        "no-duplicates batches do; counted and reported")
    g.add_argument("--false-negative-margin", type=float, default=None,
                   help="also leave out a candidate whose cosine with the query exceeds its positive's by more than "
                        "this (Qwen3-Embedding's guard against unlabelled positives: 0.1); counted in summary.json")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on GPUs that have it")
    g.add_argument("--mini-batch", type=int, default=0,
                   help="GradCache: encode in mini-batches of this many texts and take the loss on the whole "
                        "cached batch, so the batch is bounded by time, not activation memory (0: off)")
    g.add_argument("--grad-cache-reduce", default="per-mini-batch", choices=["per-mini-batch", "once"],
                   help="GradCache under ZeRO-2/3, where DeepSpeed reduces gradients at each mini-batch's backward: "
                        "once reduces them once per step (DeepSpeed's coalesce_grad_reduction), holding whole "
                        "gradients of the trained weights on every rank during the step; fp32 only (ZeRO-0/1 reduce "
                        "once anyway)")
    g.add_argument("--log-steps", type=int, default=10, help="steps between logged means (console bar, TensorBoard in OUTPUT_DIR/runs)")
    g.add_argument("--seed", type=int, default=42, help="data order, negative sampling, dropout, the expansion layer's start")


def add_reliability_args(g) -> None:
    g.add_argument("--skip-bad-lines", action="store_true", help="skip and count bad JSONL lines instead of stopping")
    g.add_argument("--validate-data", action="store_true",
                   help="check every line of the training data in parallel before the model loads "
                        "(data_prep/validate.py): a bad line stops the run at step 0, not hours in")
    g.add_argument("--save-steps", type=int, default=500, help="steps between checkpoints")
    g.add_argument("--checkpoint-storage", default="shared", choices=["shared", "node-local"],
                   help="shared: OUTPUT_DIR is one filesystem on every node; node-local: each node has its own disk "
                        "(each node's first rank writes what its node reads back; train/run/checkpoint.py)")
    g.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint in the output dir) or a checkpoint dir")
    g.add_argument("--keep", type=int, default=3, help="complete checkpoints to keep (0: all)")
    g.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many NaN/Inf losses in a row")
    g.add_argument("--dist-timeout", type=float, default=30, help="minutes a collective waits for a lost rank")
    g.add_argument("--stop-at-step", type=int, default=0,
                   help="stop after saving this step's checkpoint, as if preempted (continue with --resume auto)")
    g.add_argument("--trace-examples", action="store_true", help="write the examples of every step to OUTPUT_DIR/trace/")


def add_stream_args(g) -> None:
    """How the data stream shuffles and groups (train.input.data.JsonlStream)."""
    g.add_argument("--group-buffer", type=int, default=64, help="global batches sorted by length together (1: off)")
    g.add_argument("--shuffle-buffer", type=int, default=0,
                   help="examples shuffled together before length grouping (0: --group-buffer global batches); "
                        "a resume re-reads at most this many")
    g.add_argument("--shard-mb", type=float, default=64, help="files are shuffled in byte ranges of this size")
    g.add_argument("--open-shards", type=int, default=16, help="shards read at once (bounds the open files)")
    g.add_argument("--prefetch", type=int, default=4,
                   help="global batches read, parsed (and in pre-training tokenized) ahead in a background thread (0: off)")


def stream_options(args) -> dict:
    return dict(group_buffer=args.group_buffer, shuffle_buffer=args.shuffle_buffer,
                shard_bytes=max(1, int(args.shard_mb * (1 << 20))), open_shards=args.open_shards)


# --- the typed configuration shared code reads: one dataclass per group of flags, as --help prints them

@dataclass(frozen=True)
class ModelConfig:
    model: str | None
    pooling: str | None
    max_length: int
    release_max_length: int | None
    model_dtype: str
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    attention: str = "auto"
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_targets: str = "all-linear"
    lora_dropout: float = 0.0
    save_adapter: bool = False


@dataclass(frozen=True)
class TrainingConfig:
    output_dir: str
    deepspeed_config: str
    epochs: int
    max_steps: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    temperature: float
    mask_false_negatives: bool
    precision: str
    mini_batch: int
    log_steps: int
    seed: int
    expansion_lr: float | None = None   # fine-tuning's expansion layer (its "losses" group)
    grad_cache_reduce: str = "per-mini-batch"
    false_negative_margin: float | None = None


@dataclass(frozen=True)
class ReliabilityConfig:
    skip_bad_lines: bool
    validate_data: bool
    save_steps: int
    checkpoint_storage: str
    resume: str | None
    keep: int
    max_bad_steps: int
    dist_timeout: float
    stop_at_step: int
    trace_examples: bool


@dataclass(frozen=True)
class RunConfig:
    """What train/run/runner.py, checkpoints and the export read of a run's flags."""
    model: ModelConfig
    training: TrainingConfig
    reliability: ReliabilityConfig
    prefetch: int = 4


def run_config(args: argparse.Namespace) -> RunConfig:
    """The shared groups of a parsed command line as typed, frozen configs."""
    def pick(cls):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
    return RunConfig(pick(ModelConfig), pick(TrainingConfig), pick(ReliabilityConfig), getattr(args, "prefetch", 4))


def flags_markdown(parser: argparse.ArgumentParser, title: str) -> str:
    """Every flag of a script, grouped as --help prints them, as Markdown (docs/flags.md is made from this:
    the flag tables come from the argument help, never a second hand-written copy)."""
    lines = [f"## {title}", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS and a.option_strings
                   and a.dest != "help"]
        if not actions:
            continue
        lines += [f"**{group.title}**", "", "| flag | default | meaning |", "|---|---|---|"]
        for a in actions:
            flag = ", ".join(f"`{o}`" for o in a.option_strings)
            default = "" if a.default in (None, argparse.SUPPRESS) or isinstance(a, argparse._StoreTrueAction) \
                else f"`{str(a.default).replace(str(ROOT) + '/', '')}`"  # the repo's own files, relative
            choices = f" (one of {', '.join(map(str, a.choices))})" if a.choices else ""
            text = (a.help or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {flag} | {default} | {text}{choices} |")
        lines.append("")
    return "\n".join(lines)
