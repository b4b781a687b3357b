"""The migrations are the only way the schema is made: they must round-trip and match the ORM."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from common.db import open_database
from common.db.models import Base
from common.db.session import current_revision, downgrade, head_revision, upgrade
from common.settings import Settings

TABLES = {"batches", "jobs", "artifacts", "predictions", "workers", "metric_values"}
VIEWS = {"job_results", "job_predictions", "job_artifacts", "job_metrics"}


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


def _columns(url: str, name: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        return [column["name"] for column in sa.inspect(engine).get_columns(name)]
    finally:
        engine.dispose()


def test_0002_adds_the_readout_and_note_to_jobs_and_job_results_and_takes_them_back(
    database_url: str,
) -> None:
    upgrade(database_url, "0001")
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:  # a job from before 0002 keeps its row through both directions
        conn.execute(
            sa.text(
                "INSERT INTO batches (id, created_at, source, mode, settings, models, total_jobs) "
                "VALUES ('b1', CURRENT_TIMESTAMP, 's.csv', 'local', '{}', '{}', 1)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO jobs (id, batch_id, row_number, image_uri, model, queue, config_fingerprint, "
                "row_metadata, state, attempts, created_at) VALUES ('j1', 'b1', 2, 'file:///a.png', 'm', "
                "'q', 'c', '{}', 'queued', 0, CURRENT_TIMESTAMP)"
            )
        )
    for step in ("head", "0001", "head"):
        (upgrade if step == "head" else downgrade)(database_url, step)
        expected = step == "head"
        for relation in ("jobs", "job_results"):
            columns = _columns(database_url, relation)
            assert ("readout" in columns, "note" in columns) == (expected, expected), (step, relation)
        # 0005 (the metric values and job_metrics) sits above 0002 and goes with it.
        metrics = ({"metric_values"}, {"job_metrics"}) if not expected else (set(), set())
        assert _names(database_url) == (TABLES - metrics[0], VIEWS - metrics[1])
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT job_id FROM job_results")).scalars().all() == ["j1"]
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET readout = 'avg', note = 'no head' WHERE id = 'j1'"))
        row = conn.execute(sa.text("SELECT readout, note FROM job_results WHERE job_id = 'j1'")).one()
    engine.dispose()
    assert tuple(row) == ("avg", "no head")
