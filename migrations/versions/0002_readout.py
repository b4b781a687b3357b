"""Record each job's readout, and say so when a headless backbone leaves artifacts out.

``jobs.readout`` is the row the rollout maps read, following the model's pooling (``token``: the
class token; ``avg``: the mean of the patch tokens). ``jobs.note`` says in words what a job's
artifacts leave out and why (a backbone without a classification head has no prediction, target,
gradient rollout or relevance). Both are added to the ``job_results`` view, which is recreated.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The view as 0001 made it; this revision adds its two columns after ``target_index``.
_INITIAL = importlib.import_module("migrations.versions.0001_initial")
_AFTER = "    j.target_index,\n"
if _AFTER not in _INITIAL.JOB_RESULTS_VIEW:
    raise RuntimeError("0001's job_results view has no target_index column to place the readout after")
JOB_RESULTS_VIEW = _INITIAL.JOB_RESULTS_VIEW.replace(_AFTER, _AFTER + "    j.readout,\n    j.note,\n")


_VIEWS = ("job_results", "job_predictions", "job_artifacts")


def _drop_views() -> None:
    """SQLite rebuilds ``jobs`` to alter it, which any view that reads the table would block."""
    for view in _VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")


def _create_views(job_results: str) -> None:
    op.execute(job_results)
    op.execute(_INITIAL.JOB_PREDICTIONS_VIEW)
    op.execute(_INITIAL.JOB_ARTIFACTS_VIEW)


def upgrade() -> None:
    _drop_views()
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("readout", sa.String(16), nullable=True))
        jobs.add_column(sa.Column("note", sa.Text, nullable=True))
    _create_views(JOB_RESULTS_VIEW)


def downgrade() -> None:
    _drop_views()
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("note")
        jobs.drop_column("readout")
    _create_views(_INITIAL.JOB_RESULTS_VIEW)
