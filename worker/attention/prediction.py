"""The prediction recorded with every explanation: the top-k classes and their probabilities."""

from __future__ import annotations

import torch

__all__ = ["top_k"]


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and class indices of the ``k`` most likely classes, most likely first.

    ``k`` larger than the number of classes ``C`` returns all ``C`` (a 3-class model asked for the
    default top-5 still has a prediction). ``[B, C] -> ([B, min(k, C)] float32, [B, min(k, C)] int64)``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    probs = logits.float().softmax(dim=-1)
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return values, indices
