"""Every array artifact of a batch of images from one forward and one backward pass.

This is the core's front door for the pipeline: ``explain`` turns a preprocessed batch into one
``Explanation`` per image (numpy, on the CPU, ready to be written), and ``explain_in_batches`` splits
a larger batch so a worker survives a GPU that is smaller than its configured batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.artifacts import ARRAY_ARTIFACTS
from common.methods import MethodSettings
from worker.attention.capture import capture
from worker.attention.layer_maps import cls_attention, layer_scores
from worker.attention.prediction import top_k
from worker.attention.readout import Readout
from worker.attention.relevance import gradient_relevance
from worker.attention.rollout import attention_rollout, gradient_rollout
from worker.attention.support import model_layout
from worker.memory import in_fitting_batches

__all__ = ["Explanation", "explain", "explain_in_batches"]


@dataclass
class Explanation:
    """The array artifacts of one image (``docs/methods.md`` 1–7), as numpy arrays on the CPU.

    Field names are the artifact file names without ``.npy``; ``attention`` is ``None`` unless
    ``MethodSettings.raw_attention`` asked for it. ``target`` is the class the gradient maps explain.
    ``readout`` is the row the rollout maps read (``Readout``). A backbone without a head has no
    prediction, target, gradient rollout or relevance (``None``); a model without a class token has
    no ``cls_attention``.
    """

    readout: Readout
    layer_scores: np.ndarray  # [L, gh, gw] float32
    rollout: np.ndarray  # [gh, gw] float32
    top_indices: np.ndarray | None = None  # [k] int64
    top_probs: np.ndarray | None = None  # [k] float32
    target: int | None = None
    cls_attention: np.ndarray | None = None  # [L, H, gh, gw] float32
    grad_rollout: np.ndarray | None = None  # [gh, gw] float32
    relevance: np.ndarray | None = None  # [gh, gw] float32
    attention: np.ndarray | None = None  # [L, H, N, N] float16

    @property
    def has_head(self) -> bool:
        """False for a headless backbone: class-agnostic artifacts only."""
        return self.target is not None

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays keyed by their file names in ``common.artifacts.ARRAY_ARTIFACTS``, present ones only."""
        arrays = {name: getattr(self, name.removesuffix(".npy")) for name in ARRAY_ARTIFACTS}
        return {name: array for name, array in arrays.items() if array is not None}


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _rows(tensor: torch.Tensor | None) -> list[np.ndarray] | None:
    """Per-sample numpy rows of a batched tensor, or ``None`` when the artifact is absent."""
    return list(_numpy(tensor)) if tensor is not None else None


def explain(
    model: nn.Module,
    images: torch.Tensor,
    settings: MethodSettings,
    targets: Sequence[int | None] | None = None,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> list[Explanation]:
    """One ``Explanation`` per image of ``images`` ``[B, 3, H, W]``, in order.

    Runs exactly one forward and one backward pass for the whole batch; every artifact is computed
    from that single capture. ``targets[b]`` (``None`` = top-1) selects the class of the gradient maps.
    A headless backbone runs the forward only and gets the class-agnostic artifacts.
    """
    has_head = model_layout(model).has_head
    result = capture(model, images, targets, gradients=has_head, autocast_dtype=autocast_dtype)
    attentions, gradients = result.attentions, result.gradients
    p, grid, readout = result.num_prefix_tokens, result.grid_size, result.readout
    B = attentions.shape[1]
    scores = layer_scores(attentions, p, grid, settings.layer_score_reduction)
    rolled = attention_rollout(
        attentions,
        p,
        grid,
        head_fusion=settings.head_fusion,
        discard_ratio=settings.discard_ratio,
        readout=readout,
    )
    cls_maps = cls_attention(attentions, p, grid) if result.has_class_token else None
    probs = indices = grad_rolled = relevance = None
    if result.logits is not None and gradients is not None:
        probs, indices = top_k(result.logits, settings.top_k)
        grad_rolled = gradient_rollout(
            attentions, gradients, p, grid, discard_ratio=settings.discard_ratio, readout=readout
        )
        relevance = gradient_relevance(attentions, gradients, p, grid, readout=readout)
    raw = _numpy(attentions.transpose(0, 1).half()) if settings.raw_attention else None
    targets_np = _numpy(result.targets) if result.targets is not None else None
    columns = {
        "top_probs": _rows(probs),
        "top_indices": _rows(indices),
        "cls_attention": _rows(cls_maps),
        "grad_rollout": _rows(grad_rolled),
        "relevance": _rows(relevance),
    }
    scores_np, rolled_np = _numpy(scores), _numpy(rolled)
    return [
        Explanation(
            readout=readout,
            layer_scores=scores_np[b],
            rollout=rolled_np[b],
            target=int(targets_np[b]) if targets_np is not None else None,
            attention=raw[b] if raw is not None else None,
            **{name: rows[b] if rows is not None else None for name, rows in columns.items()},
        )
        for b in range(B)
    ]


def explain_in_batches(
    model: nn.Module,
    images: torch.Tensor,
    settings: MethodSettings,
    targets: Sequence[int | None] | None = None,
    *,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
) -> list[Explanation]:
    """``explain`` over micro-batches of at most ``batch_size`` images; the same results, in order.

    On ``torch.OutOfMemoryError`` the micro-batch is halved and retried, and the smaller size kept for
    the rest of the images (``worker.memory.in_fitting_batches``). At one image the error is
    re-raised: that input cannot be explained on this device.
    """
    total = len(images)
    if targets is not None and len(targets) != total:
        raise ValueError(f"got {len(targets)} targets for {total} images")

    def run(start: int, stop: int) -> list[Explanation]:
        chunk_targets = targets[start:stop] if targets is not None else None
        return explain(model, images[start:stop], settings, chunk_targets, autocast_dtype=autocast_dtype)

    device = next(model.parameters()).device
    batches = in_fitting_batches(total, run, batch_size=batch_size, device=device)
    return [explanation for batch in batches for explanation in batch]
