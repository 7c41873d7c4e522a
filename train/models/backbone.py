"""What a run does to its backbone before training, and what the release does with it afterwards.

    options = BackboneOptions(...)                     # the model flags (train/args.py)
    backbone = prepare_backbone(model, own_config, options)
    ...  backbone.at_step(step, total)                 # soft masking's schedule, before each step
    rebuild = lambda: backbone.shaped_as_trained(open the base again)   # the export's empty model
    release = backbone.finalize(model_with_trained_weights)             # LoRA merged, attention set

Encoders (BERT, XLM-R) pass through unchanged unless LoRA or gradient checkpointing is asked for;
decoder-only models get their tokenizer, pooling and attention set up (train/models/decoder.py,
attention.py) and may train with LoRA (lora.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sentence_transformers import SentenceTransformer

from train.args import ModelConfig
from train.models.attention import SoftMask, release_bidirectional, released_attention, set_attention
from train.models.decoder import backbone, is_decoder_only, prepare_decoder
from train.models.lora import add_lora, has_lora, merge_lora, save_adapter


@dataclass(frozen=True)
class BackboneOptions:
    attention: str = "auto"               # auto | causal | bidirectional | soft (decoder-only models)
    gradient_checkpointing: bool = False
    lora_rank: int = 0                    # 0: full fine-tuning
    lora_alpha: float = 32.0
    lora_targets: str = "all-linear"
    lora_dropout: float = 0.0
    pooling: str | None = None            # the user's --pooling, kept over last-token pooling


@dataclass
class Backbone:
    options: BackboneOptions
    decoder: bool
    own_config: bool
    notes: list[str] = field(default_factory=list)
    soft_mask: SoftMask | None = None

    def at_step(self, step: int, total: int) -> float | None:
        """Soft masking's alpha for this step (None when it is off)."""
        return self.soft_mask.at_step(step, total) if self.soft_mask else None

    @property
    def release_attention(self) -> str:
        return released_attention(self.options.attention) if self.decoder else "bidirectional"

    def shaped_as_trained(self, model: SentenceTransformer) -> SentenceTransformer:
        """The freshly loaded base in the shape training used (tokenizer, pooling, LoRA layers), so the
        trained state dict loads into it key for key."""
        if self.decoder:
            prepare_decoder(model, self.own_config, self.options.pooling)
        if self.options.lora_rank:
            o = self.options
            add_lora(model, o.lora_rank, o.lora_alpha, o.lora_targets, o.lora_dropout)
        return model

    def finalize(self, model: SentenceTransformer, adapter_dir=None, base: str = "") -> SentenceTransformer:
        """The release form of a model holding the trained weights: LoRA merged into the weights (the
        adapter alone also written to `adapter_dir` when given), and the attention it finished
        training with written into its config."""
        if has_lora(model):
            if adapter_dir is not None:
                save_adapter(model, adapter_dir, base)
            merge_lora(model)
        if self.decoder and self.release_attention == "bidirectional":
            release_bidirectional(backbone(model))
        return model


def backbone_options(model: ModelConfig) -> BackboneOptions:
    """The backbone flags of a run (train/args.py's model and LoRA groups)."""
    return BackboneOptions(model.attention, model.gradient_checkpointing, model.lora_rank, model.lora_alpha,
                           model.lora_targets, model.lora_dropout, model.pooling)


def has_sentence_transformers_config(source: str, local_only: bool) -> bool:
    """Whether the model came with its own modules.json (Qwen3-Embedding, a released model)."""
    from pathlib import Path
    if Path(source).is_dir():
        return (Path(source) / "modules.json").is_file()
    try:
        from huggingface_hub import hf_hub_download
        hf_hub_download(source, "modules.json", local_files_only=local_only)
        return True
    except Exception:  # not on the hub, not cached, or no such file: a plain transformers checkpoint
        return False


def prepare_backbone(model: SentenceTransformer, own_config: bool, options: BackboneOptions) -> Backbone:
    """Set up `model` for training as `options` say; returns the Backbone that remembers it."""
    decoder = is_decoder_only(model)
    if not decoder and options.attention not in ("auto", "bidirectional"):
        raise SystemExit(f"--attention {options.attention}: {type(backbone(model)).__name__} is an encoder, "
                         "it attends bidirectionally already; the option is for decoder-only models")
    result = Backbone(options, decoder, own_config)
    if decoder:
        result.notes += ["decoder-only backbone: " + ", ".join(prepare_decoder(model, own_config, options.pooling))]
    if options.gradient_checkpointing:
        backbone(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        result.notes.append("gradient checkpointing")
    if options.lora_rank:
        trainable = add_lora(model, options.lora_rank, options.lora_alpha, options.lora_targets, options.lora_dropout)
        total = sum(p.numel() for p in backbone(model).parameters())
        result.notes.append(f"LoRA r={options.lora_rank} alpha={options.lora_alpha:g} on {options.lora_targets}: "
                            f"{trainable:,} of {total:,} backbone weights train")
    if decoder:
        result.soft_mask = set_attention(backbone(model), options.attention)
        if options.attention != "auto":
            result.notes.append(f"attention {options.attention}" + (" (alpha = step / steps, Conan-v2)"
                                                                    if result.soft_mask else ""))
    return result
