"""Stable 64-bit ids of texts, the same on every rank and in every process (Python's hash() is salted
per process), so a loss can tell that two candidates gathered from different ranks are the same text."""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from train.losses.infonce import TextIds


def text_ids(texts: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """[N] int64: the first 8 bytes of each text's BLAKE2b digest."""
    ids = [int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
           for t in texts]
    return torch.tensor(ids, dtype=torch.long, device=device)


def positive_ids(examples: Sequence, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, P] every positive of each example (its `positives`, or the one it trains on), padded by
    repeating its first, so a row never matches a text that is not one of its positives."""
    sets = [list(dict.fromkeys(getattr(ex, "positives", None) or [ex.pos])) for ex in examples]
    width = max((len(s) for s in sets), default=1)
    return torch.stack([text_ids(s + [s[0]] * (width - len(s)), device) for s in sets]) if sets else \
        torch.zeros(0, 1, dtype=torch.long, device=device)


def retrieval_ids(examples: Sequence, pos: Sequence[str], neg: Sequence[str] = (),
                  device: torch.device | str = "cpu") -> TextIds:
    """The ids an InfoNCE loss needs for these examples and the positive / negative texts this rank encoded."""
    return TextIds(positive_ids(examples, device), text_ids(pos, device), text_ids(neg, device) if neg else None)
