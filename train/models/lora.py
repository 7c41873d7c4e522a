"""LoRA through peft, as FlagEmbedding's decoder-only fine-tuner trains LLM embedders by default.

The adapter is added with sentence-transformers' `add_adapter` (transformers' PEFT integration: the
LoRA layers are injected in place, the model keeps its class and module names), so DeepSpeed,
GradCache and the checkpoints see one ordinary module whose only trainable weights are the adapter's.
The release is the merged model (`merge_lora`: W + B A * alpha / r folded into every adapted layer,
the LoRA layers then replaced by their base layers), which loads and encodes with nothing but
sentence-transformers; `save_adapter` writes the adapter alone for those who want it.

The failure this guards against (reported of LoRA-tuned embedders): a release that encodes exactly
like the base because the adapter's weights were dropped on the way out. The export check compares
the merged release with the training engine (which runs the unmerged adapter), and a test checks
that the release differs from the base.
"""
from __future__ import annotations

from pathlib import Path

from sentence_transformers import SentenceTransformer

from train.models.decoder import backbone


def lora_config(rank: int, alpha: float, targets: str, dropout: float = 0.0):
    from peft import LoraConfig
    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, lora_dropout=dropout, bias="none")


def add_lora(model: SentenceTransformer, rank: int, alpha: float, targets: str, dropout: float = 0.0) -> int:
    """Freeze the backbone and add a LoRA adapter; returns the number of trainable parameters. Every
    other module (an expansion layer added after this) stays trainable."""
    transformer = backbone(model)
    for p in transformer.parameters():
        p.requires_grad_(False)
    try:
        model.add_adapter(lora_config(rank, alpha, targets, dropout))
    except ValueError as e:  # peft names the targets it could not find
        raise SystemExit(f"--lora-targets {targets}: {e}") from None
    return sum(p.numel() for p in transformer.parameters() if p.requires_grad)


def has_lora(model: SentenceTransformer) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return any(isinstance(m, BaseTunerLayer) for m in backbone(model).modules())


def merge_lora(model: SentenceTransformer) -> SentenceTransformer:
    """Fold the adapter into the weights and drop the LoRA layers: a plain model that encodes as the
    adapted one did (peft's own merge, layer by layer, as LoraModel.merge_and_unload does)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    transformer = backbone(model)
    for name, module in list(transformer.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent_name) if parent_name else transformer, child,
                    module.get_base_layer())
    # what transformers' save_pretrained reads to save an adapter instead of the whole model
    transformer._hf_peft_config_loaded = False
    if hasattr(transformer, "peft_config"):
        del transformer.peft_config
    for p in transformer.parameters():
        p.requires_grad_(True)
    return model


def save_adapter(model: SentenceTransformer, out_dir: Path, base: str) -> Path:
    """The adapter alone (adapter_config.json + adapter_model.safetensors), naming its base model."""
    transformer = backbone(model)
    transformer.save_pretrained(str(out_dir))  # with the adapter loaded, transformers saves only the adapter
    config = out_dir / "adapter_config.json"
    if config.is_file():
        import json
        data = json.loads(config.read_text())
        data["base_model_name_or_path"] = base
        config.write_text(json.dumps(data, indent=2))
    return out_dir
