"""Recovery bookkeeping on jobs: how often a job's worker died on it, and when it last went back to
the queue.

``interruptions`` counts attempts that ended because the worker processing the job died or stopped
renewing its lease (never a recorded failure): a job with interruptions is a suspect, processed on
its own so a poison image cannot take its chunk neighbours down with it, and failed with that count
as its reason once its attempts are spent. ``requeued_at`` is when the job was last put back on the
queue (retry, reaper, hand-back); with the batch's ``published_at`` it tells the reaper which queued
jobs have had no message published for too long — lost messages — and must be published again.

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("interruptions", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("requeued_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Native DROP COLUMN (SQLite ≥ 3.35): a batch-mode table copy would trip over the views on jobs.
    op.drop_column("jobs", "requeued_at")
    op.drop_column("jobs", "interruptions")
