"""``explain_image`` is the compute core behind one call: the same numbers, pixels and errors.

Every test runs a real timm architecture (DeiT-Tiny) with random weights on the CPU, and checks the
answer against the core's own pieces called by hand, as the pipeline calls them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from common.errors import InvalidTargetError, UnknownModelError
from common.methods import MethodSettings
from common.modelspec import ModelSpec
from vitscope import ImageExplanation, draw_overlay, explain_image
from worker.attention import explain
from worker.models import load_model
from worker.pipeline.cpu import draw_pictures
from worker.preprocess import decode_image

ARCH = "deit_tiny_patch16_224"
IMAGES = Path(__file__).resolve().parents[2] / "examples" / "images"
CAT = IMAGES / "chelsea.jpg"
ESPRESSO = 967


@pytest.fixture(autouse=True)
def _cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITSCOPE_DEVICE", "cpu")
    monkeypatch.delenv("VITSCOPE_WEIGHTS_DIR", raising=False)


def _by_hand(path: Path, settings: MethodSettings, target: int | None = None) -> tuple[np.ndarray, list]:
    """The crop and core explanation, made step by step as the pipeline makes them."""
    loaded = load_model(ModelSpec(ARCH, ARCH, weights="random"), device=torch.device("cpu"))
    picture = decode_image(path.read_bytes(), max_pixels=64_000_000, min_size=loaded.preprocessor.draft_size)
    crop = loaded.preprocessor.crop_pixels(picture)
    inputs = loaded.preprocessor.normalize_batch(torch.from_numpy(crop[None]))
    return crop, explain(loaded.model, inputs, settings, [target])


def _assert_same_maps(result: ImageExplanation, expected) -> None:
    for name in ("layer_scores", "rollout", "grad_rollout", "relevance", "cls_attention"):
        np.testing.assert_array_equal(getattr(result, name), getattr(expected, name), err_msg=name)


def test_one_call_gives_the_compute_cores_maps_and_named_predictions() -> None:
    result = explain_image(ARCH, str(CAT), weights="random")
    crop, (expected,) = _by_hand(CAT, MethodSettings())
    np.testing.assert_array_equal(result.crop, crop)
    _assert_same_maps(result, expected)
    assert result.crop.shape == (224, 224, 3)
    assert result.rollout.shape == result.grad_rollout.shape == (14, 14)
    assert result.layer_scores.shape == (12, 14, 14)
    assert [p.index for p in result.predictions] == expected.top_indices.tolist()
    assert all(isinstance(p.label, str) and p.label for p in result.predictions)  # ImageNet names
    assert result.target == result.predictions[0].index  # no target: the top-1 is explained
    assert result.target_label == result.predictions[0].label
    assert result.weights_source.startswith("RANDOM")
    assert set(result.maps) == {"rollout", "grad_rollout", "relevance"}


def test_a_target_by_label_and_method_options_reach_the_core() -> None:
    result = explain_image(
        ARCH, CAT, target="espresso", weights="random", head_fusion="max", discard_ratio=0.5, top_k=3
    )
    settings = MethodSettings(head_fusion="max", discard_ratio=0.5, top_k=3)
    _, (expected,) = _by_hand(CAT, settings, target=ESPRESSO)
    assert (result.target, result.target_label) == (ESPRESSO, "espresso")
    assert len(result.predictions) == 3
    _assert_same_maps(result, expected)
    top1 = explain_image(ARCH, CAT, weights="random")
    assert not np.array_equal(result.rollout, top1.rollout)  # the options changed the numbers


def test_a_path_bytes_a_picture_and_an_array_are_the_same_image(tmp_path: Path) -> None:
    data = CAT.read_bytes()
    picture = Image.open(io.BytesIO(data))
    copy = tmp_path / "cat.jpg"
    copy.write_bytes(data)
    results = [
        explain_image(ARCH, image, weights="random")
        for image in (CAT, data, f"file://{copy}", picture, np.asarray(picture.convert("RGB")))
    ]
    for result in results[1:]:
        np.testing.assert_array_equal(result.crop, results[0].crop)
        _assert_same_maps(result, results[0])


def test_a_module_you_built_is_explained_where_it_lives_and_keeps_its_mode() -> None:
    loaded = load_model(ModelSpec(ARCH, ARCH, weights="random"), device=torch.device("cpu"))
    module = loaded.model.train()  # as a notebook might leave it: dropout would randomize the maps
    result = explain_image(module, CAT)
    assert module.training
    _, (expected,) = _by_hand(CAT, MethodSettings())
    _assert_same_maps(result, expected)
    assert result.model == ARCH
    assert result.predictions[0].label is not None  # ImageNet-sized head: timm's names


def test_a_backbone_without_a_head_gets_the_class_agnostic_maps() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone = timm.create_model(ARCH, pretrained=False, num_classes=0)
    result = explain_image(backbone, CAT)
    assert result.predictions == []
    assert (result.target, result.grad_rollout, result.relevance) == (None, None, None)
    assert set(result.maps) == {"rollout"}
    with pytest.raises(ValueError, match="no classification head, so it has no grad_rollout map"):
        result.overlay("grad_rollout")
    with pytest.raises(InvalidTargetError, match="no classification head"):
        explain_image(backbone, CAT, target=3)


def test_the_overlay_is_the_picture_a_batch_stores() -> None:
    result = explain_image(ARCH, CAT, weights="random")
    arrays = {f"{name}.npy": grid for name, grid in result.maps.items()}
    arrays["layer_scores.npy"] = result.layer_scores
    stored = draw_pictures(result.crop, arrays, title=ARCH).files
    for name in result.maps:
        picture = result.overlay(name)
        assert picture.size == (224, 224)
        np.testing.assert_array_equal(
            np.asarray(picture), np.asarray(Image.open(io.BytesIO(stored[f"{name}.png"])))
        )
    np.testing.assert_array_equal(
        np.asarray(result.layer_grid()), np.asarray(Image.open(io.BytesIO(stored["layer_scores.png"])))
    )
    np.testing.assert_array_equal(
        np.asarray(draw_overlay(Image.fromarray(result.crop), result.rollout)),
        np.asarray(result.overlay("rollout")),
    )


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: explain_image(ARCH, CAT, weights="random", fusion="max"),
            TypeError,
            r"unknown method option\(s\) \['fusion'\]; options: head_fusion",
        ),
        (
            lambda: explain_image(ARCH, CAT, weights="random", head_fusion="median"),
            ValueError,
            "head_fusion must be one of mean, max, min; got 'median'",
        ),
        (
            lambda: explain_image(ARCH, CAT, weights="random", discard_ratio=1.5),
            ValueError,
            r"discard_ratio must be in \[0, 1\)",
        ),
        (
            lambda: explain_image("deit_tiny_patch16", CAT, weights="random"),
            UnknownModelError,
            "not a timm architecture",
        ),
        (
            lambda: explain_image(ARCH, CAT, target="espreso", weights="random"),
            InvalidTargetError,
            "'espreso' is not a class",
        ),
        (
            lambda: explain_image(ARCH, "https://example.com/cat.jpg", weights="random"),
            ValueError,
            "reads local files",
        ),
        (
            lambda: explain_image(ARCH, np.zeros((8, 8, 3), np.float32), weights="random"),
            ValueError,
            r"RGB uint8 \[H, W, 3\], got float32",
        ),
        (lambda: explain_image(ARCH, b"not an image", weights="random"), Exception, "not an image"),
        (lambda: explain_image(42, CAT), TypeError, "model must be a timm name"),
        (
            lambda: explain_image(timm.create_model(ARCH), CAT, weights="random"),
            ValueError,
            "weights and device apply to models given by name",
        ),
        (
            lambda: draw_overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((2, 2, 2))),
            ValueError,
            r"grid_map must be \[gh, gw\]",
        ),
    ],
    ids=[
        "option",
        "choice",
        "range",
        "model",
        "label",
        "url",
        "array",
        "bytes",
        "model-type",
        "module-weights",
        "overlay",
    ],
)
def test_bad_input_is_answered_with_what_is_accepted(call, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()
