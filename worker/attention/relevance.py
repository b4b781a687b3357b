"""Gradient-weighted relevance (Chefer, Gur & Wolf, 2021, "Generic Attention-model Explainability").

``docs/methods.md`` artifact 7. Unlike rollout it clamps per head before averaging and accumulates
additively, ``R ← R + Ā_l R``, so blocks that carry no positive evidence leave the map unchanged
instead of blurring it.
"""

from __future__ import annotations

import torch

from worker.attention.readout import Readout, readout_vector
from worker.attention.tokens import check_attention_shape, to_grid

__all__ = ["gradient_relevance"]


def gradient_relevance(
    attentions: torch.Tensor,
    gradients: torch.Tensor,
    num_prefix_tokens: int,
    grid_size: tuple[int, int],
    *,
    readout: Readout = Readout.TOKEN,
) -> torch.Tensor:
    """``Ā_l = mean_h(relu(A_l ⊙ G_l))``; ``R_0 = I``; ``R ← R + Ā_l R`` over the blocks in order.

    The map is ``(ρ R)[p:]`` (``ρ`` the ``readout`` row) min–max normalised to [0, 1] per sample (all
    zeros where it is constant). The final ``R`` is ``(I + Ā_{L-1}) ⋯ (I + Ā_0)``, so ``ρ R`` is
    evaluated from the left, ``r ← r + r Ā_l`` for ``l = L-1 … 0`` from ``ρ``: ``O(L·N²)`` instead
    of ``O(L·N³)``.
    Accumulated in float64, one block at a time. ``[L, B, H, N, N] (×2) -> [B, gh, gw]`` float32.
    """
    L, B, _, N = check_attention_shape(attentions, num_prefix_tokens, grid_size)
    if gradients.shape != attentions.shape:
        raise ValueError(
            f"gradients {tuple(gradients.shape)} must match attentions {tuple(attentions.shape)}"
        )
    row = readout_vector(readout, num_prefix_tokens, N, B, device=attentions.device)
    for layer in reversed(range(L)):
        weighted = (attentions[layer].double() * gradients[layer].double()).clamp_min(0.0).mean(dim=1)
        row = row + row @ weighted
    patches = row[:, 0, num_prefix_tokens:]
    low = patches.amin(dim=-1, keepdim=True)
    spread = patches.amax(dim=-1, keepdim=True) - low
    scaled = torch.where(spread > 0, (patches - low) / spread.clamp_min(torch.finfo(patches.dtype).tiny), 0.0)
    return to_grid(scaled, grid_size).float()
