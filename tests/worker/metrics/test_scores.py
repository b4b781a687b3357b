"""The small scores by their definitions: entropy, coverage of boxes and masks, pointing game, mass
inside, Spearman correlation, and the re-initialized copy of the sanity check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.worker.attention.conftest import tiny_vit
from worker.metrics import (
    box_coverage,
    mask_coverage,
    mass_inside,
    normalized_entropy,
    pointing_game,
    randomized_copy,
    spearman,
)


def test_normalized_entropy() -> None:
    maps = torch.stack([torch.ones(4, 4), torch.zeros(4, 4), torch.zeros(4, 4)])
    maps[1, 2, 3] = 5.0
    maps[2, 0, :2] = 1.0  # two equal patches: log 2 / log 16 = 1/4
    entropy = normalized_entropy(maps)
    assert entropy.tolist() == pytest.approx([1.0, 0.0, 0.25])
    assert math.isnan(float(normalized_entropy(torch.zeros(3, 3))))


def test_box_coverage_is_the_exact_overlap_area() -> None:
    # A 32×32 input on a 4×4 grid of 8-pixel patches; the box covers x 4..20, y 8..12.
    coverage = box_coverage((4, 8, 20, 12), (32, 32), (4, 4))
    expected = np.zeros((4, 4))
    expected[1, :3] = [0.5 * 0.5, 1.0 * 0.5, 0.5 * 0.5]
    np.testing.assert_allclose(coverage, expected)
    whole = box_coverage((-10, -10, 100, 100), (32, 32), (4, 4))
    np.testing.assert_allclose(whole, np.ones((4, 4)))  # parts outside the input do not count
    assert box_coverage((40, 40, 50, 50), (32, 32), (4, 4)).sum() == 0


def test_mask_coverage_is_the_share_of_set_pixels() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[0:4, 0:2] = True  # half of patch (0, 0)
    mask[4:8, 4:8] = True  # all of patch (1, 1)
    np.testing.assert_allclose(mask_coverage(mask, (2, 2)), [[0.5, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="patch grid"):
        mask_coverage(np.zeros((7, 8), dtype=bool), (2, 2))


def test_pointing_game_and_mass_inside() -> None:
    coverage = torch.zeros(1, 3, 3)
    coverage[0, 0, 0] = 0.5
    maps = torch.tensor([[[4.0, 0, 0], [0, 0, 0], [0, 0, 4.0]], [[0.0, 1, 0], [0, 0, 0], [0, 0, 0]]])
    assert pointing_game(maps, coverage).tolist() == [1.0, 0.0]  # a tie goes to the first maximum
    assert mass_inside(maps, coverage).tolist() == pytest.approx([4 * 0.5 / 8, 0.0])
    uniform = torch.ones(1, 3, 3)
    assert float(mass_inside(uniform, coverage)) == pytest.approx(0.5 / 9)


def test_spearman_is_the_correlation_of_average_ranks() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert float(spearman(a, a * 10 + 3)) == pytest.approx(1.0)
    assert float(spearman(a, -a)) == pytest.approx(-1.0)
    # With ties: x ranks 1, 2.5, 2.5, 4; y ranks 1, 2, 3, 4 -> Pearson of those.
    x, y = torch.tensor([[1.0, 2.0], [2.0, 5.0]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4])
    assert float(spearman(x, y)) == pytest.approx(float(np.corrcoef(rx, ry)[0, 1]))
    assert math.isnan(float(spearman(torch.ones(2, 2), a)))
    batch = spearman(torch.stack([a, x]), torch.stack([a, y]))
    assert batch.tolist() == pytest.approx([1.0, float(np.corrcoef(rx, ry)[0, 1])])


def test_randomized_copy_changes_only_the_last_blocks_and_is_reproducible() -> None:
    model = tiny_vit(depth=3)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    copy = randomized_copy(model, blocks=2, seed=1)
    again = randomized_copy(model, blocks=2, seed=1)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), "the original is untouched"
    for name, tensor in copy.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name])
        changed = not torch.equal(tensor, before[name])
        if name.startswith(("blocks.1.", "blocks.2.")) and name.endswith("weight") and "norm" not in name:
            assert changed, name
        elif not name.startswith(("blocks.1.", "blocks.2.")):
            assert not changed, name
    with pytest.raises(ValueError, match="cannot re-initialize 4 blocks"):
        randomized_copy(model, blocks=4, seed=0)
