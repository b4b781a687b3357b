"""Per-layer maps read straight from the attention: what the class token reads, and the score matrix.

``docs/methods.md`` artifacts 3 and 4. Neither needs gradients; both keep one map per block (and per head
for the class-token map) so the layer-by-layer picture of the paper's Fig. 4.1 can be drawn.
"""

from __future__ import annotations

import torch

from common.methods import LayerScoreReduction
from worker.attention.tokens import check_attention_shape, to_grid

__all__ = ["cls_attention", "layer_scores"]


def cls_attention(
    attentions: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int]
) -> torch.Tensor:
    """What the class token reads in every head of every block: ``A_l[b, h, 0, p:]`` on the grid.

    Query row 0 is the class token also when ``p = 2`` (DeiT's distillation token is row 1) or when
    registers follow it. ``[L, B, H, N, N] -> [B, L, H, gh, gw]``.
    """
    check_attention_shape(attentions, num_prefix_tokens, grid_size)
    rows = attentions[:, :, :, 0, num_prefix_tokens:]
    return to_grid(rows.permute(1, 0, 2, 3), grid_size)


def layer_scores(
    attentions: torch.Tensor,
    num_prefix_tokens: int,
    grid_size: tuple[int, int],
    reduction: LayerScoreReduction = LayerScoreReduction.QUERY_MAX,
) -> torch.Tensor:
    """The paper's per-layer score matrix, one map per block, on patch-to-patch attention only.

    With ``a = A_l[b, :, p:, p:]`` (prefix rows and columns dropped):
    ``query_max`` (default): ``m[h, j] = max_i a[h, i, j]``, then the mean over heads — how strongly
    patch ``j`` is attended to, at most;
    ``key_max``: ``m[h, i] = max_j a[h, i, j]``, then the mean over heads — how peaked patch ``i``'s
    own attention is;
    ``head_max``: ``m[i, j] = max_h a[h, i, j]``, then the mean over queries ``i`` — the strongest
    head for each pair, averaged over who is asking.
    ``[L, B, H, N, N] -> [B, L, gh, gw]``.
    """
    check_attention_shape(attentions, num_prefix_tokens, grid_size)
    reduction = LayerScoreReduction(reduction)
    p = num_prefix_tokens
    a = attentions[..., p:, p:]
    if reduction is LayerScoreReduction.QUERY_MAX:
        scores = a.amax(dim=-2).mean(dim=2)
    elif reduction is LayerScoreReduction.KEY_MAX:
        scores = a.amax(dim=-1).mean(dim=2)
    else:
        scores = a.amax(dim=2).mean(dim=-2)
    return to_grid(scores.transpose(0, 1), grid_size)
