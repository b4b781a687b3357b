"""The readout: which row of the rolled-out product is the map, following the model's own pooling.

The rollout family (attention rollout, gradient rollout, relevance) ends in a product ``R`` of
``N × N`` matrices; the map is one row of it, the classifier's view of the tokens. That row follows
how the model turns its tokens into one vector (``model.global_pool``):

- ``token`` (ViT, DeiT, DeiT III, CLIP, DINOv2, FlexiViT): the classifier reads the class token, so
  ``ρ = e_0``.
- ``avg`` (BEiT, EVA/EVA-02, ``*_gap_*`` ViTs; with or without a class token): the classifier
  averages the patch tokens, so ``ρ = (1/P) Σ_{j ≥ p} e_j``.

The map is ``(ρ R)[p:]``. ``ρ R`` is a row vector for either pooling, so it is always evaluated as
vector–matrix products from the left (``O(L·N²)``), never as the full product (``O(L·N³)``).
"""

from __future__ import annotations

import enum

import torch

__all__ = ["Readout", "readout_vector"]


class Readout(enum.StrEnum):
    """How the classifier pools the tokens, and therefore which row of ``R`` a map reads."""

    TOKEN = "token"  # the class token's row
    AVG = "avg"  # the mean of the patch tokens' rows


def readout_vector(
    readout: Readout,
    num_prefix_tokens: int,
    num_tokens: int,
    batch: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``ρ`` for every sample: ``[B, 1, N]``, a row vector that sums to 1.

    ``token`` needs a class token in row 0 (``num_prefix_tokens >= 1``); ``avg`` spreads ``1/P`` over
    the ``P = N - p`` patch positions and nothing over the prefix tokens.
    """
    readout = Readout(readout)
    rho = torch.zeros(batch, 1, num_tokens, dtype=dtype, device=device)
    if readout is Readout.TOKEN:
        if num_prefix_tokens < 1:
            raise ValueError("the class-token readout needs a class token (num_prefix_tokens >= 1)")
        rho[:, :, 0] = 1.0
    else:
        num_patches = num_tokens - num_prefix_tokens
        if num_patches < 1:
            raise ValueError(f"no patch tokens to average: N = {num_tokens}, p = {num_prefix_tokens}")
        rho[:, :, num_prefix_tokens:] = 1.0 / num_patches
    return rho
