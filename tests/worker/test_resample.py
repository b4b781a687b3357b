"""Specification of ``worker.resample``: the compiled resize-and-crop gives Pillow's pixels, and
``Preprocessor.crop_pixels`` gives exactly ``crop``'s, whatever order Pillow runs its passes in."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from common.errors import ImageTooLargeError
from common.methods import Preprocess
from worker.preprocess import build_preprocessor
from worker.resample import FILTERS, PillowCrops, resize_crop

PILLOW_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def pillow(
    pixels: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int], name: str
) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize(size, PILLOW_FILTERS[name]).crop(box))


def geometries(
    count: int, seed: int
) -> list[tuple[np.ndarray, tuple[int, int], tuple[int, int, int, int], str]]:
    """Random pictures (noise, or smooth with hard edges) resized up, down or mixed, with random boxes."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        height, width = (int(v) for v in rng.integers(1, 420, 2))
        out_height, out_width = (int(v) for v in rng.integers(1, 300, 2))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if i % 3 == 0:
            coarse = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
            pixels = np.asarray(coarse.resize((width, height), Image.Resampling.NEAREST))
        left = int(rng.integers(0, out_width))
        top = int(rng.integers(0, out_height))
        right = int(rng.integers(left + 1, out_width + 1))
        bottom = int(rng.integers(top + 1, out_height + 1))
        cases.append(
            (pixels, (out_width, out_height), (left, top, right, bottom), ("bicubic", "bilinear")[i % 2])
        )
    return cases


@pytest.mark.parametrize("seed", range(4))
def test_one_of_the_two_pass_orders_is_pillows_on_every_geometry(seed: int) -> None:
    orders = {False: 0, True: 0}
    for pixels, size, box, name in geometries(60, seed):
        expected = pillow(pixels, size, box, name)
        matching = [
            vertical
            for vertical in (False, True)
            if np.array_equal(resize_crop(pixels, size, box, name, vertical), expected)
        ]
        assert matching, (
            f"{pixels.shape[1]}×{pixels.shape[0]} -> {size} {box} {name}: neither order is Pillow's"
        )
        for vertical in matching:
            orders[vertical] += 1
    # Pillow 13 picks the order per geometry, so both are checked against it here; older Pillows
    # always run the horizontal pass first.
    assert orders[False] > 0
    if int(Image.__version__.split(".")[0]) >= 13:
        assert orders[True] > 0


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((375, 500), (330, 248)),  # the common photo, shorter side to 248
        ((750, 1000), (330, 248)),  # a draft-decoded 4000×3000
        ((248, 330), (330, 248)),  # no resize at all: a plain crop
        ((300, 500), (330, 300)),  # only the width changes
        ((500, 300), (300, 330)),  # only the height changes
        ((40, 30), (330, 248)),  # enlarging
        ((2000, 50), (248, 9920)),  # a tall sliver, enlarged across and shrunk down its length
    ],
)
@pytest.mark.parametrize("name", sorted(FILTERS))
def test_single_axis_and_photo_sizes_match_pillow(
    shape: tuple[int, int], size: tuple[int, int], name: str
) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    width, height = size
    box = ((width - 224) // 2 if width > 224 else 0, (height - 224) // 2 if height > 224 else 0)
    box = (*box, min(width, box[0] + 224), min(height, box[1] + 224))
    expected = pillow(pixels, size, box, name)
    assert any(
        np.array_equal(resize_crop(pixels, size, box, name, vertical), expected) for vertical in (False, True)
    )


def test_the_full_picture_as_the_box_is_pillows_whole_resize() -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (97, 131, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize((60, 45), Image.Resampling.BICUBIC))
    assert any(
        np.array_equal(resize_crop(pixels, (60, 45), (0, 0, 60, 45), "bicubic", vertical), expected)
        for vertical in (False, True)
    )


@pytest.mark.parametrize(
    ("box", "message"),
    [((0, 0, 61, 45), "not inside"), ((-1, 0, 10, 10), "not inside"), ((5, 5, 5, 9), "not inside")],
)
def test_a_box_outside_the_resized_picture_is_refused(box: tuple[int, int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resize_crop(np.zeros((10, 10, 3), np.uint8), (60, 45), box, "bicubic")


def test_a_filter_without_a_compiled_form_is_refused() -> None:
    with pytest.raises(ValueError, match="lanczos"):
        resize_crop(np.zeros((10, 10, 3), np.uint8), (5, 5), (0, 0, 5, 5), "lanczos")


# --- PillowCrops: learning the order ----------------------------------------------------------------


class Counted:
    """A stand-in for the Pillow call that counts how often the compiled path fell back to it."""

    def __init__(self, result: np.ndarray) -> None:
        self.result = result
        self.calls = 0

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return self.result


def test_a_geometry_seen_once_costs_only_pillow_and_the_second_sighting_learns_the_order() -> None:
    crops = PillowCrops()
    rng = np.random.default_rng(3)
    size, box = (330, 248), (53, 12, 277, 236)
    pictures = [rng.integers(0, 256, (375, 500, 3), dtype=np.uint8) for _ in range(3)]
    calls = []
    for pixels in pictures:
        reference = Counted(pillow(pixels, size, box, "bicubic"))
        crop = crops(lambda p=pixels: p, reference, (500, 375), size, box, "bicubic")
        assert np.array_equal(crop, reference.result)
        calls.append(reference.calls)
        if len(calls) == 1:
            assert crops.order((500, 375), size, "bicubic") == "seen once"
    # Pillow made the first two crops (the second also to compare against); the third is compiled.
    assert calls == [1, 1, 0]
    assert crops.order((500, 375), size, "bicubic") in ("horizontal first", "vertical first")


def test_a_geometry_no_order_reproduces_stays_with_pillow() -> None:
    """Another Pillow's arithmetic (a fault this Pillow cannot produce): the crops stay Pillow's."""
    crops = PillowCrops()
    pixels = np.random.default_rng(4).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    size, box = (330, 248), (53, 12, 277, 236)
    different = pillow(pixels, size, box, "bicubic") ^ 1
    for _ in range(2):
        crops(lambda: pixels, Counted(different), (500, 375), size, box, "bicubic")
    assert crops.order((500, 375), size, "bicubic") == "pillow"
    later = Counted(different)
    assert np.array_equal(crops(lambda: pixels, later, (500, 375), size, box, "bicubic"), different)
    assert later.calls == 1


def test_a_geometry_the_compiled_path_fails_on_stays_with_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure of the compiled loops (none is known; simulated) costs the image nothing."""
    import worker.resample as resample

    def broken(*_: object) -> np.ndarray:
        raise RuntimeError("simulated")

    monkeypatch.setattr(resample, "resize_crop", broken)
    crops = PillowCrops()
    pixels = np.random.default_rng(6).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    size, box = (330, 248), (53, 12, 277, 236)
    expected = pillow(pixels, size, box, "bicubic")
    for _ in range(3):
        assert np.array_equal(
            crops(lambda: pixels, Counted(expected), (500, 375), size, box, "bicubic"), expected
        )
    assert crops.order((500, 375), size, "bicubic") == "pillow"


def test_a_flat_picture_leaves_the_order_to_the_next_image() -> None:
    crops = PillowCrops()
    size, box = (330, 248), (53, 12, 277, 236)
    flat = np.full((375, 500, 3), 128, np.uint8)
    for _ in range(3):
        crops(lambda: flat, Counted(pillow(flat, size, box, "bicubic")), (500, 375), size, box, "bicubic")
    assert crops.order((500, 375), size, "bicubic") == "seen once"


def test_other_filters_are_always_pillows() -> None:
    crops = PillowCrops()
    reference = Counted(np.zeros((4, 4, 3), np.uint8))
    for _ in range(3):
        crops(lambda: np.zeros((8, 8, 3), np.uint8), reference, (8, 8), (4, 4), (0, 0, 4, 4), "lanczos")
    assert reference.calls == 3


# --- Preprocessor.crop_pixels -----------------------------------------------------------------------


def meta_model(arch: str, **kwargs: object) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(arch, **kwargs)


PREPROCESSORS = [
    ("deit_tiny_patch16_224", Preprocess.TIMM),  # bicubic, shorter side 248
    ("deit_tiny_patch16_224", Preprocess.PAPER),  # bicubic, shorter side 256
    ("vit_base_patch16_384", Preprocess.TIMM),  # 384 crop of 384: only a resize
    ("vit_base_patch16_clip_384.openai_ft_in12k_in1k", Preprocess.TIMM),  # squash
    ("vit_base_patch16_224.augreg_in21k", Preprocess.TIMM),  # bilinear
]


@pytest.mark.parametrize(
    ("arch", "pipeline"), PREPROCESSORS, ids=[f"{a}-{p.value}" for a, p in PREPROCESSORS]
)
def test_crop_pixels_are_the_crop_for_every_image_of_many_sizes(arch: str, pipeline: Preprocess) -> None:
    preprocessor = build_preprocessor(meta_model(arch), pipeline)
    rng = np.random.default_rng(5)
    sizes = [(500, 375), (375, 500), (1000, 750), (640, 427), (224, 224), (100, 80), (3000, 200), (257, 1024)]
    for width, height in sizes:
        for _ in range(3):  # seen once, learned, compiled
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            expected = np.array(preprocessor.crop(image))
            got = preprocessor.crop_pixels(image)
            assert got.dtype == np.uint8
            assert got.flags.c_contiguous
            assert np.array_equal(got, expected), f"{arch} {pipeline.value} {width}×{height}"


def test_crop_pixels_refuse_slivers_as_crop_does() -> None:
    preprocessor = build_preprocessor(meta_model("deit_tiny_patch16_224"), Preprocess.TIMM)
    with pytest.raises(ImageTooLargeError, match="too elongated"):
        preprocessor.crop_pixels(Image.new("RGB", (20_000, 2)))
