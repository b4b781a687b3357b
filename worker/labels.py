"""Class names and targets: what a model's outputs are called, and which one a job asks about."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from timm.data import ImageNetInfo, infer_imagenet_subset

from common.errors import InvalidModelSpecError, InvalidTargetError
from common.modelspec import ModelSpec

__all__ = ["class_labels", "resolve_target"]


def class_labels(spec: ModelSpec, model: torch.nn.Module) -> tuple[str, ...] | None:
    """The spec's class names, else timm's ImageNet names when the head has an ImageNet size."""
    num_classes = int(getattr(model, "num_classes", 0))
    if spec.labels is not None:
        if len(spec.labels) != num_classes:
            raise InvalidModelSpecError(
                f"model {spec.name!r}: {len(spec.labels)} labels for a head with {num_classes} classes"
            )
        return spec.labels
    subset = infer_imagenet_subset(model)
    if subset is None:
        return None
    return tuple(ImageNetInfo(subset).label_descriptions())


# ASCII digits only: ``\d`` (and ``int``) also take Arabic-Indic or full-width digits, so a target
# written "٢٨١" would have been read as class 281 although the CSV's reader sees a name.
_INDEX = re.compile(r"[+-]?[0-9]+", re.ASCII)


def resolve_target(target: str | int | None, labels: Sequence[str] | None, num_classes: int) -> int | None:
    """The class index a job's target names, or ``None`` for "the top-1 prediction".

    ``None`` or blank -> ``None``; an integer or a string of ASCII digits -> that index, range-checked; a
    class name -> its index, matched case-insensitively against the whole label, then against each
    comma-separated synonym (ImageNet labels read ``"tabby, tabby cat"``). A name matching several
    classes (ImageNet has two ``"crane"``s) is refused as ambiguous rather than guessed.
    """
    if target is None:
        return None
    if isinstance(target, bool):
        raise InvalidTargetError(f"target {target!r} is not a class index or name")
    if isinstance(target, int):
        return _checked_index(target, num_classes)
    text = target.strip()
    if not text:
        return None
    if _INDEX.fullmatch(text):
        return _checked_index(int(text), num_classes)
    if labels is None:
        raise InvalidTargetError(
            f"target {text!r}: the model has no class names; give a class index 0..{num_classes - 1}"
        )
    wanted = text.casefold()
    matches = [index for index, label in enumerate(labels) if label.strip().casefold() == wanted]
    if not matches:
        matches = [
            index
            for index, label in enumerate(labels)
            if wanted in (synonym.strip().casefold() for synonym in label.split(","))
        ]
    if len(matches) > 1:
        raise InvalidTargetError(f"target {text!r} is ambiguous: classes {matches} match; give the index")
    if not matches:
        raise InvalidTargetError(
            f"target {text!r} is not a class of this model ({num_classes} classes, none named so)"
        )
    return matches[0]


def _checked_index(index: int, num_classes: int) -> int:
    if not 0 <= index < num_classes:
        raise InvalidTargetError(
            f"target class {index} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
        )
    return index
