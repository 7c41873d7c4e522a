"""Encoding through the DeepSpeed engine: a rank's texts of a step in one forward, prompts as
sentence-transformers passes them.

Why one forward: under ZeRO-3 every forward gathers the parameters with collectives, so every rank
must run the same number of forwards per step. In CBB fine-tuning ranks hold different tasks
(3 text kinds on a retrieval rank, 2 on an STS rank, more with several tasks), so each rank packs
all of its texts into one batch, runs it once, and splits the embeddings afterwards. On a GPU this
also saves kernel launches.

Prompts go through the library's own path, `model.preprocess(texts, prompt=...)`, which also
reports the prompt's token length; a Pooling with `include_prompt=False` then leaves the prompt out
of the pooled tokens, exactly as `SentenceTransformer.encode(..., prompt=...)` does at inference.
Pooling reads one prompt length per batch, so a batch that mixes prompts of different lengths
pools each prompt's rows separately with the library's code (`MixedPromptPooling`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling

TextGroup = tuple[list[str], str]  # texts and the prompt they are encoded with ("" for none)


class MixedPromptPooling(Pooling):
    """Pooling that also takes a per-row `prompt_length` tensor (rows of several prompts in one batch).

    Rows that share a prompt length are pooled together by the library's Pooling; with one length
    for the whole batch (or include_prompt=True) this is Pooling itself. It has no weights, so
    the release folder keeps the stock Pooling module.
    """

    def forward(self, features: dict, **kwargs) -> dict:
        lengths = features.get("prompt_length")
        if self.include_prompt or not isinstance(lengths, torch.Tensor) or lengths.ndim != 1 \
                or bool((lengths == lengths[0]).all()):
            return super().forward(features, **kwargs)
        rows_total = lengths.shape[0]
        out = None
        for value in lengths.unique().tolist():
            rows = (lengths == value).nonzero().squeeze(1)
            part = {k: v[rows] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == rows_total else v
                    for k, v in features.items() if k != "prompt_length"}
            if value:
                part["prompt_length"] = int(value)
            pooled = super().forward(part, **kwargs)["sentence_embedding"]
            if out is None:
                out = pooled.new_zeros(rows_total, pooled.shape[-1])
            out = out.index_copy(0, rows, pooled)
        features["sentence_embedding"] = out
        return features


def allow_mixed_prompts(model: SentenceTransformer) -> SentenceTransformer:
    """Swap a prompt-excluding Pooling for MixedPromptPooling (the same config; training only)."""
    for name, module in model.named_children():
        if type(module) is Pooling and not module.include_prompt:
            model._modules[name] = MixedPromptPooling(**module.get_config_dict())
    return model


def _prompt_length(features: dict, rows: int) -> torch.Tensor:
    value = features.get("prompt_length") or 0
    return torch.full((rows,), int(value), dtype=torch.long)


def merge_features(parts: list[dict], pad_id: int, left_pad: bool) -> dict:
    """Pad the tokenized groups to one width and stack them; prompt lengths become one value, or one per row."""
    width = max(p["input_ids"].shape[1] for p in parts)
    merged: dict = {}
    for key, value in parts[0].items():
        if key == "prompt_length":
            continue
        if isinstance(value, torch.Tensor) and value.ndim == 2:
            fill = pad_id if key == "input_ids" else 0
            padded = [F.pad(p[key], (width - p[key].shape[1], 0) if left_pad else (0, width - p[key].shape[1]),
                            value=fill) for p in parts]
            merged[key] = torch.cat(padded)
        else:
            merged[key] = value  # batch metadata such as the modality
    lengths = torch.cat([_prompt_length(p, p["input_ids"].shape[0]) for p in parts])
    if bool((lengths == lengths[0]).all()):
        if lengths[0]:
            merged["prompt_length"] = int(lengths[0])
    else:
        merged["prompt_length"] = lengths
    return merged


def encode_groups(engine, model: SentenceTransformer, groups: list[TextGroup],
                  device) -> tuple[list[torch.Tensor], int]:
    """Embeddings of every group from ONE forward through `engine`, and the non-padding tokens encoded.

    Empty groups get an empty [0, d] tensor. Every rank that calls this once per step runs one
    forward per step, which is what ZeRO-3 needs.
    """
    sizes = [len(texts) for texts, _ in groups]
    parts = [model.preprocess(texts, prompt=prompt or None) for texts, prompt in groups if texts]
    tokenizer = model.tokenizer
    features = merge_features(parts, tokenizer.pad_token_id or 0, tokenizer.padding_side == "left")
    tokens = int(features["attention_mask"].sum())  # counted on the host, before the copy: no device sync
    features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
    embeddings = engine(features)["sentence_embedding"]
    return list(embeddings.split(sizes)), tokens
