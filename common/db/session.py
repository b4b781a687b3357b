"""Engines, sessions and schema migrations.

One engine per process, made lazily and re-made after a fork: a pooled connection inherited across
``fork()`` is shared by two processes and corrupts both (Celery's prefork pool forks). Connections
are pre-pinged so a restarted PostgreSQL costs one reconnect, not a failed job. Sessions are
transactions owned by the caller (``with db.session() as s: ...`` commits or rolls back).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from common.errors import DatabaseUnavailableError, VitscopeError

__all__ = [
    "Database",
    "alembic_config",
    "create_engine",
    "current_revision",
    "downgrade",
    "head_revision",
    "upgrade",
]


def create_engine(url: str) -> sa.Engine:
    """An engine with the settings each backend needs for many concurrent writers."""
    sa_url = sa.make_url(url)
    if sa_url.get_backend_name() == "sqlite":
        database = sa_url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: object) -> None:
            # WAL lets readers (producer status) run while a worker writes; foreign keys are off by default.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # A bounded connect: an unreachable server fails a command in seconds, not after TCP's minutes.
    connect_args = {"connect_timeout": 10} if sa_url.get_backend_name() == "postgresql" else {}
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args=connect_args)


class Database:
    """A database URL and its per-process engine and session factory."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._engine: sa.Engine | None = None
        self._sessionmaker: sessionmaker[Session] | None = None

    @property
    def engine(self) -> sa.Engine:
        with self._lock:
            if self._engine is None or self._pid != os.getpid():
                if self._engine is not None:
                    # Inherited from the parent: drop its connections without closing the parent's sockets.
                    self._engine.dispose(close=False)
                self._engine = create_engine(self.url)
                self._sessionmaker = sessionmaker(self._engine, expire_on_commit=False)
                self._pid = os.getpid()
            return self._engine

    @property
    def dialect(self) -> str:
        return sa.make_url(self.url).get_backend_name()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: commit on success, roll back on error; connectivity errors become transient."""
        engine = self.engine
        del engine  # made (or re-made after a fork) for its side effect on the session factory
        assert self._sessionmaker is not None
        session = self._sessionmaker()
        try:
            yield session
            session.commit()
        except VitscopeError:
            session.rollback()
            raise
        except OperationalError as exc:
            session.rollback()
            raise DatabaseUnavailableError(f"database unavailable: {_short(exc)}") from exc
        except DBAPIError as exc:
            session.rollback()
            if exc.connection_invalidated:
                raise DatabaseUnavailableError(f"database connection lost: {_short(exc)}") from exc
            raise
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
            self._engine = None
            self._sessionmaker = None


def _short(exc: Exception) -> str:
    return str(getattr(exc, "orig", exc)).strip().splitlines()[0][:300]


def alembic_config(url: str) -> Config:
    """Alembic configured from the installed ``migrations`` package, whatever the working directory."""
    script_location = resources.files("migrations")
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
