"""Matryoshka representation learning (Kusupati et al., 2022; Conan-embedding §2.4).

    L_MRL = sum_d w_d * L(e[:, :d])

Every loss is also taken on the first d coordinates of the embeddings, for each listed d, so the
released model can be cut to any of them (`SentenceTransformer(path, truncate_dim=d)`). The losses
normalise after truncating, so each term trains the cosine of exactly the first d coordinates.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def matryoshka(loss_fn: Callable[..., torch.Tensor], embeddings: Sequence[torch.Tensor],
               dims: Sequence[int] | None, weights: Sequence[float] | None = None, **kwargs) -> torch.Tensor:
    """sum_d w_d * loss_fn(*[e[..., :d] for e in embeddings], **kwargs); dims None: the full width only."""
    if not dims:
        return loss_fn(*embeddings, **kwargs)
    weights = weights or [1.0] * len(dims)
    width = embeddings[0].shape[-1]
    if max(dims) > width:
        raise ValueError(f"Matryoshka dimension {max(dims)} exceeds the embedding width {width}")
    return sum(w * loss_fn(*(e[..., :d] for e in embeddings), **kwargs) for d, w in zip(dims, weights))
