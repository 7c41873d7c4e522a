"""Encoding through the DeepSpeed engine: a rank's texts of a step in a fixed number of forwards,
prompts as sentence-transformers passes them.

Why a fixed number: under ZeRO-3 every forward gathers the parameters with collectives, so every
rank must run the same number of forwards per step. In CBB fine-tuning ranks hold different tasks
(3 text kinds on a retrieval rank, 2 on an STS rank, more with several tasks), so each rank pools
all of its texts, sorts them by length and runs exactly `buckets` forwards, the bucket bounds chosen
to waste the fewest padded tokens; the embeddings are put back in order afterwards. One bucket pads
every query to passage length: on the demo tasks that is 1.9-2.2x the real tokens, against 1.5x for
one forward per text kind; two buckets give 1.3-1.4x with fewer forwards (tests/test_encoding.py).

Prompts go through the library's own path, `model.preprocess(texts, prompt=...)`, which also
reports the prompt's token length; a Pooling with `include_prompt=False` then leaves the prompt out
of the pooled tokens, exactly as `SentenceTransformer.encode(..., prompt=...)` does at inference.
Pooling reads one prompt length per batch, so a batch that mixes prompts of different lengths
pools each prompt's rows separately with the library's code (`MixedPromptPooling`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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


def length_buckets(lengths: list[int], k: int) -> list[list[int]]:
    """Row indices in exactly k non-empty groups (k <= len(lengths)), contiguous in length order, that
    minimise the padded tokens (sum over groups of rows x longest row): an exact dynamic programme."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    sorted_lengths = np.asarray(lengths)[order]
    n = len(order)
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} non-empty buckets of {n} rows")
    best = np.full(n + 1, np.inf)
    best[0] = 0.0                     # no group covers no row
    cuts = np.zeros((k, n + 1), dtype=np.int64)
    for b in range(k):
        new = np.full(n + 1, np.inf)  # b + 1 non-empty groups cannot cover 0 rows
        for j in range(1, n + 1):
            starts = np.arange(j)
            cost = best[:j] + (j - starts) * sorted_lengths[j - 1]
            cuts[b, j] = int(np.argmin(cost))
            new[j] = cost[cuts[b, j]]
        best = new
    bounds, j = [], n
    for b in reversed(range(k)):
        i = cuts[b, j]
        bounds.append((i, j))
        j = i
    return [order[i:j].tolist() for i, j in reversed(bounds)]


def _rows(part: dict, left_pad: bool) -> list[dict]:
    """One tokenized group split into single-row features, each trimmed to its own length."""
    out = []
    for r, length in enumerate(part["attention_mask"].sum(1).tolist()):
        cut = slice(-length, None) if left_pad else slice(0, length)
        row = {k: v[r:r + 1, cut] if isinstance(v, torch.Tensor) and v.ndim == 2 else v for k, v in part.items()}
        out.append(row)
    return out


@dataclass
class Tokenized:
    """Text groups tokenized row by row (each row trimmed to its own length), ready to be cut into
    forwards: `sizes` texts per group, in the groups' order."""
    rows: list[dict]
    sizes: list[int]
    pad_id: int
    left_pad: bool

    @property
    def tokens(self) -> int:
        """Non-padding tokens, counted on the host: no device sync."""
        return sum(row["attention_mask"].shape[1] for row in self.rows)


def tokenize_groups(model: SentenceTransformer, groups: list[TextGroup]) -> Tokenized:
    """Tokenize every group with its prompt through the library's `model.preprocess`. Safe to run in
    the prefetch thread while the step computes (the fast tokenizer releases the GIL), as long as no
    other thread tokenizes with the same model at the same time."""
    tokenizer = model.tokenizer
    pad_id, left_pad = tokenizer.pad_token_id or 0, tokenizer.padding_side == "left"
    rows = [row for texts, prompt in groups if texts
            for row in _rows(model.preprocess(texts, prompt=prompt or None), left_pad)]
    return Tokenized(rows, [len(texts) for texts, _ in groups], pad_id, left_pad)


def to_device(features: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}


def encode_tokenized(engine, tokenized: Tokenized, device, buckets: int = 2) -> tuple[list[torch.Tensor], int]:
    """Embeddings of every group from exactly `buckets` forwards through `engine` (length buckets),
    and the non-padding tokens encoded. Empty groups get an empty [0, d] tensor.

    Every rank that calls this once per step with the same `buckets` runs the same number of
    forwards, which is what ZeRO-3 needs, whatever texts it holds.
    """
    rows, n = tokenized.rows, len(tokenized.rows)
    rows = rows + [rows[-1]] * max(0, buckets - n)  # too few texts for the buckets: repeat one, drop its output
    chunks = length_buckets([row["attention_mask"].shape[1] for row in rows], buckets)
    outputs = [engine(to_device(merge_features([rows[i] for i in chunk], tokenized.pad_id, tokenized.left_pad),
                                device))["sentence_embedding"] for chunk in chunks]
    return list(in_row_order(outputs, chunks, n).split(tokenized.sizes)), tokenized.tokens


def in_row_order(outputs: list[torch.Tensor], chunks: list[list[int]], n: int) -> torch.Tensor:
    """The outputs of forwards over `chunks` (row indices) as one tensor in row order, rows >= n
    (repeats that only filled a forward) dropped."""
    order = torch.tensor([i for chunk in chunks for i in chunk], device=outputs[0].device)
    return torch.cat(outputs)[torch.argsort(order)][:n]


def encode_groups(engine, model: SentenceTransformer, groups: list[TextGroup], device,
                  buckets: int = 2) -> tuple[list[torch.Tensor], int]:
    """tokenize_groups, then encode_tokenized: the embeddings of every group from exactly `buckets` forwards."""
    return encode_tokenized(engine, tokenize_groups(model, groups), device, buckets)
