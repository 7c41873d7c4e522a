"""Attention of a decoder-only backbone: causal (as pre-trained), bidirectional, or soft-masked.

Soft masking (Conan-embedding-v2, arXiv 2509.12892, the soft-mask mechanism of its method section):
an LLM pre-trained with a causal mask is fine-tuned into an embedder that attends both ways, and a
sudden switch loses what the causal model had learnt, so the mask moves from causal to
bidirectional over the run. At step t of T, alpha(t) = t / T, and a query at position i (1-based,
counted from the row's first real token, l real tokens in the row) gives a key at position j > i
the weight

    w_ij = min(alpha(t) * l / i, 1)          (w_ij = 1 for j <= i: the causal part is always open)

so early positions, which see least of the text, open first, and every weight reaches 1 at
alpha = 1. The weight multiplies the attention a key gets before the softmax normalises it, which is
adding log(w_ij) to the attention logits: w = 0 is the causal mask (-inf), w = 1 no mask. (The formula
is the one the issue quotes from the paper; this machine cannot reach the paper to check it.)

A model that finished soft masking, or was trained `bidirectional`, is released with
`config.is_causal = False`, which transformers' masking reads to build a bidirectional mask for
decoder models: the release loads with plain `SentenceTransformer(path)` and attends as it was trained.
"""
from __future__ import annotations

import torch

ATTENTION_MODES = ("auto", "causal", "bidirectional", "soft")


def soft_mask_bias(attention_mask: torch.Tensor, alpha: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, 1, L, L] additive attention bias for a [B, L] padding mask (1 = token, left or right padded):
    log(w_ij) above the diagonal, 0 on and below it, and the dtype's minimum towards padding."""
    mask = attention_mask.bool()
    position = mask.long().cumsum(1)                      # 1-based position of each real token in its row
    length = mask.sum(1, keepdim=True).clamp(min=1)       # l: real tokens per row
    i = position.clamp(min=1).unsqueeze(2).to(torch.float32)  # [B, L, 1] query positions
    weight = (alpha * length.unsqueeze(2).to(torch.float32) / i).clamp(max=1.0).expand(-1, -1, mask.shape[1])
    above = torch.ones(mask.shape[1], mask.shape[1], dtype=torch.bool, device=mask.device).triu(1)
    with torch.no_grad():
        bias = torch.where(above, weight.clamp(min=1e-30).log(), torch.zeros((), device=mask.device))
    minimum = torch.finfo(dtype).min
    if alpha <= 0:  # exactly the causal mask, not log of a tiny weight
        bias = bias.masked_fill(above, minimum)
    bias = bias.masked_fill(~mask.unsqueeze(1), minimum)  # keys that are padding
    return bias.clamp(min=minimum).unsqueeze(1).to(dtype)


class SoftMask:
    """Feeds the backbone the soft mask of the current step: the 2-D padding mask the backbone is
    called with becomes `soft_mask_bias` (the pooling still reads the 2-D mask from the features).
    sentence-transformers calls the backbone's `forward` directly, past module hooks, so the mask is
    swapped in a wrapper of that one method (removed by `remove`). `at_step(step, total)` before each
    step's forwards: the schedule is the step, so a resumed run continues it where it stopped."""

    def __init__(self, transformer: torch.nn.Module):
        self.alpha, self.transformer = 0.0, transformer
        original = transformer.forward

        def forward(*args, **kwargs):
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.ndim == 2:
                dtype = next((p.dtype for p in transformer.parameters() if p.is_floating_point()), torch.float32)
                kwargs["attention_mask"] = soft_mask_bias(mask, self.alpha, dtype)
            return original(*args, **kwargs)
        transformer.forward = forward

    def at_step(self, step: int, total: int) -> float:
        self.alpha = min(1.0, step / max(1, total))
        return self.alpha

    def remove(self) -> None:
        if "forward" in vars(self.transformer):
            del self.transformer.forward


def is_causal(transformer: torch.nn.Module) -> bool:
    return bool(getattr(transformer.config, "is_causal", True))


def set_attention(transformer: torch.nn.Module, mode: str) -> SoftMask | None:
    """Put a decoder backbone in `mode` for training; returns the SoftMask to step for 'soft'."""
    if mode in ("auto", "causal"):
        return None
    if mode == "bidirectional":
        release_bidirectional(transformer)
        return None
    if not is_causal(transformer):
        raise SystemExit("--attention soft: the model already attends bidirectionally (config.is_causal is "
                         "false); soft masking moves a causal model there. Pass --attention bidirectional")
    if getattr(transformer.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        raise SystemExit(f"--attention soft needs a float attention mask: --attn-implementation sdpa or eager, "
                         f"not {transformer.config._attn_implementation}")
    return SoftMask(transformer)


def release_bidirectional(transformer: torch.nn.Module) -> None:
    """Attend both ways from now on, and in the saved config (transformers reads `is_causal`)."""
    transformer.config.is_causal = False


def released_attention(mode: str) -> str:
    """What the release attends with after training in `mode` (soft ends at alpha = 1)."""
    return "bidirectional" if mode in ("bidirectional", "soft") else "causal"
