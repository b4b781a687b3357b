"""The maps of a model that has learned something point at the thing it learned.

The model and its task are in ``tests/trained_vit.py`` (shared with the metrics tests): a small ViT
trained to name the colour of the one 16×16 square among random clutter, so a correct gradient
rollout must put its mass on the square's 4 patches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from common.methods import MethodSettings
from tests.trained_vit import TASK
from worker.attention import Explanation, explain


@pytest.fixture(scope="module")
def held_out(trained_model: VisionTransformer) -> tuple[list[Explanation], torch.Tensor, torch.Tensor]:
    images, labels, corners = TASK.sample(128, torch.Generator().manual_seed(12345))
    return explain(trained_model, images, MethodSettings(top_k=1)), labels, corners


def _mass_on_object(maps: list[np.ndarray], corners: torch.Tensor) -> float:
    """Mean over images of the fraction of the map's mass that lies on the square's patches."""
    return float(
        np.mean([m[TASK.object_patches(c)].sum() / m.sum() for m, c in zip(maps, corners, strict=True)])
    )


def test_the_trained_model_solves_the_task(
    held_out: tuple[list[Explanation], torch.Tensor, torch.Tensor],
) -> None:
    explanations, labels, _ = held_out
    predictions = np.array([e.top_indices[0] for e in explanations])
    assert (predictions == labels.numpy()).mean() > 0.9


@pytest.mark.parametrize("method", ["grad_rollout", "rollout", "relevance"])
def test_maps_put_their_mass_on_the_object(
    held_out: tuple[list[Explanation], torch.Tensor, torch.Tensor], method: str
) -> None:
    explanations, _, corners = held_out
    mass = _mass_on_object([getattr(e, method) for e in explanations], corners)
    # 4× chance (0.25): a trained model gets about 0.5-0.7 here; the same maps transposed get about 0.13.
    assert mass > 4 * TASK.object_area_fraction, f"{method}: {mass:.3f} of the mass on the object"


def test_the_square_is_drawn_exactly_on_the_patches_its_mask_names() -> None:
    """The mass test is only as good as the mask: it must cover the drawn square, not its transpose."""
    images, labels, corners = TASK.sample(16, torch.Generator().manual_seed(0))
    colours = (torch.tensor(TASK.colours) - 0.5) / 0.5
    pixel_block = np.ones((TASK.patch_size, TASK.patch_size), dtype=bool)
    for image, label, corner in zip(images, labels, corners, strict=True):
        mask = TASK.object_patches(corner)
        assert int(mask.sum()) == (TASK.object_size // TASK.patch_size) ** 2
        inside = torch.from_numpy(np.kron(mask, pixel_block))
        assert torch.equal(image[:, inside], colours[label][:, None].expand(3, int(inside.sum())))
