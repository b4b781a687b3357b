"""PNG files written fast: the worker encodes five pictures per image, more CPU than anything else it does.

A PNG is the signature and chunks (length, type, body, CRC-32 of type and body); one IDAT chunk holds
the zlib stream of the filtered scanlines, each row prefixed by its filter type. Every row here is
"up"-filtered (each byte minus the byte above it, mod 256: one numpy subtraction), then deflated in
one of three ways, chosen by the level (``VITSCOPE_PNG_LEVEL``):

- **0**: stored, uncompressed deflate blocks (libdeflate level 0). For a host whose CPU cannot keep
  up with its GPU: about 1.4–1.8× larger files for photo-like pictures.
- **1** (the default): Huffman coding only, with one code built for the whole picture
  (``_huffman_zlib``, compiled by numba, GIL released). In a photo, the up-filtered bytes are small
  differences with no long repeats: LZ77 matching, most of any deflate coder's time, finds almost
  nothing there. Skipping it gives files 5–6 % *smaller* than libdeflate's level 1 in 40 % of its
  time, and as fast to decode. This is the "Huffman only" strategy of zlib (``Z_HUFFMAN_ONLY``),
  which is slower than this, and the idea of fpnge.
- **2–12**: libdeflate's levels of the same name (through ``imagecodecs``, GIL released).

A picture of flat colour (the layer grid: 89 % of its filtered bytes are zero) is the opposite case:
there LZ77 is what shrinks it 29×, so ``png_bytes(..., flat=True)`` uses libdeflate at level 1 or
above whatever the level. PNG is lossless: every level and both coders give back the same pixels
(``tests/worker/test_png.py`` decodes them with Pillow, libpng and zlib).
"""

from __future__ import annotations

import struct
import zlib

import imagecodecs
import numpy as np
from numba import njit

__all__ = ["DEFAULT_PNG_LEVEL", "HUFFMAN_LEVEL", "PNG_LEVELS", "huffman_zlib", "png_bytes"]

PNG_LEVELS = range(13)
DEFAULT_PNG_LEVEL = 1
HUFFMAN_LEVEL = 1  # the level coded by ``huffman_zlib`` rather than libdeflate

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FILTER_UP = 2

# Deflate's code-length alphabet is sent in this order (RFC 1951, 3.2.7).
_CODE_LENGTH_ORDER = np.array([16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15], np.int64)
_MAX_CODE_BITS = 15
_END_OF_BLOCK = 256


def png_bytes(pixels: np.ndarray, *, level: int = DEFAULT_PNG_LEVEL, flat: bool = False) -> bytes:
    """``uint8 [H, W, 3]`` as an 8-bit RGB PNG file (plain: no interlacing, no ancillary chunks).

    ``level`` is one of ``PNG_LEVELS`` (see the module docstring); every level gives back the same
    pixels, only the size and the time differ. ``flat`` marks a picture of large flat areas (a chart,
    not a photo), which is deflated by libdeflate at ``max(level, 1)``: Huffman coding alone would
    leave it 4× larger, storing it raw 29×.
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"png_bytes takes uint8 [H, W, 3] pixels, got {pixels.dtype} {pixels.shape}")
    if level not in PNG_LEVELS:
        raise ValueError(f"PNG level must be 0 to {PNG_LEVELS[-1]}, got {level}")
    height, width, _ = pixels.shape
    rows = np.ascontiguousarray(pixels).reshape(height, width * 3)
    scanlines = np.empty((height, width * 3 + 1), dtype=np.uint8)
    scanlines[:, 0] = _PNG_FILTER_UP
    scanlines[:1, 1:] = rows[:1]
    np.subtract(rows[1:], rows[:-1], out=scanlines[1:, 1:])  # uint8 arithmetic wraps mod 256
    if flat:
        idat = bytes(imagecodecs.deflate_encode(scanlines, level=max(level, 1)))
    elif level == HUFFMAN_LEVEL:
        idat = huffman_zlib(scanlines.reshape(-1))
    else:
        idat = bytes(imagecodecs.deflate_encode(scanlines, level=level))  # a zlib stream
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, no interlace
    return b"".join((_PNG_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", idat), _chunk(b"IEND", b"")))


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(body, zlib.crc32(kind))
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def huffman_zlib(data: np.ndarray) -> bytes:
    """``uint8 [n]`` as a zlib stream of one dynamic-Huffman deflate block without LZ77 matches;
    ``zlib.decompress`` gives ``data`` back."""
    flat = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    body = _huffman_deflate(flat, _CODE_LENGTH_ORDER)
    return b"\x78\x01" + body.tobytes() + struct.pack(">I", zlib.adler32(flat))


@njit(nogil=True, cache=True)
def _code_lengths(freq: np.ndarray, limit: int) -> np.ndarray:  # pragma: no cover - compiled
    """Huffman code lengths for ``freq`` (zero for absent symbols), none longer than ``limit``.

    The classic two-queue construction over the symbols sorted by count. A code too long for deflate
    (possible only for counts growing like Fibonacci numbers) is rebuilt from flattened counts,
    ``c >> 1 | 1``, until it fits: the code is then slightly longer than optimal, and still valid.
    """
    n = freq.shape[0]
    counts = freq.copy()
    lengths = np.zeros(n, np.int64)
    while True:
        symbols = np.nonzero(counts)[0]
        k = symbols.shape[0]
        if k == 1:  # deflate needs a complete code: one symbol gets a 1-bit code of its own
            lengths[symbols[0]] = 1
            return lengths
        order = symbols[np.argsort(counts[symbols], kind="mergesort")]
        weight = np.empty(2 * k - 1, np.int64)
        parent = np.zeros(2 * k - 1, np.int64)
        for j in range(k):
            weight[j] = counts[order[j]]
        leaf, node, made = 0, k, k
        while made < 2 * k - 1:  # join the two lightest of (next leaf, next internal node), twice
            total = 0
            for _ in range(2):
                if leaf < k and (node >= made or weight[leaf] <= weight[node]):
                    parent[leaf] = made
                    total += weight[leaf]
                    leaf += 1
                else:
                    parent[node] = made
                    total += weight[node]
                    node += 1
            weight[made] = total
            made += 1
        depth = np.zeros(2 * k - 1, np.int64)
        longest = 0
        for j in range(2 * k - 3, -1, -1):  # parents are made after their children
            depth[j] = depth[parent[j]] + 1
        for j in range(k):
            lengths[order[j]] = depth[j]
            longest = max(longest, depth[j])
        if longest <= limit:
            return lengths
        for j in range(n):
            if counts[j] > 0:
                counts[j] = (counts[j] >> 1) | 1


@njit(nogil=True, cache=True)
def _reversed(code: int, bits: int) -> int:  # pragma: no cover - compiled
    out = 0
    for _ in range(bits):
        out = (out << 1) | (code & 1)
        code >>= 1
    return out


@njit(nogil=True, cache=True)
def _canonical_codes(lengths: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """Deflate's canonical codes for ``lengths`` (RFC 1951, 3.2.2), bit-reversed: deflate sends a
    Huffman code's first bit first, into an LSB-first stream."""
    count = np.zeros(_MAX_CODE_BITS + 1, np.int64)
    for length in lengths:
        count[length] += 1
    count[0] = 0
    next_code = np.zeros(_MAX_CODE_BITS + 1, np.int64)
    code = 0
    for bits in range(1, _MAX_CODE_BITS + 1):
        code = (code + count[bits - 1]) << 1
        next_code[bits] = code
    codes = np.zeros(lengths.shape[0], np.uint64)
    for symbol in range(lengths.shape[0]):
        length = lengths[symbol]
        if length:
            codes[symbol] = _reversed(next_code[length], length)
            next_code[length] += 1
    return codes


@njit(nogil=True, cache=True)
def _huffman_deflate(data: np.ndarray, code_length_order: np.ndarray) -> np.ndarray:  # pragma: no cover
    """One final dynamic-Huffman deflate block of ``data``'s bytes as literals (RFC 1951, 3.2.7).

    The block header sends 257 literal/length code lengths (no length symbol is used), two unused
    1-bit distance codes (a complete code, which every inflater accepts) and the code lengths
    themselves each as a 4-bit code: the code-length alphabet's symbols 0–15 all get length 4, a
    complete code of 16 that costs 130 bytes per picture instead of a second Huffman code.
    """
    n = data.shape[0]
    freq = np.zeros(_END_OF_BLOCK + 1, np.int64)
    for j in range(n):
        freq[data[j]] += 1
    freq[_END_OF_BLOCK] = 1
    lengths = _code_lengths(freq, _MAX_CODE_BITS)
    codes = _canonical_codes(lengths)

    out = np.empty(n * 2 + 256, np.uint8)  # a code is at most 15 bits per byte, plus the header
    pos = 0
    bits = np.uint64(0)  # pending output, least significant bit first
    count = 0
    # BFINAL = 1, BTYPE = 2 (dynamic); HLIT = 257 - 257, HDIST = 2 - 1, HCLEN = 19 - 4
    bits |= np.uint64(1 | (2 << 1) | (0 << 3) | (1 << 8) | (15 << 13))
    count += 17
    for j in range(19):
        bits |= np.uint64(0 if code_length_order[j] >= 16 else 4) << np.uint64(count)
        count += 3
        while count >= 8:
            out[pos] = np.uint8(bits & np.uint64(0xFF))
            pos += 1
            bits >>= np.uint64(8)
            count -= 8
    for j in range(_END_OF_BLOCK + 1 + 2):  # each code length, by its 4-bit code (canonical: its value)
        length = lengths[j] if j <= _END_OF_BLOCK else 1
        bits |= np.uint64(_reversed(length, 4)) << np.uint64(count)
        count += 4
        while count >= 8:
            out[pos] = np.uint8(bits & np.uint64(0xFF))
            pos += 1
            bits >>= np.uint64(8)
            count -= 8
    for j in range(n):
        symbol = data[j]
        bits |= codes[symbol] << np.uint64(count)
        count += lengths[symbol]
        if count >= 32:
            for _ in range(4):
                out[pos] = np.uint8(bits & np.uint64(0xFF))
                pos += 1
                bits >>= np.uint64(8)
            count -= 32
    bits |= codes[_END_OF_BLOCK] << np.uint64(count)
    count += lengths[_END_OF_BLOCK]
    while count > 0:
        out[pos] = np.uint8(bits & np.uint64(0xFF))
        pos += 1
        bits >>= np.uint64(8)
        count -= 8
    return out[:pos]
