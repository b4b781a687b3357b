"""Attention rollout (Abnar & Zuidema, 2020) and its gradient-weighted variant.

``docs/methods.md`` artifacts 5 and 6. Both fuse each block's heads into one ``N × N`` matrix ``F_l``,
optionally discard its smallest entries, add the identity for the residual connection, make every
row sum to 1 and multiply the blocks together; the class token's row of the product, restricted to
the patches, is the map. The product is taken in float64 because 24 blocks of float32 matrix products
lose the small entries that make up most of the map.
"""

from __future__ import annotations

import math

import torch

from common.methods import HeadFusion
from worker.attention.readout import Readout, readout_vector
from worker.attention.tokens import check_attention_shape, to_grid

__all__ = [
    "attention_rollout",
    "discard_smallest",
    "fuse_heads",
    "gradient_fusion",
    "gradient_rollout",
    "readout_row",
    "rollout_matrices",
]


def fuse_heads(attentions: torch.Tensor, head_fusion: HeadFusion = HeadFusion.MEAN) -> torch.Tensor:
    """``F_l = fuse_h(A_l)``: the elementwise mean, max or min over heads, in float64.

    Converted one block at a time: a float64 copy of all blocks at once would be the largest tensor
    in the worker. ``[L, B, H, N, N] -> [L, B, N, N]`` float64.
    """
    head_fusion = HeadFusion(head_fusion)
    if head_fusion is HeadFusion.MEAN:
        return torch.stack([layer.double().mean(dim=1) for layer in attentions])
    if head_fusion is HeadFusion.MAX:
        return torch.stack([layer.double().amax(dim=1) for layer in attentions])
    return torch.stack([layer.double().amin(dim=1) for layer in attentions])


def gradient_fusion(attentions: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """``F_l = relu(mean_h(A_l ⊙ G_l))`` in float64, one block at a time.

    Heads are averaged before the ReLU, so a head that votes against the target class cancels one
    that votes for it. ``[L, B, H, N, N] (×2) -> [L, B, N, N]`` float64.
    """
    if gradients.shape != attentions.shape:
        raise ValueError(
            f"gradients {tuple(gradients.shape)} must match attentions {tuple(attentions.shape)}"
        )
    return torch.stack(
        [
            (attention.double() * gradient.double()).mean(dim=1).clamp_min(0.0)
            for attention, gradient in zip(attentions, gradients, strict=True)
        ]
    )


def discard_smallest(fused: torch.Tensor, num_prefix_tokens: int, discard_ratio: float) -> torch.Tensor:
    """Zero the ``floor(r · N · P)`` smallest entries of each ``F_l[b]`` among its patch columns.

    Candidates are the ``N × P`` entries in columns ``j >= p``; the prefix columns are never touched,
    so the class token's own contribution survives any ratio. Counted per sample and per block;
    ``r = 0`` zeroes nothing (the original method). Equal values at the cut are discarded in
    row-major order, so the result never depends on the kernel or the batch it ran in. (The cut is
    found with ``kthvalue`` rather than a full sort: same result, several times faster.)
    Returns a new tensor. ``[L, B, N, N] -> [L, B, N, N]``.
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    L, B, N, _ = fused.shape
    P = N - num_prefix_tokens
    count = math.floor(discard_ratio * N * P)
    result = fused.clone()
    if count == 0:
        return result
    patches = result[..., num_prefix_tokens:].reshape(L, B, N * P)
    cut = patches.kthvalue(count, dim=-1, keepdim=True).values
    below, at_cut = patches < cut, patches == cut
    still_to_discard = count - below.sum(dim=-1, keepdim=True)
    discard = below | (at_cut & (at_cut.cumsum(dim=-1) <= still_to_discard))
    result[..., num_prefix_tokens:] = patches.masked_fill(discard, 0.0).reshape(L, B, N, P)
    return result


def rollout_matrices(fused: torch.Tensor, num_prefix_tokens: int, discard_ratio: float) -> torch.Tensor:
    """``Â_l = row_normalize(discard(F_l) + I)`` in float64; every row sums to 1.

    The identity stands for the residual connection around each attention block.
    ``[L, B, N, N] -> [L, B, N, N]`` float64.
    """
    kept = discard_smallest(fused.double(), num_prefix_tokens, discard_ratio)
    N = kept.shape[-1]
    with_residual = kept + torch.eye(N, dtype=kept.dtype, device=kept.device)
    return with_residual / with_residual.sum(dim=-1, keepdim=True)


def readout_row(matrices: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """``ρ R`` with ``R = Â_{L-1} ⋯ Â_1 Â_0`` (later blocks multiply from the left).

    Only this one row is read out, so it is evaluated from the left as vector–matrix products,
    ``r ← r Â_l`` for ``l = L-1 … 0`` starting from ``ρ``: the same numbers by associativity, in
    ``O(L·N²)`` instead of the ``O(L·N³)`` of the full product.
    ``[L, B, N, N], ρ [B, 1, N] -> [B, N]``.
    """
    row = rho.to(matrices.dtype)
    for layer in reversed(range(len(matrices))):
        row = row @ matrices[layer]
    return row[:, 0, :]


def _grid_map(row: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """``(ρ R)[b, p:] / max`` on the grid, all zeros where the maximum is 0. ``[B, N] -> [B, gh, gw]`` float32."""
    readout = row[:, num_prefix_tokens:]
    peak = readout.amax(dim=-1, keepdim=True)
    scaled = torch.where(peak > 0, readout / peak.clamp_min(torch.finfo(readout.dtype).tiny), 0.0)
    return to_grid(scaled, grid_size).float()


def _read_out(
    matrices: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int], readout: Readout
) -> torch.Tensor:
    _, B, N, _ = matrices.shape
    rho = readout_vector(readout, num_prefix_tokens, N, B, dtype=matrices.dtype, device=matrices.device)
    return _grid_map(readout_row(matrices, rho), num_prefix_tokens, grid_size)


def attention_rollout(
    attentions: torch.Tensor,
    num_prefix_tokens: int,
    grid_size: tuple[int, int],
    *,
    head_fusion: HeadFusion = HeadFusion.MEAN,
    discard_ratio: float = 0.9,
    readout: Readout = Readout.TOKEN,
) -> torch.Tensor:
    """Attention rollout: ``F_l = fuse_h(A_l)``, then discard, ``+ I``, row-normalise, multiply, read out.

    The map is ``(ρ R)[p:]`` divided by its maximum, ``ρ`` the ``readout`` row (class-agnostic: no
    gradients involved). ``[L, B, H, N, N] -> [B, gh, gw]`` float32 in [0, 1].
    """
    check_attention_shape(attentions, num_prefix_tokens, grid_size)
    fused = fuse_heads(attentions, head_fusion)
    matrices = rollout_matrices(fused, num_prefix_tokens, discard_ratio)
    return _read_out(matrices, num_prefix_tokens, grid_size, readout)


def gradient_rollout(
    attentions: torch.Tensor,
    gradients: torch.Tensor,
    num_prefix_tokens: int,
    grid_size: tuple[int, int],
    *,
    discard_ratio: float = 0.9,
    readout: Readout = Readout.TOKEN,
) -> torch.Tensor:
    """Gradient rollout: ``F_l = relu(mean_h(A_l ⊙ G_l))``, then the same discard, ``+ I``, product, readout.

    Class-specific through ``G``. ``[L, B, H, N, N] (×2) -> [B, gh, gw]`` float32 in [0, 1].
    """
    check_attention_shape(attentions, num_prefix_tokens, grid_size)
    fused = gradient_fusion(attentions, gradients)
    matrices = rollout_matrices(fused, num_prefix_tokens, discard_ratio)
    return _read_out(matrices, num_prefix_tokens, grid_size, readout)
