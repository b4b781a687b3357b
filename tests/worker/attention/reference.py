"""A plainly written reference of every formula in METHODS.md, independent of ``worker.attention``.

Written for reading, not speed: numpy, explicit loops over samples, layers and heads, and a
hand-written ViT forward that recomputes the attention from each block's weights. Inputs may be
float32 (as captured); every slice is taken to float64 before any arithmetic. The core is compared
against these functions on real timm architectures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class ReferencePass:
    """What the hand-written forward computes (float32, as the model does), as numpy arrays.

    ``attentions``/``gradients`` ``[L, B, H, N, N]``, ``logits`` ``[B, C]``, ``targets`` ``[B]``.
    """

    logits: np.ndarray
    attentions: np.ndarray
    gradients: np.ndarray
    targets: np.ndarray


def reference_pass(
    model: nn.Module, images: torch.Tensor, targets: list[int | None] | None = None
) -> ReferencePass:
    """Recompute a timm ViT's forward by hand: ``x -> norm1 -> qkv -> softmax(q kᵀ · scale)`` per block.

    Each block's attention keeps its ``.grad`` (``retain_grad``), so ``∂ y[b, t_b] / ∂ A_l`` is read
    off after a plain ``backward`` — no hooks and no shared code with the core. The parameter
    gradients that ``backward`` also accumulates are cleared again.
    """
    model.eval()
    maps: list[torch.Tensor] = []
    with torch.enable_grad():
        x = model.patch_embed(images)
        x = model._pos_embed(x)
        x = model.norm_pre(x)
        for block in model.blocks:
            attn = block.attn
            h = block.norm1(x)
            B, N, _ = h.shape
            qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
            scores = (q * attn.scale) @ k.transpose(-2, -1)
            attention = torch.softmax(scores, dim=-1)
            attention.retain_grad()
            maps.append(attention)
            mixed = (attention @ v).transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
            x = x + block.ls1(attn.proj(attn.norm(mixed)))
            x = x + block.ls2(block.mlp(block.norm2(x)))
        logits = model.forward_head(model.norm(x))
        top1 = logits.argmax(dim=1).tolist()
        chosen = [top1[b] if targets is None or targets[b] is None else targets[b] for b in range(B)]
        score = sum(logits[b, chosen[b]] for b in range(B))
        score.backward()
    model.zero_grad(set_to_none=True)
    return ReferencePass(
        logits=logits.detach().numpy(),
        attentions=np.stack([attention.detach().numpy() for attention in maps]),
        gradients=np.stack([attention.grad.numpy() for attention in maps]),
        targets=np.array(chosen, dtype=np.int64),
    )


def grid(values: np.ndarray, grid_size: tuple[int, int]) -> np.ndarray:
    return values.reshape(*values.shape[:-1], *grid_size)


def ref_cls_attention(attn: np.ndarray, p: int, grid_size: tuple[int, int]) -> np.ndarray:
    """``[L, B, H, N, N] -> [B, L, H, gh, gw]``: row 0 (the class token), patch columns."""
    L, B, H, _, _ = attn.shape
    out = np.zeros((B, L, H, *grid_size))
    for b in range(B):
        for layer in range(L):
            for head in range(H):
                out[b, layer, head] = grid(attn[layer, b, head, 0, p:], grid_size)
    return out


def ref_layer_scores(attn: np.ndarray, p: int, grid_size: tuple[int, int], reduction: str) -> np.ndarray:
    """``[L, B, H, N, N] -> [B, L, gh, gw]``, one sample, block and head at a time."""
    L, B, H, _, _ = attn.shape
    out = np.zeros((B, L, *grid_size))
    for b in range(B):
        for layer in range(L):
            a = attn[layer, b, :, p:, p:].astype(np.float64)  # [H, queries i, keys j]
            if reduction == "query_max":  # per head: the strongest query for each key j
                per_head = [a[h].max(axis=0) for h in range(H)]
                score = np.mean(per_head, axis=0)
            elif reduction == "key_max":  # per head: the strongest key for each query i
                per_head = [a[h].max(axis=1) for h in range(H)]
                score = np.mean(per_head, axis=0)
            else:  # head_max: per pair the strongest head, then averaged over queries i
                strongest = np.maximum.reduce([a[h] for h in range(H)])
                score = strongest.mean(axis=0)
            out[b, layer] = grid(score, grid_size)
    return out


def ref_discard(matrix: np.ndarray, p: int, ratio: float) -> np.ndarray:
    """Zero the floor(r·N·P) smallest patch-column entries of one ``[N, N]`` matrix (ties: row-major)."""
    N = matrix.shape[0]
    P = N - p
    kept = matrix.astype(np.float64)
    candidates = kept[:, p:].ravel()  # row-major over (i, j - p)
    count = math.floor(ratio * N * P)
    rows, columns = np.divmod(np.argsort(candidates, kind="stable")[:count], P)
    kept[rows, p + columns] = 0.0
    return kept


def ref_rollout_from_fused(fused: np.ndarray, p: int, grid_size: tuple[int, int], ratio: float) -> np.ndarray:
    """``fused`` ``[L, B, N, N]`` -> ``[B, gh, gw]``: discard, ``+ I``, normalise rows, multiply, read out."""
    L, B, N, _ = fused.shape
    out = np.zeros((B, N - p))
    for b in range(B):
        R = np.eye(N)
        for layer in range(L):
            matrix = ref_discard(fused[layer, b], p, ratio) + np.eye(N)
            for i in range(N):
                matrix[i] = matrix[i] / matrix[i].sum()
            R = matrix @ R
        row = R[0, p:]
        out[b] = row / row.max() if row.max() > 0 else 0.0
    return grid(out, grid_size)


def ref_attention_rollout(
    attn: np.ndarray, p: int, grid_size: tuple[int, int], fusion: str, ratio: float
) -> np.ndarray:
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}[fusion]
    fused = np.stack([fuse(attn[layer].astype(np.float64), axis=1) for layer in range(attn.shape[0])])
    return ref_rollout_from_fused(fused, p, grid_size, ratio)


def ref_gradient_rollout(
    attn: np.ndarray, grad: np.ndarray, p: int, grid_size: tuple[int, int], ratio: float
) -> np.ndarray:
    fused = np.stack(
        [
            np.maximum((attn[layer].astype(np.float64) * grad[layer]).mean(axis=1), 0.0)
            for layer in range(attn.shape[0])
        ]
    )
    return ref_rollout_from_fused(fused, p, grid_size, ratio)


def ref_relevance(attn: np.ndarray, grad: np.ndarray, p: int, grid_size: tuple[int, int]) -> np.ndarray:
    """Chefer et al.: ``Ā_l = mean_h relu(A ⊙ G)``, ``R ← R + Ā_l R``, row 0, min–max."""
    L, B, H, N, _ = attn.shape
    out = np.zeros((B, N - p))
    for b in range(B):
        R = np.eye(N)
        for layer in range(L):
            weighted = np.mean(
                [np.maximum(attn[layer, b, h].astype(np.float64) * grad[layer, b, h], 0.0) for h in range(H)],
                axis=0,
            )
            R = R + weighted @ R
        row = R[0, p:]
        spread = row.max() - row.min()
        out[b] = (row - row.min()) / spread if spread > 0 else 0.0
    return grid(out, grid_size)


def ref_top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities, sorted descending, the first k (and their classes)."""
    logits = logits.astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = exp / exp.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(probs, order, axis=1), order
