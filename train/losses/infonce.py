"""InfoNCE with in-batch negatives gathered from every rank (Conan-embedding, arXiv 2408.15710, Eq. 1).

For a query q_i with positive p_i, the candidates C are the positives and hard negatives of the
whole global batch (all ranks), and

    L = -1/N * sum_i log( exp(s(q_i, p_i) / tau) / sum_{c in C} exp(s(q_i, c) / tau) )

with s the cosine similarity and tau the temperature (0.02 by default, as in BGE and Conan).
Candidates from other ranks are gathered with gradients, so each passage embedding receives the
gradient of every query that scored it, wherever that query lives; the result equals one process
computing the loss over the concatenated global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather_with_grad, rank


def info_nce(q: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean cross-entropy of each query's positive (column labels[i]) among all candidates, by cosine / tau."""
    q, candidates = F.normalize(q.float(), dim=-1), F.normalize(candidates.float(), dim=-1)
    return F.cross_entropy(q @ candidates.T / temperature, labels)


def gathered_candidates(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None,
                        group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' candidates and the label of each local query.

    Candidates are ordered [positives of rank 0..W-1, negatives of rank 0..W-1], so query i of rank r
    has its positive at column r * B + i.
    """
    candidates = [all_gather_with_grad(pos, group)]
    if neg is not None and neg.numel():
        candidates.append(all_gather_with_grad(neg, group))
    labels = torch.arange(q.shape[0], device=q.device) + rank(group) * q.shape[0]
    return torch.cat(candidates), labels


class InfoNCELoss(nn.Module):
    """Cross-entropy of each query's positive among all gathered candidates (mean over local queries).

    Under data parallelism each rank returns the mean over its own queries; DeepSpeed averages the
    gradients over ranks, which gives the gradient of the mean over the global batch.
    """

    def __init__(self, temperature: float = 0.02):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None) -> torch.Tensor:
        candidates, labels = gathered_candidates(q, pos, neg)
        return info_nce(q, candidates, labels, self.temperature)
