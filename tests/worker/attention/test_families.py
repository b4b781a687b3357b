"""Every supported timm family, explained and checked against the plain reference, at its own input size.

Each case is a real timm architecture shrunk to two or three blocks and a narrow embedding (random
weights, attention sharpened as in a trained model) but kept at its own input size and token layout:
class-token ViTs (CLIP, DINOv2 with registers, FlexiViT, DeiT III, distilled DeiT), average-pooled
ViTs with and without a class token (``*_gap_*``), BEiT and BEiT v2 (relative position bias), EVA
and EVA-02 (rotary embedding). Every map must correlate ≥ 0.999 with the reference (written from
``docs/methods.md``, with the readout the model's pooling implies), and a batch must give the
single-image results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import timm
import torch
from torch import nn

from common.errors import InvalidTargetError
from common.methods import MethodSettings
from tests.worker.attention.conftest import ATTENTION_SHARPENING, images
from tests.worker.attention.reference import (
    ref_attention_rollout,
    ref_cls_attention,
    ref_gradient_rollout,
    ref_layer_scores,
    ref_relevance,
    ref_top_k,
    reference_pass,
)
from worker.attention import Explanation, Readout, check_supported, explain

SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 4}
MIN_CORRELATION = 0.999


@dataclass(frozen=True)
class FamilyCase:
    """A shrunk timm architecture and what its structure must be read as."""

    arch: str
    readout: Readout
    num_prefix_tokens: int
    grid_size: tuple[int, int]
    has_class_token: bool = True
    has_head: bool = True
    kwargs: dict[str, Any] = field(default_factory=dict)


FAMILY_CASES = [
    pytest.param(FamilyCase("vit_base_patch16_clip_224", Readout.TOKEN, 1, (14, 14)), id="clip"),
    pytest.param(
        FamilyCase(
            "vit_small_patch14_reg4_dinov2",
            Readout.TOKEN,
            5,
            (16, 16),
            has_head=False,
            kwargs={"img_size": 224},
        ),
        id="dinov2-registers-headless",
    ),
    pytest.param(
        FamilyCase(
            "vit_small_patch14_reg4_dinov2",
            Readout.TOKEN,
            5,
            (16, 16),
            kwargs={"img_size": 224, "num_classes": 10},
        ),
        id="dinov2-registers-with-head",
    ),
    pytest.param(FamilyCase("flexivit_small", Readout.TOKEN, 1, (15, 15)), id="flexivit-240px"),
    pytest.param(FamilyCase("deit3_small_patch16_224", Readout.TOKEN, 1, (14, 14)), id="deit3"),
    pytest.param(
        FamilyCase("deit_tiny_distilled_patch16_224", Readout.TOKEN, 2, (14, 14)), id="deit-distilled"
    ),
    pytest.param(
        FamilyCase("vit_medium_patch16_gap_256", Readout.AVG, 0, (16, 16), has_class_token=False),
        id="gap-no-class-token",
    ),
    pytest.param(
        FamilyCase("vit_little_patch16_reg4_gap_256", Readout.AVG, 4, (16, 16), has_class_token=False),
        id="gap-registers-no-class-token",
    ),
    pytest.param(FamilyCase("beit_base_patch16_224", Readout.AVG, 1, (14, 14)), id="beit"),
    pytest.param(FamilyCase("beitv2_base_patch16_224", Readout.AVG, 1, (14, 14)), id="beitv2"),
    pytest.param(FamilyCase("eva_giant_patch14_224", Readout.AVG, 1, (16, 16)), id="eva"),
    pytest.param(
        FamilyCase("eva02_tiny_patch14_224", Readout.AVG, 1, (16, 16), kwargs={"num_classes": 10}),
        id="eva02-rope",
    ),
    pytest.param(
        FamilyCase("eva02_tiny_patch14_224", Readout.AVG, 1, (16, 16), has_head=False), id="eva02-headless"
    ),
]

# Sample 0 is explained for its top-1 class, sample 1 for a given class (headless: no targets).
TARGETS: list[int | None] = [None, 3]


def _sharpened(model: nn.Module) -> nn.Module:
    """Random weights that behave like trained ones where it matters for the comparison.

    Queries and keys scaled (peaked attention instead of ≈ 1/N everywhere), prefix tokens at the scale
    of the patch embeddings, BEiT's relative position bias non-zero (timm initialises it to 0, which
    would leave the bias untested) and layer scale at 1 (BEiT v2, DINOv2, DeiT III and the ``*_gap_*``
    ViTs start at 1e-5 or 1e-6, which leaves every block's output, and so every gradient, near 0), and
    the head at unit gain (BEiT and EVA scale it by 1e-3, which leaves every gradient near 0).
    """
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            for name in ("qkv", "q_proj", "k_proj"):
                projection = getattr(attn, name, None)
                if projection is not None:
                    projection.weight.mul_(ATTENTION_SHARPENING)
            table = getattr(attn, "relative_position_bias_table", None)
            if table is not None:
                table.normal_(std=1.0)
            for name in ("gamma_1", "gamma_2", "ls1", "ls2"):
                gamma = getattr(block, name, None)
                gamma = getattr(gamma, "gamma", gamma)  # ViT's LayerScale module keeps it in `.gamma`
                if isinstance(gamma, torch.Tensor):
                    gamma.fill_(1.0)
        for name in ("cls_token", "dist_token", "reg_token"):
            token = getattr(model, name, None)
            if token is not None:
                token.normal_(std=0.02)
        for head in (getattr(model, "head", None), getattr(model, "head_dist", None)):
            if isinstance(head, nn.Linear):
                head.weight.normal_(std=head.in_features**-0.5)
    return model.eval()


def _build(case: FamilyCase) -> nn.Module:
    torch.manual_seed(0)
    return _sharpened(timm.create_model(case.arch, pretrained=False, **{**SMALL, **case.kwargs}))


def _input_size(model: nn.Module) -> int:
    height, width = model.patch_embed.img_size
    assert height == width
    return int(height)


@dataclass
class FamilyRun:
    case: FamilyCase
    model: nn.Module
    batch: torch.Tensor
    explanations: list[Explanation]


@pytest.fixture(scope="module", params=FAMILY_CASES)
def family_run(request: pytest.FixtureRequest) -> FamilyRun:
    case: FamilyCase = request.param
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _build(case)
        batch = images(len(TARGETS), _input_size(model))
        targets = TARGETS if case.has_head else None
        explanations = explain(model, batch, MethodSettings(), targets)
    finally:
        torch.set_num_threads(previous)
    return FamilyRun(case=case, model=model, batch=batch, explanations=explanations)


def _correlation(actual: np.ndarray, expected: np.ndarray) -> float:
    """Pearson correlation; a constant map (undefined correlation) must equal the reference instead."""
    actual, expected = actual.ravel().astype(np.float64), expected.ravel().astype(np.float64)
    if np.ptp(expected) == 0 or np.ptp(actual) == 0:
        return 1.0 if np.allclose(actual, expected, rtol=0, atol=1e-6) else 0.0
    return float(np.corrcoef(actual, expected)[0, 1])


def test_the_layout_is_read_from_the_models_structure(family_run: FamilyRun) -> None:
    case = family_run.case
    layout = check_supported(family_run.model)
    assert layout.readout is case.readout
    assert layout.num_prefix_tokens == case.num_prefix_tokens
    assert layout.grid_size == case.grid_size
    assert layout.has_class_token is case.has_class_token
    assert layout.has_head is case.has_head
    assert all(explanation.readout is case.readout for explanation in family_run.explanations)


def test_every_map_matches_the_reference_with_the_pooling_readout(family_run: FamilyRun) -> None:
    case, model = family_run.case, family_run.model
    p, grid, readout = case.num_prefix_tokens, case.grid_size, case.readout.value
    reference = reference_pass(model, family_run.batch, TARGETS if case.has_head else None)
    attn = reference.attentions
    expected: dict[str, np.ndarray] = {
        "layer_scores": ref_layer_scores(attn, p, grid, "query_max"),
        "rollout": ref_attention_rollout(attn, p, grid, "mean", 0.9, readout),
    }
    if case.has_class_token:
        expected["cls_attention"] = ref_cls_attention(attn, p, grid)
    if case.has_head:
        grad = reference.gradients
        expected["grad_rollout"] = ref_gradient_rollout(attn, grad, p, grid, 0.9, readout)
        expected["relevance"] = ref_relevance(attn, grad, p, grid, readout)
    present = {name.removesuffix(".npy") for name in family_run.explanations[0].arrays()}
    assert present == set(expected)
    for b, explanation in enumerate(family_run.explanations):
        for name, maps in expected.items():
            actual = getattr(explanation, name)
            assert actual.shape == maps[b].shape, name
            assert np.isfinite(actual).all(), name
            correlation = _correlation(actual, maps[b])
            assert correlation >= MIN_CORRELATION, f"{name} of sample {b}: correlation {correlation:.6f}"
        if case.has_head:
            probs, classes = ref_top_k(reference.logits, 5)
            np.testing.assert_array_equal(explanation.top_indices, classes[b])
            np.testing.assert_allclose(explanation.top_probs, probs[b], rtol=0, atol=1e-5)
            assert explanation.target == int(reference.targets[b])
        else:
            assert (explanation.top_indices, explanation.top_probs, explanation.target) == (None, None, None)
            assert (explanation.grad_rollout, explanation.relevance) == (None, None)


def test_the_readout_changes_the_map_where_the_pooling_does(family_run: FamilyRun) -> None:
    """The pooling readout is not a relabelled class-token row: the two rows give different maps."""
    case = family_run.case
    if not (case.readout is Readout.AVG and case.has_class_token):
        pytest.skip("only average-pooled models with a class token have both rows to compare")
    reference = reference_pass(family_run.model, family_run.batch, TARGETS)
    as_token = ref_attention_rollout(
        reference.attentions, case.num_prefix_tokens, case.grid_size, "mean", 0.9
    )
    assert _correlation(family_run.explanations[0].rollout, as_token[0]) < MIN_CORRELATION


def test_a_batch_gives_the_single_image_results(family_run: FamilyRun) -> None:
    case, model = family_run.case, family_run.model
    torch.set_num_threads(1)
    for b, batched in enumerate(family_run.explanations):
        target = [TARGETS[b]] if case.has_head else None
        (single,) = explain(model, family_run.batch[b : b + 1], MethodSettings(), target)
        assert single.target == batched.target
        assert single.arrays().keys() == batched.arrays().keys()
        for name, array in single.arrays().items():
            np.testing.assert_allclose(array, batched.arrays()[name], rtol=0, atol=1e-5, err_msg=name)


def test_a_headless_backbone_refuses_a_target_class() -> None:
    model = _build(
        FamilyCase("vit_small_patch14_reg4_dinov2", Readout.TOKEN, 5, (4, 4), kwargs={"img_size": 56})
    )
    with pytest.raises(InvalidTargetError, match="no classification head"):
        explain(model, images(1, 56), MethodSettings(), [3])
