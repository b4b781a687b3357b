"""Small SQL helpers shared by the query modules (jobs, batches, workers, reports, metrics)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from common.errors import PermanentError

__all__ = ["chunks", "dialect_insert"]

# Keep IN (...) lists and multi-row inserts well under every driver's parameter limit.
CHUNK = 500


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def dialect_insert(session: Session, table: Any) -> Any:
    """The dialect's INSERT, which knows ``on_conflict_do_nothing`` / ``on_conflict_do_update``."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise PermanentError(f"unsupported database dialect {name!r}: use PostgreSQL or SQLite")
