"""Plain records passed between the producer, the worker and the query functions of ``common.db``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "ArtifactRecord",
    "JobOutcome",
    "MetricRecord",
    "NewJob",
    "PredictionRecord",
    "QueuedImageJob",
    "QueuedJob",
    "WorkerIdentity",
]


@dataclass(frozen=True)
class NewJob:
    """A job as the producer creates it, before any worker has seen it."""

    row_number: int
    image_uri: str
    model: str
    queue: str
    config_fingerprint: str
    row_id: str | None = None
    target: str | None = None
    row_metadata: dict[str, Any] = field(default_factory=dict)


class QueuedJob(NamedTuple):
    """A job to put on the queue: messages are chunks of one model, sent to that model's queue."""

    id: str
    model: str
    queue: str


class QueuedImageJob(NamedTuple):
    """A queued job with its image URI, which lets publishing keep rows repeating one image in one
    message, where the worker computes them once (``common.publish.chunk_jobs``)."""

    id: str
    model: str
    queue: str
    image_uri: str


@dataclass(frozen=True)
class WorkerIdentity:
    """Who claims a job: the host, and the process on it (``host:pid``)."""

    hostname: str
    worker_id: str


@dataclass(frozen=True)
class ArtifactRecord:
    name: str
    uri: str
    content_type: str
    bytes: int
    checksum: str
    shape: str | None = None
    dtype: str | None = None
    shard_uri: str | None = None  # in the shards layout: the tar, and where in it the data lies
    shard_offset: int | None = None
    shard_length: int | None = None


@dataclass(frozen=True)
class PredictionRecord:
    rank: int
    class_index: int
    prob: float
    label: str | None = None


@dataclass(frozen=True)
class MetricRecord:
    """One faithfulness score: ``method`` (``rollout``, …, ``random``) × ``metric`` (``deletion_auc``, …)."""

    method: str
    metric: str
    value: float


@dataclass(frozen=True)
class JobOutcome:
    """What a worker learned about a job, written in one transaction when it succeeds.

    ``target_index`` is ``None`` (and ``predictions`` empty) for a backbone without a head; ``readout``
    is the row the rollout maps read (``token`` or ``avg``); ``note`` says what the artifacts leave out.
    """

    image_sha256: str
    target_index: int | None
    device: str
    weights_source: str
    artifacts: Sequence[ArtifactRecord]
    predictions: Sequence[PredictionRecord]
    fetch_seconds: float | None = None
    compute_seconds: float | None = None
    store_seconds: float | None = None
    readout: str | None = None
    note: str | None = None
    metrics: Sequence[MetricRecord] = ()
    metrics_config: str | None = None  # MetricSettings.digest of the metrics, when there are any
