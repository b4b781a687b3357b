"""Pictures out: the computed arrays as ``.npy`` bytes and their PNG presentations (``docs/methods.md`` artifact 8).

Pure functions from arrays to bytes; which pictures an image gets (``common.artifacts``) and storing
them are the pipeline's business (``worker.pipeline.cpu.draw_pictures``). The ``.npy`` grid maps are
the primary artifacts; the PNGs are for people. Everything here runs once per image in the
worker's hot loop, so it is written for speed without changing a pixel of what ``docs/methods.md``
(artifact 8) defines:

- overlays are drawn for a whole micro-batch at once (``heatmap_overlays``): as tensor ops on the
  GPU when the maps come from one, as one compiled loop (numba, GIL released) on a CPU, both with
  matplotlib's jet table looked up by index exactly as matplotlib does;
- a layer grid's white canvas, title and ``block l`` labels are drawn once per layout and cached;
  each image only paints its coloured panels (compiled);
- PNGs are written by ``worker.png`` (Huffman coding of the filtered rows at the default level, the
  layer grid's runs coded as matches), with the GIL released.

Only matplotlib's colormap table is used; pyplot is never imported.
"""

from __future__ import annotations

import functools
import io
import math

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit
from PIL import Image, ImageDraw, ImageFont

from worker.png import DEFAULT_PNG_LEVEL, PNG_LEVELS, png_bytes

__all__ = [
    "DEFAULT_PNG_LEVEL",
    "PNG_LEVELS",
    "heatmap_overlay",
    "heatmap_overlays",
    "layer_grid_pixels",
    "npy_bytes",
    "png_bytes",
]

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


@functools.cache
def _jet_table() -> tuple[np.ndarray, int]:
    """matplotlib's jet lookup table ``[N + 3, 3]`` float64 (the last three rows: under, over, bad) and N."""
    colormap = matplotlib.colormaps["jet"]
    rows = [colormap(np.arange(colormap.N)), colormap.get_under(), colormap.get_over(), colormap.get_bad()]
    table = np.vstack([np.asarray(row, dtype=np.float64).reshape(-1, 4)[:, :3] for row in rows])
    return np.ascontiguousarray(table), colormap.N


def _jet_indices(values: torch.Tensor) -> torch.Tensor:
    """The rows of the jet table matplotlib picks for ``values`` (clipped to [0, 1]): ``floor(v·N)``,
    with 1 mapped to ``N - 1`` and NaN to the "bad" row. Multiplying by ``N = 256`` is exact in binary
    floating point, so the index is the same as matplotlib's for every value, on any device."""
    _, N = _jet_table()
    scaled = values.clamp(0.0, 1.0) * N
    indices = scaled.floor().clamp(max=N - 1).to(torch.int64)
    return torch.where(torch.isnan(values), torch.full_like(indices, N + 2), indices)


def _jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) ``[...]`` -> jet colours ``[..., 3]`` float in [0, 1]."""
    table, _ = _jet_table()
    return table[_jet_indices(torch.from_numpy(np.asarray(values))).numpy()]


def heatmap_overlays(crops: torch.Tensor, grid_maps: torch.Tensor) -> torch.Tensor:
    """Several grid maps over each of a batch of crops, as tensor ops on the tensors' device.

    ``crops`` ``uint8 [B, H, W, 3]`` and ``grid_maps`` ``[B, M, gh, gw]`` -> ``uint8 [B, M, H, W, 3]``.
    ``docs/methods.md`` artifact 8, per picture: ``m = bilinear(grid_map)`` upsampled to ``H × W`` in float32 with
    ``align_corners=False`` (pixel centres, as the patch grid tiles the crop), ``c = jet(m) + crop /
    255`` in float64, ``out = round(255 · c / max(c))`` with the maximum over that picture. Maps are
    expected in [0, 1] (rollout maps are divided by their maximum, relevance is min-max normalized);
    values outside are clipped by the colormap. Identical, pixel for pixel, to composing each picture
    with numpy and matplotlib's colormap (``tests/worker/render_reference.py``).
    """
    if crops.ndim != 4 or crops.shape[3] != 3:
        raise ValueError(f"crops must be [B, H, W, 3], got shape {tuple(crops.shape)}")
    if grid_maps.ndim != 4 or grid_maps.shape[0] != crops.shape[0]:
        raise ValueError(
            f"grid_maps must be [B, M, gh, gw] for {crops.shape[0]} crops, got {tuple(grid_maps.shape)}"
        )
    H, W = crops.shape[1:3]
    upsampled = F.interpolate(grid_maps.to(torch.float32), size=(H, W), mode="bilinear", align_corners=False)
    if crops.device.type == "cpu":
        return _compose_compiled(upsampled, crops)
    return _compose_tensors(upsampled, crops)


def _compose_tensors(upsampled: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    """Jet colours plus the crop, scaled by the picture's maximum, as tensor ops (a GPU's path)."""
    B, M, H, W = upsampled.shape
    table = torch.from_numpy(_jet_table()[0]).to(crops.device)
    indices = _jet_indices(upsampled)
    # index_select and in-place arithmetic: three times faster on a CPU than fancy indexing and
    # fresh tensors, with the same operations in the same order.
    combined = table.index_select(0, indices.reshape(-1)).reshape(B, M, H, W, 3)  # float64
    combined.add_((crops.to(torch.float64) / 255.0)[:, None])
    peak = combined.reshape(B, M, -1).amax(dim=2).reshape(B, M, 1, 1, 1)
    return combined.div_(peak).mul_(255.0).round_().to(torch.uint8)


def _compose_compiled(upsampled: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    """``_compose_tensors`` on a CPU as one compiled loop: the tensor ops make nine passes over
    float64 temporaries four times the picture's size; this makes two over the pixels, with the same
    float64 operations in the same order, so the pixels are the same (tested on every path)."""
    B, M, H, W = upsampled.shape
    out = np.empty((B, M, H, W, 3), np.uint8)
    _compose_kernel(
        np.ascontiguousarray(upsampled.numpy()), np.ascontiguousarray(crops.numpy()), _jet_table()[0], out
    )
    return torch.from_numpy(out)


@njit(nogil=True, cache=True, error_model="numpy")
def _compose_kernel(  # pragma: no cover - compiled
    upsampled: np.ndarray, crops: np.ndarray, table: np.ndarray, out: np.ndarray
) -> None:
    """``out[b, m] = round(255 · c / max(c))``, ``c = jet(upsampled[b, m]) + crops[b] / 255``.

    The jet row is ``_jet_indices``'s: ``floor(clip(v, 0, 1) · N)`` in float32, 1 mapped to ``N - 1``,
    NaN to the "bad" row ``N + 2``. A picture whose maximum is 0 (a black crop under NaN maps) is
    black, as the tensor path's ``0 / 0`` cast to uint8 gives.
    """
    B, M, H, W = upsampled.shape
    N = table.shape[0] - 3
    combined = np.empty(H * W * 3, np.float64)
    scaled = np.empty(256, np.float64)
    for value in range(256):
        scaled[value] = value / 255.0
    for b in range(B):
        crop = crops[b].reshape(H * W * 3)
        for m in range(M):
            peak = -np.inf
            values = upsampled[b, m].reshape(H * W)
            for p in range(H * W):
                v = values[p]
                if np.isnan(v):
                    row = N + 2
                else:
                    v = min(max(v, np.float32(0.0)), np.float32(1.0))
                    row = min(int(np.floor(v * np.float32(N))), N - 1)
                for ch in range(3):
                    c = table[row, ch] + scaled[crop[3 * p + ch]]
                    combined[3 * p + ch] = c
                    peak = max(peak, c)
            target = out[b, m].reshape(H * W * 3)
            if peak > 0:
                # A plain loop over contiguous values: compiled to vector division and rounding.
                for n in range(H * W * 3):
                    target[n] = np.uint8(np.rint(combined[n] / peak * 255.0))
            else:
                target[:] = 0


def heatmap_overlay(crop: np.ndarray, grid_map: np.ndarray) -> np.ndarray:
    """One grid map over one crop: ``uint8 [H, W, 3]`` + ``[gh, gw]`` -> ``uint8 [H, W, 3]`` (see
    ``heatmap_overlays``, which does whole batches at once)."""
    if crop.ndim != 3 or crop.shape[2] != 3:
        raise ValueError(f"crop must be [H, W, 3], got shape {crop.shape}")
    if grid_map.ndim != 2:
        raise ValueError(f"grid_map must be [gh, gw], got shape {grid_map.shape}")
    crops = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.uint8))[None]
    maps = torch.from_numpy(np.asarray(grid_map, dtype=np.float32))[None, None]
    return heatmap_overlays(crops, maps)[0, 0].numpy()


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


@functools.lru_cache(maxsize=32)
def _grid_template(blocks: int, gh: int, gw: int, title: str | None) -> np.ndarray:
    """The white canvas of a layer grid with its title and ``block l`` labels, panels left blank.

    Drawn once per layout: text is the slow part of a grid, and it never overlaps a panel (labels sit
    in the strip under each panel, the title in the band above), so pasting panels into a copy of
    this canvas gives the same pixels as drawing everything per image. Read-only; copy before use.
    """
    rows, cols = _tiling(blocks)
    scale = math.ceil(_PANEL_TARGET / max(gh, gw))
    panel_h, panel_w = gh * scale, gw * scale
    top = _GAP + (_TITLE_HEIGHT if title else 0)
    cell_h, cell_w = panel_h + _LABEL_HEIGHT + _GAP, panel_w + _GAP
    image = Image.new("RGB", (_GAP + cols * cell_w, top + rows * cell_h), (_WHITE,) * 3)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    if title:
        draw.text((_GAP, _GAP // 2), title, fill=_TEXT_COLOUR, font=font)
    for block in range(blocks):
        row, col = divmod(block, cols)
        y, x = top + row * cell_h, _GAP + col * cell_w
        draw.text((x, y + panel_h + 1), f"block {block}", fill=_TEXT_COLOUR, font=font)
    canvas = np.array(image)
    canvas.flags.writeable = False
    return canvas


def layer_grid_pixels(layer_scores: np.ndarray, *, title: str | None = None) -> np.ndarray:
    """The per-block score grids ``[L, gh, gw]`` as one picture ``uint8 [h, w, 3]``, one panel per
    block (the paper's Fig. 4.1).

    Panels are tiled row by row in block order (see ``_tiling``), each grid enlarged by a whole
    factor with nearest neighbour to about 96 px (every patch stays a crisp square), coloured with jet
    after per-panel min-max normalization (``_normalize_panels``), and labelled ``block l`` underneath
    with ``l`` the 0-based index into the array. An optional title runs along the top (Pillow's
    built-in font: characters it lacks, such as an em dash, show as boxes).
    """
    if layer_scores.ndim != 3 or layer_scores.shape[0] < 1:
        raise ValueError(f"layer_scores must be [L, gh, gw] with L >= 1, got shape {layer_scores.shape}")
    L, gh, gw = layer_scores.shape
    _rows, cols = _tiling(L)
    scale = math.ceil(_PANEL_TARGET / max(gh, gw))
    panel_h, panel_w = gh * scale, gw * scale
    top = _GAP + (_TITLE_HEIGHT if title else 0)
    cell_h, cell_w = panel_h + _LABEL_HEIGHT + _GAP, panel_w + _GAP

    indices = _jet_indices(torch.from_numpy(_normalize_panels(layer_scores.astype(np.float64)))).numpy()
    colours = _jet_bytes()[indices]
    canvas = _grid_template(L, gh, gw, title or None).copy()
    _paint_panels(canvas, colours, scale, top, cols, cell_h, cell_w, _GAP)
    return canvas


@functools.cache
def _jet_bytes() -> np.ndarray:
    """The jet table as 8-bit colours, ``rint(255 · colour)``: the same bytes as rounding each pixel's
    colour, computed once per row of the table instead of once per pixel."""
    return np.rint(_jet_table()[0] * 255.0).astype(np.uint8)


@njit(nogil=True, cache=True)
def _paint_panels(  # pragma: no cover - compiled
    canvas: np.ndarray,
    colours: np.ndarray,
    scale: int,
    top: int,
    cols: int,
    cell_h: int,
    cell_w: int,
    gap: int,
) -> None:
    """Each block's ``[gh, gw]`` colours into its panel of ``canvas``, every patch a ``scale``-pixel
    square (nearest neighbour), without the ``[L, gh·scale, gw·scale, 3]`` enlarged copy numpy's
    ``repeat`` makes first."""
    blocks, gh, gw, _ = colours.shape
    for block in range(blocks):
        y0 = top + (block // cols) * cell_h
        x0 = gap + (block % cols) * cell_w
        for i in range(gh):
            for j in range(gw):
                for dy in range(scale):
                    y = y0 + i * scale + dy
                    for dx in range(scale):
                        x = x0 + j * scale + dx
                        for ch in range(3):
                            canvas[y, x, ch] = colours[block, i, j, ch]
