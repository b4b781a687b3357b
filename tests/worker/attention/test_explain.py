"""``explain``: every artifact from one pass, per image; ``explain_in_batches``: the same, in pieces."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from common.artifacts import ARRAY_ARTIFACTS
from common.methods import HeadFusion, LayerScoreReduction, MethodSettings
from tests.worker.attention.conftest import hooks_left, images, raise_in_forward, vit
from worker.attention import (
    Explanation,
    attention_rollout,
    capture,
    cls_attention,
    explain,
    explain_in_batches,
    gradient_relevance,
    gradient_rollout,
    layer_scores,
    top_k,
)

IMG = 112  # deit_tiny at 112 px: a 7×7 grid, N = 50, fast enough to run many batches.


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return vit("deit_tiny_patch16_224", img_size=IMG)


def _assert_same(first: list[Explanation], second: list[Explanation], atol: float = 1e-5) -> None:
    assert len(first) == len(second)
    for one, other in zip(first, second, strict=True):
        assert one.target == other.target
        np.testing.assert_array_equal(one.top_indices, other.top_indices)
        np.testing.assert_allclose(one.top_probs, other.top_probs, rtol=0, atol=atol)
        assert one.arrays().keys() == other.arrays().keys()
        for name, array in one.arrays().items():
            np.testing.assert_allclose(array, other.arrays()[name], rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize(
    "settings",
    [
        MethodSettings(),
        MethodSettings(
            head_fusion=HeadFusion.MAX,
            discard_ratio=0.0,
            layer_score_reduction=LayerScoreReduction.HEAD_MAX,
            top_k=3,
        ),
        MethodSettings(head_fusion=HeadFusion.MIN, discard_ratio=0.5, layer_score_reduction="key_max"),
    ],
    ids=["defaults", "max-no-discard-head_max-top3", "min-half-key_max"],
)
def test_explanations_are_the_artifact_functions_applied_to_one_capture(
    model: nn.Module, settings: MethodSettings
) -> None:
    batch = images(3, IMG)
    explanations = explain(model, batch, settings, [None, 4, None])
    result = capture(model, batch, [None, 4, None])
    A, G, p, grid = result.attentions, result.gradients, result.num_prefix_tokens, result.grid_size
    assert G is not None
    probs, indices = top_k(result.logits, settings.top_k)
    expected: dict[str, torch.Tensor] = {
        "cls_attention.npy": cls_attention(A, p, grid),
        "layer_scores.npy": layer_scores(A, p, grid, settings.layer_score_reduction),
        "rollout.npy": attention_rollout(
            A, p, grid, head_fusion=settings.head_fusion, discard_ratio=settings.discard_ratio
        ),
        "grad_rollout.npy": gradient_rollout(A, G, p, grid, discard_ratio=settings.discard_ratio),
        "relevance.npy": gradient_relevance(A, G, p, grid),
    }
    assert len(explanations) == 3
    for b, explanation in enumerate(explanations):
        assert explanation.target == int(result.targets[b])
        np.testing.assert_array_equal(explanation.top_indices, indices[b].numpy())
        np.testing.assert_allclose(explanation.top_probs, probs[b].numpy(), rtol=0, atol=1e-6)
        for name, tensor in expected.items():
            np.testing.assert_allclose(explanation.arrays()[name], tensor[b].numpy(), rtol=0, atol=1e-6)


def test_array_names_shapes_and_dtypes(model: nn.Module) -> None:
    L, H, (gh, gw), N = 12, 3, (7, 7), 50
    plain = explain(model, images(1, IMG), MethodSettings(top_k=4))[0]
    with_raw = explain(model, images(1, IMG), MethodSettings(top_k=4, raw_attention=True))[0]
    expected: dict[str, tuple[tuple[int, ...], Any]] = {
        "attention.npy": ((L, H, N, N), np.float16),
        "cls_attention.npy": ((L, H, gh, gw), np.float32),
        "layer_scores.npy": ((L, gh, gw), np.float32),
        "rollout.npy": ((gh, gw), np.float32),
        "grad_rollout.npy": ((gh, gw), np.float32),
        "relevance.npy": ((gh, gw), np.float32),
    }
    assert set(expected) == set(ARRAY_ARTIFACTS)
    assert plain.attention is None
    assert set(plain.arrays()) == set(ARRAY_ARTIFACTS) - {"attention.npy"}
    assert set(with_raw.arrays()) == set(ARRAY_ARTIFACTS)
    for name, (shape, dtype) in expected.items():
        array = with_raw.arrays()[name]
        assert (array.shape, array.dtype) == (shape, dtype), name
    assert (plain.top_indices.shape, plain.top_indices.dtype) == ((4,), np.int64)
    assert (plain.top_probs.shape, plain.top_probs.dtype) == ((4,), np.float32)
    result = capture(model, images(1, IMG))
    np.testing.assert_allclose(
        with_raw.attention, result.attentions[:, 0].numpy(), rtol=1e-3, atol=1e-4, err_msg="float16 of A"
    )


def test_one_forward_and_one_backward_for_the_whole_batch(model: nn.Module) -> None:
    forwards: list[int] = []
    backwards: list[int] = []

    def count_backward(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(lambda grad: backwards.append(grad.shape[0]))

    handles = [
        model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0])),
        model.head.register_forward_hook(count_backward),
    ]
    try:
        explain(model, images(5, IMG), MethodSettings(raw_attention=True))
    finally:
        for handle in handles:
            handle.remove()
    assert forwards == [5]
    assert backwards == [5]


def test_a_batch_gives_the_results_of_single_image_runs(model: nn.Module) -> None:
    batch, targets = images(4, IMG), [None, 9, None, 2]
    settings = MethodSettings(raw_attention=True)
    together = explain(model, batch, settings, targets)
    alone = [explain(model, batch[b : b + 1], settings, [targets[b]])[0] for b in range(4)]
    _assert_same(together, alone)


def test_given_targets_change_the_gradient_maps_but_not_the_attention_maps(model: nn.Module) -> None:
    batch = images(1, IMG)
    top1 = explain(model, batch, MethodSettings())[0]
    other = 1 if top1.target == 0 else 0
    given = explain(model, batch, MethodSettings(), [other])[0]
    assert given.target == other
    assert top1.target == int(top1.top_indices[0])
    for name in ("cls_attention", "layer_scores", "rollout"):
        np.testing.assert_array_equal(getattr(given, name), getattr(top1, name), err_msg=name)
    np.testing.assert_array_equal(given.top_indices, top1.top_indices)
    for name in ("grad_rollout", "relevance"):
        assert not np.allclose(getattr(given, name), getattr(top1, name), atol=1e-3), name


def test_bfloat16_autocast_gives_maps_close_to_float32(model: nn.Module) -> None:
    batch = images(2, IMG)
    exact = explain(model, batch, MethodSettings())
    approx = explain(model, batch, MethodSettings(), [e.target for e in exact], autocast_dtype=torch.bfloat16)
    for one, other in zip(exact, approx, strict=True):
        for name in (
            "cls_attention.npy",
            "layer_scores.npy",
            "rollout.npy",
            "grad_rollout.npy",
            "relevance.npy",
        ):
            a, b = one.arrays()[name], other.arrays()[name]
            assert b.dtype == np.float32
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98, name
            np.testing.assert_allclose(b, a, rtol=0, atol=0.15, err_msg=name)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_micro_batches_give_the_results_of_one_batch(model: nn.Module, batch_size: int) -> None:
    batch, targets = images(7, IMG), [None, 1, None, 2, None, 3, None]
    expected = explain(model, batch, MethodSettings(), targets)
    _assert_same(explain_in_batches(model, batch, MethodSettings(), targets, batch_size=batch_size), expected)


def test_out_of_memory_halves_the_micro_batch_and_keeps_it_small(model: nn.Module) -> None:
    """A GPU that fits 2 images: 8 fails, 4 fails, then the rest runs in 2s — with the same results."""
    attempts: list[int] = []

    def fits_two(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        attempts.append(args[0].shape[0])
        if args[0].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    batch = images(11, IMG)
    expected = explain_in_batches(model, batch, MethodSettings(), batch_size=2)
    handle = model.register_forward_pre_hook(fits_two)
    try:
        result = explain_in_batches(model, batch, MethodSettings(), batch_size=8)
    finally:
        handle.remove()
    assert attempts == [8, 4, 2, 2, 2, 2, 2, 1]
    _assert_same(result, expected)
    assert hooks_left(model) == 0


def test_out_of_memory_at_one_image_is_raised(model: nn.Module) -> None:
    attempts: list[int] = []

    def fits_nothing(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        attempts.append(args[0].shape[0])
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = model.register_forward_pre_hook(fits_nothing)
    try:
        with pytest.raises(torch.OutOfMemoryError, match="injected"):
            explain_in_batches(model, images(5, IMG), MethodSettings(), batch_size=4)
    finally:
        handle.remove()
    assert attempts == [4, 2, 1]
    assert hooks_left(model) == 0


def test_other_errors_are_not_retried(model: nn.Module) -> None:
    attempts: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: attempts.append(args[0].shape[0]))
    failing = model.register_forward_pre_hook(raise_in_forward(RuntimeError("not a memory problem")))
    try:
        with pytest.raises(RuntimeError, match="not a memory problem"):
            explain_in_batches(model, images(4, IMG), MethodSettings(), batch_size=4)
    finally:
        handle.remove()
        failing.remove()
    assert attempts == [4]


@pytest.mark.parametrize(
    ("count", "targets", "batch_size", "message"),
    [(2, None, 0, "batch_size must be >= 1"), (2, [None], 2, "got 1 targets for 2 images")],
)
def test_explain_in_batches_checks_its_arguments(
    model: nn.Module, count: int, targets: list[int | None] | None, batch_size: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        explain_in_batches(model, images(count, IMG), MethodSettings(), targets, batch_size=batch_size)
