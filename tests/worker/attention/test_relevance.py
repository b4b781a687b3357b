"""Gradient-weighted relevance (Chefer et al.) against the plain reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.worker.attention.conftest import VitRun
from tests.worker.attention.reference import ref_relevance
from worker.attention import gradient_relevance


def test_relevance_matches_the_reference(vit_run: VitRun) -> None:
    case, attentions, gradients = vit_run.case, vit_run.capture.attentions, vit_run.capture.gradients
    assert gradients is not None
    result = gradient_relevance(attentions, gradients, case.num_prefix_tokens, case.grid_size)
    expected = ref_relevance(attentions.numpy(), gradients.numpy(), case.num_prefix_tokens, case.grid_size)
    assert result.shape == (2, *case.grid_size)
    assert result.dtype == torch.float32
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_relevance_is_min_max_normalised(vit_run: VitRun) -> None:
    case, attentions, gradients = vit_run.case, vit_run.capture.attentions, vit_run.capture.gradients
    assert gradients is not None
    maps = gradient_relevance(attentions, gradients, case.num_prefix_tokens, case.grid_size)
    assert bool(torch.isfinite(maps).all())
    torch.testing.assert_close(maps.amin(dim=(1, 2)), torch.zeros(2))
    torch.testing.assert_close(maps.amax(dim=(1, 2)), torch.ones(2))


def test_heads_are_clamped_before_they_are_averaged() -> None:
    """One head for, one against: relu per head keeps the positive one (rollout would cancel them)."""
    attentions = torch.full((1, 1, 2, 3, 3), 1 / 3)
    gradients = torch.zeros_like(attentions)
    gradients[0, 0, 0, 0, 1] = 3.0
    gradients[0, 0, 1, 0, 1] = -3.0
    relevance = gradient_relevance(attentions, gradients, 1, (1, 2))
    torch.testing.assert_close(relevance, torch.tensor([[[1.0, 0.0]]]))


def test_a_constant_readout_is_all_zeros_not_nan() -> None:
    attentions = torch.full((2, 1, 2, 5, 5), 0.2)
    maps = gradient_relevance(attentions, torch.zeros_like(attentions), 1, (2, 2))
    torch.testing.assert_close(maps, torch.zeros(1, 2, 2))


def test_gradients_must_have_the_shape_of_the_attention() -> None:
    attentions = torch.full((2, 1, 2, 5, 5), 0.2)
    with pytest.raises(ValueError, match="must match attentions"):
        gradient_relevance(attentions, torch.zeros(2, 1, 2, 4, 4), 1, (2, 2))
