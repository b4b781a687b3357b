"""Localization: does the map point at the region the dataset marks (a box or a mask)?

The region arrives in the model's input pixels (the box or mask already mapped through the same
resize and centre crop as the image, see ``worker.preprocess.Preprocessor.map_box`` / ``crop_mask``)
and is turned into ``coverage[i, j]``: the fraction of patch ``(i, j)``'s area inside the region.
Boxes are covered exactly (continuous overlap areas); masks by the share of the patch's pixels set.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["box_coverage", "mask_coverage", "mass_inside", "pointing_game"]


def box_coverage(
    box: tuple[float, float, float, float], input_size: tuple[int, int], grid_size: tuple[int, int]
) -> np.ndarray:
    """``[gh, gw]`` share of each patch's area inside ``box`` = ``(x0, y0, x1, y1)`` in input pixels.

    ``input_size`` is ``(H, W)``; patch ``(i, j)`` spans ``[j·W/gw, (j+1)·W/gw) × [i·H/gh, (i+1)·H/gh)``.
    Parts of the box outside the input are ignored.
    """
    H, W = input_size
    gh, gw = grid_size
    x0, y0, x1, y1 = box

    def overlap(lo: float, hi: float, side: int, cells: int) -> np.ndarray:
        edges = np.arange(cells + 1, dtype=np.float64) * side / cells
        return np.clip(np.minimum(hi, edges[1:]) - np.maximum(lo, edges[:-1]), 0, None) / (side / cells)

    return np.outer(overlap(y0, y1, H, gh), overlap(x0, x1, W, gw))


def mask_coverage(mask: np.ndarray, grid_size: tuple[int, int]) -> np.ndarray:
    """``[gh, gw]`` share of each patch's pixels set in ``mask`` ``[H, W]`` (bool), ``H, W`` multiples of the grid."""
    gh, gw = grid_size
    H, W = mask.shape
    if H % gh or W % gw:
        raise ValueError(f"mask {H}×{W} does not divide into a {gh}×{gw} patch grid")
    return mask.reshape(gh, H // gh, gw, W // gw).mean(axis=(1, 3), dtype=np.float64)


def pointing_game(maps: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """1.0 where the map's most important patch overlaps the region, else 0.0: ``[..., gh, gw] -> [...]``.

    Ties go to the first maximum in row-major order. "Overlaps" (any of its pixels inside) plays the
    part of the original pointing game's 15-pixel tolerance, about one 16-pixel patch.
    """
    flat = maps.flatten(-2)
    top = flat.argmax(dim=-1, keepdim=True)
    region = coverage.flatten(-2).expand_as(flat)
    return (region.gather(-1, top)[..., 0] > 0).float()


def mass_inside(maps: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Share of the map's (non-negative) mass inside the region, patches weighted by their coverage.

    ``[..., gh, gw] -> [...]``; NaN for a map without positive mass. A uniform map scores the
    region's share of the input.
    """
    flat = maps.flatten(-2).double().clamp_min(0)
    region = coverage.flatten(-2).double()
    total = flat.sum(-1)
    inside = (flat * region).sum(-1) / total
    return torch.where(total > 0, inside, torch.full_like(inside, float("nan"))).float()
