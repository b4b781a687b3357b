"""Specification of ``worker.preprocess``: which files decode to what, and which tensor a model gets."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision import transforms

from common.errors import ImageError, ImageTooLargeError
from common.methods import Preprocess
from worker.preprocess import IMAGENET_MEAN, IMAGENET_STD, build_preprocessor, decode_image

LIMIT = 64_000_000


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def meta_model(arch: str, **kwargs: object) -> torch.nn.Module:
    """The architecture without allocating weights: preprocessing only reads its config and input size."""
    with torch.device("meta"):
        return timm.create_model(arch, **kwargs)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise, so resampling filters and crop offsets change the numbers."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    noisy = base + rng.normal(0, 20, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width × height`` 1-bit pixels, followed by only a few bytes of them."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(16)))


# --- decode_image: modes ----------------------------------------------------------------------------


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.info["transparency"] = 1  # palette entry 1 (blue) is see-through
    return image


def _rgba() -> Image.Image:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((0, 0), (255, 0, 0, 255))
    image.putpixel((1, 0), (0, 0, 0, 128))
    return image


def _sixteen_bit() -> Image.Image:
    return Image.fromarray(np.array([[65535, 32896], [0, 257]], dtype=np.uint16))


# (name, image builder, format, {(x, y): expected RGB after decoding})
MODE_CASES: list[tuple[str, Callable[[], Image.Image], str, dict[tuple[int, int], tuple[int, int, int]]]] = [
    ("L", lambda: Image.new("L", (4, 4), 100), "PNG", {(0, 0): (100, 100, 100)}),
    ("1", lambda: Image.new("1", (4, 4), 1), "PNG", {(0, 0): (255, 255, 255)}),
    ("P", lambda: Image.new("RGB", (4, 4), (10, 200, 30)).quantize(4), "PNG", {(0, 0): (10, 200, 30)}),
    ("P+transparency", _palette_with_transparency, "PNG", {(0, 0): (255, 0, 0), (1, 1): (255, 255, 255)}),
    ("RGBA", _rgba, "PNG", {(0, 0): (255, 0, 0), (1, 0): (127, 127, 127), (2, 2): (255, 255, 255)}),
    ("LA", lambda: Image.new("LA", (4, 4), (0, 0)), "PNG", {(0, 0): (255, 255, 255)}),
    ("CMYK", lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "TIFF", {(0, 0): (255, 0, 0)}),
    ("I;16", _sixteen_bit, "PNG", {(0, 0): (255, 255, 255), (1, 0): (128, 128, 128), (1, 1): (1, 1, 1)}),
]


@pytest.mark.parametrize(("mode", "build", "fmt", "expected"), MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_every_mode_decodes_to_rgb_with_alpha_on_white(
    mode: str,
    build: Callable[[], Image.Image],
    fmt: str,
    expected: dict[tuple[int, int], tuple[int, int, int]],
) -> None:
    source = build()
    assert source.mode == mode.split("+")[0]
    decoded = decode_image(encode(source, fmt), max_pixels=LIMIT)
    assert decoded.mode == "RGB"
    assert decoded.size == source.size
    for xy, rgb in expected.items():
        assert decoded.getpixel(xy) == rgb, xy


# --- decode_image: EXIF orientation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "quarter_turns"),
    [(1, 0), (3, 2), (6, -1), (8, 1)],  # EXIF 6 = shown turned 90° clockwise, 8 = counter-clockwise
)
def test_exif_orientation_is_applied(orientation: int, quarter_turns: int) -> None:
    stored = np.zeros((40, 80, 3), dtype=np.uint8)  # landscape, a red block in the top-left corner
    stored[:20, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95)

    decoded = np.asarray(decode_image(data, max_pixels=LIMIT), dtype=np.int16)
    upright = np.rot90(stored, k=quarter_turns).astype(np.int16)
    assert decoded.shape == upright.shape
    assert np.abs(decoded - upright).mean() < 3


# --- decode_image: refusals -------------------------------------------------------------------------

_JPEG = encode(photo(64, 48), "JPEG")
_PNG = encode(photo(64, 48), "PNG")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (np.random.default_rng(1).bytes(2048), "not an image"),
        (b"<!DOCTYPE html><html>Not Found</html>", "not an image"),
        (_JPEG[: len(_JPEG) // 2], "truncated image file"),
        (_PNG[: len(_PNG) // 2], "truncated image file"),
        (_PNG[:100], "truncated image file"),
    ],
    ids=["empty", "random-bytes", "html-page", "truncated-jpeg", "truncated-png", "png-cut-in-first-chunk"],
)
def test_unusable_files_are_image_errors(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message) as caught:
        decode_image(data, max_pixels=LIMIT)
    assert not isinstance(caught.value, ImageTooLargeError)


def test_a_huge_canvas_in_a_tiny_file_is_refused_as_too_large() -> None:
    bomb = png_claiming(100_000, 100_000)  # 10^10 pixels claimed in 60 bytes
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb, max_pixels=LIMIT)


def test_pixel_limit_is_checked_on_the_header_before_decoding() -> None:
    header = png_claiming(3000, 1000)  # hardly any pixel data: decoding would fail as truncated
    with pytest.raises(ImageTooLargeError, match="3000×1000"):
        decode_image(header, max_pixels=2_999_999)
    with pytest.raises(ImageError, match="truncated") as caught:
        decode_image(header, max_pixels=3_000_000)
    assert not isinstance(caught.value, ImageTooLargeError)


@pytest.mark.parametrize(("max_pixels", "accepted"), [(64 * 48, True), (64 * 48 - 1, False)])
def test_pixel_limit_is_inclusive(max_pixels: int, accepted: bool) -> None:
    if accepted:
        assert decode_image(_PNG, max_pixels=max_pixels).size == (64, 48)
    else:
        with pytest.raises(ImageTooLargeError):
            decode_image(_PNG, max_pixels=max_pixels)


# --- Preprocessor -----------------------------------------------------------------------------------

TIMM_CASES = [
    ("vit_base_patch32_224", {}),  # augreg: mean = std = 0.5, crop_pct 0.9
    ("deit_tiny_patch16_224", {}),  # ImageNet statistics
    ("vit_base_patch16_384", {}),  # 384 input, crop_pct 1.0
    ("vit_base_patch16_clip_384.openai_ft_in12k_in1k", {}),  # squash resize, crop_pct 0.95
]


@pytest.mark.parametrize(("arch", "kwargs"), TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
@pytest.mark.parametrize("size", [(301, 203), (203, 301), (500, 500)])
def test_timm_pipeline_equals_timms_own_transform(
    arch: str, kwargs: dict[str, object], size: tuple[int, int]
) -> None:
    model = meta_model(arch, **kwargs)
    image = photo(*size)
    expected = create_transform(**resolve_data_config({}, model=model))(image)

    preprocessor = build_preprocessor(model, Preprocess.TIMM)
    tensor = preprocessor(image)
    assert tensor.dtype == torch.float32
    assert tensor.shape == expected.shape
    assert torch.equal(tensor, expected)


def test_timm_pipeline_follows_an_img_size_override() -> None:
    """timm's config still says 224 for a model built at 384; the patch grid needs 384."""
    model = meta_model("deit_tiny_patch16_224", img_size=384)
    config = resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 224, 224)
    expected = create_transform(**{**config, "input_size": (3, 384, 384)})(photo(400, 300))

    tensor = build_preprocessor(model, Preprocess.TIMM)(photo(400, 300))
    assert tensor.shape == (3, 384, 384)
    assert torch.equal(tensor, expected)


@pytest.mark.parametrize(
    ("arch", "kwargs", "resize", "crop"),
    [
        ("vit_base_patch32_224", {}, 256, 224),
        ("deit_tiny_patch16_224", {}, 256, 224),
        ("vit_base_patch16_384", {}, 439, 384),  # round(384 * 256 / 224)
        ("deit_tiny_patch16_224", {"img_size": 384}, 439, 384),
    ],
)
def test_paper_pipeline_is_resize_256_bicubic_crop_224_imagenet(
    arch: str, kwargs: dict[str, object], resize: int, crop: int
) -> None:
    reference = transforms.Compose(
        [
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    image = photo(333, 250)
    tensor = build_preprocessor(meta_model(arch, **kwargs), Preprocess.PAPER)(image)
    assert torch.equal(tensor, reference(image))


@pytest.mark.parametrize(
    ("arch", "pipeline", "mean", "std"),
    [
        ("vit_base_patch32_224", Preprocess.TIMM, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ("vit_base_patch32_224", Preprocess.PAPER, IMAGENET_MEAN, IMAGENET_STD),
        ("deit_tiny_patch16_224", Preprocess.TIMM, IMAGENET_MEAN, IMAGENET_STD),
        ("deit_tiny_patch16_224", Preprocess.PAPER, IMAGENET_MEAN, IMAGENET_STD),
    ],
)
def test_normalization_statistics_per_pipeline(
    arch: str, pipeline: Preprocess, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    preprocessor = build_preprocessor(meta_model(arch), pipeline)
    assert preprocessor.pipeline is pipeline
    assert preprocessor.mean == pytest.approx(mean)
    assert preprocessor.std == pytest.approx(std)


@pytest.mark.parametrize("pipeline", list(Preprocess))
def test_the_crop_is_exactly_what_the_model_sees(pipeline: Preprocess) -> None:
    preprocessor = build_preprocessor(meta_model("vit_base_patch32_224"), pipeline)
    image = photo(320, 240)
    cropped = preprocessor.crop(image)
    assert torch.equal(preprocessor.normalize(cropped), preprocessor(image))
    crop = np.array(cropped)
    assert crop.dtype == np.uint8
    assert crop.shape == (224, 224, 3)
    from_crop = transforms.functional.to_tensor(crop)
    mean = torch.tensor(preprocessor.mean)[:, None, None]
    std = torch.tensor(preprocessor.std)[:, None, None]
    assert torch.allclose((from_crop - mean) / std, preprocessor(image), atol=1e-6)


def test_center_crop_keeps_the_middle_of_a_wide_image() -> None:
    """A 768×256 image is already 256 high: the crop is columns 272..495, the white band 352..415."""
    pixels = np.zeros((256, 768, 3), dtype=np.uint8)
    pixels[:, 352:416] = 255
    crop = np.asarray(
        build_preprocessor(meta_model("deit_tiny_patch16_224"), Preprocess.PAPER).crop(
            Image.fromarray(pixels)
        )
    )
    assert crop.shape == (224, 224, 3)
    assert (crop[:, 80:144] == 255).all()
    assert (crop[:, :80] == 0).all()
    assert (crop[:, 144:] == 0).all()


@pytest.mark.parametrize(("size", "refused"), [((20_000, 2), True), ((2, 20_000), True), ((4000, 30), False)])
def test_slivers_are_refused_before_a_huge_resize(size: tuple[int, int], refused: bool) -> None:
    preprocessor = build_preprocessor(meta_model("deit_tiny_patch16_224"), Preprocess.TIMM)
    image = Image.new("RGB", size, (90, 90, 90))
    if refused:
        with pytest.raises(ImageTooLargeError, match="too elongated"):
            preprocessor(image)
    else:
        assert preprocessor(image).shape == (3, 224, 224)


def _png_with_broken_chunk() -> bytes:
    """A PNG whose second chunk has a name Pillow quotes in its error ("broken PNG file (chunk b'…')")."""
    data = bytearray(_PNG)
    ihdr_end = 8 + 8 + 13 + 4
    data[ihdr_end + 4 : ihdr_end + 8] = b"rOOt"  # the next chunk's type field
    return bytes(data)


@pytest.mark.parametrize(
    "data",
    [
        b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n",
        b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n",
        b"P6\n" + b"rootSECRET" * 200,  # a PPM header token Pillow would echo back
        _png_with_broken_chunk(),
        _PNG[: len(_PNG) // 2],
    ],
    ids=["passwd", "ssh-key", "ppm-token", "png-chunk-name", "truncated-png"],
)
def test_no_error_message_quotes_the_file(data: bytes) -> None:
    """The reason is stored where anyone reading results sees it: it names the problem, never the bytes."""
    with pytest.raises(ImageError) as caught:
        decode_image(data, max_pixels=LIMIT)
    message = str(caught.value)
    for marker in ("root", "OPENSSH", "b3Bl", "SECRET", "rOOt", "\\x"):
        assert marker not in message, message


# Large JPEGs decode at reduced scale; the model's input is made per micro-batch on the device.
def _jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 6, (size[1], size[0], 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("size", "decoded"),
    [
        ((4000, 3000), (1000, 750)),
        ((2000, 1500), (1000, 750)),
        ((2400, 1800), (1200, 900)),
        ((1200, 900), (1200, 900)),
        ((600, 450), (600, 450)),
    ],
)
def test_large_jpegs_decode_at_the_smallest_scale_that_keeps_twice_the_resize(
    size: tuple[int, int], decoded: tuple[int, int]
) -> None:
    preprocessor = build_preprocessor(meta_model("deit_tiny_patch16_224"), Preprocess.TIMM)
    assert preprocessor.draft_size == 2 * preprocessor.resize_size == 496
    data = _jpeg(size)
    draft = decode_image(data, max_pixels=10**8, min_size=preprocessor.draft_size)
    assert draft.size == decoded
    full = decode_image(data, max_pixels=10**8)
    assert full.size == size
    difference = np.abs(
        np.asarray(preprocessor.crop(draft), dtype=np.float64)
        - np.asarray(preprocessor.crop(full), dtype=np.float64)
    )
    assert difference.mean() < 1.0  # grey levels, out of 255
    if decoded == size:
        assert difference.max() == 0


def test_draft_decoding_leaves_other_formats_whole() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 2000), (10, 200, 30)).save(buffer, "PNG")
    assert decode_image(buffer.getvalue(), max_pixels=10**8, min_size=496).size == (3000, 2000)


def test_the_pixel_limit_is_checked_on_the_full_size_before_a_draft_decode() -> None:
    with pytest.raises(ImageTooLargeError):
        decode_image(_jpeg((4000, 3000)), max_pixels=4_000_000, min_size=496)


@pytest.mark.parametrize("pipeline", list(Preprocess))
def test_normalize_batch_is_bit_identical_to_normalizing_each_crop(pipeline: Preprocess) -> None:
    preprocessor = build_preprocessor(meta_model("vit_base_patch32_224"), pipeline)
    rng = np.random.default_rng(3)
    crops = rng.integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    one_by_one = torch.stack([preprocessor.normalize(Image.fromarray(c)) for c in crops])
    batched = preprocessor.normalize_batch(torch.from_numpy(crops))
    assert batched.is_contiguous()  # the model runs the same kernels on the same layout
    assert torch.equal(batched, one_by_one)


# --- decode_image: memory of a large picture ---------------------------------------------------------


def _big_png(path: str, width: int, height: int, *, color_type: int, bit_depth: int) -> None:
    """An 8000×8000-class PNG written a row at a time (the test never holds its pixels): a gradient
    row, repeated, compresses to a few hundred KB like the issue's 124 KB scan."""
    channels = {0: 1, 6: 4}[color_type]
    dtype = ">u2" if bit_depth == 16 else "u1"
    top = 65535 if bit_depth == 16 else 255
    row = np.linspace(0, top, width * channels).astype(dtype)
    if color_type == 6:
        row.reshape(width, 4)[:, 3] = np.linspace(0, 255, width).astype("u1")  # alpha from clear to opaque
    line = b"\x00" + row.tobytes()  # filter type 0
    compressor = zlib.compressobj(6)
    data = b"".join(compressor.compress(line) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    with open(path, "wb") as handle:
        handle.write(
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
        )


# Runs in a fresh interpreter: resets the peak resident size after loading, decodes, prints the rise.
_PEAK_SCRIPT = """
import sys
from worker.preprocess import decode_image

data = open(sys.argv[1], "rb").read()
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # resets VmHWM, the peak resident set size, to the current one

def resident(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

before = resident("VmRSS")
image = decode_image(data, max_pixels=64_000_000)
assert image.mode == "RGB" and image.size == (8000, 8000)
print(resident("VmHWM") - before)
"""


@pytest.mark.parametrize(("color_type", "bit_depth"), [(0, 16), (6, 8)], ids=["16-bit grey", "RGBA"])
def test_decoding_the_largest_image_peaks_at_a_small_multiple_of_its_rgb_size(
    tmp_path, color_type: int, bit_depth: int
) -> None:
    """An 8000×8000 picture (the default pixel limit) costs the decoded file plus its RGB result, not
    float64 grey levels (+972 MiB) or RGBA copies (+1.09 GiB): at most 3× its 8-bit RGB size, 549 MiB."""
    import subprocess
    import sys

    path = tmp_path / "large.png"
    _big_png(str(path), 8000, 8000, color_type=color_type, bit_depth=bit_depth)
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    rise = int(result.stdout.strip().splitlines()[-1])
    rgb_bytes = 8000 * 8000 * 3
    print(f"peak rise {rise / 2**20:.0f} MiB = {rise / rgb_bytes:.2f}x the 8-bit RGB size")
    assert rise <= 3 * rgb_bytes, f"decoding peaked {rise / 2**20:.0f} MiB above the start"


@pytest.mark.parametrize("mode", ["I;16", "I", "RGBA", "LA", "P"])
def test_band_conversion_equals_converting_the_whole_picture(mode: str, monkeypatch) -> None:
    """Bands of a few rows give exactly the pixels of the whole-picture conversion."""
    import worker.preprocess as preprocess

    rng = np.random.default_rng(1)
    if mode == "I;16":
        levels = rng.integers(0, 65536, (37, 53), dtype=np.uint16)
        levels[0, :4] = [128, 129, 385, 65535]  # around the rounding boundaries
        source = Image.fromarray(levels)
        expected = np.clip(np.rint(levels / 257.0), 0, 255).astype(np.uint8)[..., None].repeat(3, axis=-1)
    elif mode == "I":
        levels = rng.integers(-70_000, 200_000, (37, 53)).astype(np.int32)
        source = Image.fromarray(levels, "I")
        expected = np.clip(np.rint(levels / 257.0), 0, 255).astype(np.uint8)[..., None].repeat(3, axis=-1)
    else:
        source = Image.fromarray(rng.integers(0, 256, (37, 53, 4), dtype=np.uint8), "RGBA")
        if mode == "LA":
            source = source.convert("LA")
        elif mode == "P":
            source = source.convert("RGB").convert("P")
            source.info["transparency"] = 3
        rgba = source.convert("RGBA")
        expected = np.asarray(
            Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB")
        )
    monkeypatch.setattr(preprocess, "_BAND_PIXELS", 5 * 53)  # bands of 5 rows, the last one shorter
    assert np.array_equal(np.asarray(preprocess._to_rgb(source)), expected)
