"""Which models the compute core can explain, and where their attention lives.

Every artifact reads the class token's row of hooked post-softmax attention, so a model qualifies
when it has timm's ViT layout: ``blocks[l].attn.attn_drop`` (the hook point), a fixed patch grid
``patch_embed.grid_size``, a class token among its ``num_prefix_tokens`` leading tokens, and a
classification head (the gradient maps explain a class logit). Checking this up front turns "the
hooks never fired" or "row 0 is a register" into a clear, permanent error.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from common.errors import UnsupportedModelError

__all__ = ["ModelLayout", "check_supported", "model_layout"]


@dataclass(frozen=True)
class ModelLayout:
    """Where a supported model keeps what the core needs, read once per capture.

    ``attn_drops[l]`` is block ``l``'s attention dropout, whose output in eval mode is the softmax.
    """

    attn_drops: tuple[nn.Module, ...]
    num_prefix_tokens: int
    grid_size: tuple[int, int]

    @property
    def num_layers(self) -> int:
        return len(self.attn_drops)


def _model_label(model: nn.Module, name: str | None) -> str:
    if name:
        return name
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return architecture or type(model).__name__


def model_layout(model: nn.Module, name: str | None = None) -> ModelLayout:
    """The model's hook points, prefix count and patch grid; ``UnsupportedModelError`` if it has none.

    ``name`` is used in the message (default: timm's architecture name, else the class name).
    """
    label = _model_label(model, name)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
        raise UnsupportedModelError(f"model {label!r} is not supported: it has no transformer `blocks`")
    attn_drops = []
    for index, block in enumerate(blocks):
        attn_drop = getattr(getattr(block, "attn", None), "attn_drop", None)
        if not isinstance(attn_drop, nn.Module):
            raise UnsupportedModelError(
                f"model {label!r} is not supported: block {index} has no `attn.attn_drop` to hook"
            )
        attn_drops.append(attn_drop)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None or len(grid) != 2:
        raise UnsupportedModelError(f"model {label!r} is not supported: it has no `patch_embed.grid_size`")
    num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
    if num_prefix_tokens < 1 or getattr(model, "has_class_token", True) is False:
        raise UnsupportedModelError(
            f"model {label!r} is not supported: it has no class token whose attention could be read out"
        )
    if getattr(model, "num_classes", None) == 0:
        raise UnsupportedModelError(
            f"model {label!r} is not supported: it has no classification head (num_classes = 0), "
            "so there is no class logit to explain"
        )
    return ModelLayout(
        attn_drops=tuple(attn_drops),
        num_prefix_tokens=num_prefix_tokens,
        grid_size=(int(grid[0]), int(grid[1])),
    )


def check_supported(model: nn.Module, name: str | None = None) -> None:
    """Raise ``UnsupportedModelError`` naming the model unless the core can explain it.

    Called by the model registry right after building a model, so an unusable architecture fails its
    jobs before any image is fetched.
    """
    model_layout(model, name)
