"""Initial schema: batches, jobs, artifacts, predictions, workers, and the user-facing views.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
JOB_STATES = ("queued", "running", "succeeded", "failed")

# Columns of job_results that point at one artifact each: (column, artifact name).
ARTIFACT_COLUMNS = (
    ("rollout_uri", "rollout.npy"),
    ("grad_rollout_uri", "grad_rollout.npy"),
    ("relevance_uri", "relevance.npy"),
    ("layer_scores_uri", "layer_scores.npy"),
    ("cls_attention_uri", "cls_attention.npy"),
    ("attention_uri", "attention.npy"),
    ("rollout_png_uri", "rollout.png"),
    ("grad_rollout_png_uri", "grad_rollout.png"),
    ("relevance_png_uri", "relevance.png"),
    ("layer_scores_png_uri", "layer_scores.png"),
)


def _artifact_column(column: str, name: str) -> str:
    return f"(SELECT a.uri FROM artifacts a WHERE a.job_id = j.id AND a.name = '{name}') AS {column}"


JOB_RESULTS_VIEW = f"""
CREATE VIEW job_results AS
SELECT
    j.id AS job_id,
    j.batch_id,
    b.name AS batch_name,
    j.row_number,
    j.row_id,
    j.image_uri,
    j.image_sha256,
    j.model,
    j.state,
    j.target,
    j.target_index,
    p.class_index AS top1_index,
    p.label AS top1_label,
    p.prob AS top1_prob,
    j.error_class,
    j.error_message,
    j.attempts,
    j.worker_host,
    j.device,
    j.weights_source,
    j.reused_from,
    j.created_at,
    j.started_at,
    j.finished_at,
    j.fetch_seconds,
    j.compute_seconds,
    j.store_seconds,
    {", ".join(_artifact_column(column, name) for column, name in ARTIFACT_COLUMNS)}
FROM jobs j
JOIN batches b ON b.id = j.batch_id
LEFT JOIN predictions p ON p.job_id = j.id AND p.rank = 1
"""

JOB_PREDICTIONS_VIEW = """
CREATE VIEW job_predictions AS
SELECT
    j.id AS job_id,
    j.batch_id,
    b.name AS batch_name,
    j.row_id,
    j.image_uri,
    j.image_sha256,
    j.model,
    p.rank,
    p.class_index,
    p.label,
    p.prob
FROM predictions p
JOIN jobs j ON j.id = p.job_id
JOIN batches b ON b.id = j.batch_id
"""

JOB_ARTIFACTS_VIEW = """
CREATE VIEW job_artifacts AS
SELECT
    j.id AS job_id,
    j.batch_id,
    b.name AS batch_name,
    j.row_id,
    j.image_uri,
    j.image_sha256,
    j.model,
    a.name,
    a.uri,
    a.content_type,
    a.shape,
    a.dtype,
    a.bytes,
    a.checksum
FROM artifacts a
JOIN jobs j ON j.id = a.job_id
JOIN batches b ON b.id = j.batch_id
"""


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("settings", JSON, nullable=False),
        sa.Column("models", JSON, nullable=False),
        sa.Column("total_jobs", sa.Integer, nullable=False),
        sa.Column("published_at", TIMESTAMP, nullable=True),
        sa.UniqueConstraint("name", name="uq_batches_name"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("batch_id", sa.String(40), sa.ForeignKey("batches.id", ondelete="CASCADE"), nullable=False),
        sa.Column("row_number", sa.Integer, nullable=False),
        sa.Column("row_id", sa.String(200), nullable=True),
        sa.Column("image_uri", sa.Text, nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("queue", sa.String(200), nullable=False),
        sa.Column("target", sa.String(200), nullable=True),
        sa.Column("config_fingerprint", sa.String(32), nullable=False),
        sa.Column("row_metadata", JSON, nullable=False),
        sa.Column(
            "state",
            sa.String(16),
            sa.CheckConstraint(f"state IN {JOB_STATES!r}", name="ck_jobs_state"),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("worker_host", sa.String(255), nullable=True),
        sa.Column("worker_id", sa.String(255), nullable=True),
        sa.Column("device", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", TIMESTAMP, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("fetch_seconds", sa.Float, nullable=True),
        sa.Column("compute_seconds", sa.Float, nullable=True),
        sa.Column("store_seconds", sa.Float, nullable=True),
        sa.Column("image_sha256", sa.String(64), nullable=True),
        sa.Column("target_index", sa.Integer, nullable=True),
        sa.Column("weights_source", sa.Text, nullable=True),
        sa.Column("reused_from", sa.String(32), nullable=True),
        sa.Column("error_class", sa.String(100), nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.UniqueConstraint("batch_id", "row_number", "model", name="uq_jobs_batch_row_model"),
    )
    op.create_index("ix_jobs_batch_state", "jobs", ["batch_id", "state"])
    op.create_index("ix_jobs_model", "jobs", ["model"])
    op.create_index("ix_jobs_image_config", "jobs", ["image_sha256", "config_fingerprint"])
    op.create_index("ix_jobs_state_lease", "jobs", ["state", "lease_expires_at"])
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("content_type", sa.String(64), nullable=False),
        sa.Column("shape", sa.String(64), nullable=True),
        sa.Column("dtype", sa.String(16), nullable=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),
    )
    op.create_table(
        "predictions",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("rank", sa.Integer, primary_key=True),
        sa.Column("class_index", sa.Integer, nullable=False),
        sa.Column("label", sa.String(255), nullable=True),
        sa.Column("prob", sa.Float, nullable=False),
    )
    op.create_index("ix_predictions_class_rank", "predictions", ["class_index", "rank"])
    op.create_table(
        "workers",
        sa.Column("worker_id", sa.String(255), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("node", sa.String(255), nullable=True),
        sa.Column("queues", sa.Text, nullable=True),
        sa.Column("device", sa.String(64), nullable=True),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("last_seen_at", TIMESTAMP, nullable=False),
        sa.Column("running_jobs", sa.Integer, nullable=False),
        sa.Column("current_model", sa.String(200), nullable=True),
        sa.Column("jobs_done", sa.Integer, nullable=False),
    )
    op.execute(JOB_RESULTS_VIEW)
    op.execute(JOB_PREDICTIONS_VIEW)
    op.execute(JOB_ARTIFACTS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS job_artifacts")
    op.execute("DROP VIEW IF EXISTS job_predictions")
    op.execute("DROP VIEW IF EXISTS job_results")
    op.drop_table("workers")
    op.drop_index("ix_predictions_class_rank", table_name="predictions")
    op.drop_table("predictions")
    op.drop_table("artifacts")
    op.drop_index("ix_jobs_state_lease", table_name="jobs")
    op.drop_index("ix_jobs_image_config", table_name="jobs")
    op.drop_index("ix_jobs_model", table_name="jobs")
    op.drop_index("ix_jobs_batch_state", table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("batches")
