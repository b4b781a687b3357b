"""The registry of what one job stores: its arrays and its pictures, each named once.

Kept free of torch: the producer lists, links and titles the same files the worker writes. Every
other name (the pictures each kind of drawing makes, the maps the pipeline stacks, the panels a
report shows side by side) is derived from the two tables here. What each array means is defined
in ``docs/methods.md``; shapes use ``L`` blocks, ``H`` heads, ``N`` tokens and the ``gh × gw``
patch grid.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "ARRAY_ARTIFACTS",
    "IMAGE_ARTIFACTS",
    "INPUT_PICTURE",
    "LAYER_GRID",
    "OVERLAYS",
    "PANELS",
    "PICTURES",
    "PICTURE_SOURCES",
    "PictureArtifact",
    "PictureKind",
]

# Every array one job may write, named as the file it is stored as. ``attention.npy`` is opt-in.
ARRAY_ARTIFACTS: tuple[str, ...] = (
    "attention.npy",  # [L, H, N, N] float16, only with raw_attention
    "cls_attention.npy",  # [L, H, gh, gw]
    "layer_scores.npy",  # [L, gh, gw]
    "rollout.npy",  # [gh, gw]
    "grad_rollout.npy",  # [gh, gw]
    "relevance.npy",  # [gh, gw]
)


class PictureKind(enum.Enum):
    """How a picture presents its array (``docs/methods.md`` artifact 8)."""

    INPUT = "input"  # the model's input crop itself, the background of the overlays (no array)
    LAYER_GRID = "layer grid"  # one jet panel per block of an [L, gh, gw] array (the paper's Fig. 4.1)
    OVERLAY = "overlay"  # a [gh, gw] map in jet over the input crop (Figs. 4.2-4.3)


@dataclass(frozen=True)
class PictureArtifact:
    """One picture a job stores: its file name, its kind, the array it presents (``None`` for the
    input crop), its title in a report, and whether its map explains one class (the job's target,
    through the gradients) rather than the image as a whole."""

    name: str
    kind: PictureKind
    source: str | None
    title: str
    explains_target: bool = False


# Every picture one job writes, in the order of the results CSV's columns (after the arrays').
PICTURES: tuple[PictureArtifact, ...] = (
    PictureArtifact("input.png", PictureKind.INPUT, None, "input"),
    PictureArtifact("layer_scores.png", PictureKind.LAYER_GRID, "layer_scores.npy", "per-layer scores"),
    PictureArtifact("rollout.png", PictureKind.OVERLAY, "rollout.npy", "rollout"),
    PictureArtifact(
        "grad_rollout.png", PictureKind.OVERLAY, "grad_rollout.npy", "gradient rollout", explains_target=True
    ),
    PictureArtifact("relevance.png", PictureKind.OVERLAY, "relevance.npy", "relevance", explains_target=True),
)


def _only(kind: PictureKind) -> str:
    (name,) = (picture.name for picture in PICTURES if picture.kind is kind)
    return name


IMAGE_ARTIFACTS: tuple[str, ...] = tuple(picture.name for picture in PICTURES)
# Each picture drawn from an array, and that array.
PICTURE_SOURCES: Mapping[str, str] = {
    picture.name: picture.source for picture in PICTURES if picture.source is not None
}
# The crop the model saw, stored as it is: a report shows it next to the overlays drawn on it.
INPUT_PICTURE = _only(PictureKind.INPUT)
LAYER_GRID = _only(PictureKind.LAYER_GRID)
# The overlays, in the order the pipeline stacks their maps.
OVERLAYS: tuple[str, ...] = tuple(picture.name for picture in PICTURES if picture.kind is PictureKind.OVERLAY)
# What a report shows side by side (the paper's Figs. 4.2-4.3): the input crop, then the overlays.
PANELS: tuple[PictureArtifact, ...] = tuple(
    picture for picture in PICTURES if picture.kind is not PictureKind.LAYER_GRID
)
