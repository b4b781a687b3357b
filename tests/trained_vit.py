"""A small ViT trained by the test suite on a task whose evidence has a known place.

64×64 images of random clutter with one solid 16×16 square aligned to the 8-pixel patch grid; the
label is the square's colour. Everything outside the square is noise, so a model that is right must
read the square's 4 patches (1/16 of the image): maps of a faithful method must put their mass there,
and deleting those patches first must destroy the prediction fastest.

The weights are cached (``$VITSCOPE_TEST_CACHE`` or ``.cache/`` in the repository) under a hash of the
task and training configuration, so only the first run trains (150 steps, 15–25 s on one core). The
architecture is timm's registered ``test_vit`` with the keyword arguments in ``MODEL_ARGS``, so the
worker can build the very same model from a models file (``arch = "test_vit"``, ``model_args``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

REPOSITORY = Path(__file__).resolve().parents[1]


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

# timm's ``test_vit`` built with these is exactly ``build()``'s VisionTransformer (same state dict).
MODEL_ARGS: dict[str, Any] = {
    "patch_size": TASK.patch_size,
    "embed_dim": TRAINING.embed_dim,
    "depth": TRAINING.depth,
    "num_heads": TRAINING.num_heads,
    "mlp_ratio": TRAINING.mlp_ratio,
}


def build() -> VisionTransformer:
    return VisionTransformer(img_size=TASK.img_size, num_classes=len(TASK.colours), **MODEL_ARGS)


def train() -> VisionTransformer:
    """One thread, whatever the machine: torch's multithreaded kernels sum in a different order per
    thread count, and the model that came out of two threads on one CPU was as accurate (100 %) yet
    ranked its evidence differently enough to fail ``test_evaluate``'s insertion check."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train()
    finally:
        torch.set_num_threads(threads)


def _train() -> VisionTransformer:
    torch.manual_seed(TRAINING.seed)
    model = build().train()
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


def checkpoint_path() -> Path:
    config = {
        "task": asdict(TASK),
        "training": asdict(TRAINING),
        "timm": timm.__version__.split(".")[0],
        "threads": 1,  # checkpoints trained with several threads (before) are not reused
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("VITSCOPE_TEST_CACHE") or REPOSITORY / ".cache")
    return cache / "vitscope-tests" / f"coloured-square-vit-{digest}.safetensors"


def trained_checkpoint() -> Path:
    """The cached checkpoint, trained first if it is not there yet."""
    path = checkpoint_path()
    if not path.exists():
        model = train()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        save_file(model.state_dict(), partial)
        partial.replace(path)  # atomic: a concurrent run sees the whole file or none
    return path


def load_trained() -> VisionTransformer:
    model = build()
    model.load_state_dict(load_file(trained_checkpoint()))
    return model.eval()


# What the worker's ``timm`` preprocessing does to a test_vit input of 64 px: crop_pct 0.95 resizes
# to floor(64 / 0.95) = 67 px, then crops 64 at offset round(3 / 2) = 2. Pictures written 67 px wide
# with the task image at (2, 2) therefore reach the model pixel for pixel (up to 8-bit rounding).
STORED_SIZE, STORED_OFFSET = 67, 2


def write_task_images(directory: Path, count: int, seed: int) -> list[tuple[Path, int, tuple[int, ...]]]:
    """``count`` task images as PNG files: ``(path, label, bbox of the square in the file's pixels)``."""
    from PIL import Image

    images, labels, corners = TASK.sample(count, torch.Generator().manual_seed(seed))
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (image, label, corner) in enumerate(zip(images, labels, corners, strict=True)):
        canvas = np.full((STORED_SIZE, STORED_SIZE, 3), 128, dtype=np.uint8)
        pixels = ((image.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).round().clip(0, 255).astype(np.uint8)
        end = STORED_OFFSET + TASK.img_size
        canvas[STORED_OFFSET:end, STORED_OFFSET:end] = pixels
        path = directory / f"square-{index:03d}.png"
        Image.fromarray(canvas).save(path)
        top, left = (int(v) + STORED_OFFSET for v in corner)
        written.append((path, int(label), (left, top, left + TASK.object_size, top + TASK.object_size)))
    return written


def models_file_entry(name: str) -> str:
    """A models-file table that makes the worker build the trained model from its checkpoint."""
    arguments = "\n".join(f"{key} = {value!r}" for key, value in MODEL_ARGS.items())
    labels = ", ".join(f'"{label}"' for label in ("red", "green", "blue", "yellow"))
    return (
        f'[models.{name}]\narch = "test_vit"\nweights = "{trained_checkpoint()}"\n'
        f"img_size = {TASK.img_size}\nlabels = [{labels}]\n\n[models.{name}.model_args]\n{arguments}\n"
    )
