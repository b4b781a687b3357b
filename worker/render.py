"""Pictures out: the computed arrays as ``.npy`` bytes and their PNG presentations (``docs/methods.md`` artifact 8).

Pure functions from arrays to bytes; storing them is the pipeline's business. The ``.npy`` grid maps
are the primary artifacts; the PNGs are for people. Everything here runs once per image in the
worker's hot loop, so pictures are composed with numpy and Pillow rather than matplotlib figures
(only matplotlib's colormap table is used; pyplot is never imported).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from common.methods import ARRAY_ARTIFACTS, IMAGE_ARTIFACTS

__all__ = [
    "INPUT_PICTURE",
    "PICTURE_SOURCES",
    "heatmap_overlay",
    "layer_grid_png",
    "npy_bytes",
    "overlay_png",
    "render_artifacts",
]

# Each picture and the array it presents.
PICTURE_SOURCES: dict[str, str] = {
    "layer_scores.png": "layer_scores.npy",
    "rollout.png": "rollout.npy",
    "grad_rollout.png": "grad_rollout.npy",
    "relevance.png": "relevance.npy",
}
# The crop the model saw, stored as it is: a report shows it next to the overlays drawn on it.
INPUT_PICTURE = "input.png"
_LAYER_GRID = "layer_scores.png"
_OVERLAYS = tuple(name for name in IMAGE_ARTIFACTS if name not in (_LAYER_GRID, INPUT_PICTURE))

# Layer grid geometry, in pixels.
_PANEL_TARGET = 96  # a panel's longer side is the first whole multiple of the grid at or above this
_GAP = 6  # between panels and around the edge
_LABEL_HEIGHT = 14  # strip under each panel for its "block l" label
_TITLE_HEIGHT = 18
_WHITE = 255
_TEXT_COLOUR = (0, 0, 0)


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` in ``.npy`` format; ``np.load(io.BytesIO(b))`` gives it back with dtype and shape.

    Pickling is refused: an artifact is plain numbers, and a pickled object would be code to whoever
    loads it.
    """
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) ``[...]`` -> jet colours ``[..., 3]`` float in [0, 1]."""
    return matplotlib.colormaps["jet"](np.clip(values, 0.0, 1.0))[..., :3]


def heatmap_overlay(crop: np.ndarray, grid_map: np.ndarray) -> np.ndarray:
    """Draw a grid map over the model's input crop: ``uint8 [H, W, 3]`` + ``[gh, gw]`` -> ``uint8 [H, W, 3]``.

    ``docs/methods.md`` artifact 8: ``m = bilinear(grid_map)`` upsampled to ``H × W`` with ``align_corners=False``
    (pixel centres, as the patch grid tiles the crop), ``c = jet(m) + crop / 255`` (both in [0, 1]),
    ``out = round(255 * c / max(c))``. The map is expected in [0, 1] (the rollout maps are divided by
    their maximum, relevance is min-max normalized); values outside are clipped by the colormap.
    """
    if crop.ndim != 3 or crop.shape[2] != 3:
        raise ValueError(f"crop must be [H, W, 3], got shape {crop.shape}")
    if grid_map.ndim != 2:
        raise ValueError(f"grid_map must be [gh, gw], got shape {grid_map.shape}")
    H, W, _ = crop.shape
    grid = torch.from_numpy(np.asarray(grid_map, dtype=np.float32))[None, None]
    upsampled = F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)[0, 0].numpy()
    combined = _jet(upsampled) + crop.astype(np.float64) / 255.0
    combined /= combined.max()
    return np.rint(combined * 255.0).astype(np.uint8)


# zlib level 3: half the encoding time of the default 6 for about 12 % larger files (measured on
# 224×224 overlays). Encoding is most of the rendering time, which runs once per image per worker.
_PNG_COMPRESS_LEVEL = 3


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def overlay_png(crop: np.ndarray, grid_map: np.ndarray) -> bytes:
    """``heatmap_overlay`` encoded as PNG."""
    return _png(heatmap_overlay(crop, grid_map))


def _tiling(count: int) -> tuple[int, int]:
    """Rows and columns for ``count`` panels: ``rows = floor(sqrt(n))``, ``cols = ceil(n / rows)``.

    Landscape and near square, with no empty cell for the usual depths: 12 -> 3×4, 24 -> 4×6.
    """
    rows = math.isqrt(count)
    return rows, math.ceil(count / rows)


def _normalize_panels(layer_scores: np.ndarray) -> np.ndarray:
    """``[L, gh, gw]`` -> the same, each block min-max scaled to [0, 1] on its own.

    Per panel, because score magnitudes drift strongly with depth (later blocks attend more
    uniformly); one shared scale would leave most panels a flat blue. A constant panel becomes 0.
    """
    lowest = layer_scores.min(axis=(1, 2), keepdims=True)
    spread = layer_scores.max(axis=(1, 2), keepdims=True) - lowest
    return np.divide(layer_scores - lowest, spread, out=np.zeros_like(layer_scores), where=spread > 0)


def layer_grid_png(layer_scores: np.ndarray, *, title: str | None = None) -> bytes:
    """The per-block score grids ``[L, gh, gw]`` as one PNG, one panel per block (the paper's Fig. 4.1).

    Panels are tiled row by row in block order (see ``_tiling``), each grid enlarged by a whole
    factor with nearest neighbour to about 96 px (every patch stays a crisp square), coloured with jet
    after per-panel min-max normalization (``_normalize_panels``), and labelled ``block l`` underneath
    with ``l`` the 0-based index into the array. An optional title runs along the top (Pillow's
    built-in font: characters it lacks, such as an em dash, show as boxes).
    """
    if layer_scores.ndim != 3 or layer_scores.shape[0] < 1:
        raise ValueError(f"layer_scores must be [L, gh, gw] with L >= 1, got shape {layer_scores.shape}")
    L, gh, gw = layer_scores.shape
    rows, cols = _tiling(L)
    scale = math.ceil(_PANEL_TARGET / max(gh, gw))
    panel_h, panel_w = gh * scale, gw * scale
    top = _GAP + (_TITLE_HEIGHT if title else 0)
    cell_h, cell_w = panel_h + _LABEL_HEIGHT + _GAP, panel_w + _GAP

    colours = np.rint(_jet(_normalize_panels(layer_scores.astype(np.float64))) * 255.0).astype(np.uint8)
    panels = colours.repeat(scale, axis=1).repeat(scale, axis=2)
    canvas = np.full((top + rows * cell_h, _GAP + cols * cell_w, 3), _WHITE, dtype=np.uint8)
    for block in range(L):
        row, col = divmod(block, cols)
        y, x = top + row * cell_h, _GAP + col * cell_w
        canvas[y : y + panel_h, x : x + panel_w] = panels[block]

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    if title:
        draw.text((_GAP, _GAP // 2), title, fill=_TEXT_COLOUR, font=font)
    for block in range(L):
        row, col = divmod(block, cols)
        y, x = top + row * cell_h, _GAP + col * cell_w
        draw.text((x, y + panel_h + 1), f"block {block}", fill=_TEXT_COLOUR, font=font)
    return _png(np.asarray(image))


def render_artifacts(
    arrays: Mapping[str, np.ndarray], crop: np.ndarray, *, title: str | None = None
) -> dict[str, bytes]:
    """Every artifact's bytes for one image: each given array as ``.npy`` and the pictures of them.

    ``arrays`` is keyed by names from ``ARRAY_ARTIFACTS``; ``crop`` is the model's input crop
    ``uint8 [H, W, 3]`` (the array of ``Preprocessor.crop``). Each picture of ``IMAGE_ARTIFACTS`` is rendered
    when its source array (``PICTURE_SOURCES``) is present: the layer grid (with ``title``) from
    ``layer_scores.npy`` and an overlay on ``crop`` for each of the three maps. ``input.png`` is the
    crop itself, always written, so a report can show what the model saw beside what it attended to.
    """
    unknown = sorted(set(arrays) - set(ARRAY_ARTIFACTS))
    if unknown:
        raise ValueError(f"unknown array artifact name(s) {unknown}; expected names from {ARRAY_ARTIFACTS}")
    rendered = {name: npy_bytes(array) for name, array in arrays.items()}
    rendered[INPUT_PICTURE] = _png(crop)
    layer_scores = arrays.get(PICTURE_SOURCES[_LAYER_GRID])
    if layer_scores is not None:
        rendered[_LAYER_GRID] = layer_grid_png(layer_scores, title=title)
    for picture in _OVERLAYS:
        grid_map = arrays.get(PICTURE_SOURCES[picture])
        if grid_map is not None:
            rendered[picture] = overlay_png(crop, grid_map)
    return rendered
