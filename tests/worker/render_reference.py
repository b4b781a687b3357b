"""The renderer as first written: one picture at a time with numpy, matplotlib's colormap and Pillow.

Kept as the plainly written reference the fast paths of ``worker.render`` (batched tensor ops, the
cached grid template, libpng encoding) must match pixel for pixel.
"""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

_PANEL_TARGET, _GAP, _LABEL_HEIGHT, _TITLE_HEIGHT = 96, 6, 14, 18


def jet(values: np.ndarray) -> np.ndarray:
    return matplotlib.colormaps["jet"](np.clip(values, 0.0, 1.0))[..., :3]


def heatmap_overlay(crop: np.ndarray, grid_map: np.ndarray) -> np.ndarray:
    H, W, _ = crop.shape
    grid = torch.from_numpy(np.asarray(grid_map, dtype=np.float32))[None, None]
    upsampled = F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)[0, 0].numpy()
    combined = jet(upsampled) + crop.astype(np.float64) / 255.0
    combined /= combined.max()
    return np.rint(combined * 255.0).astype(np.uint8)


def layer_grid(layer_scores: np.ndarray, title: str | None = None) -> np.ndarray:
    L, gh, gw = layer_scores.shape
    rows = math.isqrt(L)
    cols = math.ceil(L / rows)
    scale = math.ceil(_PANEL_TARGET / max(gh, gw))
    panel_h, panel_w = gh * scale, gw * scale
    top = _GAP + (_TITLE_HEIGHT if title else 0)
    cell_h, cell_w = panel_h + _LABEL_HEIGHT + _GAP, panel_w + _GAP
    scores = layer_scores.astype(np.float64)
    lowest = scores.min(axis=(1, 2), keepdims=True)
    spread = scores.max(axis=(1, 2), keepdims=True) - lowest
    normalized = np.divide(scores - lowest, spread, out=np.zeros_like(scores), where=spread > 0)
    colours = np.rint(jet(normalized) * 255.0).astype(np.uint8)
    panels = colours.repeat(scale, axis=1).repeat(scale, axis=2)
    canvas = np.full((top + rows * cell_h, _GAP + cols * cell_w, 3), 255, dtype=np.uint8)
    for block in range(L):
        row, col = divmod(block, cols)
        y, x = top + row * cell_h, _GAP + col * cell_w
        canvas[y : y + panel_h, x : x + panel_w] = panels[block]
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    if title:
        draw.text((_GAP, _GAP // 2), title, fill=(0, 0, 0), font=font)
    for block in range(L):
        row, col = divmod(block, cols)
        y, x = top + row * cell_h, _GAP + col * cell_w
        draw.text((x, y + panel_h + 1), f"block {block}", fill=(0, 0, 0), font=font)
    return np.asarray(image)
