"""Attention rollout and gradient rollout: the reference, the invariants, and the discard rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.methods import HeadFusion
from tests.worker.attention.conftest import VitRun
from tests.worker.attention.reference import ref_attention_rollout, ref_discard, ref_gradient_rollout
from worker.attention import attention_rollout, gradient_rollout, rollout_matrices
from worker.attention.readout import Readout, readout_vector
from worker.attention.rollout import (
    discard_smallest,
    fuse_heads,
    gradient_fusion,
    readout_row,
)

RATIOS = [0.0, 0.9]


def _gradients(run: VitRun) -> torch.Tensor:
    assert run.capture.gradients is not None
    return run.capture.gradients


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("fusion", list(HeadFusion))
def test_attention_rollout_matches_the_reference(vit_run: VitRun, fusion: HeadFusion, ratio: float) -> None:
    case, attentions = vit_run.case, vit_run.capture.attentions
    result = attention_rollout(
        attentions, case.num_prefix_tokens, case.grid_size, head_fusion=fusion, discard_ratio=ratio
    )
    expected = ref_attention_rollout(
        attentions.numpy(), case.num_prefix_tokens, case.grid_size, fusion.value, ratio
    )
    assert result.shape == (2, *case.grid_size)
    assert result.dtype == torch.float32
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio", RATIOS)
def test_gradient_rollout_matches_the_reference(vit_run: VitRun, ratio: float) -> None:
    case, attentions, gradients = vit_run.case, vit_run.capture.attentions, _gradients(vit_run)
    result = gradient_rollout(
        attentions, gradients, case.num_prefix_tokens, case.grid_size, discard_ratio=ratio
    )
    expected = ref_gradient_rollout(
        attentions.numpy(), gradients.numpy(), case.num_prefix_tokens, case.grid_size, ratio
    )
    assert result.shape == (2, *case.grid_size)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_defaults_are_mean_fusion_and_a_discard_ratio_of_0_9(vit_run: VitRun) -> None:
    case, attentions, gradients = vit_run.case, vit_run.capture.attentions, _gradients(vit_run)
    p, grid = case.num_prefix_tokens, case.grid_size
    torch.testing.assert_close(
        attention_rollout(attentions, p, grid),
        attention_rollout(attentions, p, grid, head_fusion=HeadFusion.MEAN, discard_ratio=0.9),
    )
    torch.testing.assert_close(
        gradient_rollout(attentions, gradients, p, grid),
        gradient_rollout(attentions, gradients, p, grid, discard_ratio=0.9),
    )


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("source", ["mean", "max", "min", "gradient"])
def test_every_rollout_matrix_is_row_stochastic(vit_run: VitRun, source: str, ratio: float) -> None:
    attentions = vit_run.capture.attentions
    if source == "gradient":
        fused = gradient_fusion(attentions, _gradients(vit_run))
    else:
        fused = fuse_heads(attentions, HeadFusion(source))
    matrices = rollout_matrices(fused, vit_run.case.num_prefix_tokens, ratio)
    assert matrices.dtype == torch.float64
    assert bool((matrices >= 0).all())
    sums = matrices.sum(dim=-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-12)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("method", ["mean", "max", "min", "gradient"])
def test_rollout_maps_are_finite_non_negative_and_peak_at_one(
    vit_run: VitRun, method: str, ratio: float
) -> None:
    case, attentions = vit_run.case, vit_run.capture.attentions
    p, grid = case.num_prefix_tokens, case.grid_size
    if method == "gradient":
        maps = gradient_rollout(attentions, _gradients(vit_run), p, grid, discard_ratio=ratio)
    else:
        maps = attention_rollout(attentions, p, grid, head_fusion=HeadFusion(method), discard_ratio=ratio)
    assert bool(torch.isfinite(maps).all())
    assert float(maps.min()) >= 0.0
    torch.testing.assert_close(maps.amax(dim=(1, 2)), torch.ones(maps.shape[0]))


def test_mean_fusion_without_discard_is_the_plain_abnar_zuidema_product(vit_run: VitRun) -> None:
    """Abnar & Zuidema: ``Â = 0.5 · mean_h A + 0.5 · I`` (rows of A already sum to 1), multiplied up."""
    case, attentions = vit_run.case, vit_run.capture.attentions
    p = case.num_prefix_tokens
    N = attentions.shape[-1]
    joint = torch.eye(N, dtype=torch.float64)
    for layer_attention in attentions:
        joint = (0.5 * layer_attention.double().mean(dim=1) + 0.5 * torch.eye(N, dtype=torch.float64)) @ joint
    row = joint[:, 0, p:]
    expected = (row / row.max(dim=1, keepdim=True).values).reshape(-1, *case.grid_size)
    result = attention_rollout(
        vit_run.capture.attentions, p, case.grid_size, head_fusion=HeadFusion.MEAN, discard_ratio=0.0
    )
    torch.testing.assert_close(result.double(), expected, rtol=1e-6, atol=1e-7)


def test_the_three_fusions_give_different_maps(vit_run: VitRun) -> None:
    case, attentions = vit_run.case, vit_run.capture.attentions
    maps = {
        fusion: attention_rollout(attentions, case.num_prefix_tokens, case.grid_size, head_fusion=fusion)
        for fusion in HeadFusion
    }
    assert not torch.allclose(maps[HeadFusion.MEAN], maps[HeadFusion.MAX], atol=1e-3)
    assert not torch.allclose(maps[HeadFusion.MEAN], maps[HeadFusion.MIN], atol=1e-3)
    assert not torch.allclose(maps[HeadFusion.MAX], maps[HeadFusion.MIN], atol=1e-3)


def test_gradient_rollout_depends_on_the_target_class(vit_run: VitRun) -> None:
    """Swapping in another sample's gradients (another class) changes the map; rollout has no class."""
    case, attentions, gradients = vit_run.case, vit_run.capture.attentions, _gradients(vit_run)
    p, grid = case.num_prefix_tokens, case.grid_size
    own = gradient_rollout(attentions, gradients, p, grid)
    swapped = gradient_rollout(attentions, gradients.flip(1), p, grid)
    assert not torch.allclose(own, swapped, atol=1e-3)


@pytest.mark.parametrize(
    ("tokens", "p", "ratio", "count"),
    [
        (197, 1, 0.9, math.floor(0.9 * 197 * 196)),
        (198, 2, 0.9, math.floor(0.9 * 198 * 196)),
        (5, 1, 0.5, 10),
        (5, 1, 0.0, 0),
        (5, 1, 0.99, 19),
        (3, 2, 0.4, 1),
    ],
)
def test_discard_zeroes_exactly_floor_r_n_p_patch_entries_and_never_a_prefix_column(
    tokens: int, p: int, ratio: float, count: int
) -> None:
    """Prefix columns hold the smallest values on purpose: a rule that ignored them would take them first."""
    generator = torch.Generator().manual_seed(0)
    fused = torch.rand(2, 3, tokens, tokens, generator=generator, dtype=torch.float64) + 1.0
    fused[..., :p] = 1e-3
    kept = discard_smallest(fused, p, ratio)
    torch.testing.assert_close(kept[..., :p], fused[..., :p], rtol=0, atol=0)
    zeroed = kept[..., p:] == 0
    assert zeroed.sum(dim=(-2, -1)).tolist() == [[count] * 3] * 2
    largest_zeroed = torch.where(zeroed, fused[..., p:], -torch.inf).amax(dim=(-2, -1))
    smallest_kept = torch.where(zeroed, torch.inf, fused[..., p:]).amin(dim=(-2, -1))
    assert bool((largest_zeroed < smallest_kept).all())
    torch.testing.assert_close(kept[..., p:][~zeroed], fused[..., p:][~zeroed], rtol=0, atol=0)


def test_discard_counts_per_sample_and_per_block() -> None:
    """A block or sample with much larger values must not shield the others from the discard."""
    fused = torch.ones(2, 2, 3, 3, dtype=torch.float64)
    fused[0, 1] *= 100.0
    fused[1, 0] *= 0.01
    kept = discard_smallest(fused + torch.arange(9, dtype=torch.float64).reshape(3, 3) * 1e-6, 1, 0.5)
    assert (kept[..., 1:] == 0).sum(dim=(-2, -1)).tolist() == [[3, 3], [3, 3]]


def test_discard_breaks_ties_in_row_major_order() -> None:
    fused = torch.full((1, 1, 3, 3), 0.5, dtype=torch.float64)
    kept = discard_smallest(fused, 1, 0.5)
    expected_zero = torch.tensor([[False, True, True], [False, True, False], [False, False, False]])
    assert torch.equal(kept[0, 0] == 0, expected_zero)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_discard_with_many_ties_matches_the_reference(ratio: float) -> None:
    generator = torch.Generator().manual_seed(3)
    fused = torch.randint(0, 4, (2, 3, 11, 11), generator=generator).double()
    kept = discard_smallest(fused, 2, ratio)
    for layer in range(2):
        for b in range(3):
            np.testing.assert_array_equal(
                kept[layer, b].numpy(), ref_discard(fused[layer, b].numpy(), 2, ratio)
            )


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_discard_ratio_outside_zero_to_one_is_rejected(ratio: float) -> None:
    with pytest.raises(ValueError, match="discard_ratio"):
        discard_smallest(torch.ones(1, 1, 3, 3), 1, ratio)


def class_token_row(matrices: torch.Tensor) -> torch.Tensor:
    """Row 0 of ``R``: ``readout_row`` from ``ρ = e_0``. ``[L, B, N, N] -> [B, N]``."""
    _, B, N, _ = matrices.shape
    return readout_row(matrices, readout_vector(Readout.TOKEN, 1, N, B, device=matrices.device))


def test_later_blocks_multiply_from_the_left() -> None:
    """``R = Â_1 Â_0``: here row 0 of ``Â_1 Â_0`` is [1, 0] and row 0 of ``Â_0 Â_1`` is [0, 1]."""
    first = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]], dtype=torch.float64)
    second = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]], dtype=torch.float64)
    row = class_token_row(torch.cat([first, second]))
    torch.testing.assert_close(row[0], (second[0, 0] @ first[0, 0])[0])
    assert not torch.allclose(row[0], (first[0, 0] @ second[0, 0])[0])


def test_the_class_token_row_is_row_0_of_the_full_product(vit_run: VitRun) -> None:
    fused = fuse_heads(vit_run.capture.attentions, HeadFusion.MEAN)
    matrices = rollout_matrices(fused, vit_run.case.num_prefix_tokens, 0.9)
    product = matrices[0]
    for matrix in matrices[1:]:
        product = matrix @ product
    torch.testing.assert_close(class_token_row(matrices), product[:, 0, :], rtol=1e-10, atol=1e-12)


def test_the_average_readout_is_the_mean_of_the_patch_rows_of_the_full_product(vit_run: VitRun) -> None:
    p = vit_run.case.num_prefix_tokens
    fused = fuse_heads(vit_run.capture.attentions, HeadFusion.MEAN)
    matrices = rollout_matrices(fused, p, 0.9)
    product = matrices[0]
    for matrix in matrices[1:]:
        product = matrix @ product
    _, B, N, _ = matrices.shape
    rho = readout_vector(Readout.AVG, p, N, B)
    torch.testing.assert_close(
        readout_row(matrices, rho), product[:, p:, :].mean(dim=1), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("readout", list(Readout))
@pytest.mark.parametrize("p", [0, 1, 5])
def test_readout_vectors_are_rows_that_sum_to_one_on_their_tokens(readout: Readout, p: int) -> None:
    if readout is Readout.TOKEN and p == 0:
        with pytest.raises(ValueError, match="needs a class token"):
            readout_vector(readout, p, p + 4, 2)
        return
    rho = readout_vector(readout, p, p + 4, 2)
    assert rho.shape == (2, 1, p + 4)
    torch.testing.assert_close(rho.sum(dim=-1), torch.ones(2, 1, dtype=torch.float64))
    weighted = (rho[0, 0] > 0).nonzero().flatten().tolist()
    assert weighted == ([0] if readout is Readout.TOKEN else list(range(p, p + 4)))


def test_a_map_without_positive_evidence_is_all_zeros_not_nan() -> None:
    """Zero gradients make every ``F_l`` zero, ``R = I`` and ``R[0, p:] = 0``: the readout must stay finite."""
    attentions = torch.full((2, 1, 2, 5, 5), 0.2)
    maps = gradient_rollout(attentions, torch.zeros_like(attentions), 1, (2, 2))
    torch.testing.assert_close(maps, torch.zeros(1, 2, 2))


def test_gradients_must_have_the_shape_of_the_attention() -> None:
    attentions = torch.full((2, 1, 2, 5, 5), 0.2)
    with pytest.raises(ValueError, match="must match attentions"):
        gradient_rollout(attentions, torch.zeros(2, 1, 1, 5, 5), 1, (2, 2))
