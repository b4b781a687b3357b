"""Images in: bytes to a checked RGB picture, and that picture to exactly the tensor a model expects.

Two steps, kept apart because they fail differently. ``decode_image`` judges the *file* (too large,
truncated, not an image: permanent ``ImageError``s, reported per job). A ``Preprocessor`` then
applies one of the named pipelines of ``docs/methods.md`` "Preprocessing"; its ``crop`` is also the
picture the overlays are drawn on, so a heat map always lines up with what the model saw.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import resolve_data_config
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from common.errors import ImageError, ImageTooLargeError, UnsupportedModelError
from common.methods import Preprocess
from worker.resample import PillowCrops

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocessor", "build_preprocessor", "decode_image", "to_rgb"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# timm's eval crop modes reproduced here; "border" (letterboxing) is used by no ViT in timm.
_CROP_MODES = ("center", "squash")
# Where a centre crop starts: torchvision rounds half the margin (half to even), transformers' image
# processors floor it; the two differ by a pixel whenever the margin is odd.
_CROP_OFFSETS = ("torchvision", "transformers")

# The paper's recipe at its native size: shorter side to 256, centre crop 224.
_PAPER_RESIZE, _PAPER_CROP = 256, 224

# What Pillow raises for malformed files besides UnidentifiedImageError: OSError for truncated or
# broken streams, SyntaxError/ValueError/struct.error/EOFError from individual format plugins.
_PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, struct.error, EOFError)

# Grey-level modes holding more than 8 bits. Pillow's own convert("RGB") clips them at 255, which
# turns a 16-bit scan almost entirely white; they are rescaled from the 16-bit range instead.
_HIGH_DEPTH_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

_WHITE = (255, 255, 255, 255)

# Largest intermediate picture before the centre crop (~100 MB of RGB); only slivers reach it.
_MAX_RESIZED_PIXELS = 32_000_000

# Every preprocessor's compiled crops, with the pass order learned per geometry.
_CROPS = PillowCrops()


def decode_image(data: bytes, *, max_pixels: int, min_size: int | None = None) -> Image.Image:
    """Decode image file bytes into a fully loaded RGB picture, upright as the camera meant it.

    With ``min_size``, a JPEG at least twice that size on both sides is decoded at a reduced scale
    (libjpeg's DCT scaling by 1/2, 1/4 or 1/8, Pillow's ``draft``), the smallest that keeps both sides
    at or above ``min_size``. ``Preprocessor.draft_size`` asks for twice the resize target, so the
    resize that follows still shrinks the picture: a 4000×3000 photo decodes at 1000×750 in a quarter
    of the time, and its 224-pixel crop differs from the full decode's by 0.2 grey levels on average
    (at most 2 on a photo-like test image). Smaller images and other formats decode in full.

    The pixel limit is checked against the size in the file's header *before* any pixel is decoded,
    so a small file claiming a huge canvas (a decompression bomb) costs nothing. Pillow's own bomb
    guard (which fires at twice ``Image.MAX_IMAGE_PIXELS``) is reported the same way. The picture is
    loaded here, not lazily later, so that a truncated file fails in this function with a clear
    message. EXIF orientation is applied, and every mode becomes RGB (see ``_to_rgb``).

    Raises ``ImageTooLargeError`` over ``max_pixels`` and ``ImageError`` for anything that is not a
    complete, decodable image. No message quotes the file's content (see issue 7): an error naming a
    file the worker was tricked into reading must not hand its first bytes to whoever reads results.
    """
    if not data:
        raise ImageError("not an image (empty file, 0 bytes)")
    image_format = "unknown format"
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x Pillow's limit it only warns; our own limit decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            image_format = image.format or image_format
            _check_pixels(image.size, max_pixels)
            if min_size is not None and image.format == "JPEG":
                image.draft(image.mode, (min_size, min_size))
            image.load()
            # In place: an upright image is not copied (the copy cost as much as a quarter of its resize).
            ImageOps.exif_transpose(image, in_place=True)
    except Image.DecompressionBombError:
        raise ImageTooLargeError(
            f"image too large (over Pillow's decompression-bomb limit of {2 * cast(int, Image.MAX_IMAGE_PIXELS):,} pixels)"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image (no known image format in its {len(data):,} bytes)") from None
    except _PIL_DECODE_ERRORS as exc:
        # Pillow's own messages may quote the file (a PNG chunk name, a PPM header token): the
        # reason is stored where anyone reading results can see it, so it names the problem only.
        if "truncated" in str(exc).lower():
            raise ImageError(f"truncated image file ({image_format}, {len(data):,} bytes)") from None
        raise ImageError(
            f"corrupt image file ({image_format}; the decoder stopped with {type(exc).__name__})"
        ) from None
    return _to_rgb(image)


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}×{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """A picture someone else decoded, made RGB as ``decode_image`` makes every file (``_to_rgb``)."""
    image.load()
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB.

    Transparent pixels (RGBA, LA, palette images with a transparent colour) are composited on
    white, the background a viewer shows them on; simply dropping alpha would expose whatever colour
    the encoder left under fully transparent pixels, often black. 16-bit grey levels are scaled to
    8 bits (``v / 257``, so 65535 -> 255). CMYK, L, 1, P and the rest use Pillow's own conversion.

    These two are converted a band of rows at a time into the RGB result (``_by_bands``): done on
    the whole picture, the float64 grey levels cost 8 bytes a pixel several times over (+972 MiB for
    an 8000×8000 16-bit scan) and the RGBA copies and composite four pictures' worth (+1.09 GiB),
    per decode slot. By bands, the peak is the decoded file plus the RGB result.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_GREY_MODES:
        return _by_bands(image, _grey_band)
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        return _by_bands(image, _composite_band)
    return image.convert("RGB")


# Rows converted at once by ``_by_bands``: a few MB of intermediates for the widest allowed image.
_BAND_PIXELS = 1 << 20


def _by_bands(image: Image.Image, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """``image`` as RGB, ``convert`` applied to one band of rows at a time and pasted into the result.

    Both conversions are per pixel, so the bands' results are exactly the whole picture's.
    """
    width, height = image.size
    rows = max(1, _BAND_PIXELS // max(width, 1))
    result = Image.new("RGB", image.size)
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(top + rows, height)))
        result.paste(convert(band), (0, top))
    return result


def _grey_band(band: Image.Image) -> Image.Image:
    """16-bit grey levels to 8 bits, ``round(v / 257)`` in integers: ``(v + 128) // 257`` is exact for
    every level since 257 is odd (no tie), and clipping matches the float form for 32-bit values."""
    levels = np.asarray(band).astype(np.int64)
    grey = np.clip((levels + 128) // 257, 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _composite_band(band: Image.Image) -> Image.Image:
    """Transparent pixels composited on white, as a viewer shows them."""
    rgba = band.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


@dataclass(frozen=True)
class Preprocessor:
    """One model's input recipe: resize, centre crop, scale to [0, 1], normalize per channel.

    The steps are torchvision's functional forms of exactly the transforms
    ``timm.data.create_transform`` builds for evaluation, so the tensors are bit-identical to timm's.

    ``resize_size`` is the shorter side after resizing (``crop_mode="center"``, aspect ratio kept),
    or both sides (``crop_mode="squash"``, as timm does for some CLIP/EVA fine-tunes); the centre
    crop to ``input_size`` follows either way. ``crop_offsets`` says where that crop starts:
    torchvision's rule (timm) or ``transformers``' image processors' (``worker.hf_models``).
    """

    pipeline: Preprocess
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_size: int
    interpolation: str = "bicubic"
    crop_mode: str = "center"
    crop_offsets: str = "torchvision"

    def __post_init__(self) -> None:
        if self.crop_mode not in _CROP_MODES:
            raise ValueError(f"crop_mode must be 'center' or 'squash', got {self.crop_mode!r}")
        if self.crop_offsets not in _CROP_OFFSETS:
            raise ValueError(f"crop_offsets must be one of {_CROP_OFFSETS}, got {self.crop_offsets!r}")

    def _center_crop(self, resized: Image.Image) -> Image.Image:
        """The crop of an already resized picture, starting where ``crop_offset`` says."""
        if self.crop_offsets == "torchvision":
            return TF.center_crop(resized, list(self.input_size))
        left, top = self.crop_offset(resized.size)
        return TF.crop(resized, top, left, *self.input_size)

    def crop(self, image: Image.Image) -> Image.Image:
        """The resized, centre-cropped RGB picture: exactly the pixels the model sees.

        A sliver (say 20000×2 px) passes the pixel limit but would be resized to a canvas of
        gigabytes before the crop; it is refused with ``ImageTooLargeError`` instead.
        """
        if self.crop_mode == "center":
            _check_resized_pixels(image.size, self.resize_size)
        size = self.resize_size if self.crop_mode == "center" else [self.resize_size, self.resize_size]
        resized = TF.resize(image, size, interpolation=InterpolationMode(self.interpolation))
        return self._center_crop(resized)

    def crop_pixels(self, image: Image.Image) -> np.ndarray:
        """``crop`` as ``uint8 [H, W, 3]``, the same pixels, computed only where the crop keeps them
        once the picture's geometry is known (``worker.resample.PillowCrops``): 0.4 ms for a 500×375
        photo instead of 1.5. A crop that needs padding (a picture smaller than the crop) is Pillow's."""
        if self.crop_mode == "center":
            _check_resized_pixels(image.size, self.resize_size)
        resized = self.resized_size(image.size)
        left, top = self.crop_offset(resized)
        crop_height, crop_width = self.input_size
        box = (left, top, left + crop_width, top + crop_height)

        def pillow() -> np.ndarray:
            return np.array(self.crop(image), dtype=np.uint8)

        if left < 0 or top < 0 or box[2] > resized[0] or box[3] > resized[1]:
            return pillow()
        return _CROPS(
            lambda: np.asarray(image),
            pillow,
            image.size,
            resized,
            box,
            self.interpolation,
        )

    @property
    def draft_size(self) -> int:
        """The smallest shorter side a large JPEG may be decoded at (``decode_image``'s ``min_size``):
        twice the resize target, so the resize still shrinks and the crop barely changes."""
        return 2 * self.resize_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB picture -> model input ``[3, H, W]`` float32, ``(x / 255 - mean) / std``."""
        return self.normalize(self.crop(image))

    def normalize(self, cropped: Image.Image) -> torch.Tensor:
        """The model input from an already ``crop``-ped picture: callers that also need the crop for
        the overlays resize once instead of twice."""
        return TF.normalize(TF.to_tensor(cropped), list(self.mean), list(self.std))

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """``(width, height)`` of an image of ``size`` (width, height) after ``crop``'s resize step.

        torchvision's rule: the shorter side becomes ``resize_size``, the longer one
        ``int(resize_size * long / short)`` (truncated); ``squash`` makes both ``resize_size``.
        """
        width, height = size
        if self.crop_mode == "squash":
            return self.resize_size, self.resize_size
        short, long = min(width, height), max(width, height)
        scaled = int(self.resize_size * long / short)
        return (self.resize_size, scaled) if width <= height else (scaled, self.resize_size)

    def crop_offset(self, resized: tuple[int, int]) -> tuple[int, int]:
        """``(left, top)`` of the centre crop inside the resized ``(width, height)`` picture.

        torchvision's ``center_crop``: ``round((side - crop) / 2)`` (half to even); a picture smaller
        than the crop is first padded by ``(crop - side) // 2`` before it, so the offset is negative.
        ``transformers``' image processors: ``(side - crop) // 2`` (their recipes never crop more than
        they resized to, ``worker.hf_models``).
        """
        crop_height, crop_width = self.input_size

        def offset(side: int, crop: int) -> int:
            if self.crop_offsets == "transformers":
                return (side - crop) // 2
            return -((crop - side) // 2) if crop > side else round((side - crop) / 2.0)

        return offset(resized[0], crop_width), offset(resized[1], crop_height)

    def map_box(
        self, box: tuple[float, float, float, float], size: tuple[int, int]
    ) -> tuple[float, float, float, float]:
        """A box ``(x0, y0, x1, y1)`` in the pixels of an original image of ``size`` (width, height),
        in the pixels of the model's input: scaled by the resize, shifted by the crop (not clipped).

        Coordinates are continuous pixel edges (``x1`` is the right edge, a box of the whole image is
        ``(0, 0, width, height)``); the resize maps edge ``x`` to ``x · resized_width / width``.
        """
        width, height = size
        resized_width, resized_height = self.resized_size(size)
        left, top = self.crop_offset((resized_width, resized_height))
        sx, sy = resized_width / width, resized_height / height
        x0, y0, x1, y1 = box
        return (x0 * sx - left, y0 * sy - top, x1 * sx - left, y1 * sy - top)

    def crop_mask(self, mask: Image.Image) -> np.ndarray:
        """A region mask of the original image (non-zero = inside), through ``crop``'s resize and
        crop with nearest-neighbour sampling: ``[H, W]`` bool on the model's input pixels."""
        grey = mask.convert("L")
        size = self.resize_size if self.crop_mode == "center" else [self.resize_size, self.resize_size]
        resized = TF.resize(grey, size, interpolation=InterpolationMode.NEAREST)
        return np.asarray(self._center_crop(resized)) > 0

    def normalize_batch(self, crops: torch.Tensor) -> torch.Tensor:
        """Crops ``uint8 [B, H, W, 3]`` (on any device) -> model inputs ``float32 [B, 3, H, W]``.

        The same float32 operations as ``normalize`` (``x / 255``, then ``(x - mean) / std``), so the
        result is bit-identical to normalizing each crop alone; done on the device, only 8-bit pixels
        cross the bus.
        """
        if crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[3] != 3:
            raise ValueError(f"crops must be uint8 [B, H, W, 3], got {crops.dtype} {tuple(crops.shape)}")
        images = crops.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=crops.device)[:, None, None]
        std = torch.as_tensor(self.std, dtype=torch.float32, device=crops.device)[:, None, None]
        return images.sub_(mean).div_(std)


def _check_resized_pixels(size: tuple[int, int], shorter_side: int) -> None:
    short, long = sorted(size)
    resized = (shorter_side, int(shorter_side * long / short))  # torchvision's rounding
    if resized[0] * resized[1] > _MAX_RESIZED_PIXELS:
        raise ImageTooLargeError(
            f"image {size[0]}×{size[1]} is too elongated: resizing its shorter side to {shorter_side} px "
            f"would make it {resized[1]} px long (limit {_MAX_RESIZED_PIXELS:,} pixels)"
        )


def build_preprocessor(model: torch.nn.Module, pipeline: Preprocess) -> Preprocessor:
    """The ``Preprocessor`` for ``model`` under a named pipeline (``docs/methods.md`` "Preprocessing").

    ``timm``: the model's own data config (``timm.data.resolve_data_config``): resize to
    ``floor(S / crop_pct)`` with the config's interpolation, centre crop ``S``, the config's mean
    and std (0.5 for the augreg ViTs, ImageNet statistics for DeiT).

    ``paper``: shorter side to 256 (bicubic), centre crop 224, ImageNet mean/std. For a model whose
    input side ``S`` is not 224 both numbers scale with it: shorter side ``round(S * 256 / 224)``,
    crop ``S``, keeping the paper's crop fraction.

    ``S`` is the size the model was *built* for (``patch_embed.img_size``), which differs from the
    pretrained config when ``img_size`` was overridden at creation; timm's config would still say
    224 there and the patch grid would not match.
    """
    config = resolve_data_config({}, model=model)
    height, width = _model_input_size(model, config["input_size"])
    if height != width:
        raise UnsupportedModelError(f"non-square model input {height}×{width} is not supported")
    if pipeline is Preprocess.PAPER:
        return Preprocessor(
            pipeline=pipeline,
            input_size=(height, width),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            resize_size=round(height * _PAPER_RESIZE / _PAPER_CROP),
        )
    crop_mode = config.get("crop_mode") or "center"
    if crop_mode not in _CROP_MODES:
        raise UnsupportedModelError(f"timm crop_mode {crop_mode!r} is not supported {_CROP_MODES}")
    return Preprocessor(
        pipeline=pipeline,
        input_size=(height, width),
        mean=_triple(config["mean"]),
        std=_triple(config["std"]),
        resize_size=math.floor(height / config["crop_pct"]),
        interpolation=config["interpolation"],
        crop_mode=crop_mode,
    )


def _model_input_size(model: torch.nn.Module, config_size: tuple[int, int, int]) -> tuple[int, int]:
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is None:
        return int(config_size[1]), int(config_size[2])
    return int(img_size[0]), int(img_size[1])


def _triple(values: tuple[float, ...]) -> tuple[float, float, float]:
    red, green, blue = (float(v) for v in values)
    return red, green, blue


def upright_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of the picture in ``data`` as the user sees it: the header's size, turned by
    the EXIF orientation, at full resolution. ``decode_image`` may decode a large JPEG at a reduced
    scale; regions given in the original image's pixels (a ``bbox``) are mapped from this size."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
