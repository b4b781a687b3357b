"""Which models the core accepts, and the clear refusal of the ones it cannot explain."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
from timm.models.xcit import XCA
from torch import nn

from common.errors import UnsupportedModelError
from tests.worker.attention.conftest import hooks_left, tiny_vit
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
        ("vit_small_patch14_reg4_dinov2", {"img_size": 112, "depth": 2}, 5, (8, 8), 2),
        ("vit_little_patch16_reg4_gap_256", {"depth": 2}, 4, (16, 16), 2),
        ("beit_base_patch16_224", {"depth": 2, "embed_dim": 64, "num_heads": 4}, 1, (14, 14), 2),
        ("eva02_tiny_patch14_224", {"depth": 2, "img_size": 112}, 1, (8, 8), 2),
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


def _without_fused_flag() -> nn.Module:
    model = tiny_vit()
    del model.blocks[0].attn.fused_attn
    return model


def _without_grid() -> nn.Module:
    model = tiny_vit()
    model.patch_embed = nn.Conv2d(3, 16, kernel_size=8, stride=8)
    return model


class _XCAInViTBlock(XCA):
    """XCiT's attention, callable from a ViT block (which also passes masking options it ignores)."""

    def forward(self, x: torch.Tensor, **masking: object) -> torch.Tensor:
        return super().forward(x)


def _with_cross_covariance_attention() -> nn.Module:
    """XCiT's attention passes the name check (``attn_drop``, ``fused_attn``) but is channel to channel."""
    model = tiny_vit()
    model.blocks[0].attn = _XCAInViTBlock(dim=16, num_heads=2)
    return model


@pytest.mark.parametrize(
    ("build", "name", "reason"),
    [
        (
            lambda: timm.create_model("resnet18", pretrained=False),
            "resnet18",
            "no transformer `blocks` and no self-attention at all (a convolutional or MLP network",
        ),
        (
            lambda: timm.create_model(
                "swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1), embed_dim=32
            ),
            "swin_tiny_patch4_window7_224",
            "Swin attend within windows",
        ),
        (
            lambda: timm.create_model(
                "vit_base_patch16_siglip_224", pretrained=False, depth=1, embed_dim=32, num_heads=4
            ),
            "vit_base_patch16_siglip_224",
            "pools with attention (global_pool = 'map'",
        ),
        (
            lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1, global_pool="max"),
            "deit_tiny_patch16_224",
            "global_pool = 'max' is not a readout",
        ),
        (
            lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1, global_pool=""),
            "deit_tiny_patch16_224",
            "global_pool = '' is not a readout",
        ),
        (_without_attn_drop, "VisionTransformer", "block 1 has no `attn.attn_drop` to hook"),
        (_without_fused_flag, "VisionTransformer", "has no `fused_attn` flag"),
        (_without_grid, "VisionTransformer", "no `patch_embed.grid_size`"),
        (_with_cross_covariance_attention, "VisionTransformer", "not token-to-token"),
    ],
    ids=[
        "resnet18",
        "swin-windowed-attention",
        "siglip-attention-pooling",
        "max-pooling",
        "no-pooling",
        "no-attention-module",
        "no-fused-attn-flag",
        "no-grid",
        "xcit-cross-covariance-attention",
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


def test_the_probe_leaves_no_hooks_and_the_fused_flags_as_they_were() -> None:
    model = tiny_vit()
    flags = [block.attn.fused_attn for block in model.blocks]
    check_supported(model)
    assert hooks_left(model) == 0
    assert [block.attn.fused_attn for block in model.blocks] == flags
