"""Merge a fine-tuned model with its base to keep general ability (LM-Cocktail, arXiv 2311.13534).

    python train/run/merge.py --model output/finetune/final --base intfloat/multilingual-e5-small \
        --weight 0.5 --output output/finetune/merged

Fine-tuning on a few tasks gains in domain and loses elsewhere. LM-Cocktail's remedy is a weighted
average of the parameters: theta = w * theta_finetuned + (1 - w) * theta_base. Every encoder tensor
that the base also has (same name, same shape) is averaged; what only the fine-tuned model has (the
expansion layer of `train/finetune.py`) is kept as trained. The result is a sentence-transformers
folder like the input (prompts, max_seq_length, model card), with the merge recorded in its card.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer


def merge_weights(finetuned: SentenceTransformer, base: SentenceTransformer, weight: float) -> tuple[int, int]:
    """Average the encoder in place: finetuned <- weight * finetuned + (1 - weight) * base.

    Returns (tensors averaged, tensors kept as fine-tuned). Raises if the encoders do not match
    (another architecture or vocabulary is not a base of this model)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    ft_encoder, base_encoder = finetuned[0].auto_model, base[0].auto_model
    base_state = base_encoder.state_dict()
    ft_state = ft_encoder.state_dict()
    mismatched = [k for k, v in ft_state.items() if k in base_state and base_state[k].shape != v.shape]
    missing = [k for k in ft_state if k not in base_state]
    if mismatched or missing:
        raise ValueError(f"the base's encoder does not match the fine-tuned one: "
                         f"{len(mismatched)} tensors of another shape (e.g. {mismatched[:2]}), "
                         f"{len(missing)} missing (e.g. {missing[:2]})")
    with torch.no_grad():
        for name, tensor in ft_state.items():
            if tensor.is_floating_point():
                tensor.mul_(weight).add_(base_state[name].to(tensor.device, tensor.dtype), alpha=1.0 - weight)
    kept = sum(1 for module in list(finetuned)[1:] for _ in module.parameters())  # pooling / expansion / normalize: as fine-tuned
    return len(ft_state), kept


def merge_release(model_dir: str | Path, base: str, weight: float, output: str | Path) -> Path:
    """Write the merged release folder; the base is a local folder or hub id (offline e5 works)."""
    from train.models.model import open_sentence_transformer, resolve_model
    finetuned = open_sentence_transformer(str(model_dir), local_only=True)  # both fp32: a bf16 base is upcast
    source, local_only = resolve_model(base)
    base_model = open_sentence_transformer(source, local_only)
    averaged, kept = merge_weights(finetuned, base_model, weight)
    output = Path(output)
    finetuned.save(str(output))
    card = Path(model_dir) / "README.md"
    note = (f"\n\n## Merged with the base model\n\nLM-Cocktail merge (arXiv 2311.13534): "
            f"{weight:g} x this fine-tuned model + {1 - weight:g} x `{base}`, {averaged} encoder tensors "
            f"averaged, the layers after pooling kept as fine-tuned (`train/run/merge.py`).\n")
    if card.is_file():
        (output / "README.md").write_text(card.read_text(encoding="utf-8") + note, encoding="utf-8")
    print(f"merged {averaged} encoder tensors ({weight:g} fine-tuned + {1 - weight:g} base); "
          f"kept {kept} tensors after pooling as fine-tuned -> {output}")
    return output


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="the fine-tuned sentence-transformers folder")
    p.add_argument("--base", required=True, help="the model it was fine-tuned from (folder or hub id)")
    p.add_argument("--weight", type=float, default=0.5, help="share of the fine-tuned weights")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    try:
        merge_release(args.model, args.base, args.weight, args.output)
    except ValueError as e:
        raise SystemExit(f"merge error: {e}") from None


if __name__ == "__main__":
    main()
