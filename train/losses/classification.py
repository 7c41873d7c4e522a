"""Classification as contrastive learning without in-batch negatives (Conan-embedding §2.3).

Each text q_i is scored against one text of its own label p_i and n texts of other labels y_ik:

    L = -1/B sum_i log( exp(s(q_i, p_i)/tau) / (exp(s(q_i, p_i)/tau) + sum_k exp(s(q_i, y_ik)/tau)) )

Only a text's own candidates count: another text of the same label elsewhere in the batch must not
be pushed away, so the batch's other positives are not negatives here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def classification(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, temperature: float) -> torch.Tensor:
    """q, pos [B, d]; neg [B * n, d] (n other-label texts per query)."""
    q = F.normalize(q.float(), dim=-1)
    own = torch.cat([pos[:, None], neg.reshape(q.shape[0], -1, neg.shape[-1])], dim=1)  # [B, 1 + n, d]
    scores = torch.einsum("bd,bkd->bk", q, F.normalize(own.float(), dim=-1)) / temperature
    return F.cross_entropy(scores, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
