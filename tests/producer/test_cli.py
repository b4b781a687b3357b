"""The producer CLI as a user meets it: embedded defaults, exit codes, formats, and clear refusals."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from typer.testing import CliRunner

from common.db.models import Batch, Job
from common.settings import get_settings
from producer.cli import app

runner = CliRunner()


def _invoke(*args: str):
    get_settings.cache_clear()
    return runner.invoke(app, list(args), env={"COLUMNS": "200"}, catch_exceptions=False)


@pytest.fixture
def dataset(tmp_path: Path, write_image) -> Path:
    for name in ("cat", "dog"):
        write_image(tmp_path / "images" / f"{name}.png", seed=len(name) + ord(name[0]))
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    path = tmp_path / "data.csv"
    path.write_text(
        "id,image_uri,site\ncat,images/cat.png,a\ndog,images/dog.png,b\nbroken,images/broken.png,c\n"
    )
    return path


def test_local_run_on_embedded_defaults(dataset: Path, tmp_path: Path) -> None:
    result = _invoke("submit", str(dataset), "--weights", "random", "--name", "first")
    assert result.exit_code == 1  # one image is broken: the batch completes, the exit status says so
    batch_id = result.stdout.strip().splitlines()[-1]
    assert (tmp_path / "vitscope.db").exists()
    assert any((tmp_path / "results").rglob("rollout.png"))

    status = _invoke("status", "first")
    assert status.exit_code == 0
    assert batch_id in status.stdout
    assert "ImageError" in status.stdout

    as_json = json.loads(_invoke("results", batch_id, "--format", "json").stdout)
    assert [job["id"] for job in as_json] == ["cat", "dog", "broken"]
    assert [job["status"] for job in as_json] == ["succeeded", "succeeded", "failed"]
    assert set(as_json[0]) >= {
        "job_id",
        "batch_id",
        "image_uri",
        "model",
        "status",
        "error",
        "target",
        "predictions",
        "artifacts",
        "timings",
    }
    assert len(as_json[0]["predictions"]) == 5
    assert as_json[0]["metadata"] == {"site": "a"}
    assert "ImageError" in as_json[2]["error"]

    rows = list(csv.DictReader(io.StringIO(_invoke("results", "first", "--format", "csv").stdout)))
    assert [row["status"] for row in rows] == ["succeeded", "succeeded", "failed"]
    assert rows[0]["rollout.png"].startswith("file://")

    lines = _invoke("results", "first", "--format", "jsonl", "--status", "failed").stdout.splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["broken"]

    out = tmp_path / "out.csv"
    assert _invoke("results", "first", "--format", "csv", "-o", str(out)).exit_code == 0
    assert out.read_text().count("\n") == 4

    table = _invoke("results", "first").stdout
    assert "cat.png" in table
    assert "failed" in table


def test_retry_reruns_only_failed_jobs(dataset: Path, tmp_path: Path) -> None:
    batch_id = _invoke("submit", str(dataset), "--weights", "random").stdout.strip().splitlines()[-1]
    (tmp_path / "images" / "broken.png").write_bytes((tmp_path / "images" / "cat.png").read_bytes())
    result = _invoke("retry", batch_id)
    assert result.exit_code == 0, result.output
    assert "1 failed job(s)" in result.output
    statuses = [job["status"] for job in json.loads(_invoke("results", batch_id, "--format", "json").stdout)]
    assert statuses == ["succeeded"] * 3


@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        ("path\nimages/cat.png\n", "no 'image_uri' column"),
        ("image_uri,model\nimages/cat.png,resnet5000\n", "line 2: unknown model 'resnet5000'"),
        ("", "the file is empty"),
    ],
)
def test_invalid_input_exits_2_and_creates_nothing(tmp_path: Path, csv_text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(csv_text)
    result = _invoke("submit", str(path), "--weights", "random")
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "vitscope.db").exists() or _batches(tmp_path) == 0


def test_unknown_models_option_is_refused(dataset: Path, tmp_path: Path) -> None:
    result = _invoke("submit", str(dataset), "--models", "deit_tiny_patch16_224,vit_nope")
    assert result.exit_code == 2
    assert "unknown model 'vit_nope'" in result.output


def test_offline_pretrained_stops_with_instructions_before_submitting(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    # A closed local port: offline for sure, even on a machine that has internet.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    result = _invoke("submit", str(dataset))
    assert result.exit_code == 2
    assert "VITSCOPE_WEIGHTS_DIR" in result.output
    assert "random" in result.output
    assert _batches(tmp_path) == 0

    fallback = _invoke("submit", str(dataset), "--random-if-offline")
    assert "RANDOM" in fallback.output
    batch_id = fallback.stdout.strip().splitlines()[-1]
    jobs = json.loads(_invoke("results", batch_id, "--format", "json").stdout)
    assert all("RANDOM" in job["weights_source"] for job in jobs if job["status"] == "succeeded")


def test_not_found_batch_is_a_clear_error(tmp_path: Path) -> None:
    result = _invoke("status", "nope")
    assert result.exit_code == 2
    assert "no batch with id or name 'nope'" in result.output


def test_db_commands(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from common.db.session import head_revision

    monkeypatch.setenv("VITSCOPE_DATABASE_URL", postgres_url)
    assert "current: none" in _invoke("db", "current").stdout
    assert _invoke("db", "upgrade").exit_code == 0
    assert f"current: {head_revision()}" in _invoke("db", "current").stdout
    assert _invoke("db", "downgrade", "base").exit_code == 0
    assert "current: none" in _invoke("db", "current").stdout


def _batches(tmp_path: Path) -> int:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'vitscope.db'}")
    try:
        with engine.connect() as conn:
            return (
                conn.execute(sa.select(sa.func.count()).select_from(Batch)).scalar()
                + conn.execute(sa.select(sa.func.count()).select_from(Job)).scalar()
            )
    finally:
        engine.dispose()


def test_retry_publishes_a_batch_whose_producer_died_before_publishing(
    tmp_path: Path, broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.db import open_database
    from producer.submit import SubmitOptions, commit_plan, plan_submission

    broker = broker_url
    monkeypatch.setenv("VITSCOPE_BROKER_URL", broker)
    data = tmp_path / "data.csv"
    data.write_text("image_uri\n" + "".join(f"s3://b/{i}.png\n" for i in range(40)))
    options = SubmitOptions(weights="random")
    db = open_database(get_settings())
    batch_id = commit_plan(db, plan_submission(data, options), options, mode="distributed").batch_id
    db.dispose()  # committed, never published: the producer "died" here
    client = redis.Redis.from_url(broker, socket_timeout=5)
    try:
        result = _invoke("retry", batch_id)
        assert result.exit_code == 0, result.output
        assert "never fully published" in result.output
        assert client.llen("vitscope.deit_tiny") == 2  # 40 jobs in chunks of 32
        client.flushdb()
        assert "never fully published" not in _invoke("retry", batch_id).output  # published now
        assert client.llen("vitscope.deit_tiny") == 0
    finally:
        client.close()


def test_formula_cells_are_kept_in_the_database_and_escaped_in_csv_results(
    tmp_path: Path, write_image
) -> None:
    """A CSV written on Windows (BOM, CRLF) with spreadsheet formulas in its cells."""
    write_image(tmp_path / "images" / "cat.png")
    ids = ['=HYPERLINK("http://x")', "+1", "-2", "@SUM(A1)", "plain"]
    lines = ["id,image_uri,target,site"] + [
        f'"{cell.replace(chr(34), 2 * chr(34))}",images/cat.png,,s' for cell in ids
    ]
    (tmp_path / "data.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    result = _invoke("submit", str(tmp_path / "data.csv"), "--weights", "random")
    assert result.exit_code == 0, result.output
    batch_id = result.stdout.strip().splitlines()[-1]

    as_json = json.loads(_invoke("results", batch_id, "--format", "json").stdout)
    assert [job["id"] for job in as_json] == ids  # stored and returned as given
    assert [job["reused_from"] is None for job in as_json].count(True) == 1  # one image: computed once

    rows = list(csv.DictReader(io.StringIO(_invoke("results", batch_id, "--format", "csv").stdout)))
    assert [row["id"] for row in rows] == ["'" + cell for cell in ids[:-1]] + ["plain"]
    for row in rows:
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r"))


def test_a_distributed_submit_warns_about_local_paths(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = redis_url.rsplit("/", 1)[0] + "/15"
    monkeypatch.setenv("VITSCOPE_BROKER_URL", broker)
    data = tmp_path / "data.csv"
    data.write_text("image_uri\nimages/a.png\nfile:///srv/b.png\ns3://bucket/c.png\n")
    client = redis.Redis.from_url(broker, socket_timeout=5)
    try:
        result = _invoke("submit", str(data), "--weights", "random")
        assert result.exit_code == 0, result.output
        assert "2 row(s) name local files" in result.output
        assert "VITSCOPE_FILE_ROOTS" in result.output
        assert client.llen("vitscope.deit_tiny") == 1  # submitted all the same: the warning is advice
        data.write_text("image_uri\ns3://bucket/c.png\n")
        assert "local files" not in _invoke("submit", str(data), "--weights", "random").output
    finally:
        client.flushdb()
        client.close()
