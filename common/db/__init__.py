"""The SQL side of vitscope: schema (``models``), sessions and migrations (``session``), and the
functions that read and change state: ``jobs`` (claims, leases, outcomes), ``batches``,
``workers``, ``reports`` and ``metrics`` (queries for the commands that show results)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from common.db.session import Database, current_revision, head_revision, upgrade
from common.errors import DatabaseUnavailableError, NotFoundError, PermanentError
from common.settings import Settings

__all__ = ["Database", "open_database", "require_existing"]


def open_database(settings: Settings, *, migrate: bool | None = None, create: bool = True) -> Database:
    """The configured database, with its schema at the newest migration.

    The embedded SQLite default migrates itself on first use so a new user needs no set-up step; a
    shared server (PostgreSQL) is migrated deliberately with ``producer db upgrade`` and refused with
    that instruction when behind. ``create=False`` is for commands that only read: a SQLite file that
    does not exist is reported (``NotFoundError``, naming the file) instead of being created empty,
    which would hide a command run from the wrong folder.
    """
    url = settings.resolved_database_url()
    if not create:
        require_existing(settings)
    db = Database(url)
    if migrate is None:
        migrate = db.dialect == "sqlite"
    try:
        revision = current_revision(db.engine)
    except sa.exc.OperationalError as exc:
        reason = " ".join(str(exc.orig).split())  # psycopg's message spans lines; the CLI prints one
        raise DatabaseUnavailableError(f"cannot connect to the database {_safe(url)}: {reason}") from exc
    if revision != head_revision():
        if migrate:
            upgrade(url)
        else:
            raise PermanentError(
                f"the database {_safe(url)} is at schema revision {revision or 'none'}, "
                f"not {head_revision()}: run `producer db upgrade`"
            )
    return db


def require_existing(settings: Settings) -> None:
    """Raise ``NotFoundError`` naming the file when the configured database is a SQLite file that does
    not exist (connecting would create it); servers are not asked."""
    parsed = sa.make_url(settings.resolved_database_url())
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    if parsed.database.startswith("file:") or Path(parsed.database).exists():
        return
    where = (
        "VITSCOPE_DATABASE_URL"
        if settings.database_url
        else "the default, vitscope.db in the working directory"
    )
    raise NotFoundError(
        f"no database at {Path(parsed.database).resolve()} ({where}): run the command from the folder "
        "you submitted from, or set VITSCOPE_DATABASE_URL"
    )


def _safe(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)
