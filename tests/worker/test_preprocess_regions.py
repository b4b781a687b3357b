"""Boxes and masks go through exactly the resize and centre crop the image goes through.

Hand-computed examples for both pipelines (the numbers in the comments are the whole derivation),
then the same boxes drawn into real pictures and cropped by the real preprocessor: the drawn
rectangle must land where ``map_box`` says, and ``crop_mask`` must agree with it.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
from PIL import Image, ImageDraw

from common.methods import Preprocess
from worker.metrics import box_coverage
from worker.preprocess import Preprocessor, build_preprocessor


@pytest.fixture(scope="module")
def paper() -> Preprocessor:
    # deit_tiny under the paper's recipe: shorter side 256, centre crop 224.
    return build_preprocessor(timm.create_model("deit_tiny_patch16_224", pretrained=False), Preprocess.PAPER)


@pytest.fixture(scope="module")
def timm_augreg() -> Preprocessor:
    # vit_tiny's own config: crop_pct 0.9, so shorter side floor(224 / 0.9) = 248, centre crop 224.
    return build_preprocessor(timm.create_model("vit_tiny_patch16_224", pretrained=False), Preprocess.TIMM)


def test_paper_pipeline_maps_a_box_of_a_landscape_image(paper: Preprocessor) -> None:
    assert paper.resize_size == 256
    # 400×300: shorter side 300 -> 256, longer int(256 · 400 / 300) = 341; crop offsets
    # left round((341 - 224) / 2) = round(58.5) = 58 (half to even), top (256 - 224) / 2 = 16.
    assert paper.resized_size((400, 300)) == (341, 256)
    assert paper.crop_offset((341, 256)) == (58, 16)
    # x: 100 · 341/400 - 58 = 27.25, 300 · 341/400 - 58 = 197.75; y: 60 · 256/300 - 16 = 35.2, 240 · 256/300 - 16 = 188.8
    assert paper.map_box((100, 60, 300, 240), (400, 300)) == pytest.approx((27.25, 35.2, 197.75, 188.8))
    coverage = box_coverage((27.25, 35.2, 197.75, 188.8), (224, 224), (14, 14))
    columns = np.array([0, (32 - 27.25) / 16, *[1.0] * 10, (197.75 - 192) / 16, 0])
    rows = np.array([0, 0, (48 - 35.2) / 16, *[1.0] * 8, (188.8 - 176) / 16, 0, 0])
    np.testing.assert_allclose(coverage, np.outer(rows, columns))


def test_timm_pipeline_maps_a_box_of_a_portrait_image(timm_augreg: Preprocessor) -> None:
    assert timm_augreg.resize_size == 248
    # 300×500: shorter side 300 -> 248, longer int(248 · 500 / 300) = int(413.3) = 413; offsets
    # left (248 - 224) / 2 = 12, top round((413 - 224) / 2) = round(94.5) = 94.
    assert timm_augreg.resized_size((300, 500)) == (248, 413)
    assert timm_augreg.crop_offset((248, 413)) == (12, 94)
    # x: 30 · 248/300 - 12 = 12.8, 270 · 248/300 - 12 = 211.2; y: 100 · 413/500 - 94 = -11.4 (above the crop), 400 · 413/500 - 94 = 236.4
    assert timm_augreg.map_box((30, 100, 270, 400), (300, 500)) == pytest.approx((12.8, -11.4, 211.2, 236.4))


def test_a_crop_larger_than_the_picture_pads_before_it() -> None:
    squash = Preprocessor(
        Preprocess.TIMM, (224, 224), (0.5,) * 3, (0.5,) * 3, resize_size=220, crop_mode="squash"
    )
    assert squash.resized_size((640, 100)) == (220, 220)
    assert squash.crop_offset((220, 220)) == (-2, -2)  # padded by (224 - 220) // 2 = 2 before
    assert squash.map_box((0, 0, 640, 100), (640, 100)) == pytest.approx((2, 2, 222, 222))


@pytest.mark.parametrize(
    ("pipeline", "size", "box"),
    [
        ("paper", (400, 300), (100, 60, 300, 240)),
        ("timm_augreg", (300, 500), (30, 100, 270, 400)),
        ("timm_augreg", (517, 389), (150, 201, 277, 388)),
    ],
)
def test_a_drawn_box_lands_where_map_box_says(
    pipeline: str, size: tuple[int, int], box: tuple[int, int, int, int], request: pytest.FixtureRequest
) -> None:
    preprocessor: Preprocessor = request.getfixturevalue(pipeline)
    picture = Image.new("RGB", size, "black")
    ImageDraw.Draw(picture).rectangle(
        (box[0], box[1], box[2] - 1, box[3] - 1), fill="white"
    )  # inclusive corners
    crop = np.asarray(preprocessor.crop(picture))[..., 0]
    x0, y0, x1, y1 = preprocessor.map_box(box, size)
    H, W = preprocessor.input_size
    xs, ys = np.arange(W) + 0.5, np.arange(H) + 0.5  # pixel centres
    inside = (ys[:, None] > y0) & (ys[:, None] < y1) & (xs[None, :] > x0) & (xs[None, :] < x1)
    # Away from the edges (bicubic resampling blurs about one pixel) the crop is white exactly inside.
    margin = (ys[:, None] > y0 - 2) & (ys[:, None] < y1 + 2) & (xs[None, :] > x0 - 2) & (xs[None, :] < x1 + 2)
    core = (ys[:, None] > y0 + 2) & (ys[:, None] < y1 - 2) & (xs[None, :] > x0 + 2) & (xs[None, :] < x1 - 2)
    assert inside.any()
    assert (crop[core] > 200).all()
    assert (crop[~margin] < 55).all()
    # The mask of the same box, cropped the same way (nearest-neighbour), agrees with map_box.
    mask = preprocessor.crop_mask(picture.convert("L"))
    assert mask.shape == (H, W)
    assert mask[core].all()
    assert not mask[~margin].any()
