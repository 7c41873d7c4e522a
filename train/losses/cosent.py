"""CoSENT loss for sentence pairs with graded similarity (Su, 2022; Conan-embedding Eq. 2).

For pairs (i, j) and (k, l) of the batch whose gold scores satisfy g(i,j) > g(k,l),

    L = log( 1 + sum_{g(i,j) > g(k,l)} exp( lambda * (cos(x_k, x_l) - cos(x_i, x_j)) ) )

so the model is pushed to rank every pair by its gold score; only the order of the scores matters,
so any numeric scale works (0-5, 0/1 labels). lambda (the scale) is 20 by default, as in the paper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cosent(cosines: torch.Tensor, gold: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """CoSENT over a batch of pair cosines [B] and gold scores [B]."""
    diff = scale * (cosines[None, :] - cosines[:, None])          # diff[a, b] = scale * (cos_b - cos_a)
    ordered = gold[:, None] > gold[None, :]                       # pair a should score above pair b
    diff = diff.masked_fill(~ordered, float("-inf"))
    zero = torch.zeros(1, dtype=diff.dtype, device=diff.device)   # the "1 +" inside the log
    return torch.logsumexp(torch.cat([zero, diff.flatten()]), dim=0)


class CoSENTLoss(nn.Module):
    def __init__(self, scale: float = 20.0):
        super().__init__()
        self.scale = scale

    def forward(self, emb1: torch.Tensor, emb2: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        cosines = F.cosine_similarity(emb1.float(), emb2.float(), dim=-1)
        return cosent(cosines, gold.float().to(cosines.device), self.scale)


def pair_cosent(emb1: torch.Tensor, emb2: torch.Tensor, gold: torch.Tensor, scale: float) -> torch.Tensor:
    """CoSENT over pair embeddings [B, d] (already gathered across ranks) and gold scores [B]."""
    return cosent(F.cosine_similarity(emb1.float(), emb2.float(), dim=-1), gold.float(), scale)
