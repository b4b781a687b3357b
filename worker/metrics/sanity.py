"""The model-randomization sanity check (Adebayo et al., 2018, "Sanity Checks for Saliency Maps").

A map that explains the *model* must change when the model does. The check re-initializes the last
``k`` blocks of a copy of the model, explains the same images for the same classes, and measures the
Spearman rank correlation between each map and its counterpart. High correlation means the method
mostly shows something other than what the re-initialized blocks learned (the image's structure, the
earlier blocks); a faithful method's correlation drops.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["randomized_copy", "spearman"]

# timm's ViT initialization (``init_weights_vit_timm``): truncated normal, std 0.02, zero biases.
_INIT_STD = 0.02


def randomized_copy(model: nn.Module, blocks: int, seed: int) -> nn.Module:
    """A deep copy of ``model`` whose last ``blocks`` transformer blocks are freshly initialized.

    Linear layers get timm's ViT initialization, normalization layers weight 1 and bias 0; other
    parameters of those blocks (layer-scale factors) keep their values, which keeps each residual
    branch's scale what the rest of the network expects. The draws come from a CPU generator seeded with
    ``seed``, so every device and every process builds the same copy. The original is not touched.
    """
    clone = copy.deepcopy(model).eval()
    all_blocks = list(clone.blocks)
    if not 1 <= blocks <= len(all_blocks):
        raise ValueError(f"cannot re-initialize {blocks} blocks of a model with {len(all_blocks)}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in all_blocks[-blocks:]:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    weight = torch.empty(module.weight.shape, dtype=torch.float32)
                    nn.init.trunc_normal_(weight, std=_INIT_STD, generator=generator)
                    module.weight.copy_(weight)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.LayerNorm | nn.GroupNorm) and module.weight is not None:
                    module.weight.fill_(1.0)
                    if module.bias is not None:
                        module.bias.zero_()
    return clone


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last axis, ties sharing their average rank (as ``scipy.stats.rankdata``).

    ``rank_i = #{j: v_j < v_i} + (#{j: v_j = v_i} + 1) / 2``; ``O(P²)`` per row, a few hundred patches.
    """
    less = (values[..., None, :] < values[..., :, None]).sum(-1)
    equal = (values[..., None, :] == values[..., :, None]).sum(-1)
    return less.double() + (equal.double() + 1) / 2


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of two maps per leading index: ``[..., gh, gw] × 2 -> [...]``.

    The Pearson correlation of average ranks; NaN where either map is constant (no order to compare).
    """
    ra, rb = _average_ranks(a.flatten(-2)), _average_ranks(b.flatten(-2))
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    denominator = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    rho = (ra * rb).sum(-1) / denominator
    return torch.where(denominator > 0, rho, torch.full_like(rho, float("nan"))).float()
