"""The small scores by their definitions: entropy, coverage of boxes and masks, pointing game, mass
inside, Spearman correlation, and the re-initialized copy of the sanity check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from common.metric_settings import SanityLayers
from tests.worker.attention.conftest import tiny_vit
from worker.metrics import (
    box_coverage,
    cascade_layers,
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
    copy = randomized_copy(model, blocks=2, seed=1, layers=SanityLayers.BLOCKS)
    again = randomized_copy(model, blocks=2, seed=1, layers=SanityLayers.BLOCKS)
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
        randomized_copy(model, blocks=4, seed=0, layers=SanityLayers.BLOCKS)
    with pytest.raises(ValueError, match=r'0 blocks .* \(sanity_layers = "blocks": 1 to 3\)'):
        randomized_copy(model, blocks=0, seed=0, layers=SanityLayers.BLOCKS)


def _independent_cascade(model: nn.Module, blocks: int, seed: int) -> dict[str, torch.Tensor]:
    """Adebayo et al.'s cascade written from the state dict's names alone, not from module types.

    Output first: ``head.``, ``head_dist.``, ``fc_norm.``, ``norm.``, then ``blocks.{L−1}.`` down to
    ``blocks.{L−k}.``; in each, the parameters in the state dict's order: a 2-D ``weight`` is a
    linear layer's (truncated normal, σ = 0.02, one shared generator), a 1-D ``weight`` a norm's
    (ones), every ``bias`` zero; anything else (layer scale) is kept.
    """
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    depth = len(model.blocks)
    prefixes = ["head.", "head_dist.", "fc_norm.", "norm."]
    prefixes += [f"blocks.{index}." for index in range(depth - 1, depth - 1 - blocks, -1)]
    generator = torch.Generator().manual_seed(seed)
    for prefix in prefixes:
        for name in [name for name in state if name.startswith(prefix)]:
            if name.endswith(".weight") and state[name].ndim == 2:
                drawn = torch.empty(state[name].shape)
                nn.init.trunc_normal_(drawn, std=0.02, generator=generator)
                state[name] = drawn
            elif name.endswith(".weight") and state[name].ndim == 1:
                state[name] = torch.ones_like(state[name])
            elif name.endswith(".bias"):
                state[name] = torch.zeros_like(state[name])
    return state


@pytest.mark.parametrize(
    "options",
    [
        {},  # class token: head and final norm
        {"global_pool": "avg", "class_token": False},  # average pooling: head and fc_norm, no final norm
        {"init_values": 0.5},  # layer scale, which the copy keeps
        {"distilled": True},  # DeiT's second head
    ],
)
@pytest.mark.parametrize("blocks", [0, 1, 3])
def test_the_output_cascade_equals_an_independent_reinitialization(options: dict, blocks: int) -> None:
    options = dict(options)  # pytest shares the parameter between the runs of each ``blocks``
    distilled = options.pop("distilled", False)
    model = _distilled_vit() if distilled else tiny_vit(depth=3, **options)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    copy = randomized_copy(model, blocks=blocks, seed=7, layers=SanityLayers.OUTPUT)
    expected = _independent_cascade(model, blocks, seed=7)
    state = copy.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, expected[name]), name
    assert not torch.equal(state["head.weight"], before["head.weight"])
    if distilled:
        assert not torch.equal(state["head_dist.weight"], before["head_dist.weight"])
    for index in range(3 - blocks):  # the blocks below the cascade keep their trained values
        assert torch.equal(
            state[f"blocks.{index}.attn.qkv.weight"], before[f"blocks.{index}.attn.qkv.weight"]
        )
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), "the original is untouched"


def _distilled_vit() -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    return VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, num_classes=5
    ).eval()


def test_a_deeper_cascade_redraws_nothing_a_shallower_one_drew() -> None:
    """Adebayo et al.'s cascade is one sequence of models: step k + 1 adds a block to step k's."""
    model = tiny_vit(depth=3)
    one = randomized_copy(model, blocks=1, seed=3).state_dict()
    two = randomized_copy(model, blocks=2, seed=3).state_dict()
    for name, tensor in one.items():
        if not name.startswith("blocks.1."):
            assert torch.equal(tensor, two[name]), name
    assert not torch.equal(one["blocks.1.attn.qkv.weight"], two["blocks.1.attn.qkv.weight"])
    assert [name for name, _ in cascade_layers(model, 2, SanityLayers.OUTPUT)] == [
        "head",
        "norm",
        "blocks.2",
        "blocks.1",
    ]
    assert [name for name, _ in cascade_layers(model, 2, SanityLayers.BLOCKS)] == ["blocks.1", "blocks.2"]
