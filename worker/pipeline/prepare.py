"""Prepare: fetch, hash, decode and preprocess one image, and resolve its target class."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import InvalidTargetError
from common.fetch import content_sha256
from worker.labels import resolve_target
from worker.models import LoadedModel
from worker.pipeline.claim import Ticket
from worker.pipeline.runtime import Runtime
from worker.pipeline.score import region_coverage
from worker.preprocess import decode_image

__all__ = ["Prepared", "prepare"]


@dataclass
class Prepared:
    """One image ready to compute: the model input, the crop the overlays are drawn on."""

    ticket: Ticket
    sha256: str
    tensor: torch.Tensor
    crop: np.ndarray
    target_index: int | None
    fetch_seconds: float
    coverage: np.ndarray | None = None  # [gh, gw] share of each patch in the job's box or mask


def prepare(runtime: Runtime, loaded: LoadedModel, ticket: Ticket) -> Prepared:
    """Fetch, hash, decode and preprocess one image; resolve its target. Runs on the fetch pool."""
    start = time.perf_counter()
    data = runtime.fetcher.fetch(ticket.image_uri)
    image = decode_image(data, max_pixels=runtime.settings.max_image_pixels)
    cropped = loaded.preprocessor.crop(image)
    coverage = region_coverage(runtime, loaded, ticket, image.size)
    return Prepared(
        ticket=ticket,
        sha256=content_sha256(data),
        tensor=loaded.preprocessor.normalize(cropped),
        crop=np.array(cropped, dtype=np.uint8),
        target_index=_target_index(loaded, ticket),
        fetch_seconds=time.perf_counter() - start,
        coverage=coverage,
    )


def _target_index(loaded: LoadedModel, ticket: Ticket) -> int | None:
    """The class the job's gradient maps explain; a backbone without a head has none to explain."""
    if not loaded.layout.has_head:
        if ticket.target is not None and str(ticket.target).strip():
            raise InvalidTargetError(
                f"target {ticket.target!r}: model {ticket.model!r} has no classification head "
                "(num_classes = 0), so no class can be explained; leave the target empty or give the "
                "model a head in a models file (num_classes and a checkpoint)"
            )
        return None
    return resolve_target(ticket.target, loaded.labels, loaded.model.num_classes)
