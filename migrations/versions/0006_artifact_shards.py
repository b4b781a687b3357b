"""Artifact shards (issue 19): each artifact row may point into a tar shard, and ``job_artifacts``
shows where.

``shard_uri`` is the shard's URI, ``shard_offset`` and ``shard_length`` the byte range of the
member's data in it (one ranged GET reads the artifact); all three are NULL for an artifact stored
as an object of its own, as every artifact before this revision was. ``uri`` stays readable either
way: in a shard it is a member URI (``<shard>#member=…&offset=…&length=…``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# The view as 0001 made it; this revision adds the shard columns after ``checksum``.
_INITIAL = importlib.import_module("migrations.versions.0001_initial")
_AFTER = "    a.checksum\n"
if _AFTER not in _INITIAL.JOB_ARTIFACTS_VIEW:
    raise RuntimeError("0001's job_artifacts view has no checksum column to place the shard columns after")
JOB_ARTIFACTS_VIEW = _INITIAL.JOB_ARTIFACTS_VIEW.replace(
    _AFTER, "    a.checksum,\n    a.shard_uri,\n    a.shard_offset,\n    a.shard_length\n"
)


def upgrade() -> None:
    # Native ADD COLUMN on both databases (no table copy, so the views on ``artifacts`` can stay until
    # the one that changes is replaced).
    op.add_column("artifacts", sa.Column("shard_uri", sa.Text(), nullable=True))
    op.add_column("artifacts", sa.Column("shard_offset", sa.BigInteger(), nullable=True))
    op.add_column("artifacts", sa.Column("shard_length", sa.BigInteger(), nullable=True))
    op.execute("DROP VIEW IF EXISTS job_artifacts")
    op.execute(JOB_ARTIFACTS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS job_artifacts")
    # Native DROP COLUMN (SQLite ≥ 3.35), as 0004's downgrade.
    op.drop_column("artifacts", "shard_length")
    op.drop_column("artifacts", "shard_offset")
    op.drop_column("artifacts", "shard_uri")
    op.execute(_INITIAL.JOB_ARTIFACTS_VIEW)
