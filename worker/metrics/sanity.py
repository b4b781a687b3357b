"""The model-randomization sanity check (Adebayo et al., 2018, "Sanity Checks for Saliency Maps").

A map that explains the *model* must change when the model does. The check re-initializes part of
a copy of the model, explains the same images for the same classes, and measures the Spearman rank
correlation between each map and its counterpart. High correlation means the method mostly shows
something other than what the re-initialized layers learned (the image's structure, the earlier
blocks); a faithful method's correlation drops.

Which part (``SanityLayers``, ``docs/metrics.md``): ``output`` is Adebayo et al.'s cascade, which
starts at the output layer: the classifier head(s), the final norm(s), then the last ``k`` blocks,
top-down; ``blocks`` re-initializes the last ``k`` blocks and keeps the trained head and final norm.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from common.metric_settings import SanityLayers

__all__ = ["OUTPUT_LAYERS", "cascade_layers", "randomized_copy", "spearman"]

# timm's ViT initialization (``init_weights_vit_timm``): truncated normal, std 0.02, zero biases.
_INIT_STD = 0.02

# What sits above the blocks in timm's ViT family, output first: the classifier, DeiT's distillation
# classifier, the norm of average-pooled models, the final norm. Absent or ``Identity`` ones are skipped.
OUTPUT_LAYERS = ("head", "head_dist", "fc_norm", "norm")


def cascade_layers(model: nn.Module, blocks: int, layers: SanityLayers) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs the copy re-initializes, in the order their weights are drawn.

    ``output``: the ``OUTPUT_LAYERS`` the model has, then ``blocks.{L−1}`` down to ``blocks.{L−k}``
    (top-down, so a deeper cascade draws the same values for the layers a shallower one drew).
    ``blocks``: ``blocks.{L−k}`` up to ``blocks.{L−1}`` (bottom-up: the order vitscope has always
    drawn them in, so earlier sanity values stay reproducible).
    """
    model_blocks = cast(Sequence[nn.Module], model.blocks)
    depth = len(model_blocks)
    layers = SanityLayers(layers)
    least = 0 if layers is SanityLayers.OUTPUT else 1
    if not least <= blocks <= depth:
        raise ValueError(
            f"cannot re-initialize {blocks} blocks of a model with {depth} "
            f'(sanity_layers = "{layers.value}": {least} to {depth})'
        )
    chosen = range(depth - blocks, depth)
    if layers is SanityLayers.BLOCKS:
        return [(f"blocks.{index}", model_blocks[index]) for index in chosen]
    top = [
        (name, module)
        for name in OUTPUT_LAYERS
        if isinstance(module := getattr(model, name, None), nn.Module)
        and next(module.parameters(), None) is not None
    ]
    return top + [(f"blocks.{index}", model_blocks[index]) for index in reversed(chosen)]


def randomized_copy(
    model: nn.Module, blocks: int, seed: int, layers: SanityLayers = SanityLayers.OUTPUT
) -> nn.Module:
    """A deep copy of ``model`` with ``cascade_layers(model, blocks, layers)`` freshly initialized.

    Linear layers get timm's ViT initialization (truncated normal σ = 0.02, zero bias), drawn in
    ``cascade_layers``' order and, inside a layer, in module order; normalization layers weight 1 and
    bias 0; other parameters of those layers (layer-scale factors, BEiT's relative position bias) keep
    their values, which keeps each residual branch's scale what the rest of the network expects. The
    draws come from a CPU generator seeded with ``seed``, so every device and every process builds
    the same copy. The original is not touched.
    """
    clone = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in cascade_layers(clone, blocks, layers):
            for module in layer.modules():
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
