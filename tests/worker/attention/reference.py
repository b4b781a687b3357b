"""A plainly written reference of every formula in docs/methods.md, independent of ``worker.attention``.

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


def _split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, N, H·d] -> [B, H, N, d]``."""
    B, N, _ = t.shape
    return t.reshape(B, N, num_heads, -1).transpose(1, 2)


def _rotate(x: torch.Tensor, rope: torch.Tensor, half: bool) -> torch.Tensor:
    """Rotary position embedding: ``x · cos + rotate(x) · sin`` with ``rope = [sin | cos]``.

    ``rotate`` maps the pairs ``(x_{2i}, x_{2i+1}) -> (-x_{2i+1}, x_{2i})`` (interleaved layout), or
    ``(x_a, x_b) -> (-x_b, x_a)`` over the two halves of the head dimension (``half``).
    """
    sin, cos = rope[..., : rope.shape[-1] // 2], rope[..., rope.shape[-1] // 2 :]
    if half:
        first, second = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        rotated = torch.cat([-second, first], dim=-1)
    else:
        rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).reshape(x.shape)
    return x * cos + rotated * sin


def _relative_position_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """BEiT's learned bias per head and token pair: ``bias[h, i, j] = table[index[i, j], h]``."""
    N = index.shape[0]
    return table[index.reshape(-1)].reshape(N, N, -1).permute(2, 0, 1)


def _qkv(attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys, values ``[B, H, N, d]`` from the block's projection weights (fused or separate)."""
    H = attn.num_heads
    if getattr(attn, "qkv", None) is None:  # EVA-02 style separate projections
        return (
            _split_heads(attn.q_proj(h), H),
            _split_heads(attn.k_proj(h), H),
            _split_heads(attn.v_proj(h), H),
        )
    projected = h @ attn.qkv.weight.T
    if attn.qkv.bias is not None:
        projected = projected + attn.qkv.bias
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is not None:  # BEiT/EVA: learned query and value biases, none on the keys
        projected = projected + torch.cat([q_bias, torch.zeros_like(q_bias), attn.v_bias])
    q, k, v = projected.chunk(3, dim=-1)
    return _split_heads(q, H), _split_heads(k, H), _split_heads(v, H)


def _embed(
    model: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Tokens ``[B, N, C]`` in the model's order (class, distillation, register tokens, patches), and the per-model
    position terms of the attention: BEiT's shared relative bias, EVA's rotary embedding."""
    x = model.patch_embed(images)
    B = x.shape[0]
    x = x.reshape(B, -1, x.shape[-1])
    prefix = [
        token.expand(B, -1, -1)
        for token in (getattr(model, name, None) for name in ("cls_token", "dist_token", "reg_token"))
        if token is not None
    ]
    pos_embed = getattr(model, "pos_embed", None)
    if pos_embed is not None and getattr(model, "no_embed_class", False):
        x = torch.cat([*prefix, x + pos_embed], dim=1)
    else:
        x = torch.cat([*prefix, x], dim=1)
        if pos_embed is not None:
            x = x + pos_embed
    shared_bias = model.rel_pos_bias() if getattr(model, "rel_pos_bias", None) is not None else None
    rope = model.rope.get_embed() if getattr(model, "rope", None) is not None else None
    norm_pre = getattr(model, "norm_pre", None)
    if norm_pre is not None:
        x = norm_pre(x)
    return x, shared_bias, rope


def _attention_scores(
    attn: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    shared_bias: torch.Tensor | None,
    p: int,
    rope: torch.Tensor | None,
) -> torch.Tensor:
    """``q kᵀ · scale`` plus the family's position terms, before the softmax. ``[B, H, N, N]``."""
    if rope is not None:  # EVA: rotate the patch tokens' queries and keys, never the prefix tokens'
        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :p], _rotate(q[:, :, p:], rope, half)], dim=2)
        k = torch.cat([k[:, :, :p], _rotate(k[:, :, p:], rope, half)], dim=2)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    table = getattr(attn, "relative_position_bias_table", None)
    if table is not None:  # BEiT: a learned bias per head and token pair, per block
        scores = scores + _relative_position_bias(table, attn.relative_position_index)
    if shared_bias is not None:  # BEiT with one bias shared by all blocks
        scores = scores + shared_bias
    return scores


def _layer_scale(block: nn.Module, which: int, value: torch.Tensor) -> torch.Tensor:
    """The block's residual branch scaled as the family does: ``gamma_i`` (BEiT/EVA) or ``ls_i`` (ViT)."""
    gamma = getattr(block, f"gamma_{which}", None)
    if gamma is not None:
        return gamma * value
    ls = getattr(block, f"ls{which}", None)
    return ls(value) if ls is not None else value


def reference_pass(
    model: nn.Module, images: torch.Tensor, targets: list[int | None] | None = None
) -> ReferencePass:
    """Recompute a timm ViT/DeiT/BEiT/EVA forward by hand: ``x -> norm1 -> q, k, v -> softmax(scores)``.

    The scores are ``q kᵀ · scale`` plus each family's position term, written out here: BEiT's
    relative position bias (``table[index]`` per head), EVA's rotary embedding of the patch tokens'
    queries and keys (the sin/cos table is the model's ``rope.get_embed()``; the rotation is done
    here). Projections, norms, MLPs and the head are the model's own layers; the attention itself is
    never the timm module's forward. Each block's attention keeps its ``.grad`` (``retain_grad``), so
    ``∂ y[b, t_b] / ∂ A_l`` is read off after a plain ``backward`` — no hooks and no shared code with
    the core. A headless model (``num_classes = 0``) gets no backward: ``gradients``, ``logits`` and
    ``targets`` are then empty. The parameter gradients that ``backward`` accumulates are cleared.
    """
    model.eval()
    maps: list[torch.Tensor] = []
    p = model.num_prefix_tokens
    with torch.enable_grad():
        x, shared_bias, rope = _embed(model, images)
        for block in model.blocks:
            attn = block.attn
            h = block.norm1(x)
            B, N, _ = h.shape
            q, k, v = _qkv(attn, h)
            identity = nn.Identity()
            q, k = getattr(attn, "q_norm", identity)(q), getattr(attn, "k_norm", identity)(k)
            attention = torch.softmax(_attention_scores(attn, q, k, shared_bias, p, rope), dim=-1)
            attention.retain_grad()
            maps.append(attention)
            mixed = (attention @ v).transpose(1, 2).reshape(B, N, -1)
            mixed = getattr(attn, "norm", nn.Identity())(mixed)
            x = x + _layer_scale(block, 1, attn.proj(mixed))
            x = x + _layer_scale(block, 2, block.mlp(block.norm2(x)))
        output = model.forward_head(model.norm(x))
        if model.num_classes == 0:
            empty = np.zeros(0)
            return ReferencePass(
                logits=empty,
                attentions=np.stack([attention.detach().numpy() for attention in maps]),
                gradients=empty,
                targets=empty,
            )
        top1 = output.argmax(dim=1).tolist()
        chosen = [top1[b] if targets is None or targets[b] is None else targets[b] for b in range(B)]
        score = sum(output[b, chosen[b]] for b in range(B))
        score.backward()
    model.zero_grad(set_to_none=True)
    return ReferencePass(
        logits=output.detach().numpy(),
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


def ref_readout(readout: str, p: int, n: int) -> np.ndarray:
    """The row the classifier reads: ``e_0`` for the class token, the mean of the patch rows for ``avg``."""
    rho = np.zeros(n)
    if readout == "token":
        rho[0] = 1.0
    else:
        for j in range(p, n):
            rho[j] = 1.0 / (n - p)
    return rho


def ref_rollout_from_fused(
    fused: np.ndarray, p: int, grid_size: tuple[int, int], ratio: float, readout: str = "token"
) -> np.ndarray:
    """``fused`` ``[L, B, N, N]`` -> ``[B, gh, gw]``: discard, ``+ I``, normalise rows, multiply, read
    out ``(ρ R)[p:]`` with the full product ``R`` (no vector–matrix shortcut)."""
    L, B, N, _ = fused.shape
    out = np.zeros((B, N - p))
    for b in range(B):
        R = np.eye(N)
        for layer in range(L):
            matrix = ref_discard(fused[layer, b], p, ratio) + np.eye(N)
            for i in range(N):
                matrix[i] = matrix[i] / matrix[i].sum()
            R = matrix @ R
        row = (ref_readout(readout, p, N) @ R)[p:]
        out[b] = row / row.max() if row.max() > 0 else 0.0
    return grid(out, grid_size)


def ref_attention_rollout(
    attn: np.ndarray, p: int, grid_size: tuple[int, int], fusion: str, ratio: float, readout: str = "token"
) -> np.ndarray:
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}[fusion]
    fused = np.stack([fuse(attn[layer].astype(np.float64), axis=1) for layer in range(attn.shape[0])])
    return ref_rollout_from_fused(fused, p, grid_size, ratio, readout)


def ref_gradient_rollout(
    attn: np.ndarray,
    grad: np.ndarray,
    p: int,
    grid_size: tuple[int, int],
    ratio: float,
    readout: str = "token",
) -> np.ndarray:
    fused = np.stack(
        [
            np.maximum((attn[layer].astype(np.float64) * grad[layer]).mean(axis=1), 0.0)
            for layer in range(attn.shape[0])
        ]
    )
    return ref_rollout_from_fused(fused, p, grid_size, ratio, readout)


def ref_relevance(
    attn: np.ndarray, grad: np.ndarray, p: int, grid_size: tuple[int, int], readout: str = "token"
) -> np.ndarray:
    """Chefer et al.: ``Ā_l = mean_h relu(A ⊙ G)``, ``R ← R + Ā_l R``, the readout row ``ρ R``, min–max."""
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
        row = (ref_readout(readout, p, N) @ R)[p:]
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
