"""Store: one image's pictures drawn and encoded, every artifact written under its deterministic
key, and the job described for the database.

With a CPU pool and a store other processes can open, a pool process does all of it and sends back
only the descriptions (``artifacts.write_artifacts``); otherwise the pool (or this thread) draws
and encodes and this thread writes.

In the shards layout nothing is written here: the pool (or this thread) draws and encodes, and each
image's future holds an ``Unwritten`` job, which the record stage gathers into a shard.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass

from common.db.records import ArtifactRecord, JobOutcome, PredictionRecord
from common.storage import ObjectStore
from worker.attention import Explanation
from worker.models import LoadedModel
from worker.pipeline.artifacts import (
    Encoded,
    ImageArtifacts,
    StoreTarget,
    Written,
    draw,
    encode_artifacts,
    encode_artifacts_many,
    put_artifacts,
    write_artifacts_many,
)
from worker.pipeline.clock import StageClock
from worker.pipeline.compute import Computed
from worker.pipeline.cpu import CpuPool
from worker.pipeline.shard import Unwritten

__all__ = ["Stored", "Storing", "store", "store_all"]

# What the store stage hands the record stage for one image: the job's row with its artifacts
# written (objects layout), or the job and its encoded files for the open shard (shards layout).
Stored = JobOutcome | Unwritten


@dataclass(frozen=True)
class Storing:
    """What storing uses: the CPU pool and the store threads, the store (and how a pool process opens
    it, ``None`` when one cannot), the layout, the stage clock, and what the job rows and PNGs record."""

    cpu: CpuPool
    pool: ThreadPoolExecutor
    store: ObjectStore
    target: StoreTarget | None
    sharded: bool
    clock: StageClock
    device: str
    png_level: int


def store_all(storing: Storing, loaded: LoadedModel, batch: list[Computed]) -> list[Future[Stored]]:
    """Start storing a computed micro-batch; one future per image, in order, each failing on its own.

    With a CPU pool that can open the store, the batch goes to the pool in one call per pool process
    (``write_artifacts_many``), not one per image: each call costs the driving process about half a
    millisecond besides the pixels, as much as recording a job. Otherwise each image is a task of
    the store threads.
    """
    if not (storing.cpu.workers and storing.target is not None):
        return [storing.pool.submit(store, storing, loaded, computed) for computed in batch]
    futures: list[Future[Stored]] = [Future() for _ in batch]
    parts = min(storing.cpu.workers, len(batch))
    for part in range(parts):
        mine = [futures[i] for i in range(part, len(batch), parts)]
        task = storing.pool.submit(_store_in_pool, storing, loaded, batch[part::parts], mine)
        task.add_done_callback(functools.partial(_end_unfinished, mine))
    return futures


def _end_unfinished(futures: list[Future[Stored]], task: Future[None]) -> None:
    """A store task cancelled before it ran (the runtime closing) still ends its images' futures."""
    for future in futures:
        if not future.done():
            error = CancelledError() if task.cancelled() else task.exception()
            future.set_exception(error or RuntimeError("the store task ended without storing this image"))


def _store_in_pool(
    storing: Storing, loaded: LoadedModel, batch: list[Computed], futures: list[Future[Stored]]
) -> None:
    """One pool call for ``batch``; each image's outcome or error goes to its own future."""
    start = time.perf_counter()
    try:
        images = [_artifacts(storing, c) for c in batch]
        results: list[Written | Encoded | Exception]
        if storing.sharded:
            results = list(storing.cpu.run(encode_artifacts_many, images))
        else:
            assert storing.target is not None
            results = list(storing.cpu.run(write_artifacts_many, storing.target, images))
    except BaseException as exc:  # the pool process died (or worse): every image of the call failed
        for future in futures:
            future.set_exception(exc)
        return
    share = (time.perf_counter() - start) / len(batch)
    for computed, result, future in zip(batch, results, futures, strict=True):
        if isinstance(result, BaseException):
            future.set_exception(result)
            continue
        try:
            storing.clock.add(result.seconds)
            outcome = _outcome(storing, loaded, computed, result.artifacts, share)
            if isinstance(result, Encoded):
                future.set_result(Unwritten(outcome, result))
            else:
                storing.store.take_over(result.keys)  # synced with the micro-batch, before it is recorded
                future.set_result(outcome)
        except BaseException as exc:  # every future must end, or its micro-batch's record waits forever
            future.set_exception(exc)


def store(storing: Storing, loaded: LoadedModel, computed: Computed) -> Stored:
    """Render every artifact (in the CPU pool if there is one), write them here under deterministic
    keys, describe them for the database: for stores a pool process cannot open (``store_all``).
    In the shards layout, encode them for the open shard instead of writing them."""
    start = time.perf_counter()
    image = _artifacts(storing, computed)
    pictures = storing.cpu.run(draw, image)
    if storing.sharded:
        encoded = encode_artifacts(image, pictures)
        storing.clock.add(encoded.seconds)
        outcome = _outcome(storing, loaded, computed, encoded.artifacts, time.perf_counter() - start)
        return Unwritten(outcome, encoded)
    written = put_artifacts(storing.store, image, pictures)
    storing.clock.add(written.seconds)
    return _outcome(storing, loaded, computed, written.artifacts, time.perf_counter() - start)


def _artifacts(storing: Storing, computed: Computed) -> ImageArtifacts:
    prepared, ticket = computed.prepared, computed.prepared.ticket
    return ImageArtifacts(
        image_sha256=prepared.sha256,
        model=ticket.model,
        config=ticket.config,
        crop=prepared.crop,
        arrays=computed.explanation.arrays(),
        overlays=computed.overlays,
        title=f"{ticket.model}: layer scores",
        png_level=storing.png_level,
    )


def _outcome(
    storing: Storing,
    loaded: LoadedModel,
    computed: Computed,
    artifacts: list[ArtifactRecord],
    seconds: float,
) -> JobOutcome:
    """The job's row: its image, prediction, artifacts and timings."""
    prepared, explanation = computed.prepared, computed.explanation
    return JobOutcome(
        image_sha256=prepared.sha256,
        target_index=explanation.target,
        readout=explanation.readout.value,
        note=_note(explanation),
        device=storing.device,
        weights_source=loaded.weights_source,
        artifacts=artifacts,
        predictions=_predictions(explanation, loaded.labels),
        fetch_seconds=prepared.fetch_seconds,
        compute_seconds=computed.seconds,
        store_seconds=seconds,
        metrics=computed.metrics,
        metrics_config=prepared.ticket.metrics_config if computed.metrics else None,
    )


def _predictions(explanation: Explanation, labels: tuple[str, ...] | None) -> list[PredictionRecord]:
    """The top-k classes with their names when known; none for a backbone without a head."""
    if explanation.top_indices is None or explanation.top_probs is None:
        return []
    return [
        PredictionRecord(
            rank=rank,
            class_index=int(index),
            prob=float(prob),
            label=labels[int(index)] if labels is not None and int(index) < len(labels) else None,
        )
        for rank, (index, prob) in enumerate(
            zip(explanation.top_indices, explanation.top_probs, strict=True), 1
        )
    ]


def _note(explanation: Explanation) -> str | None:
    """What this job's artifacts leave out and why, in words for ``job_results.note``; None if nothing."""
    missing = []
    if not explanation.has_head:
        missing.append(
            "no classification head (num_classes = 0): no prediction, target, gradient rollout or relevance"
        )
    if explanation.cls_attention is None:
        missing.append("no class token: no cls_attention")
    return "; ".join(missing) or None
