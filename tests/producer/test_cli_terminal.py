"""The CLI on an 80-column terminal: one line per job, `producer batches`, read-only commands that
never create a database, and filters that say what they could have matched.

Batches are committed as ``producer submit`` commits them (``plan_submission`` + ``commit_plan`` on
the embedded SQLite of the test's folder) and their jobs finished in the database, so no model runs.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from common.db import open_database
from common.db.models import Job, JobState, utcnow
from common.settings import get_settings
from producer.cli import app
from producer.submit import SubmitOptions, commit_plan, plan_submission

runner = CliRunner()
MODELS = ("deit_tiny_patch16_224", "vit_base_patch16_224")
LONG_ERROR = "could not decode the image: " + "a very long explanation of what went wrong " * 6


def _invoke(*args: str, columns: int = 80):
    get_settings.cache_clear()
    return runner.invoke(app, list(args), env={"COLUMNS": str(columns)}, catch_exceptions=False)


def _commit(
    tmp_path: Path, *, rows: int = 4, models: tuple[str, ...] = MODELS, name: str | None = None
) -> str:
    """A batch of ``rows`` images × ``models`` in the folder's vitscope.db: the first row's jobs
    succeeded, the second's failed with a long message, the rest queued."""
    csv = tmp_path / f"data-{name or rows}.csv"
    csv.write_text(
        "id,image_uri,site\n"
        + "".join(f"img{i},images/a_rather_long_file_name_number_{i:03d}.png,s{i}\n" for i in range(rows))
    )
    db = open_database(get_settings())
    options = SubmitOptions(models=models, name=name, weights="random")
    batch_id = commit_plan(db, plan_submission(csv, options), options, mode="local").batch_id
    now = utcnow()
    with db.session() as session:
        for job in session.scalars(sa.select(Job).where(Job.batch_id == batch_id)):
            if job.row_number == 2:
                job.state, job.started_at, job.finished_at = (
                    JobState.SUCCEEDED,
                    now - timedelta(seconds=4),
                    now,
                )
                job.weights_source = "RANDOM (untrained weights: for smoke runs only)"
            elif job.row_number == 3:
                job.state, job.error_class, job.error_message = JobState.FAILED, "ImageError", LONG_ERROR
    db.dispose()
    return batch_id


def _fits(text: str, columns: int = 80) -> list[str]:
    lines = text.splitlines()
    assert all(len(line) <= columns for line in lines), "\n".join(
        line for line in lines if len(line) > columns
    )
    return lines


def test_results_table_has_one_line_per_job_at_80_columns(tmp_path: Path) -> None:
    batch_id = _commit(tmp_path, rows=4)
    result = _invoke("results", batch_id)
    assert result.exit_code == 0, result.output
    lines = _fits(result.stdout)
    jobs = [line for line in lines if "a_rather_long" in line or "a_rather_lo…" in line or "img" in line]
    assert len(jobs) == 4 * len(MODELS)  # one line per job, nothing wrapped onto a second line
    assert any("ImageError: c…" in line for line in jobs)  # the long error is shortened, not wrapped
    assert any("deit_tiny_patch16_224" in line for line in jobs)  # short cells whole
    assert lines[0].split() == ["row", "id", "image", "model", "state", "error"]  # no job has a prediction


def test_status_fits_80_columns_and_reports_computed_images_per_second(tmp_path: Path) -> None:
    batch_id = _commit(tmp_path, rows=4)
    result = _invoke("status", batch_id)
    assert result.exit_code == 0, result.output
    _fits(result.stdout)
    assert "images/s (2 computed" in result.stdout
    assert "jobs/s" not in result.stdout


def test_next_hints_are_one_whole_command_per_line(tmp_path: Path, write_image) -> None:
    write_image(tmp_path / "images" / "cat.png")
    (tmp_path / "data.csv").write_text("image_uri\nimages/cat.png\n")
    result = _invoke("submit", "data.csv", "--weights", "random")
    assert result.exit_code == 0, result.output
    batch_id = result.stdout.strip().splitlines()[-1]
    lines = _fits(result.output)
    assert f"next:      producer status {batch_id}" in lines
    assert f"           producer results {batch_id} --format csv" in lines
    assert "computed images/s" in result.output


def test_batches_lists_the_newest_first_with_counts(tmp_path: Path) -> None:
    first = _commit(tmp_path, rows=4, name="cats")
    second = _commit(tmp_path, rows=3, models=MODELS[:1])
    result = _invoke("batches")
    assert result.exit_code == 0, result.output
    lines = _fits(result.stdout)
    rows = [line for line in lines if line.startswith(("2", first[:4]))]
    assert [row.split()[0] for row in rows] == [second, first]  # ids whole, newest first
    assert " cats " in rows[1]
    assert "local" in rows[1]
    assert rows[1].split()[-2:] == ["4/8", "2"]  # done (succeeded or failed) of all, failed
    assert _invoke("batches", "--limit", "1").stdout.count(first) == 0


def test_batches_on_an_empty_database_says_how_to_make_one(tmp_path: Path) -> None:
    assert _invoke("db", "upgrade").exit_code == 0
    result = _invoke("batches")
    assert result.exit_code == 0
    assert "no batches" in result.stdout


@pytest.mark.parametrize(
    "command",
    [
        ("status", "b1"),
        ("results", "b1"),
        ("compare", "b1"),
        ("report", "b1", "--out", "site"),
        ("figures", "b1", "--out", "figs"),
        ("retry", "b1"),
        ("batches",),
        ("db", "current"),
    ],
)
def test_read_only_commands_never_create_a_database(tmp_path: Path, command: tuple[str, ...]) -> None:
    result = _invoke(*command)
    assert result.exit_code == 2
    assert f"no database at {tmp_path / 'vitscope.db'}" in result.output
    assert "VITSCOPE_DATABASE_URL" in result.output
    assert list(tmp_path.iterdir()) == []


def test_not_found_names_the_database_searched(tmp_path: Path) -> None:
    _commit(tmp_path, rows=1)
    result = _invoke("status", "nope")
    assert result.exit_code == 2
    assert (
        f"no batch with id or name 'nope' in the database sqlite:///{tmp_path / 'vitscope.db'}"
        in result.output
    )


def test_a_filter_that_matches_nothing_says_what_the_batch_has(tmp_path: Path) -> None:
    batch_id = _commit(tmp_path, rows=4)
    result = _invoke("results", batch_id, "--model", "deit_tiny")
    assert result.exit_code == 0
    assert result.stdout == ""  # no empty table
    message = " ".join(result.stderr.split())
    assert f"no job of batch {batch_id} matches --model deit_tiny" in message
    assert "did you mean deit_tiny_patch16_224?" in message
    assert f"Its models: {', '.join(MODELS)}; its jobs: " in message
    assert "its jobs: 4 queued, 2 succeeded, 2 failed." in message

    by_state = _invoke("results", batch_id, "--state", "running", "--format", "csv")
    assert by_state.exit_code == 0
    assert by_state.stdout.startswith("job_id,")  # the header, for scripts
    assert "matches --state running" in " ".join(by_state.stderr.split())


@pytest.mark.parametrize(
    "command", [(), ("submit",), ("retry",), ("status",), ("figures",), ("db", "upgrade")]
)
def test_help_shows_boolean_flags_as_flags(command: tuple[str, ...]) -> None:
    """Ours (``--local``) and typer's own (``--help``, ``--install-completion``) alike."""
    result = _invoke(*command, "--help")
    assert result.exit_code == 0
    flags = [
        line
        for line in result.stdout.splitlines()
        if any(flag in line for flag in ("--local", "--watch", "--pdf", "--help", "--install-completion"))
    ]
    assert any("--help" in line for line in flags)
    assert command != () or any("--install-completion" in line for line in flags)
    for line in result.stdout.splitlines():
        assert "<bool>" not in line, line


@pytest.mark.parametrize(
    ("command", "asked"),
    [
        (
            ("report", "--out", "site", "--models", "deit_tiny"),
            "--model deit_tiny (did you mean deit_tiny_patch16_224?)",
        ),
        (("report", "--out", "site", "--state", "running"), "--state running"),
        (
            ("figures", "--out", "figs", "--models", "vit_base"),
            "--model vit_base (did you mean vit_base_patch16_224?)",
        ),
    ],
)
def test_report_and_figures_filters_that_match_nothing_are_refused(
    tmp_path: Path, command: tuple[str, ...], asked: str
) -> None:
    batch_id = _commit(tmp_path, rows=4)
    result = _invoke(command[0], batch_id, *command[1:])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert f"no job of batch {batch_id} matches {asked}. Its models: {', '.join(MODELS)}" in message
    assert "its jobs: 4 queued, 2 succeeded, 2 failed." in message
    assert not (tmp_path / command[2]).exists()
