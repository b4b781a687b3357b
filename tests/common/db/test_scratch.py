"""The throwaway database the tests and benchmarks share: created empty, dropped even while in use."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from common.db.scratch import scratch_database


def _databases(admin_url: str) -> set[str]:
    engine = sa.create_engine(admin_url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(sa.text("SELECT datname FROM pg_database")).scalars())
    finally:
        engine.dispose()


def test_a_scratch_database_is_empty_and_dropped_with_a_connection_still_open(
    postgres_admin_url: str,
) -> None:
    with scratch_database(postgres_admin_url, prefix="vitscope_scratchtest") as url:
        name = sa.make_url(url).database
        assert name is not None
        assert name.startswith("vitscope_scratchtest_")
        assert name in _databases(postgres_admin_url)
        left_open = sa.create_engine(url)
        conn = left_open.connect()  # as a killed worker's pool would leave it
        tables = conn.execute(sa.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")).scalar()
        assert tables == 0
    assert name not in _databases(postgres_admin_url)
    with pytest.raises(sa.exc.OperationalError):
        conn.execute(sa.text("SELECT 1"))
    left_open.dispose()


def test_a_scratch_database_is_dropped_when_the_body_raises(postgres_admin_url: str) -> None:
    names: list[str | None] = []

    def fail_inside() -> None:
        with scratch_database(postgres_admin_url) as url:
            names.append(sa.make_url(url).database)
            raise RuntimeError("the test failed")

    with pytest.raises(RuntimeError, match="the test failed"):
        fail_inside()
    assert names[0] is not None
    assert names[0] not in _databases(postgres_admin_url)
