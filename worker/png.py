"""PNG files written fast: the worker encodes five pictures per image, more CPU than anything else it does.

A PNG is the signature and chunks (length, type, body, CRC-32 of type and body); one IDAT chunk holds
the zlib stream of the filtered scanlines, each row prefixed by its filter type. A photo's rows are
"up"-filtered (each byte minus the byte above it, mod 256: one numpy subtraction), then deflated in
one of three ways, chosen by the level (``VITSCOPE_PNG_LEVEL``):

- **0**: stored, uncompressed deflate blocks (libdeflate level 0). For a host whose CPU cannot keep
  up with its GPU: about 1.4–1.8× larger files for photo-like pictures.
- **1** (the default): Huffman coding only, with one code built for the whole picture
  (``huffman_zlib``, compiled by numba, GIL released). In a photo, the up-filtered bytes are small
  differences with no long repeats: LZ77 matching, most of any deflate coder's time, finds almost
  nothing there. Skipping it gives files 5–6 % *smaller* than libdeflate's level 1 in 40 % of its
  time, and as fast to decode. This is the "Huffman only" strategy of zlib (``Z_HUFFMAN_ONLY``),
  which is slower than this, and the idea of fpnge.
- **2–12**: libdeflate's levels of the same name (through ``imagecodecs``, GIL released).

A picture of flat colour (the layer grid: 89 % of its up-filtered bytes are zero) is the opposite
case: there repeats are everything. ``png_bytes(..., flat=True)`` filters each row "up" where it
repeats the row above and "sub" elsewhere, so runs of one colour become runs of zeros, and at levels
0 and 1 codes every run of a repeated byte as a match at distance 1 (zlib's ``Z_RLE``): 30× smaller
than the raw rows in half of libdeflate's time. PNG is lossless: every level and every coder give
back the same pixels (``tests/worker/test_png.py`` decodes them with Pillow, libpng and zlib).
"""

from __future__ import annotations

import struct
import zlib
from typing import cast

import imagecodecs
import numpy as np
from numba import njit

__all__ = ["DEFAULT_PNG_LEVEL", "HUFFMAN_LEVEL", "PNG_LEVELS", "huffman_zlib", "png_bytes"]

PNG_LEVELS = range(13)
DEFAULT_PNG_LEVEL = 1
HUFFMAN_LEVEL = 1  # the level coded by ``huffman_zlib`` rather than libdeflate

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FILTER_SUB = 1
_PNG_FILTER_UP = 2

# Deflate's code-length alphabet is sent in this order (RFC 1951, 3.2.7).
_CODE_LENGTH_ORDER = np.array([16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15], np.int64)
_MAX_CODE_BITS = 15
_END_OF_BLOCK = 256


def png_bytes(pixels: np.ndarray, *, level: int = DEFAULT_PNG_LEVEL, flat: bool = False) -> bytes:
    """``uint8 [H, W, 3]`` as an 8-bit RGB PNG file (plain: no interlacing, no ancillary chunks).

    ``level`` is one of ``PNG_LEVELS`` (see the module docstring); every level gives back the same
    pixels, only the size and the time differ. ``flat`` marks a picture of large flat areas (a chart,
    not a photo): its rows are filtered to turn runs into zeros and, at levels 0 and 1, coded with
    runs: Huffman coding alone would leave it 4× larger, storing it raw 29×.
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"png_bytes takes uint8 [H, W, 3] pixels, got {pixels.dtype} {pixels.shape}")
    if level not in PNG_LEVELS:
        raise ValueError(f"PNG level must be 0 to {PNG_LEVELS[-1]}, got {level}")
    height, width, _ = pixels.shape
    rows = np.ascontiguousarray(pixels).reshape(height, width * 3)
    scanlines = _filtered(rows, flat)
    if flat and level <= HUFFMAN_LEVEL:
        idat = huffman_zlib(scanlines.reshape(-1), runs=True)
    elif level == HUFFMAN_LEVEL:
        idat = huffman_zlib(scanlines.reshape(-1))
    else:
        idat = bytes(imagecodecs.deflate_encode(cast(bytes, scanlines), level=level))  # a zlib stream
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, no interlace
    return b"".join((_PNG_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", idat), _chunk(b"IEND", b"")))


def _filtered(rows: np.ndarray, flat: bool) -> np.ndarray:
    """The scanlines, each prefixed by its filter type: "up" for every row of a photo; for a flat
    picture "up" where a row repeats the one above (all zeros) and "sub" (each byte minus the same
    channel of the pixel to its left) elsewhere, which turns a run of one colour into zeros too."""
    height, row_bytes = rows.shape
    scanlines = np.empty((height, row_bytes + 1), dtype=np.uint8)
    scanlines[:, 0] = _PNG_FILTER_UP
    scanlines[:1, 1:] = rows[:1]
    np.subtract(rows[1:], rows[:-1], out=scanlines[1:, 1:])  # uint8 arithmetic wraps mod 256
    if flat:
        changed = np.ones(height, dtype=bool)
        changed[1:] = scanlines[1:, 1:].any(axis=1)
        sub = rows[changed]
        scanlines[changed, 0] = _PNG_FILTER_SUB
        scanlines[changed, 1:4] = sub[:, :3]
        scanlines[changed, 4:] = sub[:, 3:] - sub[:, :-3]  # wraps mod 256
    return scanlines


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(body, zlib.crc32(kind))
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def huffman_zlib(data: np.ndarray, *, runs: bool = False) -> bytes:
    """``uint8 [n]`` as a zlib stream of one dynamic-Huffman deflate block: literals only, or with
    ``runs`` also runs of a repeated byte as matches at distance 1; ``zlib.decompress`` gives
    ``data`` back."""
    flat = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    body = _huffman_deflate(flat, runs, _CODE_LENGTH_ORDER, _LENGTH_BASES, _LENGTH_EXTRA_BITS)
    return b"\x78\x01" + body.tobytes() + struct.pack(">I", zlib.adler32(cast(bytes, flat)))


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


# Deflate's length symbols 257–285: the first length of each and its count of extra bits (RFC 1951, 3.2.5).
_LENGTH_BASES = np.array(
    [
        3,
        4,
        5,
        6,
        7,
        8,
        9,
        10,
        11,
        13,
        15,
        17,
        19,
        23,
        27,
        31,
        35,
        43,
        51,
        59,
        67,
        83,
        99,
        115,
        131,
        163,
        195,
        227,
        258,
    ],
    np.int64,
)
_LENGTH_EXTRA_BITS = np.array(
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0], np.int64
)
_MIN_RUN, _MAX_RUN = 3, 258
_SAMPLE_EVERY = 4  # bytes counted for a photo's code: one in four
_LITERAL_LENGTH_SYMBOLS = 286


@njit(nogil=True, cache=True)
def _length_symbols(bases: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """For each run length 3–258, the index (0–28) of its length symbol."""
    symbol_of = np.zeros(_MAX_RUN + 1, np.int64)
    for index in range(bases.shape[0]):
        last = bases[index + 1] if index + 1 < bases.shape[0] else _MAX_RUN + 1
        for length in range(bases[index], min(last, _MAX_RUN + 1)):
            symbol_of[length] = index
    symbol_of[_MAX_RUN] = bases.shape[0] - 1  # 258 has a symbol of its own, not 227 + 31
    return symbol_of


@njit(nogil=True, cache=True)
def _huffman_deflate(  # pragma: no cover - compiled
    data: np.ndarray, runs: bool, code_length_order: np.ndarray, bases: np.ndarray, extra_bits: np.ndarray
) -> np.ndarray:
    """One final dynamic-Huffman deflate block of ``data`` (RFC 1951, 3.2.7): literals, and with
    ``runs`` every run of 3–258 repeats of the byte before as a match at distance 1 (zlib's
    ``Z_RLE``).

    The block header sends 286 literal/length code lengths, two 1-bit distance codes (a complete
    code, which every inflater accepts; only distance 1 is used) and the code lengths themselves
    each as a 4-bit code: the code-length alphabet's symbols 0–15 all get length 4, a complete code
    of 16 that costs 150 bytes per picture instead of a second Huffman code.
    """
    n = data.shape[0]
    symbol_of = _length_symbols(bases)
    # Pass 1: the symbol counts, and with runs the tokens (a byte, or -length for a run).
    freq = np.zeros(_LITERAL_LENGTH_SYMBOLS, np.int64)
    tokens = np.empty(n if runs else 0, np.int16)
    count_tokens = 0
    if runs:
        j = 0
        while j < n:
            if j > 0:
                previous = data[j - 1]
                end = j
                while end < n and end - j < _MAX_RUN and data[end] == previous:
                    end += 1
                if end - j >= _MIN_RUN:
                    tokens[count_tokens] = j - end
                    freq[_END_OF_BLOCK + 1 + symbol_of[end - j]] += 1
                    count_tokens += 1
                    j = end
                    continue
            tokens[count_tokens] = data[j]
            freq[data[j]] += 1
            count_tokens += 1
            j += 1
    else:
        # The code is built from every 4th byte, plus one of each byte value so that every byte has
        # a code: 0.07 % larger files than from exact counts, for a quarter of the counting.
        for j in range(0, n, _SAMPLE_EVERY):
            freq[data[j]] += 1
        for value in range(_END_OF_BLOCK):
            freq[value] += 1
        count_tokens = n
    freq[_END_OF_BLOCK] = 1
    lengths = _code_lengths(freq, _MAX_CODE_BITS)
    codes = _canonical_codes(lengths)

    # Pass 2: the bits, least significant first, gathered in a 64-bit register and stored 32 at a
    # time (a token adds at most 15 + 5 + 1 bits, so the register never overflows). The store is
    # written out in each loop: a helper returning the register as a tuple made this pass 3× slower.
    words = np.empty(n // 2 + 256, np.dtype("<u4"))  # a token is at most 21 bits per byte, plus the header
    w = 0
    bits = np.uint64(0)
    count = np.uint64(0)
    # BFINAL = 1, BTYPE = 2 (dynamic); HLIT = 286 - 257, HDIST = 2 - 1, HCLEN = 19 - 4
    bits |= np.uint64(1 | (2 << 1) | ((_LITERAL_LENGTH_SYMBOLS - 257) << 3) | (1 << 8) | (15 << 13))
    count += np.uint64(17)
    # Then the code-length code (3 bits each: 4 for symbols 0–15, 0 for 16–18) and every code length
    # by its 4-bit code (canonical: its own value). Not the hot part: one loop for both.
    for j in range(19 + _LITERAL_LENGTH_SYMBOLS + 2):
        if j < 19:
            value, width = (0 if code_length_order[j] >= 16 else 4), 3
        else:
            length = lengths[j - 19] if j - 19 < _LITERAL_LENGTH_SYMBOLS else 1
            value, width = _reversed(length, 4), 4
        bits |= np.uint64(value) << count
        count += np.uint64(width)
        if count >= 32:
            words[w] = np.uint32(bits & np.uint64(0xFFFFFFFF))
            w += 1
            bits >>= np.uint64(32)
            count -= np.uint64(32)
    widths = lengths.astype(np.uint64)
    if runs:
        for t in range(count_tokens):
            token = np.int64(tokens[t])
            if token >= 0:
                bits |= codes[token] << count
                count += widths[token]
            else:  # a run: its length symbol, the extra bits, distance code 0 (the 1-bit code "0")
                run = -token
                index = symbol_of[run]
                symbol = _END_OF_BLOCK + 1 + index
                bits |= codes[symbol] << count
                count += widths[symbol]
                bits |= np.uint64(run - bases[index]) << count
                count += np.uint64(extra_bits[index] + 1)
            if count >= 32:
                words[w] = np.uint32(bits & np.uint64(0xFFFFFFFF))
                w += 1
                bits >>= np.uint64(32)
                count -= np.uint64(32)
    else:
        for t in range(n):
            symbol = data[t]
            bits |= codes[symbol] << count
            count += widths[symbol]
            if count >= 32:
                words[w] = np.uint32(bits & np.uint64(0xFFFFFFFF))
                w += 1
                bits >>= np.uint64(32)
                count -= np.uint64(32)
    bits |= codes[_END_OF_BLOCK] << count
    count += widths[_END_OF_BLOCK]
    tail = (int(count) + 7) // 8  # the last bits, padded to a whole byte
    out = np.empty(4 * w + tail, np.uint8)
    out[: 4 * w] = words[:w].view(np.uint8)
    for k in range(tail):
        out[4 * w + k] = np.uint8((bits >> np.uint64(8 * k)) & np.uint64(0xFF))
    return out
