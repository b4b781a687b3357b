"""The recorded prediction: top-k softmax probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.worker.attention.conftest import VitRun
from tests.worker.attention.reference import ref_top_k
from worker.attention import top_k


@pytest.mark.parametrize("k", [1, 5])
def test_top_k_matches_the_reference(vit_run: VitRun, k: int) -> None:
    probs, indices = top_k(vit_run.capture.logits, k)
    expected_probs, expected_indices = ref_top_k(vit_run.reference.logits, k)
    assert probs.dtype == torch.float32
    assert indices.dtype == torch.int64
    np.testing.assert_array_equal(indices.numpy(), expected_indices)
    np.testing.assert_allclose(probs.numpy(), expected_probs, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("k", "expected_indices"),
    [(1, [[2]]), (2, [[2, 0]]), (3, [[2, 0, 1]]), (5, [[2, 0, 1]])],
    ids=["k=1", "k=2", "k=C", "k>C-returns-all-C"],
)
def test_top_k_is_sorted_and_capped_at_the_number_of_classes(
    k: int, expected_indices: list[list[int]]
) -> None:
    logits = torch.tensor([[1.0, 0.0, 2.0]])
    probs, indices = top_k(logits, k)
    assert indices.tolist() == expected_indices
    full = torch.softmax(logits, dim=-1)[0]
    torch.testing.assert_close(probs[0], full[indices[0]])


@pytest.mark.parametrize("k", [0, -1])
def test_k_must_be_positive(k: int) -> None:
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_k(torch.zeros(1, 3), k)
