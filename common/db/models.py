"""The SQL schema: batches of jobs, their artifacts and predictions, and the workers that ran them.

The database is the source of truth for job state (the queue only carries job ids). The schema is
made by the Alembic migrations in ``migrations/``; these classes describe it to the ORM, and a test
checks that the migrations and these classes agree. Users query the views made by the migrations
(``job_results``, ``job_predictions``, ``job_artifacts``, ``job_metrics``) rather than these tables.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

__all__ = [
    "Artifact",
    "Base",
    "Batch",
    "Job",
    "JobMetric",
    "JobState",
    "Prediction",
    "WorkerHeartbeat",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no timezone type; storing naive UTC there and aware UTC on PostgreSQL keeps lease
    comparisons (``lease_expires_at < now``) correct on both.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; vitscope stores timezone-aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


class JobState(enum.StrEnum):
    """queued → running → succeeded | failed; a transient failure or a lost worker goes back to queued."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


JOB_STATE_TYPE = sa.Enum(
    JobState,
    name="job_state",
    native_enum=False,
    create_constraint=True,
    length=16,
    values_callable=lambda states: [s.value for s in states],
    validate_strings=True,
)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
        float: sa.Float(),
    }


class Batch(Base):
    """One ``producer submit``: a dataset × models with one set of method settings."""

    __tablename__ = "batches"
    __table_args__ = (sa.UniqueConstraint("name", name="uq_batches_name"),)

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    name: Mapped[str | None] = mapped_column(sa.String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    source: Mapped[str] = mapped_column(sa.Text)
    mode: Mapped[str] = mapped_column(sa.String(16))  # "local" or "distributed"
    settings: Mapped[dict[str, Any]] = mapped_column()
    models: Mapped[dict[str, Any]] = mapped_column()  # {"names": [...], "specs": {name: ModelSpec dict}}
    total_jobs: Mapped[int] = mapped_column(default=0)
    published_at: Mapped[datetime | None] = mapped_column()  # when its messages were last sent

    jobs: Mapped[list[Job]] = relationship(back_populates="batch", passive_deletes=True)


class Job(Base):
    """One image × one model. Natural key: (batch, CSV line, model)."""

    __tablename__ = "jobs"
    __table_args__ = (
        sa.UniqueConstraint("batch_id", "row_number", "model", name="uq_jobs_batch_row_model"),
        sa.Index("ix_jobs_batch_state", "batch_id", "state"),
        sa.Index("ix_jobs_model", "model"),
        sa.Index("ix_jobs_image_config", "image_sha256", "config_fingerprint"),
        sa.Index("ix_jobs_state_lease", "state", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    batch_id: Mapped[str] = mapped_column(sa.ForeignKey("batches.id", ondelete="CASCADE"))
    row_number: Mapped[int] = mapped_column()  # line in the CSV (header = 1)
    row_id: Mapped[str | None] = mapped_column(sa.String(200))  # the CSV's own `id` column
    image_uri: Mapped[str] = mapped_column(sa.Text)
    model: Mapped[str] = mapped_column(sa.String(200))
    queue: Mapped[str] = mapped_column(sa.String(200))  # routing decided once, at submit
    target: Mapped[str | None] = mapped_column(sa.String(200))  # as written in the CSV
    config_fingerprint: Mapped[str] = mapped_column(sa.String(32))
    row_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)

    state: Mapped[JobState] = mapped_column(JOB_STATE_TYPE, default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(default=0)
    # Attempts that ended with the worker dead or silent (not a recorded failure): see migration 0004.
    interruptions: Mapped[int] = mapped_column(default=0, server_default="0")
    worker_host: Mapped[str | None] = mapped_column(sa.String(255))
    worker_id: Mapped[str | None] = mapped_column(sa.String(255))  # host:pid of the claiming process
    device: Mapped[str | None] = mapped_column(sa.String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column()

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    requeued_at: Mapped[datetime | None] = mapped_column()  # last put back on the queue; None = never
    fetch_seconds: Mapped[float | None] = mapped_column()
    compute_seconds: Mapped[float | None] = mapped_column()
    store_seconds: Mapped[float | None] = mapped_column()

    image_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    target_index: Mapped[int | None] = mapped_column()  # the class the gradient maps explain
    readout: Mapped[str | None] = mapped_column(sa.String(16))  # "token" or "avg": the row the maps read
    note: Mapped[str | None] = mapped_column(sa.Text)  # what the artifacts leave out, and why
    weights_source: Mapped[str | None] = mapped_column(sa.Text)
    reused_from: Mapped[str | None] = mapped_column(sa.String(32))
    error_class: Mapped[str | None] = mapped_column(sa.String(100))
    error_message: Mapped[str | None] = mapped_column(sa.Text)

    batch: Mapped[Batch] = relationship(back_populates="jobs")
    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="job", passive_deletes=True, order_by="Artifact.name"
    )
    predictions: Mapped[list[Prediction]] = relationship(
        back_populates="job", passive_deletes=True, order_by="Prediction.rank"
    )
    metrics: Mapped[list[JobMetric]] = relationship(back_populates="job", passive_deletes=True)


class Artifact(Base):
    """One stored artifact of a job: where it is and what it holds.

    In the ``objects`` layout ``uri`` is the artifact's own object. In the ``shards`` layout it is a
    member URI (``<shard>#member=…&offset=…&length=…``, see ``common.storage.shards``) and the shard
    columns say the same in SQL: the tar's URI and the offset and length of the member's data, so
    one ranged GET reads it. A reused job's rows point at its original's members.
    """

    __tablename__ = "artifacts"
    __table_args__ = (sa.UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(sa.String(64))  # e.g. "rollout.npy", "rollout.png"
    uri: Mapped[str] = mapped_column(sa.Text)
    content_type: Mapped[str] = mapped_column(sa.String(64))
    shape: Mapped[str | None] = mapped_column(sa.String(64))  # "12x3x14x14" for arrays; "224x224x3" for PNGs
    dtype: Mapped[str | None] = mapped_column(sa.String(16))
    bytes: Mapped[int] = mapped_column(sa.BigInteger)
    checksum: Mapped[str] = mapped_column(sa.String(64))  # sha256 of the stored bytes
    shard_uri: Mapped[str | None] = mapped_column(sa.Text)  # None: an object of its own
    shard_offset: Mapped[int | None] = mapped_column(sa.BigInteger)  # of the member's data in the tar
    shard_length: Mapped[int | None] = mapped_column(sa.BigInteger)  # = bytes

    job: Mapped[Job] = relationship(back_populates="artifacts")


class Prediction(Base):
    """The model's top-k classes for one job (rank 1 = top-1)."""

    __tablename__ = "predictions"
    __table_args__ = (sa.Index("ix_predictions_class_rank", "class_index", "rank"),)

    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(primary_key=True)
    class_index: Mapped[int] = mapped_column()
    label: Mapped[str | None] = mapped_column(sa.String(255))
    prob: Mapped[float] = mapped_column()

    job: Mapped[Job] = relationship(back_populates="predictions")


class JobMetric(Base):
    """One faithfulness score of one job's map (``docs/metrics.md``): job × method × metric.

    ``config`` is the digest of the metric settings and the job's box or mask
    (``MetricSettings.digest``): a later job reuses this job's maps only with equal metric settings.
    """

    __tablename__ = "metric_values"

    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    method: Mapped[str] = mapped_column(sa.String(32), primary_key=True)  # rollout, …, random
    metric: Mapped[str] = mapped_column(sa.String(32), primary_key=True)  # deletion_auc, …
    value: Mapped[float] = mapped_column()
    config: Mapped[str] = mapped_column(sa.String(32))

    job: Mapped[Job] = relationship(back_populates="metrics")


class WorkerHeartbeat(Base):
    """A worker process's last sign of life, so ``producer status`` can say who is alive and busy."""

    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)  # host:pid
    hostname: Mapped[str] = mapped_column(sa.String(255))
    node: Mapped[str | None] = mapped_column(sa.String(255))  # the Celery node name, e.g. gpu0@host
    queues: Mapped[str | None] = mapped_column(sa.Text)
    device: Mapped[str | None] = mapped_column(sa.String(64))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    running_jobs: Mapped[int] = mapped_column(default=0)
    current_model: Mapped[str | None] = mapped_column(sa.String(200))
    jobs_done: Mapped[int] = mapped_column(default=0)
