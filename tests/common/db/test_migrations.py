"""The migrations are the only way the schema is made: they must round-trip and match the ORM."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from common.db import open_database
from common.db.models import Base
from common.db.session import current_revision, downgrade, head_revision, upgrade
from common.settings import Settings

TABLES = {"batches", "jobs", "artifacts", "predictions", "workers"}
VIEWS = {"job_results", "job_predictions", "job_artifacts"}


def _names(url: str) -> tuple[set[str], set[str]]:
    engine = sa.create_engine(url)
    try:
        inspector = sa.inspect(engine)
        return set(inspector.get_table_names()) - {"alembic_version"}, set(inspector.get_view_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    upgrade(database_url)
    assert _names(database_url) == (TABLES, VIEWS)
    downgrade(database_url, "base")
    assert _names(database_url) == (set(), set())
    upgrade(database_url)
    assert _names(database_url) == (TABLES, VIEWS)
    engine = sa.create_engine(database_url)
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_migrations_match_the_orm_models(database_url: str) -> None:
    upgrade(database_url)
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    # Views are created by the migrations on purpose and are not ORM tables.
    diff = [d for d in diff if not (d[0] == "remove_table" and d[1].name in VIEWS)]
    assert diff == []


def test_embedded_sqlite_migrates_itself_on_first_use(tmp_path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'fresh.db'}")
    db = open_database(settings)
    assert current_revision(db.engine) == head_revision()
    db.dispose()


def test_default_database_is_a_sqlite_file_in_the_working_directory(tmp_path) -> None:
    db = open_database(Settings())
    assert db.dialect == "sqlite"
    assert (tmp_path / "vitscope.db").exists()
    db.dispose()


def test_postgres_behind_head_is_refused_with_the_upgrade_command(postgres_url: str) -> None:
    import pytest

    from common.errors import PermanentError

    with pytest.raises(PermanentError, match="producer db upgrade"):
        open_database(Settings(database_url=postgres_url))
    upgrade(postgres_url)
    open_database(Settings(database_url=postgres_url)).dispose()
