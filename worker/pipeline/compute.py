"""Compute: one forward + backward pass for a micro-batch; a failing batch is split to find the culprit."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future

import torch

from common.db.records import JobOutcome
from worker.attention import explain_in_batches
from worker.models import LoadedModel
from worker.pipeline.claim import Ticket
from worker.pipeline.prepare import Prepared
from worker.pipeline.record import Recorder
from worker.pipeline.score import score
from worker.pipeline.store import store

__all__ = ["compute"]

log = logging.getLogger(__name__)


def compute(
    recorder: Recorder, loaded: LoadedModel, batch: list[Prepared]
) -> list[tuple[Ticket, Future[JobOutcome]]]:
    """One forward + backward for the micro-batch, then its metrics if the batch asked for them;
    rendering and upload go to the store pool."""
    runtime = recorder.runtime
    settings = batch[0].ticket.settings
    start = time.perf_counter()
    try:
        images = torch.stack([p.tensor for p in batch]).to(runtime.device, non_blocking=True)
        explanations = explain_in_batches(
            loaded.model,
            images,
            settings,
            [p.target_index for p in batch],
            batch_size=len(batch),
            autocast_dtype=runtime.autocast,
        )
        tickets = [p.ticket for p in batch]
        coverages = [p.coverage for p in batch]
        metrics = score(runtime, loaded, images, tickets, [p.sha256 for p in batch], coverages, explanations)
    except Exception as exc:
        if len(batch) == 1:
            recorder.fail(batch[0].ticket, exc)
            return []
        # Find the image that breaks the batch instead of failing its neighbours.
        log.warning("micro-batch of %d failed (%s); retrying its images one by one", len(batch), exc)
        return [result for prepared in batch for result in compute(recorder, loaded, [prepared])]
    per_image = (time.perf_counter() - start) / len(batch)
    return [
        (p.ticket, runtime.render_pool.submit(store, runtime, loaded, p, e, per_image, m))
        for p, e, m in zip(batch, explanations, metrics, strict=True)
    ]
