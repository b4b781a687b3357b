"""The maps of a model that has learned something point at the thing it learned.

A small ViT is trained here on a synthetic task whose evidence has a known place: 64×64 images of
random clutter with one solid 16×16 square aligned to the 8-pixel patch grid; the label is the
square's colour. Everything outside the square is noise, so a model that is right must read the
square's 4 patches (1/16 of the image), and a correct gradient rollout must put its mass there.
The weights are cached (``$VITSCOPE_TEST_CACHE`` or ``.cache/`` in the repository) under a hash of
the task and training configuration, so only the first run trains (150 steps, 15–25 s on one core).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from common.methods import MethodSettings
from worker.attention import Explanation, explain

REPOSITORY = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Task:
    """The synthetic data: where the evidence is and what it looks like."""

    img_size: int = 64
    patch_size: int = 8
    object_size: int = 16
    colours: tuple[tuple[float, float, float], ...] = ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0))
    distractors: int = 4
    distractor_size: int = 4

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def object_area_fraction(self) -> float:
        return (self.object_size / self.img_size) ** 2

    def sample(
        self, count: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``count`` normalised images ``[count, 3, S, S]``, their labels and the squares' top-left corners."""
        S = self.img_size
        pixels = torch.rand(count, 3, S, S, generator=generator)
        axis = torch.arange(S)
        for _ in range(self.distractors):
            corner = torch.randint(0, S - self.distractor_size + 1, (count, 2), generator=generator)
            colour = torch.rand(count, 3, 1, 1, generator=generator)
            pixels = torch.where(self._square(corner, self.distractor_size, axis), colour, pixels)
        labels = torch.randint(0, len(self.colours), (count,), generator=generator)
        cells = (S - self.object_size) // self.patch_size + 1
        corner = torch.randint(0, cells, (count, 2), generator=generator) * self.patch_size
        colour = torch.tensor(self.colours)[labels][:, :, None, None]
        pixels = torch.where(self._square(corner, self.object_size, axis), colour, pixels)
        return (pixels - 0.5) / 0.5, labels, corner

    @staticmethod
    def _square(corner: torch.Tensor, size: int, axis: torch.Tensor) -> torch.Tensor:
        """``[count, 1, S, S]`` masks of ``size``-pixel squares at ``corner`` ``[count, 2]`` (row, column)."""
        rows = (axis >= corner[:, :1]) & (axis < corner[:, :1] + size)
        columns = (axis >= corner[:, 1:]) & (axis < corner[:, 1:] + size)
        return (rows[:, :, None] & columns[:, None, :])[:, None]

    def object_patches(self, corner: torch.Tensor) -> np.ndarray:
        """``[grid, grid]`` mask of the patches the square covers."""
        mask = np.zeros((self.grid, self.grid), dtype=bool)
        top, left = (int(value) // self.patch_size for value in corner)
        span = self.object_size // self.patch_size
        mask[top : top + span, left : left + span] = True
        return mask


@dataclass(frozen=True)
class Training:
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    steps: int = 150
    batch_size: int = 64
    max_lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0


TASK, TRAINING = Task(), Training()


def _build() -> VisionTransformer:
    return VisionTransformer(
        img_size=TASK.img_size,
        patch_size=TASK.patch_size,
        num_classes=len(TASK.colours),
        embed_dim=TRAINING.embed_dim,
        depth=TRAINING.depth,
        num_heads=TRAINING.num_heads,
        mlp_ratio=TRAINING.mlp_ratio,
    )


def _train() -> VisionTransformer:
    torch.manual_seed(TRAINING.seed)
    model = _build().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAINING.max_lr, weight_decay=TRAINING.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=TRAINING.max_lr, total_steps=TRAINING.steps, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(TRAINING.seed + 1)
    for _ in range(TRAINING.steps):
        images, labels, _ = TASK.sample(TRAINING.batch_size, generator)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def _checkpoint_path() -> Path:
    config = {"task": asdict(TASK), "training": asdict(TRAINING), "timm": timm.__version__.split(".")[0]}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("VITSCOPE_TEST_CACHE") or REPOSITORY / ".cache")
    return cache / "vitscope-tests" / f"coloured-square-vit-{digest}.safetensors"


@pytest.fixture(scope="module")
def trained_model() -> VisionTransformer:
    path = _checkpoint_path()
    if path.exists():
        model = _build()
        model.load_state_dict(load_file(path))
        return model.eval()
    model = _train()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    save_file(model.state_dict(), partial)
    partial.replace(path)  # atomic: a concurrent run sees the whole file or none
    return model


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
