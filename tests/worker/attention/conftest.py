"""Models and captured passes shared by the compute-core tests.

Every architecture in ``VIT_CASES`` is a real timm model with random weights. timm's initialisation
is degenerate for explaining: almost uniform attention (every entry ≈ 1/N), where all methods return
nearly the same map and the discard ranks near-ties, and prefix tokens of norm 1e-6, which (without a
position embedding, as in DINOv2) attend uniformly and are cut off by the discard. ``vit`` and
``tiny_vit`` therefore scale the query/key/value weights (peaked attention) and give the prefix tokens
the scale of the patch embeddings, as in a trained model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tests.worker.attention.reference import ReferencePass, reference_pass
from worker.attention import Capture, capture

ATTENTION_SHARPENING = 4.0


def _like_trained(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(ATTENTION_SHARPENING)
        for name in ("cls_token", "dist_token", "reg_token"):
            token = getattr(model, name, None)
            if token is not None:
                token.normal_(std=0.02)
    return model.eval()


def vit(arch: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    """A timm ViT with random weights made to look trained (see the module docstring), in eval mode."""
    torch.manual_seed(seed)
    return _like_trained(timm.create_model(arch, pretrained=False, **kwargs))


def tiny_vit(dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs: Any) -> VisionTransformer:
    """A 2-block ViT on 32×32 images (4×4 grid, N = 17): milliseconds per pass, so tests can loop."""
    torch.manual_seed(seed)
    options: dict[str, Any] = {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 16,
        "depth": 2,
        "num_heads": 2,
        "num_classes": 5,
    }
    options.update(kwargs)
    return _like_trained(VisionTransformer(**options)).to(dtype)


def images(batch: int, size: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator, dtype=dtype)


@dataclass(frozen=True)
class VitCase:
    """One architecture and the token layout it must be read with."""

    arch: str
    num_prefix_tokens: int
    grid_size: tuple[int, int]
    depth: int
    img_size: int = 224
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        return vit(self.arch, **self.kwargs)


VIT_CASES = [
    pytest.param(VitCase("deit_tiny_patch16_224", 1, (14, 14), 12), id="deit_tiny-p1-14x14"),
    pytest.param(VitCase("deit_tiny_distilled_patch16_224", 2, (14, 14), 12), id="deit_tiny_distilled-p2"),
    pytest.param(VitCase("vit_base_patch32_224", 1, (7, 7), 12), id="vit_base_patch32-7x7"),
    pytest.param(
        VitCase("deit_tiny_patch16_224", 1, (10, 10), 12, img_size=160, kwargs={"img_size": 160}),
        id="deit_tiny-160px-10x10",
    ),
    pytest.param(
        VitCase("deit_tiny_patch16_224", 1, (14, 14), 24, kwargs={"depth": 24}), id="deit_tiny-24-blocks"
    ),
    pytest.param(
        VitCase(
            "vit_small_patch14_reg4_dinov2",
            5,
            (8, 8),
            12,
            img_size=112,
            kwargs={"img_size": 112, "num_classes": 1000},
        ),
        id="dinov2_reg4-p5-8x8",
    ),
    pytest.param(
        VitCase("vit_base_patch16_384", 1, (24, 24), 12, img_size=384),
        id="vit_base_patch16_384-24x24",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        VitCase("vit_large_patch16_224", 1, (14, 14), 24), id="vit_large-24-blocks", marks=pytest.mark.slow
    ),
]

# Sample 0 is explained for its top-1 class, sample 1 for a given class.
CASE_TARGETS: list[int | None] = [None, 7]


@dataclass
class VitRun:
    """One architecture run once by the core and once by the hand-written reference."""

    case: VitCase
    model: nn.Module
    capture: Capture
    reference: ReferencePass


@pytest.fixture(scope="session", params=VIT_CASES)
def vit_run(request: pytest.FixtureRequest) -> VitRun:
    case: VitCase = request.param
    model = case.build()
    batch = images(len(CASE_TARGETS), case.img_size)
    return VitRun(
        case=case,
        model=model,
        capture=capture(model, batch, CASE_TARGETS),
        reference=reference_pass(model, batch, CASE_TARGETS),
    )


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Intra-op threads spin against other processes on a shared 2-core machine (10× slower there)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_model() -> VisionTransformer:
    return tiny_vit()


def hooks_left(model: nn.Module) -> int:
    """Forward hooks still registered on any attention dropout of ``model``."""
    return sum(len(block.attn.attn_drop._forward_hooks) for block in model.blocks)


def raise_in_forward(error: Exception) -> Callable[..., None]:
    """A forward pre-hook that raises ``error``: a fault injected through the model's own API."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        raise error

    return hook
