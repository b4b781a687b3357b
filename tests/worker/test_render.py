"""Specification of ``worker.render``: exact ``.npy`` bytes, overlays as docs/methods.md artifact 8 defines them,
and a layer grid whose panels sit where the layout says; and of the one path that turns an image's
arrays into every file it stores (``worker.pipeline.cpu.draw_pictures`` and the arrays' bytes)."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.artifacts import ARRAY_ARTIFACTS, IMAGE_ARTIFACTS, INPUT_PICTURE, PICTURE_SOURCES
from tests.worker import render_reference
from worker.pipeline.artifacts import ImageArtifacts, draw, encode_artifacts
from worker.render import (
    DEFAULT_PNG_LEVEL,
    _compose_compiled,
    _compose_tensors,
    _jet,
    heatmap_overlay,
    heatmap_overlays,
    layer_grid_pixels,
    npy_bytes,
    png_bytes,
)

RNG = np.random.default_rng(7)


def overlay_png(crop: np.ndarray, grid_map: np.ndarray) -> bytes:
    """An overlay as the pipeline stores it (``draw_pictures``: ``png_bytes`` of the pixels)."""
    return png_bytes(heatmap_overlay(crop, grid_map))


def layer_grid_png(layer_scores: np.ndarray, *, title: str | None = None) -> bytes:
    """A layer grid as the pipeline stores it (its flat colour coded as runs)."""
    return png_bytes(layer_grid_pixels(layer_scores, title=title), flat=True)


def decode_png(data: bytes) -> np.ndarray:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def jet(values: np.ndarray) -> np.ndarray:
    return matplotlib.colormaps["jet"](values)[..., :3]


def jet_rgb8(value: float) -> np.ndarray:
    """The 8-bit colour a panel pixel of normalized ``value`` gets."""
    return np.rint(jet(np.array([value]))[0] * 255).astype(np.uint8)


def bilinear_half_pixel(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Plain separable linear interpolation sampling at pixel centres, clamped at the edges."""
    gh, gw = grid.shape
    ys = (np.arange(height) + 0.5) * gh / height - 0.5
    xs = (np.arange(width) + 0.5) * gw / width - 0.5
    rows = np.stack([np.interp(xs, np.arange(gw), grid[r]) for r in range(gh)])
    return np.stack([np.interp(ys, np.arange(gh), rows[:, c]) for c in range(width)], axis=1)


def reference_overlay(crop: np.ndarray, upsampled: np.ndarray) -> np.ndarray:
    combined = jet(upsampled) + crop / 255.0
    return np.rint(255 * combined / combined.max()).astype(np.uint8)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Start and length of every run of True in a 1-D mask."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(start), int(stop - start)) for start, stop in zip(edges[::2], edges[1::2], strict=True)]


def coloured(pixels: np.ndarray) -> np.ndarray:
    """Jet colours are saturated (channel spread >= 127); background and text are grey levels."""
    spread = pixels.max(axis=-1).astype(np.int16) - pixels.min(axis=-1)
    return spread > 60


def panels_of(png: bytes) -> list[np.ndarray]:
    """Cut the coloured panels out of a layer grid PNG, row by row."""
    pixels = decode_png(png)
    mask = coloured(pixels)
    found = []
    for top, height in runs(mask.any(axis=1)):
        band = mask[top : top + height]
        for left, width in runs(band.any(axis=0)):
            found.append(pixels[top : top + height, left : left + width])
    return found


# --- npy_bytes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        RNG.random((12, 3, 14, 14)).astype(np.float16),
        RNG.random((12, 14, 14)).astype(np.float32),
        RNG.random((7, 7)),
        RNG.integers(0, 255, (4, 5), dtype=np.uint8),
        np.asfortranarray(RNG.random((3, 4)).astype(np.float32)),
        RNG.random((5, 6)).astype(np.float32).T,  # not contiguous
        np.float32(0.5) * np.ones(()),
    ],
    ids=["float16-4d", "float32-3d", "float64-2d", "uint8", "fortran", "transposed", "0-d"],
)
def test_npy_round_trip_is_exact(array: np.ndarray) -> None:
    loaded = np.load(io.BytesIO(npy_bytes(array)))
    assert loaded.dtype == array.dtype
    assert loaded.shape == array.shape
    assert np.array_equal(loaded, array)


def test_npy_refuses_pickled_objects() -> None:
    with pytest.raises(ValueError, match="pickle"):
        npy_bytes(np.array([{"a": 1}], dtype=object))


# --- heatmap_overlay --------------------------------------------------------------------------------

# A 2×2 map upsampled to 4×4 with align_corners=False samples at source positions -0.25 (clamped
# to 0), 0.25, 0.75 and 1.25 (clamped to 1): weights 1, 3/4 + 1/4, 1/4 + 3/4, 1 along each axis.
TWO_BY_TWO = np.array([[0.0, 0.8], [0.4, 1.0]])
TWO_BY_TWO_UPSAMPLED = np.array(
    [
        [0.0, 0.2, 0.6, 0.8],
        [0.1, 0.2875, 0.6625, 0.85],
        [0.3, 0.4625, 0.7875, 0.95],
        [0.4, 0.55, 0.85, 1.0],
    ]
)


@pytest.mark.parametrize("crop_value", [0, 128, 255])
def test_overlay_of_a_two_by_two_map_matches_hand_computed_values(crop_value: int) -> None:
    crop = np.full((4, 4, 3), crop_value, dtype=np.uint8)
    expected = reference_overlay(crop, TWO_BY_TWO_UPSAMPLED)
    assert np.array_equal(heatmap_overlay(crop, TWO_BY_TWO.astype(np.float32)), expected)


def test_hand_computed_upsampling_agrees_with_the_plain_reference() -> None:
    assert np.allclose(bilinear_half_pixel(TWO_BY_TWO, 4, 4), TWO_BY_TWO_UPSAMPLED)


@pytest.mark.parametrize(
    ("grid", "size"), [((14, 14), (224, 224)), ((7, 7), (224, 224)), ((24, 24), (384, 384))]
)
def test_overlay_matches_the_plain_reference(grid: tuple[int, int], size: tuple[int, int]) -> None:
    # Multiples of 1/64 with the dyadic interpolation weights of these sizes stay exact in float32,
    # so no value can fall on the other side of one of the colormap's 256 bins: equality is exact.
    grid_map = (RNG.integers(0, 65, grid) / 64).astype(np.float32)
    crop = RNG.integers(0, 256, (*size, 3), dtype=np.uint8)
    expected = reference_overlay(crop, bilinear_half_pixel(grid_map.astype(np.float64), *size))
    overlay = heatmap_overlay(crop, grid_map)
    assert overlay.dtype == np.uint8
    assert overlay.shape == (*size, 3)
    assert np.array_equal(overlay, expected)


@pytest.mark.parametrize("seed", range(4))
def test_overlay_brightest_channel_is_255(seed: int) -> None:
    rng = np.random.default_rng(seed)
    grid_map = rng.random((14, 14))
    crop = rng.integers(0, 200, (224, 224, 3), dtype=np.uint8)
    assert heatmap_overlay(crop, grid_map).max() == 255


@pytest.mark.parametrize(("row", "col"), [(3, 10), (0, 0), (13, 6)])
def test_a_hot_patch_shows_at_its_place_in_the_png(row: int, col: int) -> None:
    grid_map = np.zeros((14, 14), dtype=np.float32)
    grid_map[row, col] = 1.0
    crop = np.full((224, 224, 3), 100, dtype=np.uint8)
    pixels = decode_png(overlay_png(crop, grid_map)).astype(np.int16)

    background = pixels[0, 0] if (row, col) != (0, 0) else pixels[-1, -1]
    changed = np.abs(pixels - background).sum(axis=-1) > 0
    ys, xs = np.nonzero(changed)
    centre_y, centre_x = row * 16 + 8, col * 16 + 8
    # pixel y samples the grid at (y + 0.5) / 16 - 0.5: one cell's weight is non-zero from 16 px
    # above its centre to 15 px below it, and largest on the 2×2 pixels around the centre
    assert ys.min() >= centre_y - 16
    assert ys.max() <= centre_y + 15
    assert xs.min() >= centre_x - 16
    assert xs.max() <= centre_x + 15
    assert changed[centre_y - 1 : centre_y + 1, centre_x - 1 : centre_x + 1].all()


# --- layer_grid_png ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blocks", "grid", "rows", "cols", "panel"),
    [
        (12, (14, 14), 3, 4, 98),
        (24, (14, 14), 4, 6, 98),
        (12, (7, 7), 3, 4, 98),
        (24, (24, 24), 4, 6, 96),
        (1, (14, 14), 1, 1, 98),
        (10, (14, 14), 3, 4, 98),  # two empty cells in the last row
    ],
)
def test_layer_grid_layout(blocks: int, grid: tuple[int, int], rows: int, cols: int, panel: int) -> None:
    png = layer_grid_png(RNG.random((blocks, *grid)).astype(np.float32))
    mask = coloured(decode_png(png))
    row_runs, col_runs = runs(mask.any(axis=1)), runs(mask.any(axis=0))
    assert [length for _, length in row_runs] == [panel] * rows
    assert [length for _, length in col_runs] == [panel] * cols
    assert len(panels_of(png)) == blocks


def test_layer_grid_panels_show_their_own_block() -> None:
    """Block l has its hot patch at (l, l): in each panel the top colour of jet is at that patch."""
    blocks = 12
    scores = np.zeros((blocks, 14, 14), dtype=np.float32)
    for block in range(blocks):
        scores[block, block, block] = 1.0
    panels = panels_of(layer_grid_png(scores))
    assert len(panels) == blocks
    for block, panel in enumerate(panels):
        hot = np.all(panel == jet_rgb8(1.0), axis=-1)
        ys, xs = np.nonzero(hot)
        assert len(ys) == 7 * 7, block  # exactly the one patch, enlarged 7 times
        assert (ys // 7 == block).all(), block
        assert (xs // 7 == block).all(), block
    assert not np.array_equal(panels[0], panels[1])


def test_layer_grid_normalizes_each_panel_on_its_own() -> None:
    base = RNG.random((14, 14)).astype(np.float32)
    scores = np.stack([base, 10 * base + 3, base[::-1], np.full((14, 14), 0.25, dtype=np.float32)])
    panels = panels_of(layer_grid_png(scores))
    assert np.array_equal(panels[0], panels[1])  # an affine rescaling is invisible
    assert not np.array_equal(panels[0], panels[2])
    assert (panels[3] == jet_rgb8(0.0)).all()  # constant -> low


def test_layer_grid_title_adds_a_band_above_the_same_panels() -> None:
    scores = RNG.random((12, 14, 14)).astype(np.float32)
    plain = decode_png(layer_grid_png(scores))
    titled_png = layer_grid_png(scores, title="deit_tiny_patch16_224 — cat.jpg")
    titled = decode_png(titled_png)
    extra = titled.shape[0] - plain.shape[0]
    assert extra > 0
    assert titled.shape[1] == plain.shape[1]
    assert (titled[:extra] < 128).any()  # there is text in the band
    assert all(
        np.array_equal(a, b)
        for a, b in zip(panels_of(titled_png), panels_of(layer_grid_png(scores)), strict=True)
    )


def test_layer_grid_labels_are_drawn() -> None:
    pixels = decode_png(layer_grid_png(RNG.random((4, 14, 14)).astype(np.float32)))
    mask = coloured(pixels)
    (top, height), *_ = runs(mask.any(axis=1))
    label_band = pixels[top + height : top + height + 14]
    assert (label_band < 128).any()


# --- every artifact of one image, as the pipeline draws and encodes it ------------------------------


def computed_arrays(*, with_attention: bool) -> dict[str, np.ndarray]:
    L, H, gh, gw = 12, 3, 14, 14
    arrays = {
        "cls_attention.npy": RNG.random((L, H, gh, gw)).astype(np.float32),
        "layer_scores.npy": RNG.random((L, gh, gw)).astype(np.float32),
        "rollout.npy": RNG.random((gh, gw)).astype(np.float32),
        "grad_rollout.npy": RNG.random((gh, gw)).astype(np.float32),
        "relevance.npy": RNG.random((gh, gw)).astype(np.float32),
    }
    if with_attention:
        N = gh * gw + 1
        arrays["attention.npy"] = RNG.random((L, H, N, N)).astype(np.float16)
    return arrays


def stored_files(arrays: dict[str, np.ndarray], crop: np.ndarray, *, title: str = "") -> dict[str, bytes]:
    """Every file the pipeline stores for one image, by artifact name: the pictures ``draw_pictures``
    draws beside the arrays' ``.npy`` bytes, as ``encode_artifacts`` puts them together
    (``put_artifacts`` writes the same files)."""
    image = ImageArtifacts("ab" * 32, "model", "c" * 16, crop, arrays, None, title, DEFAULT_PNG_LEVEL)
    return dict(encode_artifacts(image, draw(image)).files)


@pytest.mark.parametrize("with_attention", [True, False])
def test_the_pipeline_stores_every_array_and_picture(with_attention: bool) -> None:
    arrays = computed_arrays(with_attention=with_attention)
    crop = RNG.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    rendered = stored_files(arrays, crop, title="x")

    expected = set(ARRAY_ARTIFACTS) | set(IMAGE_ARTIFACTS)
    if not with_attention:
        expected.discard("attention.npy")
    assert set(rendered) == expected
    for name, array in arrays.items():
        assert np.array_equal(np.load(io.BytesIO(rendered[name])), array)
    for name in ("rollout.png", "grad_rollout.png", "relevance.png"):
        assert np.array_equal(
            decode_png(rendered[name]), heatmap_overlay(crop, arrays[PICTURE_SOURCES[name]])
        )
    assert rendered["layer_scores.png"] == layer_grid_png(arrays["layer_scores.npy"], title="x")
    assert np.array_equal(decode_png(rendered[INPUT_PICTURE]), crop)


def test_the_pipeline_draws_only_pictures_whose_array_is_given() -> None:
    crop = np.zeros((224, 224, 3), dtype=np.uint8)
    rendered = stored_files({"rollout.npy": np.ones((14, 14), dtype=np.float32)}, crop)
    assert set(rendered) == {"rollout.npy", "rollout.png", INPUT_PICTURE}


def test_the_pipeline_refuses_unknown_array_names() -> None:
    with pytest.raises(ValueError, match=r"rolout\.npy"):
        stored_files({"rolout.npy": np.ones((14, 14))}, np.zeros((224, 224, 3), dtype=np.uint8))


# The fast paths against the renderer as first written (tests/worker/render_reference.py).
@pytest.mark.parametrize(
    ("batch", "grid", "size"),
    [(1, (14, 14), (224, 224)), (5, (7, 7), (224, 224)), (3, (24, 24), (384, 384)), (2, (3, 5), (37, 61))],
)
@pytest.mark.parametrize("path", ["heatmap_overlays", "compiled", "tensors"])
def test_batched_overlays_equal_the_plain_renderer_pixel_for_pixel(
    batch: int, grid: tuple[int, int], size: tuple[int, int], path: str
) -> None:
    """The public function and both its paths: the compiled loop a CPU worker runs and the tensor ops a
    GPU runs (here on the CPU)."""
    crops = RNG.integers(0, 256, (batch, *size, 3), dtype=np.uint8)
    maps = RNG.random((batch, 3, *grid)).astype(np.float32)
    maps[0, 0] /= maps[0, 0].max()  # the exact top of the colour scale
    maps[-1, -1, 0, 0] = 1.5  # out of range: clipped
    maps[-1, 1, 0, 0] = -0.25
    out = _overlays_by(path, crops, maps)
    assert out.shape == (batch, 3, *size, 3)
    assert out.dtype == np.uint8
    for b in range(batch):
        for m in range(3):
            np.testing.assert_array_equal(out[b, m], render_reference.heatmap_overlay(crops[b], maps[b, m]))


def _overlays_by(path: str, crops: np.ndarray, maps: np.ndarray) -> np.ndarray:
    if path == "heatmap_overlays":
        return heatmap_overlays(torch.from_numpy(crops), torch.from_numpy(maps)).numpy()
    compose = {"compiled": _compose_compiled, "tensors": _compose_tensors}[path]
    upsampled = F.interpolate(
        torch.from_numpy(maps), size=crops.shape[1:3], mode="bilinear", align_corners=False
    )
    return compose(upsampled, torch.from_numpy(crops)).numpy()


def test_the_compiled_and_the_tensor_overlays_agree_on_nan_edges_and_a_black_picture() -> None:
    """Values a map should not hold but may: NaN (the colormap's "bad" colour), every bin edge of the
    jet table, out of range; and a black crop under an all-NaN map, whose maximum is 0."""
    crops = RNG.integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
    crops[2] = 0
    edges = np.concatenate([np.arange(257) / 256, np.nextafter(np.arange(1, 257) / 256, 0)])
    maps = RNG.random((3, 2, 32, 48)).astype(np.float32)
    maps[0, 0].reshape(-1)[: edges.size] = edges.astype(np.float32)
    maps[0, 1, ::3] = np.nan
    maps[1, 0] = RNG.normal(0.5, 1.0, (32, 48))
    maps[2] = np.nan
    compiled, tensors = _overlays_by("compiled", crops, maps), _overlays_by("tensors", crops, maps)
    np.testing.assert_array_equal(compiled, tensors)
    assert (compiled[2] == 0).all()
    for m in range(2):
        np.testing.assert_array_equal(compiled[0, m], render_reference.heatmap_overlay(crops[0], maps[0, m]))


def test_jet_lookup_picks_matplotlibs_colour_at_every_bin_edge() -> None:
    edges = np.concatenate([np.arange(257) / 256, np.nextafter(np.arange(1, 257) / 256, 0)]).astype(
        np.float32
    )
    np.testing.assert_array_equal(_jet(edges), matplotlib.colormaps["jet"](edges)[..., :3])


@pytest.mark.parametrize(
    ("blocks", "grid", "title"),
    [
        (12, (14, 14), "deit_tiny_patch16_224: layer scores"),
        (24, (16, 16), None),
        (1, (7, 7), "t"),
        (5, (3, 9), None),
    ],
)
def test_layer_grid_from_the_cached_template_equals_the_plain_renderer(
    blocks: int, grid: tuple[int, int], title: str | None
) -> None:
    for seed in range(2):  # the second call reuses the cached canvas, which must stay clean
        scores = np.random.default_rng(seed).random((blocks, *grid)).astype(np.float32)
        np.testing.assert_array_equal(
            layer_grid_pixels(scores, title=title), render_reference.layer_grid(scores, title=title)
        )


def test_png_encoding_is_lossless() -> None:
    pixels = render_reference.heatmap_overlay(
        RNG.integers(0, 256, (224, 224, 3), dtype=np.uint8), RNG.random((14, 14)).astype(np.float32)
    )
    np.testing.assert_array_equal(decode_png(png_bytes(pixels)), pixels)
