"""Specification of ``worker.png``: files every decoder reads back pixel for pixel, at every level and
with both coders, and a Huffman coder that is right on its own terms (optimal, length-limited, valid
deflate for any input)."""

from __future__ import annotations

import heapq
import io
import zlib

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from worker.png import PNG_LEVELS, _code_lengths, huffman_zlib, png_bytes
from worker.render import layer_grid_pixels

RNG = np.random.default_rng(11)


def photo_like(size: int = 224) -> np.ndarray:
    """A smooth gradient with sensor-like noise: what the input crop and the overlays look like."""
    y, x = np.mgrid[0:size, 0:size]
    smooth = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.float64)
    return np.clip(smooth + RNG.normal(0, 4, smooth.shape), 0, 255).astype(np.uint8)


def filtered_rows(pixels: np.ndarray) -> np.ndarray:
    """The IDAT payload ``png_bytes`` deflates: each row "up"-filtered, prefixed by filter type 2."""
    rows = pixels.reshape(pixels.shape[0], -1).astype(np.int16)
    up = np.diff(rows, axis=0, prepend=0) % 256
    return np.concatenate([np.full((rows.shape[0], 1), 2), up], axis=1).astype(np.uint8).reshape(-1)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("level", [0, 1, 2, 12])
@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 5, 3), (7, 1, 3), (378, 422, 3), (300, 17, 3)])
def test_png_files_decode_to_the_same_pixels_in_two_decoders(
    shape: tuple[int, int, int], level: int, flat: bool
) -> None:
    """``png_bytes`` writes the PNG container itself: Pillow (which also checks every chunk's CRC when
    it verifies) and libpng must both read back exactly the pixels, for odd and tiny sizes too: stored
    (level 0; more than 64 KB spans several stored blocks), Huffman-coded (1), libdeflate's fastest
    matching level and its smallest, each for a photo and for a flat picture."""
    pixels = RNG.integers(0, 256, shape, dtype=np.uint8)
    pixels[: shape[0] // 2] = 255  # a flat half: rows the "up" filter turns into zeros
    data = png_bytes(pixels, level=level, flat=flat)
    Image.open(io.BytesIO(data)).verify()
    image = Image.open(io.BytesIO(data))
    assert (image.mode, image.size) == ("RGB", (shape[1], shape[0]))
    np.testing.assert_array_equal(np.asarray(image), pixels)
    np.testing.assert_array_equal(imagecodecs.png_decode(data), pixels)


@pytest.mark.parametrize(
    "data",
    [
        np.zeros(1, np.uint8),  # one symbol: deflate still needs a complete code
        np.full(70_000, 9, np.uint8),
        np.arange(256, dtype=np.uint8),  # every byte once: a flat 8-bit code
        RNG.integers(0, 256, 100_000).astype(np.uint8),  # incompressible
        (RNG.geometric(0.4, 200_000) % 256).astype(np.uint8),  # skewed, as filtered photo rows are
        np.zeros(0, np.uint8),
        np.tile(np.array([0, 7, 7, 7], np.uint8), 20_000),  # the sampled bytes see no 7 at all
    ],
    ids=["one-byte", "one-symbol", "all-bytes", "random", "skewed", "empty", "unsampled"],
)
@pytest.mark.parametrize("runs", [False, True])
def test_huffman_streams_inflate_to_their_input(data: np.ndarray, runs: bool) -> None:
    assert zlib.decompress(huffman_zlib(data, runs=runs)) == data.tobytes()


@pytest.mark.parametrize("run", [1, 2, 3, 4, 10, 11, 257, 258, 259, 516, 517, 1000])
def test_runs_of_every_length_class_inflate(run: int) -> None:
    """Runs at the edges of deflate's length symbols (3, 10/11, 257/258 and 258 + a remainder of 1
    or 2 that must stay literals), after a different byte and at the very start."""
    pieces = [
        np.full(run, 5, np.uint8),
        np.array([9], np.uint8),
        np.full(run, 0, np.uint8),
        np.arange(7, dtype=np.uint8),
    ]
    data = np.concatenate(pieces)
    compressed = huffman_zlib(data, runs=True)
    assert zlib.decompress(compressed) == data.tobytes()
    if run >= 258:
        assert len(compressed) < 400


def test_code_lengths_longer_than_deflate_allows_are_limited_to_fifteen_bits() -> None:
    """Counts growing like Fibonacci numbers (1, 2, 3, 5, … beside the end-of-block symbol's 1) make
    the optimal code 25 bits deep; deflate allows 15. The coder must fall back to a shallower code
    that still inflates."""
    fibonacci = [1, 2]
    while len(fibonacci) < 25:
        fibonacci.append(fibonacci[-1] + fibonacci[-2])
    data = np.repeat(np.arange(25, dtype=np.uint8), fibonacci)
    RNG.shuffle(data)
    counts = np.bincount(data, minlength=257).astype(np.int64)
    counts[256] = 1
    assert max(_huffman_reference_lengths(counts).values()) > 15
    lengths = _code_lengths(counts, 15)
    assert lengths.max() <= 15
    assert (lengths[counts > 0] > 0).all()
    assert sum(2.0 ** -int(n) for n in lengths if n) == 1.0  # complete: every bit pattern decodes
    assert zlib.decompress(huffman_zlib(data)) == data.tobytes()


@pytest.mark.parametrize("seed", range(5))
def test_code_lengths_are_optimal_when_they_fit(seed: int) -> None:
    """Same total bits as a textbook Huffman code built with a heap (optimal codes can differ in
    their lengths, never in their cost)."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(257, np.int64)
    present = rng.choice(257, size=rng.integers(2, 257), replace=False)
    counts[present] = rng.integers(1, 10_000, present.size)
    lengths = _code_lengths(counts, 15)
    reference = _huffman_reference_lengths(counts)
    assert int((counts * lengths).sum()) == sum(int(counts[s]) * n for s, n in reference.items())
    assert ((lengths > 0) == (counts > 0)).all()


def _huffman_reference_lengths(counts: np.ndarray) -> dict[int, int]:
    heap = [(int(c), [s]) for s, c in enumerate(counts) if c > 0]
    depth = {s: 0 for _, symbols in heap for s in symbols}
    heapq.heapify(heap)
    while len(heap) > 1:
        (a, left), (b, right) = heapq.heappop(heap), heapq.heappop(heap)
        for s in left + right:
            depth[s] += 1
        heapq.heappush(heap, (a + b, left + right))
    return depth


def test_huffman_coding_of_a_photo_is_smaller_than_libdeflates_fastest_level() -> None:
    """Why level 1 is Huffman coding: on photo-like pictures LZ77 matches buy nothing, so leaving
    them out costs no size; and it still compresses well below the raw 150 KB."""
    pixels = photo_like()
    huffman = png_bytes(pixels, level=1)
    libdeflate = imagecodecs.deflate_encode(filtered_rows(pixels), level=1)
    assert len(huffman) < len(libdeflate) + 100  # a PNG's container adds 57 bytes
    assert len(huffman) < 0.75 * pixels.nbytes


def test_a_flat_picture_is_coded_with_runs_at_the_fast_levels() -> None:
    """A layer grid coded with Huffman codes alone, or stored, would be several times larger; with
    its runs it stays within 40 % of libdeflate's fastest level."""
    grid = layer_grid_pixels(RNG.random((12, 14, 14)), title="deit_tiny_patch16_224: layer scores")
    for level in (0, 1):
        assert len(png_bytes(grid, level=level, flat=True)) * 3 < len(png_bytes(grid, level=level))
    assert png_bytes(grid, level=0, flat=True) == png_bytes(grid, level=1, flat=True)
    libdeflate = imagecodecs.deflate_encode(filtered_rows(grid), level=1)
    assert len(png_bytes(grid, flat=True)) < 1.4 * len(libdeflate)


def test_filtered_rows_helper_matches_what_the_file_holds() -> None:
    """The helper above is what the PNG's IDAT inflates to (so the size comparison is fair)."""
    pixels = photo_like(37)
    data = png_bytes(pixels, level=2)
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8 : start - 4], "big")
    assert zlib.decompress(data[start : start + length]) == filtered_rows(pixels).tobytes()


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3))]
)
def test_png_bytes_refuses_what_is_not_8_bit_rgb(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(bad)


@pytest.mark.parametrize("level", [PNG_LEVELS[0] - 1, PNG_LEVELS[-1] + 1])
def test_png_bytes_refuses_a_level_it_does_not_have(level: int) -> None:
    with pytest.raises(ValueError, match="PNG level must be 0 to 12"):
        png_bytes(np.zeros((4, 4, 3), np.uint8), level=level)
