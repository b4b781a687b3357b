"""The token layout every artifact shares: ``N = p + P`` tokens, the ``P = gh × gw`` patches last.

The prefix tokens (class token, distillation token, registers; none in a ViT without a class
token) come first; the patches follow in
row-major grid order, so ``values[..., p:]`` reshapes straight to ``[..., gh, gw]``.
"""

from __future__ import annotations

import torch

__all__ = ["check_attention_shape", "to_grid"]


def check_attention_shape(
    attentions: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """``(L, B, H, N)`` of ``attentions`` ``[L, B, H, N, N]``; ``ValueError`` unless ``N = p + gh · gw``."""
    gh, gw = grid_size
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    N = num_prefix_tokens + gh * gw
    if attentions.ndim != 5 or attentions.shape[-2:] != (N, N):
        raise ValueError(
            f"attentions must be [L, B, H, {N}, {N}] for {num_prefix_tokens} prefix tokens and a "
            f"{gh}×{gw} grid, got {tuple(attentions.shape)}"
        )
    L, B, H, _, _ = attentions.shape
    return L, B, H, N


def to_grid(values: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Patch values ``[..., P]`` in row-major order -> ``[..., gh, gw]``."""
    gh, gw = grid_size
    return values.reshape(*values.shape[:-1], gh, gw)
