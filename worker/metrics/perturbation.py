"""Deletion and insertion curves (Petsiuk et al., 2018, "RISE"), batched over images × maps × steps.

A map over ``P`` patches ranks them most-important-first; equal values are ordered by a seeded
random permutation, so a flat map is exactly as good as a random order (a stable sort would instead
walk the grid row by row). Step ``s`` of ``S`` touches the first ``k_s = round(s · P / S)`` patches:

- **deletion** starts from the image and replaces the touched patches with the deletion canvas;
- **insertion** starts from the insertion canvas and pastes the image's touched patches onto it.

The target class's softmax probability after every step gives a curve ``p_0 … p_S`` over
``x_s = k_s / P``; its area (trapezoid rule) is the score. Deletion: lower is better (the evidence
goes first, so the probability falls fast). Insertion: higher is better.

Cost: per image, ``2 · M · (S − 1)`` perturbed images for ``M`` maps plus three shared by every map
(the image itself, the fully deleted image, the bare insertion canvas), each one no-grad forward,
run in chunks of at most ``max_batch`` images (halved while they do not fit the device).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import functional as TF

from common.metric_settings import Baseline
from worker.device import autocast
from worker.memory import in_fitting_batches

__all__ = [
    "PerturbationCurves",
    "canvas",
    "default_blur_sigma",
    "patch_ranks",
    "perturbation_curves",
    "rise_kernel",
    "step_counts",
]

# RISE blurs 224-pixel inputs with a Gaussian of sigma 5 px; the ``blur`` canvas scales it with the side.
_RISE_SIGMA, _RISE_SIDE = 5.0, 224
# RISE's released code (eclique/RISE, evaluation.py: ``klen = 11; ksig = 5``): the kernel is
# ``scipy.ndimage.gaussian_filter`` of an 11 × 11 unit impulse, whose default truncation (4σ, a
# 41-tap filter) and ``reflect`` mode fold the Gaussian's tails back into the 11 × 11 window.
_RISE_KERNEL_SIZE, _SCIPY_TRUNCATE = 11, 4.0


@dataclass
class PerturbationCurves:
    """``deletion`` / ``insertion`` ``[B, M, S + 1]`` probabilities, their ``*_auc`` ``[B, M]``, and
    ``fractions`` ``[S + 1]``, the share of patches touched at each step (the curves' x axis).
    A family that was not asked for is ``None``."""

    fractions: torch.Tensor
    deletion: torch.Tensor | None
    insertion: torch.Tensor | None
    deletion_auc: torch.Tensor | None
    insertion_auc: torch.Tensor | None


def step_counts(num_patches: int, steps: int) -> list[int]:
    """``k_s = round(s · P / S)`` for ``s = 0 … S`` (halves round up), with ``S`` capped at ``P``."""
    steps = min(steps, num_patches)
    return [(s * num_patches * 2 + steps) // (2 * steps) for s in range(steps + 1)]


def patch_ranks(maps: torch.Tensor, tie_breaks: torch.Tensor) -> torch.Tensor:
    """Each patch's position in the most-important-first order: ``[B, M, P]`` maps -> ``[B, M, P]`` int64.

    ``tie_breaks`` ``[B, P]`` is a permutation of the patches per image; equal values keep its order.
    """
    B, M, P = maps.shape
    perm = tie_breaks[:, None, :].expand(B, M, P)
    order = perm.gather(-1, torch.argsort(-maps.gather(-1, perm), dim=-1, stable=True))
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(P, device=maps.device).expand(B, M, P).contiguous())
    return ranks


def default_blur_sigma(side: int) -> float:
    return _RISE_SIGMA * side / _RISE_SIDE


def rise_kernel() -> torch.Tensor:
    """RISE's blur kernel ``[11, 11]`` float32: ``gaussian_filter(impulse, 5)`` on an 11 × 11 grid.

    Separable: each axis is the 41-tap Gaussian of σ = 5 (``exp(−i²/2σ²)`` for ``|i| ≤ 20``, summing
    to 1) applied to a unit impulse at index 5 with half-sample reflection at the window's edges
    (``d c b a | a b c d | d c b a``), so the taps that fall outside fold back in and the kernel
    still sums to 1, flatter than a Gaussian cut at the window would be.
    """
    radius = int(_SCIPY_TRUNCATE * _RISE_SIGMA + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * offsets**2 / _RISE_SIGMA**2)
    weights /= weights.sum()
    size, centre = _RISE_KERNEL_SIZE, _RISE_KERNEL_SIZE // 2
    axis = np.zeros(size)
    for x in range(size):
        source = (x + offsets) % (2 * size)  # reflection repeats every 2 · size
        source = np.where(source >= size, 2 * size - 1 - source, source)
        axis[x] = weights[source == centre].sum()
    return torch.from_numpy(np.outer(axis, axis).astype(np.float32))


def canvas(images: torch.Tensor, baseline: Baseline, blur_sigma: float | None = None) -> torch.Tensor:
    """The picture patches are replaced with (deletion) or pasted onto (insertion), ``[B, 3, H, W]``.

    ``mean``: zeros, the dataset mean once normalized. ``blur``: the normalized image blurred with a
    Gaussian of ``blur_sigma`` pixels (blurring commutes with the per-channel normalization), kernel
    ``2 · ceil(3σ) + 1`` capped below the image side, reflect padding (torchvision's
    ``gaussian_blur``). ``rise_blur``: RISE's canvas, ``conv2d`` of the normalized image with
    ``rise_kernel()`` per channel and zero padding (so the border darkens towards the mean colour),
    at any input size; ``blur_sigma`` does not apply.
    """
    if baseline is Baseline.MEAN:
        return torch.zeros_like(images)
    if baseline is Baseline.RISE_BLUR:
        C = images.shape[1]
        kernel = rise_kernel().to(device=images.device, dtype=images.dtype)
        weight = kernel.expand(C, 1, *kernel.shape).contiguous()
        return F.conv2d(images, weight, padding=_RISE_KERNEL_SIZE // 2, groups=C)
    H, W = images.shape[-2:]
    sigma = blur_sigma if blur_sigma is not None else default_blur_sigma(min(H, W))
    size = min(2 * math.ceil(3 * sigma) + 1, 2 * ((min(H, W) - 1) // 2) + 1)
    return TF.gaussian_blur(images, [size, size], [sigma, sigma])


def _target_probs(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, autocast_dtype: torch.dtype | None
) -> torch.Tensor:
    parameter = next(model.parameters())
    with torch.no_grad(), autocast(parameter.device, autocast_dtype):
        logits = model(images.to(dtype=parameter.dtype))
    return logits.float().softmax(dim=-1).gather(1, targets[:, None])[:, 0]


def perturbation_curves(
    model: nn.Module,
    images: torch.Tensor,
    targets: Sequence[int],
    maps: torch.Tensor,
    tie_breaks: torch.Tensor,
    *,
    steps: int,
    deletion_canvas: torch.Tensor,
    insertion_canvas: torch.Tensor,
    deletion: bool = True,
    insertion: bool = True,
    max_batch: int = 256,
    autocast_dtype: torch.dtype | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> PerturbationCurves:
    """Deletion and insertion curves of ``maps`` ``[B, M, gh, gw]`` for ``images`` ``[B, 3, H, W]``.

    ``targets[b]`` is the class whose probability is followed; ``tie_breaks`` ``[B, P]`` orders equal
    map values; the canvases are ``[B, 3, H, W]`` (see ``canvas``). Everything runs on ``images``'
    device, which must be the model's. ``on_progress(done, total)`` follows the forward passes, one
    call per chunk of ``max_batch`` perturbed images.

    Three steps: list every perturbed image as a request (``_requests``), run the model over them in
    chunks that fit the device (``_probabilities``), and assemble the requests' probabilities into
    curves (``_curves``).
    """
    B, M, gh, gw = maps.shape
    P = gh * gw
    counts = step_counts(P, steps)
    ranks = patch_ranks(maps.reshape(B, M, P).float(), tie_breaks.to(images.device)).reshape(B * M, P)
    requests = _requests(B, M, counts, deletion=deletion, insertion=insertion, device=images.device)
    canvases = torch.stack([deletion_canvas, insertion_canvas]).to(device=images.device, dtype=images.dtype)
    target = torch.as_tensor(list(targets), dtype=torch.int64, device=images.device)
    probs = _probabilities(
        model,
        images,
        canvases,
        ranks.reshape(B * M, gh, gw),
        requests,
        target,
        max_batch=max_batch,
        autocast_dtype=autocast_dtype,
        on_progress=on_progress,
    )
    return _curves(probs, B, M, counts, deletion=deletion, insertion=insertion)


@dataclass(frozen=True)
class _Requests:
    """Every perturbed image to run, as parallel ``[R]`` int64 rows: its image, its canvas (0 =
    deletion, 1 = insertion), its row of patch ranks (image × map) and ``k``, the patches touched.

    The first ``3 · B`` are shared by every map: each image itself, fully deleted, and the bare
    insertion canvas; then the interior deletion steps, then the interior insertion steps.
    """

    image: torch.Tensor
    canvas: torch.Tensor
    row: torch.Tensor
    k: torch.Tensor

    def __len__(self) -> int:
        return len(self.image)


def _requests(
    num_images: int,
    num_maps: int,
    counts: list[int],
    *,
    deletion: bool,
    insertion: bool,
    device: torch.device,
) -> _Requests:
    """The perturbed images ``perturbation_curves`` needs, in the order ``_curves`` reads them."""
    B, M, P, S = num_images, num_maps, counts[-1], len(counts) - 1
    parts: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
    b_all = torch.arange(B, device=device)
    first_row = b_all * M
    parts.append((b_all, 0, first_row, torch.zeros_like(b_all)))  # the image itself
    parts.append((b_all, 0, first_row, torch.full_like(b_all, P)))  # everything deleted
    parts.append((b_all, 1, first_row, torch.zeros_like(b_all)))  # the bare insertion canvas
    interior = torch.tensor(counts[1:S], dtype=torch.int64, device=device)
    grid_b, grid_m, grid_k = torch.meshgrid(b_all, torch.arange(M, device=device), interior, indexing="ij")
    for which, wanted in ((0, deletion), (1, insertion)):
        if wanted and S > 1:
            parts.append((grid_b.flatten(), which, (grid_b * M + grid_m).flatten(), grid_k.flatten()))
    return _Requests(
        image=torch.cat([b for b, _, _, _ in parts]),
        canvas=torch.cat([torch.full_like(b, which) for b, which, _, _ in parts]),
        row=torch.cat([row for _, _, row, _ in parts]),
        k=torch.cat([k for _, _, _, k in parts]),
    )


def _probabilities(
    model: nn.Module,
    images: torch.Tensor,
    canvases: torch.Tensor,
    ranks: torch.Tensor,
    requests: _Requests,
    target: torch.Tensor,
    *,
    max_batch: int,
    autocast_dtype: torch.dtype | None,
    on_progress: Callable[[int, int], None] | None,
) -> torch.Tensor:
    """The target class's probability ``[R]`` for every request, in chunks of at most ``max_batch``
    perturbed images (halved while they do not fit the device). ``ranks`` is ``[B · M, gh, gw]``.

    A patch comes from the image when ``rank >= k`` for deletion (not removed yet) and ``rank < k``
    for insertion (revealed); every other patch from the request's canvas.
    """
    H, W = images.shape[-2:]

    def run(start: int, stop: int) -> torch.Tensor:
        sl = slice(start, stop)
        image, which = requests.image[sl], requests.canvas[sl]
        keep = (ranks[requests.row[sl]] >= requests.k[sl, None, None]) ^ (which[:, None, None] == 1)
        pixels = F.interpolate(keep[:, None].float(), size=(H, W), mode="nearest") > 0.5
        perturbed = torch.where(pixels, images[image], canvases[which, image])
        return _target_probs(model, perturbed, target[image], autocast_dtype)

    def done(stop: int) -> None:
        if on_progress is not None:
            on_progress(stop, len(requests))

    chunks = in_fitting_batches(
        len(requests), run, batch_size=max(1, max_batch), device=images.device, on_done=done
    )
    return torch.cat(chunks) if chunks else torch.empty(0, device=images.device)


def _curves(
    probs: torch.Tensor, num_images: int, num_maps: int, counts: list[int], *, deletion: bool, insertion: bool
) -> PerturbationCurves:
    """The requests' probabilities (in ``_requests``' order) as curves over the share of patches
    touched, with their areas (trapezoid rule)."""
    B, M, P, S = num_images, num_maps, counts[-1], len(counts) - 1
    device = probs.device
    original, deleted, bare = probs[:B], probs[B : 2 * B], probs[2 * B : 3 * B]
    offset = 3 * B
    fractions = torch.tensor(counts, dtype=torch.float32, device=device) / P
    curves: dict[str, torch.Tensor | None] = {"deletion": None, "insertion": None}
    for name, wanted, first, last in (
        ("deletion", deletion, original, deleted),
        ("insertion", insertion, bare, original),
    ):
        if not wanted:
            continue
        curve = torch.empty(B, M, S + 1, device=device)
        curve[:, :, 0] = first[:, None]
        curve[:, :, S] = last[:, None]
        if S > 1:
            count = B * M * (S - 1)
            curve[:, :, 1:S] = probs[offset : offset + count].reshape(B, M, S - 1)
            offset += count
        curves[name] = curve

    def auc(curve: torch.Tensor | None) -> torch.Tensor | None:
        return None if curve is None else torch.trapezoid(curve, x=fractions, dim=-1)

    return PerturbationCurves(
        fractions=fractions,
        deletion=curves["deletion"],
        insertion=curves["insertion"],
        deletion_auc=auc(curves["deletion"]),
        insertion_auc=auc(curves["insertion"]),
    )
