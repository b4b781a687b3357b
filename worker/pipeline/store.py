"""Store: one image's pictures drawn and encoded, every artifact written under its deterministic
key, and the job described for the database.

With a CPU pool and a store other processes can open, a pool process does all of it and sends back
only the descriptions (``artifacts.write_artifacts``); otherwise the pool (or this thread) draws
and encodes and this thread writes.
"""

from __future__ import annotations

import time

from common.db.records import JobOutcome, PredictionRecord
from worker.attention import Explanation
from worker.models import LoadedModel
from worker.pipeline.artifacts import ImageArtifacts, Written, draw, put_artifacts, write_artifacts
from worker.pipeline.compute import Computed
from worker.pipeline.runtime import Runtime

__all__ = ["store"]


def store(runtime: Runtime, loaded: LoadedModel, computed: Computed) -> JobOutcome:
    """Render every artifact, write them under deterministic keys, describe them for the database."""
    start = time.perf_counter()
    prepared, explanation = computed.prepared, computed.explanation
    ticket = prepared.ticket
    image = ImageArtifacts(
        image_sha256=prepared.sha256,
        model=ticket.model,
        config=ticket.config,
        crop=prepared.crop,
        arrays=explanation.arrays(),
        overlays=computed.overlays,
        title=f"{ticket.model}: layer scores",
        png_level=runtime.settings.png_level,
    )
    written = _write(runtime, image)
    runtime.clock.add(written.seconds)
    return JobOutcome(
        image_sha256=prepared.sha256,
        target_index=explanation.target,
        readout=explanation.readout.value,
        note=_note(explanation),
        device=str(runtime.device),
        weights_source=loaded.weights_source,
        artifacts=written.artifacts,
        predictions=_predictions(explanation, loaded.labels),
        fetch_seconds=prepared.fetch_seconds,
        compute_seconds=computed.seconds,
        store_seconds=time.perf_counter() - start,
        metrics=computed.metrics,
        metrics_config=ticket.metrics_config if computed.metrics else None,
    )


def _write(runtime: Runtime, image: ImageArtifacts) -> Written:
    """In a pool process when it can reach the store itself; else drawn there (or here), written here."""
    if runtime.cpu.workers and runtime.store_target is not None:
        written = runtime.cpu.run(write_artifacts, runtime.store_target, image)
        runtime.store.take_over(written.keys)  # synced with the micro-batch, before it is recorded
        return written
    return put_artifacts(runtime.store, image, runtime.cpu.run(draw, image))


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
