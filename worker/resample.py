"""Pillow's antialiased resize, computed only where a centre crop keeps it.

The model's input is ``center_crop(resize(image))``: Pillow resizes the whole picture, then the crop
throws a third of it away. ``resize_crop`` computes only the crop's pixels, with Pillow's own
arithmetic (``libImaging/Resample.c``): the same filter weights in double precision, normalized to
22-bit fixed point, one pass along each axis with the intermediate picture clipped to 8 bits. The
passes are compiled (numba, GIL released, 32-bit lanes): 0.4 ms for a 500×375 photo against
Pillow's 1.5 ms.

Which pass comes first changes the last bit of some pixels, and Pillow 13 picks the order from the
geometry by a rule of its own (vertical first when the height shrinks much more than the width).
``PillowCrops`` does not guess it: the second time it sees a geometry it resizes with Pillow and
with both orders, and keeps the order whose pixels are Pillow's, for every later image of that
geometry. A geometry no order reproduces (another Pillow's arithmetic) stays with Pillow. So every
crop is Pillow's, pixel for pixel, whatever Pillow is installed; ``tests/worker/test_resample.py``
checks both orders against ``Image.resize`` on hundreds of sizes.

Only the filters Pillow defines in closed form and that timm's ViTs use (bicubic, bilinear) are
compiled; any other stays with Pillow.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
from numba import njit

__all__ = ["FILTERS", "PillowCrops", "resize_crop"]

# Pillow's filter support (in input pixels at scale 1) by name; the names are torchvision's.
FILTERS: dict[str, float] = {"bicubic": 2.0, "bilinear": 1.0}
_KIND = {"bicubic": 0, "bilinear": 1}

_PRECISION_BITS = 32 - 8 - 2  # Pillow's: two bits of headroom for the filters' negative lobes


@njit(nogil=True, cache=True)
def _weight(kind: int, x: float) -> float:  # pragma: no cover - compiled
    """``bicubic_filter`` (a = -0.5) and ``bilinear_filter`` with Pillow's operation order."""
    if x < 0.0:
        x = -x
    if kind == 0:
        a = -0.5
        if x < 1.0:
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
        if x < 2.0:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0
    if x < 1.0:
        return 1.0 - x
    return 0.0


@njit(nogil=True, cache=True)
def _coefficients(
    kind: int, support_at_1: float, in_size: int, out_size: int, first: int, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for outputs ``first .. first + count``:
    each output's first input index, its number of taps, and the taps as 22-bit integers."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = support_at_1 * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    starts = np.empty(count, np.int64)
    lengths = np.empty(count, np.int64)
    taps = np.zeros((count, ksize), np.int32)
    weights = np.empty(ksize, np.float64)
    ss = 1.0 / filterscale
    one = float(1 << _PRECISION_BITS)
    for i in range(count):
        xx = first + i
        center = (xx + 0.5) * scale
        xmin = int(center - support + 0.5)  # C's (int): truncation, and negatives clamp to 0 anyway
        if xmin < 0:
            xmin = 0
        xmax = int(center + support + 0.5)
        if xmax > in_size:
            xmax = in_size
        xmax -= xmin
        ww = 0.0
        for x in range(xmax):
            w = _weight(kind, (float(x + xmin) - center + 0.5) * ss)
            weights[x] = w
            ww += w
        for x in range(xmax):
            w = weights[x] / ww if ww != 0.0 else weights[x]
            taps[i, x] = int(-0.5 + w * one) if w < 0 else int(0.5 + w * one)
        starts[i] = xmin
        lengths[i] = xmax
    return starts, lengths, taps


@njit(nogil=True, cache=True)
def _along_rows(
    source: np.ndarray, starts: np.ndarray, lengths: np.ndarray, taps: np.ndarray, offset: int
) -> np.ndarray:  # pragma: no cover - compiled
    """One resampling pass down the rows of ``uint8 [rows, width]``: output row ``i`` sums
    ``lengths[i]`` rows from ``starts[i] - offset``, weighted by ``taps[i]``, clipped to 8 bits.

    A whole row is accumulated at once in 32-bit lanes (vectorized): Pillow's sums are 32-bit ints
    too, and integer sums do not depend on their order, so the results are Pillow's exactly.
    """
    width = source.shape[1]
    count = starts.shape[0]
    out = np.empty((count, width), np.uint8)
    line = np.empty(width, np.int32)
    for i in range(count):
        line[:] = 1 << (_PRECISION_BITS - 1)
        for t in range(lengths[i]):
            k = taps[i, t]
            row = source[starts[i] - offset + t]
            for n in range(width):
                line[n] += np.int32(row[n]) * k
        target = out[i]
        for n in range(width):
            value = line[n] >> _PRECISION_BITS
            target[n] = np.uint8(0 if value < 0 else (255 if value > 255 else value))
    return out


@njit(nogil=True, cache=True)
def _transposed(
    pixels: np.ndarray, row0: int, row1: int, column0: int, column1: int
) -> np.ndarray:  # pragma: no cover - compiled
    """``pixels[row0:row1, column0:column1]`` with rows and columns swapped, as a new C array."""
    channels = pixels.shape[2]
    out = np.empty((column1 - column0, row1 - row0, channels), np.uint8)
    for y in range(row0, row1):
        for x in range(column0, column1):
            for ch in range(channels):
                out[x - column0, y - row0, ch] = pixels[y, x, ch]
    return out


@njit(nogil=True, cache=True)
def _vertical(
    part: np.ndarray, starts: np.ndarray, lengths: np.ndarray, taps: np.ndarray, offset: int
) -> np.ndarray:  # pragma: no cover - compiled
    rows, columns, channels = part.shape
    flat = np.ascontiguousarray(part).reshape(rows, columns * channels)
    return _along_rows(flat, starts, lengths, taps, offset).reshape(starts.shape[0], columns, channels)


@njit(nogil=True, cache=True)
def _horizontal(
    part: np.ndarray, starts: np.ndarray, lengths: np.ndarray, taps: np.ndarray, offset: int
) -> np.ndarray:  # pragma: no cover - compiled
    """The pass along the columns, as a pass down the rows of the transposed picture (contiguous,
    so it vectorizes), transposed back."""
    rows, columns, channels = part.shape
    turned = _transposed(part, 0, rows, 0, columns).reshape(columns, rows * channels)
    done = _along_rows(turned, starts, lengths, taps, offset).reshape(starts.shape[0], rows, channels)
    return _transposed(done, 0, starts.shape[0], 0, rows)


@njit(nogil=True, cache=True)
def _resize_crop_kernel(
    pixels: np.ndarray,
    kind: int,
    support: float,
    out_width: int,
    out_height: int,
    left: int,
    top: int,
    width: int,
    height: int,
    vertical_first: bool,
) -> np.ndarray:  # pragma: no cover - compiled
    in_height, in_width, _ = pixels.shape
    resize_x = out_width != in_width
    resize_y = out_height != in_height
    h_start, h_length, h_taps, column0, column1 = _axis(kind, support, in_width, out_width, left, width)
    v_start, v_length, v_taps, row0, row1 = _axis(kind, support, in_height, out_height, top, height)
    # Each pass computes only what the crop needs: the first pass the rows (or columns) the second
    # pass reads, the second only the crop's. A side that keeps its size is only cut, as in Pillow.
    if vertical_first:
        part = pixels[:, column0:column1]
        part = _vertical(part, v_start, v_length, v_taps, 0) if resize_y else part[row0:row1].copy()
        if resize_x:
            return _horizontal(part, h_start, h_length, h_taps, column0)
        return part[:, left - column0 : left - column0 + width].copy()
    part = pixels[row0:row1]
    part = _horizontal(part, h_start, h_length, h_taps, 0) if resize_x else part[:, column0:column1].copy()
    if resize_y:
        return _vertical(part, v_start, v_length, v_taps, row0)
    return part


@njit(nogil=True, cache=True)
def _axis(
    kind: int, support: float, in_size: int, out_size: int, first: int, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:  # pragma: no cover - compiled
    """One axis's taps for outputs ``first .. first + count`` and the span of inputs they read. A
    side that keeps its size is not resampled (Pillow skips its pass), only cut."""
    if out_size == in_size:
        identity = np.ones((count, 1), np.int32)
        return np.arange(first, first + count), np.ones(count, np.int64), identity, first, first + count
    starts, lengths, taps = _coefficients(kind, support, in_size, out_size, first, count)
    return starts, lengths, taps, starts[0], starts[count - 1] + lengths[count - 1]


def resize_crop(
    pixels: np.ndarray,
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    interpolation: str,
    vertical_first: bool = False,
) -> np.ndarray:
    """``Image.fromarray(pixels).resize(size, interpolation).crop(box)`` as ``uint8 [h, w, C]``.

    ``pixels`` is ``uint8 [H, W, C]``, ``size`` the resized ``(width, height)``, ``box`` the crop's
    ``(left, top, right, bottom)`` inside it (no padding: callers pad with Pillow). A side that keeps
    its size is not resampled, as in Pillow.
    """
    if interpolation not in FILTERS:
        raise ValueError(f"no compiled resampling for {interpolation!r}; use one of {sorted(FILTERS)}")
    left, top, right, bottom = box
    out_width, out_height = size
    if not (0 <= left < right <= out_width and 0 <= top < bottom <= out_height):
        raise ValueError(f"crop box {box} is not inside the resized {out_width}×{out_height} picture")
    if pixels.ndim != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8 [H, W, C], got {pixels.dtype} {pixels.shape}")
    return _resize_crop_kernel(
        np.ascontiguousarray(pixels),
        _KIND[interpolation],
        FILTERS[interpolation],
        out_width,
        out_height,
        left,
        top,
        right - left,
        bottom - top,
        vertical_first,
    )


# What ``PillowCrops`` knows of a geometry: seen once, or the way its crops are made from now on.
_SEEN_ONCE = "seen once"
_PILLOW = "pillow"
_HORIZONTAL_FIRST = "horizontal first"
_VERTICAL_FIRST = "vertical first"
_ORDER_IS_VERTICAL = {_HORIZONTAL_FIRST: False, _VERTICAL_FIRST: True}


class PillowCrops:
    """Resize-and-crop that returns Pillow's pixels, computed by ``resize_crop`` once the pass order
    of the geometry is known (see the module docstring).

    A geometry is ``(input size, resized size, interpolation)``. Seen once, its crop is Pillow's and
    nothing else is spent (a folder of images of all different sizes costs what Pillow costs). The
    second time, the crop is still Pillow's, and both orders are computed beside it: if exactly one
    gives the same pixels it is kept; if both do (a flat picture) the next image decides; if neither
    does, the geometry stays with Pillow. At most ``capacity`` geometries are remembered.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._orders: dict[tuple, str] = {}
        self._capacity = capacity
        self._lock = threading.Lock()

    def __call__(
        self,
        pixels: Callable[[], np.ndarray],
        pillow: Callable[[], np.ndarray],
        in_size: tuple[int, int],
        size: tuple[int, int],
        box: tuple[int, int, int, int],
        interpolation: str,
    ) -> np.ndarray:
        """The crop ``box`` of the picture resized to ``size``: ``pixels()`` gives the picture as
        ``uint8 [H, W, C]``, ``pillow()`` the crop as Pillow makes it."""
        if interpolation not in FILTERS:
            return pillow()
        key = (in_size, size, interpolation)
        with self._lock:
            known = self._orders.get(key)
            if known is None:
                if len(self._orders) >= self._capacity:
                    self._orders.clear()
                self._orders[key] = _SEEN_ONCE
        if known is None or known == _PILLOW:
            return pillow()
        source = pixels()
        if known != _SEEN_ONCE:
            return resize_crop(source, size, box, interpolation, _ORDER_IS_VERTICAL[known])
        reference = pillow()
        matches = [
            order
            for order, vertical in _ORDER_IS_VERTICAL.items()
            if _same(reference, source, size, box, interpolation, vertical)
        ]
        if len(matches) != 2:
            with self._lock:
                self._orders[key] = matches[0] if matches else _PILLOW
        return reference

    def order(self, in_size: tuple[int, int], size: tuple[int, int], interpolation: str) -> str | None:
        """What is known of a geometry (for tests and logs)."""
        return self._orders.get((in_size, size, interpolation))


def _same(
    reference: np.ndarray,
    pixels: np.ndarray,
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    interpolation: str,
    vertical_first: bool,
) -> bool:
    """Whether ``resize_crop`` in that order gives ``reference``; a geometry it cannot handle (an
    error of its own) does not, and stays with Pillow instead of failing the image."""
    try:
        return np.array_equal(resize_crop(pixels, size, box, interpolation, vertical_first), reference)
    except Exception:
        return False
