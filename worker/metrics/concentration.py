"""Concentration: how spread out a map is, as the normalized entropy of its mass."""

from __future__ import annotations

import math

import torch

__all__ = ["normalized_entropy"]


def normalized_entropy(maps: torch.Tensor) -> torch.Tensor:
    """``H(p) / log P`` of ``p = relu(m) / Σ relu(m)`` per map: ``[..., gh, gw] -> [...]``, in [0, 1].

    1 is a flat map (every patch equally important), 0 all mass on one patch; dividing by ``log P``
    makes grids of different sizes comparable. ``0 · log 0 = 0``. A map without positive mass has no
    distribution: NaN (the caller records nothing for it).
    """
    flat = maps.flatten(-2).double().clamp_min(0)
    P = flat.shape[-1]
    total = flat.sum(-1, keepdim=True)
    p = flat / total
    terms = torch.where(p > 0, p * p.log(), torch.zeros_like(p))
    entropy = -terms.sum(-1) / math.log(P) if P > 1 else torch.zeros_like(total[..., 0])
    return torch.where(total[..., 0] > 0, entropy, torch.full_like(entropy, math.nan)).float()
