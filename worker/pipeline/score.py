"""Score: the faithfulness metrics of a computed micro-batch, right after its explanation.

Runs on the compute thread with the model and the input tensors still on the device
(``worker.metrics.evaluate`` does the batched work). This module only gathers what the metrics need
per job: the maps, the class explained, a seed of the image's own, and the region of a ``bbox`` or
``mask_uri`` column mapped onto the model's input. Nothing here runs unless the batch asked for
metrics (``producer submit --metrics``).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence, Sized
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from common.db.records import MetricRecord
from common.errors import ImageError
from common.fetch import ImageFetcher
from common.metric_settings import MetricFamily, MetricSettings, SanityLayers
from worker.attention import Explanation
from worker.metrics import (
    ImageInputs,
    box_coverage,
    evaluate,
    explanation_maps,
    mask_coverage,
    randomized_copy,
)
from worker.models import LoadedModel
from worker.pipeline.claim import Ticket
from worker.preprocess import decode_image, upright_size

__all__ = ["ScoreProgress", "image_seed", "region_coverage", "score"]

# (what is being scored, work done, work in all) as a micro-batch's metrics are computed: scoring can
# take minutes per micro-batch, and a progress bar that counts only finished jobs would stand still.
ScoreProgress = Callable[[str, int, int], None]

# The sanity check's re-initialized copies, one per warm model: building one costs a model copy.
_RANDOMIZED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int, SanityLayers], nn.Module]] = (
    weakref.WeakKeyDictionary()
)


def image_seed(sha256: str, seed: int) -> int:
    """The seed of an image's random map: from its content and the batch's seed, so the same image
    gets the same random baseline in any batch, on any worker, in any micro-batch."""
    return (int(sha256[:15], 16) + seed) % (2**63)


def region_coverage(
    fetcher: ImageFetcher, max_image_pixels: int, loaded: LoadedModel, ticket: Ticket, image: bytes
) -> np.ndarray | None:
    """``[gh, gw]`` share of each patch inside the job's box or mask, or ``None`` without one.

    Runs on the fetch pool, next to the image's own preprocessing. An unreadable mask fails the job
    like an unreadable image: the user asked for a localization score that cannot be computed.
    """
    if not ticket.metrics.wants(MetricFamily.LOCALIZATION) or not (ticket.bbox or ticket.mask_uri):
        return None
    image_size = upright_size(image)  # the full-resolution size, whatever scale the image decodes at
    preprocessor = loaded.preprocessor
    grid = tuple(int(g) for g in cast(Any, loaded.model.patch_embed).grid_size)
    if ticket.bbox:
        x0, y0, x1, y1 = (float(v) for v in ticket.bbox.split(","))
        mapped = preprocessor.map_box((x0, y0, x1, y1), image_size)
        return box_coverage(mapped, preprocessor.input_size, (grid[0], grid[1]))
    assert ticket.mask_uri is not None
    try:
        # The fetcher's errors name the URI already, and keep their class: a mask refused by the
        # file or S3 policy fails the job with ImageFetchRefusedError, exactly as an image would.
        data = fetcher.fetch(ticket.mask_uri)
    except ImageError as exc:
        raise type(exc)(f"mask_uri: {exc}") from exc
    try:
        mask = decode_image(data, max_pixels=max_image_pixels)
    except ImageError as exc:
        raise type(exc)(f"mask {ticket.mask_uri}: {exc}") from exc
    if mask.size != image_size:
        raise ImageError(
            f"mask {ticket.mask_uri} is {mask.size[0]}×{mask.size[1]}, the image {image_size[0]}×{image_size[1]}"
        )
    return mask_coverage(preprocessor.crop_mask(mask), (grid[0], grid[1]))


def _randomized(model: nn.Module, blocks: int, seed: int, layers: SanityLayers) -> nn.Module:
    copies = _RANDOMIZED.setdefault(model, {})
    if (blocks, seed, layers) not in copies:
        copies.clear()  # one copy per model: a worker rarely changes the sanity settings
        copies[blocks, seed, layers] = randomized_copy(model, blocks, seed, layers)
    return copies[blocks, seed, layers]


def score(
    loaded: LoadedModel,
    images: torch.Tensor,
    tickets: Sequence[Ticket],
    sha256s: Sequence[str],
    coverages: Sequence[np.ndarray | None],
    explanations: Sequence[Explanation],
    *,
    autocast_dtype: torch.dtype | None,
    on_progress: ScoreProgress | None,
) -> list[list[MetricRecord]]:
    """The metric values of each job of the micro-batch (empty lists when metrics are off)."""
    settings: MetricSettings = tickets[0].metrics
    if not settings.enabled:
        return [[] for _ in tickets]
    inputs = [
        ImageInputs(
            maps=explanation_maps(explanation),
            target=getattr(explanation, "target", None),
            seed=image_seed(sha256, settings.seed),
            coverage=coverage,
        )
        for explanation, sha256, coverage in zip(explanations, sha256s, coverages, strict=True)
    ]
    randomized = None
    if settings.wants(MetricFamily.SANITY):
        depth = len(cast(Sized, loaded.model.blocks))
        wanted = math.ceil(depth / 2) if settings.sanity_blocks is None else settings.sanity_blocks
        blocks = min(wanted, depth)
        randomized = _randomized(loaded.model, blocks, settings.seed, settings.sanity_layers)
    values = evaluate(
        loaded.model,
        images,
        inputs,
        settings,
        method_settings=tickets[0].settings,
        randomized=randomized,
        autocast_dtype=autocast_dtype,
        on_progress=on_progress,
    )
    return [[MetricRecord(v.method, v.metric.value, v.value) for v in image] for image in values]
