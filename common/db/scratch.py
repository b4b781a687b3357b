"""A throwaway PostgreSQL database on a server that already runs, for the tests and the benchmarks.

Both need a database of their own (a test one per test, a benchmark one per measurement) on the
server a developer or CI runs, created empty and dropped however the run ends. The product never
calls this; it lives beside the SQL code so that ``tests/`` and ``bench/`` share one copy.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

__all__ = ["scratch_database"]


@contextmanager
def scratch_database(admin_url: str, *, prefix: str = "vitscope_scratch") -> Iterator[str]:
    """Create an empty database named ``<prefix>_<random>`` through ``admin_url``; yield its URL.

    The database is dropped ``WITH (FORCE)`` on exit, so connections a test or a worker process left
    open (a killed worker's pool, say) do not keep it alive.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
