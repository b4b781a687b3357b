"""Class names and targets: labels for ImageNet-sized heads, and how a job's target is resolved."""

from __future__ import annotations

import pytest
from timm.data import ImageNetInfo

from common.errors import InvalidTargetError
from worker.labels import resolve_target

LABELS = ("cat", "dog", "bird")
IMAGENET = tuple(ImageNetInfo("imagenet-1k").label_descriptions())


@pytest.mark.parametrize(
    ("target", "labels", "num_classes", "expected"),
    [
        (None, LABELS, 3, None),
        ("", LABELS, 3, None),
        ("   ", LABELS, 3, None),
        (2, LABELS, 3, 2),
        ("2", LABELS, 3, 2),
        (" 0 ", None, 3, 0),
        ("dog", LABELS, 3, 1),
        ("DOG", LABELS, 3, 1),
        ("tabby, tabby cat", IMAGENET, 1000, 281),
        ("Tabby", IMAGENET, 1000, 281),
        ("tabby cat", IMAGENET, 1000, 281),
        ("tiger cat", IMAGENET, 1000, 282),
        ("Egyptian cat", IMAGENET, 1000, 285),
        (999, IMAGENET, 1000, 999),
    ],
)
def test_resolve_target(
    target: str | int | None, labels: tuple[str, ...] | None, num_classes: int, expected: int | None
) -> None:
    assert resolve_target(target, labels, num_classes) == expected


@pytest.mark.parametrize(
    ("target", "labels", "num_classes", "message"),
    [
        (3, LABELS, 3, "3 is out of range.*3 classes"),
        ("-1", LABELS, 3, "-1 is out of range"),
        (1000, IMAGENET, 1000, "1000 is out of range.*1000 classes"),
        ("horse", LABELS, 3, "'horse'.*3 classes"),
        ("cat", IMAGENET, 1000, "'cat'.*1000 classes"),
        ("crane", IMAGENET, 1000, r"ambiguous.*\[134, 517\]"),
        ("dog", None, 5, "no class names.*0..4"),
        (True, LABELS, 3, "True"),
        # Digits other than ASCII are not an index: a reader sees a name, and no class has it.
        ("\u0662", LABELS, 3, "'\u0662'.*none named so"),  # Arabic-Indic two
        ("\u0662\u0668\u0661", IMAGENET, 1000, "none named so"),  # 281 in Arabic-Indic digits
        ("\uff12", LABELS, 3, "none named so"),  # full-width two
    ],
)
def test_resolve_target_refuses(
    target: str | int, labels: tuple[str, ...] | None, num_classes: int, message: str
) -> None:
    with pytest.raises(InvalidTargetError, match=message):
        resolve_target(target, labels, num_classes)
