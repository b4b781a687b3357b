"""Prepare: fetch, hash, decode and crop one image in a fetch thread; resolve its target.

Decoding runs here, not in the CPU pool: Pillow and the compiled resize release the GIL, so the
fetch threads use the cores the pool leaves (``Preparing.decode_slots``: one image per such core at a
time, while downloads overlap freely), and sending the file to a pool process and the crop back
cost the driving process more CPU than the GIL-held part of decoding (2 cores: 59.9 → 63.7
images/s, ``bench/bench_pipeline.py``).

The crop is all that travels on: the model's input is made from it on the device, for a whole
micro-batch at once (``Preprocessor.normalize_batch``), and the overlays are drawn on it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import cast

import numpy as np

from common.errors import InvalidTargetError
from common.fetch import ImageFetcher, content_sha256
from worker.labels import resolve_target
from worker.models import LoadedModel
from worker.pipeline.claim import Ticket
from worker.pipeline.clock import StageClock
from worker.pipeline.cpu import decode_and_crop
from worker.pipeline.score import region_coverage

__all__ = ["Prepared", "Preparing", "prepare"]


@dataclass
class Prepared:
    """One image ready to compute: the crop the model sees (``uint8 [H, W, 3]``) and its target."""

    ticket: Ticket
    sha256: str
    crop: np.ndarray
    target_index: int | None
    fetch_seconds: float
    coverage: np.ndarray | None = None  # [gh, gw] share of each patch in the job's box or mask


@dataclass(frozen=True)
class Preparing:
    """What preparing uses: the fetcher, the decode slots (``Runtime.decode_slots``), the stage clock
    and the size limit of a decoded image."""

    fetcher: ImageFetcher
    decode_slots: threading.Semaphore
    clock: StageClock
    max_image_pixels: int


def prepare(preparing: Preparing, loaded: LoadedModel, ticket: Ticket) -> Prepared:
    """Fetch, hash, decode and crop one image; resolve its target. Runs on the fetch pool."""
    start = time.perf_counter()
    with preparing.clock.measure("fetch+decode"):
        data = preparing.fetcher.fetch(ticket.image_uri)
        sha256 = content_sha256(data)
    with preparing.decode_slots:  # downloads overlap freely; decoding takes one of the cores
        decoded = decode_and_crop(data, loaded.preprocessor, preparing.max_image_pixels)
    preparing.clock.add(decoded.seconds)
    coverage = region_coverage(preparing.fetcher, preparing.max_image_pixels, loaded, ticket, data)
    return Prepared(
        ticket=ticket,
        sha256=sha256,
        crop=decoded.crop,
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
    return resolve_target(ticket.target, loaded.labels, cast(int, loaded.model.num_classes))
