"""One forward and one backward pass that record every block's attention ``A_l`` and its gradient ``G_l``.

``docs/methods.md`` "Capturing the attention and its gradient": timm's fused attention never materialises the
attention matrix, so ``fused_attn`` is switched off on every module that has it; a forward hook on
``blocks[l].attn.attn_drop`` then sees the post-softmax attention (dropout is the identity in eval
mode). ``G_l = ∂ Σ_b y[b, t_b] / ∂ A_l`` comes from ``torch.autograd.grad`` on the captured tensors,
which returns them in layer order and never touches parameter ``.grad``. Module backward hooks are
avoided on purpose: they fire in reverse order and the deprecated one returns the wrong gradient.

A model that describes its own layout (``worker.hf_models``' ``transformers`` adapter) is hooked on
the modules it names, whose output tuple holds the attention (``ModelLayout.output_index``): those
hooks fire after the block has used the map, too late to make it a graph leaf, so for a frozen model
the input is made to require grad instead, which puts every map on the graph.

A backbone without a head (``num_classes = 0``, e.g. DINOv2 or a CLIP image tower) has no class
logit: it is captured without gradients, and ``logits``/``targets`` are ``None``.

What ``capture`` changes on the model: it is put in eval mode (and left there: explaining is
inference); ``fused_attn`` flags are restored afterwards so other users of a cached model keep the
fast kernel; hooks are always removed, also when the forward raises. Two threads must not capture
with the same model instance at the same time (the hooks are per instance).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from common.errors import InvalidTargetError, UnsupportedModelError
from worker.attention.readout import Readout
from worker.attention.support import ModelLayout, model_layout
from worker.device import autocast

__all__ = ["Capture", "capture"]


@dataclass
class Capture:
    """Everything one pass produces, detached, on the model's device.

    ``logits`` ``[B, C]`` float32 (``None`` for a headless backbone); ``attentions``
    ``[L, B, H, N, N]`` float32 post-softmax ``A_l``; ``gradients`` ``[L, B, H, N, N]`` float32
    ``∂ y[b, t_b] / ∂ A_l`` or ``None`` when not requested; ``targets`` ``[B]`` int64 (the given
    class, else the top-1; ``None`` without a head); ``N = p + gh · gw``. ``readout`` and
    ``has_class_token`` come from the model's layout (``worker.attention.support``).
    """

    logits: torch.Tensor | None
    attentions: torch.Tensor
    gradients: torch.Tensor | None
    targets: torch.Tensor | None
    num_prefix_tokens: int
    grid_size: tuple[int, int]
    readout: Readout = Readout.TOKEN
    has_class_token: bool = True


@contextlib.contextmanager
def _unfused_attention(model: nn.Module) -> Iterator[None]:
    """Switch timm's fused attention off on this instance and restore every flag afterwards."""
    previous = {module: module.fused_attn for module in model.modules() if hasattr(module, "fused_attn")}
    try:
        for module in previous:
            cast(Any, module).fused_attn = False
        yield
    finally:
        for module, flag in previous.items():
            module.fused_attn = flag


@contextlib.contextmanager
def _attention_hooks(layout: ModelLayout, maps: list[list[torch.Tensor]], track: bool) -> Iterator[None]:
    """Append each block's post-softmax attention to ``maps[l]``; hooks removed on any exit.

    With ``track``, a map that does not require grad (a frozen model) is made a graph leaf, so the
    gradient of the target logit still flows back to it through the later blocks.
    """

    def hook_for(layer: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            attention = output if layout.output_index is None else output[layout.output_index]
            if attention is None:  # a transformers model not in eager attention returns no weights
                return
            if track and not attention.requires_grad and layout.output_index is None:
                attention.requires_grad_(True)
            maps[layer].append(attention)

        return hook

    handles = [
        attn_drop.register_forward_hook(hook_for(layer)) for layer, attn_drop in enumerate(layout.attn_drops)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _resolve_targets(targets: Sequence[int | None] | None, logits: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64 class per sample: the given one, or the top-1 where ``None``."""
    B, C = logits.shape
    top1 = logits.argmax(dim=1)
    if targets is None:
        return top1
    if len(targets) != B:
        raise ValueError(f"got {len(targets)} targets for a batch of {B} images")
    resolved = []
    for b, target in enumerate(targets):
        if target is None:
            resolved.append(int(top1[b]))
            continue
        if not 0 <= int(target) < C:
            raise InvalidTargetError(f"target class {target} is out of range for a model with {C} classes")
        resolved.append(int(target))
    return torch.tensor(resolved, dtype=torch.int64, device=logits.device)


def _stack_maps(maps: list[list[torch.Tensor]], layout: ModelLayout, batch: int) -> list[torch.Tensor]:
    """The one map per layer, checked against the model's token layout ``N = p + gh · gw``."""
    counts = [len(layer_maps) for layer_maps in maps]
    if counts != [1] * layout.num_layers:
        raise UnsupportedModelError(
            f"expected one attention map from each of {layout.num_layers} blocks, got {counts}: "
            "the model's attention does not go through `attn.attn_drop` (or, for a transformers model, its "
            "attention modules return no attention weights: load it with attn_implementation='eager')"
        )
    gh, gw = layout.grid_size
    N = layout.num_prefix_tokens + gh * gw
    for layer, (attention,) in enumerate(maps):
        if attention.ndim != 4 or attention.shape[0] != batch or attention.shape[-2:] != (N, N):
            raise UnsupportedModelError(
                f"block {layer} attention has shape {tuple(attention.shape)}, expected [{batch}, H, {N}, {N}] "
                f"for {layout.num_prefix_tokens} prefix tokens and a {gh}×{gw} grid: its attention is not "
                "token-to-token self-attention over all tokens (as XCiT's cross-covariance attention)"
            )
    return [layer_maps[0] for layer_maps in maps]


def capture(
    model: nn.Module,
    images: torch.Tensor,
    targets: Sequence[int | None] | None = None,
    *,
    gradients: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> Capture:
    """Run ``images`` ``[B, 3, H, W]`` through ``model`` once and return its attention (and gradients).

    ``targets[b]`` is the class whose logit is differentiated for sample ``b`` (``None`` = top-1).
    With ``gradients=False`` no graph is built and no backward runs. With ``autocast_dtype`` the
    forward and backward run under ``torch.autocast`` on the model's device type; the captured maps
    are returned in float32 either way. Works inside ``torch.no_grad()`` and ``torch.inference_mode()``.
    Images are moved to the model's device and parameter dtype. A headless backbone
    (``num_classes = 0``) has no logit to differentiate: ``gradients=True`` is a ``ValueError`` and a
    given target an ``InvalidTargetError``.
    """
    layout = model_layout(model)
    if not layout.has_head:
        if gradients:
            raise ValueError(
                "the model has no classification head (num_classes = 0): capture without gradients"
            )
        if targets is not None and any(target is not None for target in targets):
            raise InvalidTargetError(
                "the model has no classification head (num_classes = 0), so no target class can be explained"
            )
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [B, C, H, W] batch, got shape {tuple(images.shape)}")
    parameter = next(model.parameters())
    model.eval()
    maps: list[list[torch.Tensor]] = [[] for _ in range(layout.num_layers)]
    grad_mode = torch.enable_grad() if gradients else torch.no_grad()
    with (
        torch.inference_mode(False),
        grad_mode,
        _unfused_attention(model),
        _attention_hooks(layout, maps, track=gradients),
        autocast(parameter.device, autocast_dtype),
    ):
        # Inference tensors (made under a caller's inference_mode) cannot enter an autograd graph.
        inputs = images.clone() if images.is_inference() else images
        inputs = inputs.to(device=parameter.device, dtype=parameter.dtype)
        if gradients and layout.output_index is not None and not inputs.requires_grad:
            inputs = inputs.detach().requires_grad_(True)
        output = model(inputs)
        if not isinstance(output, torch.Tensor) or output.ndim != 2:
            raise UnsupportedModelError("the model's forward must return [B, C] logits (or [B, D] features)")
        attentions = _stack_maps(maps, layout, batch=inputs.shape[0])
        logits = output if layout.has_head else None
        resolved = _resolve_targets(targets, logits) if logits is not None else None
        grads = None
        if gradients and logits is not None and resolved is not None:
            score = logits.float().gather(1, resolved[:, None]).sum()
            grads = torch.autograd.grad(score, attentions, allow_unused=True, materialize_grads=True)
    return Capture(
        logits=logits.detach().float() if logits is not None else None,
        attentions=torch.stack([attention.detach().float() for attention in attentions]),
        gradients=torch.stack([grad.float() for grad in grads]) if grads is not None else None,
        targets=resolved,
        num_prefix_tokens=layout.num_prefix_tokens,
        grid_size=layout.grid_size,
        readout=layout.readout,
        has_class_token=layout.has_class_token,
    )
