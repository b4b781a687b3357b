"""The class token's attention and the per-layer score matrix against the plain reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.methods import LayerScoreReduction
from tests.worker.attention.conftest import VitRun
from tests.worker.attention.reference import ref_cls_attention, ref_layer_scores
from worker.attention import cls_attention, layer_scores


def test_cls_attention_is_the_class_token_row_on_the_grid(vit_run: VitRun) -> None:
    case, attentions = vit_run.case, vit_run.capture.attentions
    result = cls_attention(attentions, case.num_prefix_tokens, case.grid_size)
    expected = ref_cls_attention(attentions.numpy(), case.num_prefix_tokens, case.grid_size)
    assert result.shape == (2, case.depth, attentions.shape[2], *case.grid_size)
    np.testing.assert_array_equal(result.numpy(), expected.astype(np.float32))


@pytest.mark.parametrize("reduction", list(LayerScoreReduction))
def test_layer_scores_match_the_reference(vit_run: VitRun, reduction: LayerScoreReduction) -> None:
    case, attentions = vit_run.case, vit_run.capture.attentions
    result = layer_scores(attentions, case.num_prefix_tokens, case.grid_size, reduction)
    expected = ref_layer_scores(attentions.numpy(), case.num_prefix_tokens, case.grid_size, reduction.value)
    assert result.shape == (2, case.depth, *case.grid_size)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_query_max_is_the_default_reduction(vit_run: VitRun) -> None:
    case, attentions = vit_run.case, vit_run.capture.attentions
    default = layer_scores(attentions, case.num_prefix_tokens, case.grid_size)
    explicit = layer_scores(attentions, case.num_prefix_tokens, case.grid_size, "query_max")
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)


def test_the_three_reductions_give_different_maps(vit_run: VitRun) -> None:
    case, attentions = vit_run.case, vit_run.capture.attentions
    maps = [
        layer_scores(attentions, case.num_prefix_tokens, case.grid_size, reduction)
        for reduction in LayerScoreReduction
    ]
    for first in range(len(maps)):
        for second in range(first + 1, len(maps)):
            assert not torch.allclose(maps[first], maps[second], atol=1e-3)


def test_with_two_prefix_tokens_the_class_token_row_is_read_not_the_distillation_token() -> None:
    """Rows 0 and 1 are made different on purpose; the map must come from row 0."""
    L, B, H, p, grid = 1, 1, 1, 2, (2, 2)
    N = p + 4
    attentions = torch.zeros(L, B, H, N, N)
    attentions[..., 0, :] = torch.tensor([0.1, 0.1, 0.1, 0.2, 0.3, 0.2])
    attentions[..., 1, :] = torch.tensor([0.0, 0.0, 0.4, 0.3, 0.2, 0.1])
    expected = torch.tensor([[0.1, 0.2], [0.3, 0.2]])
    torch.testing.assert_close(cls_attention(attentions, p, grid)[0, 0, 0], expected)


def test_patches_keep_row_major_grid_order() -> None:
    """Patch t of a 2×3 grid lands at (t // 3, t % 3): the grid is not transposed."""
    p, grid = 1, (2, 3)
    N = p + 6
    attentions = torch.zeros(1, 1, 1, N, N)
    attentions[..., 0, p:] = torch.arange(6, dtype=torch.float32)
    torch.testing.assert_close(
        cls_attention(attentions, p, grid)[0, 0, 0], torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    )


@pytest.mark.parametrize(
    ("shape", "p", "grid", "message"),
    [
        ((1, 1, 1, 5, 5), 1, (2, 3), r"must be \[L, B, H, 7, 7\]"),
        ((1, 1, 5, 5), 1, (2, 2), r"must be \[L, B, H, 5, 5\]"),
        ((1, 1, 1, 5, 5), -1, (2, 2), "num_prefix_tokens must be >= 0"),
    ],
    ids=["tokens-do-not-match-grid", "missing-layer-axis", "negative-prefix-count"],
)
def test_malformed_attention_is_rejected(
    shape: tuple[int, ...], p: int, grid: tuple[int, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cls_attention(torch.zeros(shape), p, grid)
    with pytest.raises(ValueError, match=message):
        layer_scores(torch.zeros(shape), p, grid)
