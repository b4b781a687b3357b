"""Faithfulness metrics: one row per job × method × metric, and the ``job_metrics`` view.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

JOB_METRICS_VIEW = """
CREATE VIEW job_metrics AS
SELECT
    j.id AS job_id,
    j.batch_id,
    b.name AS batch_name,
    j.row_id,
    j.image_uri,
    j.image_sha256,
    j.model,
    j.target_index,
    m.method,
    m.metric,
    m.value
FROM metric_values m
JOIN jobs j ON j.id = m.job_id
JOIN batches b ON b.id = j.batch_id
"""


def upgrade() -> None:
    op.create_table(
        "metric_values",
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("method", sa.String(32), primary_key=True),
        sa.Column("metric", sa.String(32), primary_key=True),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("config", sa.String(32), nullable=False),
    )
    op.execute(JOB_METRICS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS job_metrics")
    op.drop_table("metric_values")
