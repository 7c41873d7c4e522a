"""InfoNCE with in-batch negatives gathered from every rank (Conan-embedding, arXiv 2408.15710, Eq. 1).

For a query q_i with positive p_i, the candidates C are the positives and hard negatives of the
whole global batch (all ranks), and

    L = -1/N * sum_i log( exp(s(q_i, p_i) / tau) / sum_{c in C \\ F_i} exp(s(q_i, c) / tau) )

with s the cosine similarity and tau the temperature (0.02 by default, as in BGE and Conan).
Candidates from other ranks are gathered with gradients, so each passage embedding receives the
gradient of every query that scored it, wherever that query lives; the result equals one process
computing the loss over the concatenated global batch.

F_i are the false negatives of q_i: candidates other than its own column whose text is one of its
positives (another query with the same passage, or that passage mined as another query's hard
negative). Counted as negatives they would push q_i away from its own positive; they are left out
of the denominator, which is what sentence-transformers' no-duplicates batches achieve by sampling.
Texts are compared by 64-bit ids (train/losses/text_ids.py), gathered with the candidates.

A second, score-based guard (Qwen3-Embedding's, arXiv 2506.05176): with a margin m, a candidate c
scoring s(q_i, c) > s(q_i, p_i) + m is taken for an unlabelled positive and also left out of the
denominator (`score_guard`; off unless --false-negative-margin is given).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.losses.distributed import all_gather_ids, all_gather_with_grad, rank


@dataclass
class TextIds:
    """Ids of a rank's texts for one loss: what tells a copy of a query's positive from a negative."""
    positives: torch.Tensor          # [B, P]: every positive of each local query (padded by repeating one)
    pos: torch.Tensor                # [B]: the positive each local query trains on
    neg: torch.Tensor | None = None  # [B * n]: the local hard negatives


def info_nce(q: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor, temperature: float,
             exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of each query's positive (column labels[i]) among all candidates, by cosine / tau;
    exclude [B, C] (True: not a negative of that query) leaves candidates out of the denominator."""
    q, candidates = F.normalize(q.float(), dim=-1), F.normalize(candidates.float(), dim=-1)
    logits = q @ candidates.T / temperature
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    return F.cross_entropy(logits, labels)


def score_guard(q: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """[B, C] True where a candidate's cosine with the query exceeds that of its positive (column labels[i])
    by more than `margin`; computed without gradients, at the full width."""
    with torch.no_grad():
        s = F.normalize(q.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T
        guard = s > s.gather(1, labels[:, None]) + margin
        guard[torch.arange(len(labels), device=labels.device), labels] = False
    return guard


def guarded(exclude: torch.Tensor | None, guard: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    """(the exclude mask with the score guard's candidates added, how many the guard added)."""
    if guard is None:
        return exclude, 0
    added = guard if exclude is None else guard & ~exclude
    return (guard if exclude is None else exclude | guard), int(added.sum())


def copies_of_positives(positives: torch.Tensor, candidate_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, C] True where candidate c is one of query i's positives but not its own column labels[i]."""
    same = (candidate_ids[None, None, :] == positives[:, :, None]).any(dim=1)
    same[torch.arange(len(labels), device=labels.device), labels] = False
    return same


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


def false_negatives(ids: TextIds | None, labels: torch.Tensor, group=None, gather_pos: bool = True) -> torch.Tensor | None:
    """The exclude mask of info_nce for candidates laid out as gathered_candidates lays them out
    (gather_pos=False: positives local, as CBB's retrieval ranks hold the same ones); None without ids."""
    if ids is None:
        return None
    columns = [all_gather_ids(ids.pos, group) if gather_pos else ids.pos]
    if ids.neg is not None and ids.neg.numel():
        columns.append(all_gather_ids(ids.neg, group))
    return copies_of_positives(ids.positives.to(labels.device), torch.cat(columns).to(labels.device), labels)


class InfoNCELoss(nn.Module):
    """Cross-entropy of each query's positive among all gathered candidates (mean over local queries).

    Under data parallelism each rank returns the mean over its own queries; DeepSpeed averages the
    gradients over ranks, which gives the gradient of the mean over the global batch. With `ids`,
    copies of a query's positive among its candidates are left out (false negatives, above).
    """

    def __init__(self, temperature: float = 0.02, margin: float | None = None):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature, self.margin = temperature, margin
        self.excluded = 0  # false negatives left out so far (this rank's queries), for the run's report
        self.guarded = 0   # ... and left out by the score guard

    def forward(self, q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None,
                ids: TextIds | None = None) -> torch.Tensor:
        candidates, labels = gathered_candidates(q, pos, neg)
        exclude = false_negatives(ids, labels)
        if exclude is not None:
            self.excluded += int(exclude.sum())
        if self.margin is not None:
            exclude, added = guarded(exclude, score_guard(q, candidates, labels, self.margin))
            self.guarded += added
        return info_nce(q, candidates, labels, self.temperature, exclude)
