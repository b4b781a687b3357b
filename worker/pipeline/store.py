"""Store: one image's pictures drawn and encoded (the CPU pool), every artifact uploaded under its
deterministic key, and described for the database."""

from __future__ import annotations

import hashlib
import io
import time

import numpy as np
from PIL import Image

from common.db.records import ArtifactRecord, JobOutcome, PredictionRecord
from common.keys import artifact_key
from worker.attention import Explanation
from worker.models import LoadedModel
from worker.pipeline.compute import Computed
from worker.pipeline.cpu import draw_pictures
from worker.pipeline.runtime import Runtime
from worker.render import npy_bytes

__all__ = ["store"]


def _content_type(name: str) -> str:
    return "image/png" if name.endswith(".png") else "application/x-npy"


def store(runtime: Runtime, loaded: LoadedModel, computed: Computed) -> JobOutcome:
    """Render every artifact, upload them under deterministic keys, describe them for the database."""
    start = time.perf_counter()
    prepared, explanation = computed.prepared, computed.explanation
    ticket = prepared.ticket
    arrays = explanation.arrays()
    pictures = runtime.cpu.run(
        draw_pictures,
        prepared.crop,
        arrays,
        overlays=computed.overlays,
        title=f"{ticket.model}: layer scores",
    )
    runtime.clock.add(pictures.seconds)
    with runtime.clock.measure("store"):
        rendered = {**{name: npy_bytes(array) for name, array in arrays.items()}, **pictures.files}
        keys = {name: artifact_key(prepared.sha256, ticket.model, ticket.config, name) for name in rendered}
        uris = runtime.store.put_many(
            (keys[name], data, _content_type(name)) for name, data in rendered.items()
        )
        artifacts = [
            ArtifactRecord(
                name=name,
                uri=uris[keys[name]],
                content_type=_content_type(name),
                bytes=len(data),
                checksum=hashlib.sha256(data).hexdigest(),
                shape=_shape(name, data, arrays),
                dtype=str(arrays[name].dtype) if name in arrays else "uint8",
            )
            for name, data in sorted(rendered.items())
        ]
    return JobOutcome(
        image_sha256=prepared.sha256,
        target_index=explanation.target,
        readout=explanation.readout.value,
        note=_note(explanation),
        device=str(runtime.device),
        weights_source=loaded.weights_source,
        artifacts=artifacts,
        predictions=_predictions(explanation, loaded.labels),
        fetch_seconds=prepared.fetch_seconds,
        compute_seconds=computed.seconds,
        store_seconds=time.perf_counter() - start,
        metrics=computed.metrics,
        metrics_config=ticket.metrics_config if computed.metrics else None,
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


def _shape(name: str, data: bytes, arrays: dict[str, np.ndarray]) -> str:
    if name in arrays:
        return "x".join(str(d) for d in arrays[name].shape)
    width, height = Image.open(io.BytesIO(data)).size  # reads the header only
    return f"{height}x{width}x3"
