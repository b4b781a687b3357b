"""Which models the core accepts, and the clear refusal of the ones it cannot explain."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
from torch import nn

from common.errors import UnsupportedModelError
from tests.worker.attention.conftest import tiny_vit
from worker.attention import check_supported
from worker.attention.support import model_layout


@pytest.mark.parametrize(
    ("arch", "kwargs", "num_prefix_tokens", "grid_size", "depth"),
    [
        ("deit_tiny_patch16_224", {}, 1, (14, 14), 12),
        ("deit_tiny_distilled_patch16_224", {}, 2, (14, 14), 12),
        ("deit_tiny_patch16_224", {"img_size": 160}, 1, (10, 10), 12),
        ("deit_tiny_patch16_224", {"depth": 24}, 1, (14, 14), 24),
        ("vit_small_patch14_reg4_dinov2", {"img_size": 112, "num_classes": 1000}, 5, (8, 8), 12),
    ],
)
def test_layout_of_supported_models_is_read_from_the_model(
    arch: str, kwargs: dict, num_prefix_tokens: int, grid_size: tuple[int, int], depth: int
) -> None:
    model = timm.create_model(arch, pretrained=False, **kwargs)
    check_supported(model)
    layout = model_layout(model)
    assert layout.num_prefix_tokens == num_prefix_tokens
    assert layout.grid_size == grid_size
    assert layout.num_layers == depth
    assert layout.attn_drops == tuple(block.attn.attn_drop for block in model.blocks)


def _without_attn_drop() -> nn.Module:
    model = tiny_vit()
    model.blocks[1].attn = nn.Identity()
    return model


def _without_grid() -> nn.Module:
    model = tiny_vit()
    model.patch_embed = nn.Conv2d(3, 16, kernel_size=8, stride=8)
    return model


@pytest.mark.parametrize(
    ("build", "name", "reason"),
    [
        (lambda: timm.create_model("resnet18", pretrained=False), "resnet18", "no transformer `blocks`"),
        (
            lambda: timm.create_model(
                "deit_tiny_patch16_224", pretrained=False, class_token=False, global_pool="avg"
            ),
            "deit_tiny_patch16_224",
            "no class token",
        ),
        (
            lambda: timm.create_model("vit_little_patch16_reg4_gap_256", pretrained=False),
            "vit_little_patch16_reg4_gap_256",
            "no class token",
        ),
        (
            lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=0),
            "deit_tiny_patch16_224",
            "no classification head",
        ),
        (_without_attn_drop, "VisionTransformer", "block 1 has no `attn.attn_drop`"),
        (_without_grid, "VisionTransformer", "no `patch_embed.grid_size`"),
    ],
    ids=[
        "resnet18",
        "vit-without-class-token",
        "registers-without-class-token",
        "feature-extractor-without-head",
        "no-attn-drop",
        "no-grid",
    ],
)
def test_unsupported_models_are_refused_by_name(
    build: Callable[[], nn.Module], name: str, reason: str
) -> None:
    model = build()
    with pytest.raises(UnsupportedModelError) as raised:
        check_supported(model)
    assert f"model {name!r} is not supported" in str(raised.value)
    assert reason in str(raised.value)


def test_the_callers_name_for_the_model_is_used_in_the_message() -> None:
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(UnsupportedModelError, match="'my-resnet'"):
        check_supported(model, name="my-resnet")
