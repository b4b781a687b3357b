"""Which models the compute core can explain, decided from the model's structure, not its name.

A timm model qualifies when its blocks use timm's standard attention pattern: ``blocks[l].attn``
with an ``attn_drop`` module (the hook point: in eval mode its output is the post-softmax
attention) and a ``fused_attn`` flag (so the fused kernel, which never materialises the attention,
can be switched off). That covers timm's ``vision_transformer`` (ViT, CLIP, DINOv2, registers,
FlexiViT, ``*_gap_*``), ``deit`` (DeiT, distilled, DeiT III), ``beit`` (BEiT, BEiT v2; the relative
position bias is added before the softmax, so the hooked map includes it) and ``eva`` (EVA, EVA-02;
the rotary embedding rotates queries and keys before the softmax, likewise) modules, at any input
size. The map must also read out one row: the model's pooling (``model.global_pool``) decides which
(``worker.attention.readout``).

``check_supported`` adds a probe: one forward of a blank image at the model's input size, checking
that each block gives one token-to-token ``N × N`` map with ``N = p + gh · gw``. Attention that
passes the name check but is not over tokens (XCiT's cross-covariance attention is channel to
channel) is refused there, at load time, with the shape it did produce.

A model that is not a timm module can describe itself: ``model.attention_layout()`` returning a
``ModelLayout`` (the ``transformers`` adapter, ``worker.hf_models``, does). Its hook points are then
modules whose output *contains* the attention (``output[output_index]``), seen after the block used it.

Refusals are ``UnsupportedModelError`` (permanent: the job fails with the message), naming the model
and what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.errors import UnsupportedModelError
from worker.attention.readout import Readout

__all__ = ["ModelLayout", "check_supported", "model_layout"]


@dataclass(frozen=True)
class ModelLayout:
    """Where a supported model keeps what the core needs, read once per capture.

    ``attn_drops[l]`` is block ``l``'s hook point: timm's attention dropout, whose output in eval mode
    is the softmax (``output_index`` ``None``), or a module returning a tuple whose ``output_index``-th
    entry is that block's post-softmax attention (``transformers``' attention modules: ``1``).
    ``readout`` follows the model's pooling; ``has_class_token`` says whether token 0 is a class
    token (``cls_attention`` exists only then); ``has_head`` is False for backbones built with
    ``num_classes = 0``, which have no class logit to differentiate.
    """

    attn_drops: tuple[nn.Module, ...]
    num_prefix_tokens: int
    grid_size: tuple[int, int]
    readout: Readout = Readout.TOKEN
    has_class_token: bool = True
    has_head: bool = True
    output_index: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.attn_drops)


def _model_label(model: nn.Module, name: str | None) -> str:
    if name:
        return name
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return architecture or type(model).__name__


def _attention_dropouts(blocks: nn.Sequential | nn.ModuleList, label: str) -> tuple[nn.Module, ...]:
    """Every block's ``attn.attn_drop``, or a refusal naming the first block that lacks the pattern."""
    attn_drops = []
    for index, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.Module):
            raise UnsupportedModelError(
                f"model {label!r} is not supported: block {index} has no `attn` self-attention module"
            )
        attn_drop = getattr(attn, "attn_drop", None)
        if not isinstance(attn_drop, nn.Module):
            raise UnsupportedModelError(
                f"model {label!r} is not supported: block {index} has no `attn.attn_drop` to hook "
                f"({type(attn).__name__} does not apply dropout to its post-softmax attention)"
            )
        if not hasattr(attn, "fused_attn"):
            raise UnsupportedModelError(
                f"model {label!r} is not supported: block {index}'s {type(attn).__name__} has no "
                "`fused_attn` flag, so its attention matrix cannot be made to exist"
            )
        attn_drops.append(attn_drop)
    return tuple(attn_drops)


def _readout(model: nn.Module, label: str, has_class_token: bool) -> Readout:
    """The readout the model's pooling implies, or a refusal that says why there is none."""
    pool = getattr(model, "global_pool", "token")
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError(
            f"model {label!r} is not supported: it pools with attention (global_pool = {pool!r}, as "
            "SigLIP's `map` head), whose own attention over the tokens is computed inside the pool "
            "without an attention-dropout module to hook, so the row its classifier reads is unknown"
        )
    if pool == "token":
        if not has_class_token:
            raise UnsupportedModelError(
                f"model {label!r} is not supported: it pools the class token but has none"
            )
        return Readout.TOKEN
    if pool == "avg":
        if getattr(model, "pool_include_prefix", False):
            raise UnsupportedModelError(
                f"model {label!r} is not supported: its average pooling includes the prefix tokens "
                "(pool_include_prefix), which no readout here follows"
            )
        return Readout.AVG
    raise UnsupportedModelError(
        f"model {label!r} is not supported: global_pool = {pool!r} is not a readout of one row of "
        "the attention (supported: 'token' for the class token, 'avg' for the mean of the patch tokens)"
    )


def _has_attention(model: nn.Module) -> bool:
    """Whether any submodule is an attention layer, by the names timm and torch give them."""
    return any(
        "attn" in name.rsplit(".", 1)[-1].lower() or "attention" in type(module).__name__.lower()
        for name, module in model.named_modules()
    )


def model_layout(model: nn.Module, name: str | None = None) -> ModelLayout:
    """The model's hook points, prefix count, patch grid and readout; ``UnsupportedModelError`` if none.

    Structural only (no forward pass): cheap enough to run on every capture. ``name`` is used in the
    message (default: timm's architecture name, else the class name).
    """
    describe = getattr(model, "attention_layout", None)
    if callable(describe):
        return describe()
    label = _model_label(model, name)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
        if not _has_attention(model):
            raise UnsupportedModelError(
                f"model {label!r} is not supported: it has no transformer `blocks` and no self-attention at "
                "all (a convolutional or MLP network, not a vision transformer)"
            )
        raise UnsupportedModelError(
            f"model {label!r} is not supported: it has no transformer `blocks` of global self-attention "
            "(hierarchical models such as Swin attend within windows, stage by stage)"
        )
    attn_drops = _attention_dropouts(blocks, label)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None or len(grid) != 2:
        raise UnsupportedModelError(f"model {label!r} is not supported: it has no `patch_embed.grid_size`")
    num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
    has_class_token = getattr(model, "cls_token", None) is not None and num_prefix_tokens >= 1
    readout = _readout(model, label, has_class_token)
    return ModelLayout(
        attn_drops=attn_drops,
        num_prefix_tokens=num_prefix_tokens,
        grid_size=(int(grid[0]), int(grid[1])),
        readout=readout,
        has_class_token=has_class_token,
        has_head=int(getattr(model, "num_classes", 0) or 0) > 0,
    )


def _input_size(model: nn.Module, layout: ModelLayout) -> tuple[int, int]:
    """The model's own input height and width: ``patch_embed.img_size``, else grid × patch size."""
    patch_embed = model.patch_embed
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None:
        return int(img_size[0]), int(img_size[1])
    patch = getattr(patch_embed, "patch_size", (1, 1))
    return layout.grid_size[0] * int(patch[0]), layout.grid_size[1] * int(patch[1])


def check_supported(model: nn.Module, name: str | None = None) -> ModelLayout:
    """The layout of a model the core can explain; ``UnsupportedModelError`` naming it otherwise.

    Called by the model registry right after building a model, so an unusable architecture fails its
    jobs before any image is fetched. Beyond ``model_layout`` it runs one probe forward of a blank
    image (no gradients) and checks every block's attention is token-to-token.
    """
    from worker.attention.capture import capture  # capture reads layouts: import it only when probing

    label = _model_label(model, name)
    layout = model_layout(model, label)
    parameter = next(model.parameters())
    height, width = _input_size(model, layout)
    blank = torch.zeros(1, 3, height, width, dtype=parameter.dtype, device=parameter.device)
    try:
        capture(model, blank, gradients=False)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"model {label!r} is not supported: {exc}") from None
    return layout
