"""The producer CLI as a user meets it: embedded defaults, exit codes, formats, and clear refusals."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import redis
import sqlalchemy as sa
from typer.testing import CliRunner

from common.db.models import Artifact, Batch, Job
from common.db.reports import RESULT_COLUMNS
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
    assert [job["row_id"] for job in as_json] == ["cat", "dog", "broken"]
    assert [job["state"] for job in as_json] == ["succeeded", "succeeded", "failed"]
    assert set(as_json[0]) == {*RESULT_COLUMNS, "predictions", "artifacts", "metadata"}
    assert len(as_json[0]["predictions"]) == 5
    assert as_json[0]["metadata"] == {"site": "a"}
    assert as_json[2]["error_class"] == "ImageError"

    rows = list(csv.DictReader(io.StringIO(_invoke("results", "first", "--format", "csv").stdout)))
    assert [row["state"] for row in rows] == ["succeeded", "succeeded", "failed"]
    assert rows[0]["rollout_png_uri"].startswith("file://")
    # What json has, csv has, under the same names: weights_source and the dataset's own columns too.
    assert [row["weights_source"] for row in rows] == [job["weights_source"] or "" for job in as_json]
    assert [row["site"] for row in rows] == ["a", "b", "c"]
    assert {key: rows[2][key] for key in RESULT_COLUMNS} == {
        key: "" if value is None else str(value) for key, value in as_json[2].items() if key in RESULT_COLUMNS
    }

    lines = _invoke("results", "first", "--format", "jsonl", "--status", "failed").stdout.splitlines()
    assert [json.loads(line)["row_id"] for line in lines] == ["broken"]

    out = tmp_path / "out.csv"
    assert _invoke("results", "first", "--format", "csv", "-o", str(out)).exit_code == 0
    assert out.read_text().count("\n") == 4

    table = _invoke("results", "first").stdout
    assert "cat.png" in table
    assert "failed" in table


def test_resume_reruns_only_failed_jobs_with_submits_output(dataset: Path, tmp_path: Path) -> None:
    batch_id = _invoke("submit", str(dataset), "--weights", "random").stdout.strip().splitlines()[-1]
    (tmp_path / "images" / "broken.png").write_bytes((tmp_path / "images" / "cat.png").read_bytes())
    result = _invoke("resume", batch_id)
    assert result.exit_code == 0, result.output
    assert "1 failed job(s)" in result.output
    # submit --local's output: the loading line, the weights notice, the bar and the summary
    assert "loading 1 model(s) on cpu" in result.output
    assert "RANDOM weights" in result.output
    assert "explaining" in result.output
    assert "3/3" in result.output
    assert "done in" in result.output
    assert "1 reused" in result.output
    assert result.stdout.strip().splitlines()[-1] == batch_id
    statuses = [job["state"] for job in json.loads(_invoke("results", batch_id, "--format", "json").stdout)]
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


def test_a_nul_character_exits_2_naming_the_line_and_creates_nothing_on_either_database(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch, write_image
) -> None:
    """PostgreSQL failed the insert with a DataError traceback (exit 1); SQLite stored the NUL."""
    write_image(tmp_path / "images" / "cat.png")
    path = tmp_path / "nul.csv"
    path.write_text("id,image_uri\ncat,images/cat.png\nc\x00t,images/cat.png\n")
    monkeypatch.setenv("VITSCOPE_DATABASE_URL", database_url)
    if not database_url.startswith("sqlite"):
        # A shared server is migrated deliberately; submit then reaches the rows and their insert.
        assert _invoke("db", "upgrade").exit_code == 0
    result = _invoke("submit", str(path), "--weights", "random", "--local")
    assert result.exit_code == 2, result.output
    assert "line 3: a NUL character" in result.output
    assert "\x00" not in result.output  # shown as an escape, not written to the terminal
    engine = sa.create_engine(database_url)
    try:
        tables = sa.inspect(engine).get_table_names()
        if "batches" in tables:
            with engine.connect() as conn:
                assert conn.execute(sa.select(sa.func.count()).select_from(Batch)).scalar() == 0
    finally:
        engine.dispose()


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
    assert fallback.exit_code == 1, fallback.output  # ran, and the broken image failed its own job
    assert "RANDOM" in fallback.output
    batch_id = fallback.stdout.strip().splitlines()[-1]
    jobs = json.loads(_invoke("results", batch_id, "--format", "json").stdout)
    assert [job["state"] for job in jobs] == ["succeeded", "succeeded", "failed"]
    assert ["RANDOM" in job["weights_source"] for job in jobs[:2]] == [True, True]


def test_not_found_batch_is_a_clear_error(tmp_path: Path) -> None:
    assert _invoke("db", "upgrade").exit_code == 0
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


def test_resume_publishes_every_queued_job_now_even_after_the_broker_lost_them(
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
        result = _invoke("resume", batch_id)
        assert result.exit_code == 0, result.output
        assert "published 40 queued job(s) in 2 message(s)" in result.output
        assert client.llen("vitscope.deit_tiny") == 2  # 40 jobs in chunks of 32
        client.flushdb()  # the broker loses its data: resume publishes them again at once
        assert "published 40 queued job(s)" in _invoke("retry", batch_id).output  # the former name
        assert client.llen("vitscope.deit_tiny") == 2
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
    assert [job["row_id"] for job in as_json] == ids  # stored and returned as given
    assert [job["reused_from"] is None for job in as_json].count(True) == 1  # one image: computed once

    rows = list(csv.DictReader(io.StringIO(_invoke("results", batch_id, "--format", "csv").stdout)))
    assert [row["row_id"] for row in rows] == ["'" + cell for cell in ids[:-1]] + ["plain"]
    for row in rows:
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r"))


def test_a_distributed_submit_warns_about_local_paths(
    tmp_path: Path, broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = broker_url
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
        client.close()


def test_a_distributed_submit_warns_about_s3_rows_outside_the_sources_when_it_can_tell(
    tmp_path: Path, broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VITSCOPE_BROKER_URL", broker_url)
    data = tmp_path / "data.csv"
    data.write_text(
        "image_uri,mask_uri\ns3://photos/a.png,\ns3://other/b.png,\ns3://photos/c.png,s3://other/m.png\n"
    )
    # The producer's own settings say nothing about S3: the workers' settings are unknown to it.
    assert "S3" not in _invoke("submit", str(data), "--weights", "random").output
    monkeypatch.setenv("VITSCOPE_S3_SOURCES", "photos")
    result = _invoke("submit", str(data), "--weights", "random")
    assert result.exit_code == 0, result.output  # advice: the workers decide
    assert "WARNING: 2 row(s) name S3 objects outside VITSCOPE_S3_SOURCES" in result.output
    assert "s3://other/b.png is outside the S3 sources" in result.output
    monkeypatch.setenv("VITSCOPE_S3_SOURCES", "*")
    assert "S3 objects outside" not in _invoke("submit", str(data), "--weights", "random").output


# ---- every submit/status/results/retry option, run once with its effect checked ---------------------


def _job_rows(tmp_path: Path, batch_id: str) -> list[Job]:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'vitscope.db'}")
    try:
        with sa.orm.Session(engine) as session:
            return list(
                session.scalars(sa.select(Job).where(Job.batch_id == batch_id).order_by(Job.row_number))
            )
    finally:
        engine.dispose()


def _stored_arrays(tmp_path: Path, job_id: str) -> dict[str, np.ndarray]:
    from common.storage import read_uri

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'vitscope.db'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(Artifact.name, Artifact.uri).where(
                    Artifact.job_id == job_id, Artifact.name.like("%.npy")
                )
            ).all()
    finally:
        engine.dispose()
    return {name: np.load(io.BytesIO(read_uri(uri))) for name, uri in rows}


def _batch_record(tmp_path: Path, batch_id: str) -> Batch:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'vitscope.db'}")
    try:
        with sa.orm.Session(engine) as session:
            return session.get(Batch, batch_id)
    finally:
        engine.dispose()


def test_method_options_reach_the_stored_arrays(tmp_path: Path, write_image) -> None:
    """Each option is checked against the compute core run with that option — and shown to matter,
    by the core giving something else without it, so an option the CLI dropped would be caught."""
    import torch
    from PIL import Image

    from common.methods import HeadFusion, LayerScoreReduction, MethodSettings
    from common.modelspec import ModelSpec
    from worker.attention import explain
    from worker.models import ModelCache

    write_image(tmp_path / "wide.png", size=(150, 90), seed=3)  # not square: timm crops, paper resizes
    data = tmp_path / "data.csv"
    data.write_text("image_uri,cls\nwide.png,7\n")
    result = _invoke(
        "submit", str(data), "--weights", "random",
        "--head-fusion", "max", "--discard-ratio", "0.5", "--layer-scores", "key_max",
        "--raw-attention", "--top-k", "3", "--preprocess", "paper", "--target-column", "cls",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    batch_id = result.stdout.strip().splitlines()[-1]
    (job,) = _job_rows(tmp_path, batch_id)
    assert (job.state, job.target, job.target_index) == ("succeeded", "7", 7)
    stored = _stored_arrays(tmp_path, job.id)
    as_json = json.loads(_invoke("results", batch_id, "--format", "json").stdout)
    assert len(as_json[0]["predictions"]) == 3

    spec = ModelSpec.from_dict(_batch_record(tmp_path, batch_id).models["specs"]["deit_tiny_patch16_224"])
    assert spec.preprocess == "paper"
    cache = ModelCache(device=torch.device("cpu"))
    image = Image.open(tmp_path / "wide.png").convert("RGB")
    chosen = MethodSettings(
        head_fusion=HeadFusion.MAX,
        discard_ratio=0.5,
        layer_score_reduction=LayerScoreReduction.KEY_MAX,
        raw_attention=True,
        top_k=3,
    )

    def core(settings: MethodSettings, target: int | None = 7, preprocess: str = "paper") -> dict:
        loaded = cache.get(ModelSpec.from_dict({**spec.to_dict(), "preprocess": preprocess}))
        (explanation,) = explain(loaded.model, loaded.preprocessor(image)[None], settings, [target])
        return explanation.arrays()

    expected = core(chosen)
    assert set(stored) == set(expected)
    assert stored["attention.npy"].shape == (12, 3, 197, 197)
    for name, array in expected.items():
        np.testing.assert_allclose(stored[name], array, atol=2e-3 if name == "attention.npy" else 2e-5)
    alternatives = {  # what each option changes, were it left at its default
        "head_fusion": (core(dataclasses.replace(chosen, head_fusion=HeadFusion.MEAN)), "rollout.npy"),
        "discard_ratio": (core(dataclasses.replace(chosen, discard_ratio=0.9)), "rollout.npy"),
        "layer_scores": (
            core(dataclasses.replace(chosen, layer_score_reduction=LayerScoreReduction.QUERY_MAX)),
            "layer_scores.npy",
        ),
        "target_column": (core(chosen, target=None), "grad_rollout.npy"),
        "preprocess": (core(chosen, preprocess="timm"), "rollout.npy"),
    }
    for option, (other, name) in alternatives.items():
        assert not np.allclose(other[name], stored[name], atol=1e-4), f"{option} made no difference"


def test_models_file_results_filters_and_an_empty_retry(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "images" / "broken.png").unlink()
    dataset.write_text("id,image_uri\ncat,images/cat.png\ndog,images/dog.png\n")
    (tmp_path / "models.toml").write_text(
        '[models.pets]\narch = "deit_tiny_patch16_224"\nweights = "random"\nnum_classes = 2\n'
        'labels = ["cat", "dog"]\n'
        '[models.plain]\narch = "deit_tiny_patch16_224"\nweights = "random"\n'
    )
    result = _invoke(
        "submit", str(dataset), "--models-file", str(tmp_path / "models.toml"), "--models", "pets,plain"
    )
    assert result.exit_code == 0, result.output
    batch_id = result.stdout.strip().splitlines()[-1]

    pets = json.loads(_invoke("results", batch_id, "--model", "pets", "--format", "json").stdout)
    assert [(job["row_id"], job["model"], job["state"]) for job in pets] == [
        ("cat", "pets", "succeeded"),
        ("dog", "pets", "succeeded"),
    ]
    for job in pets:  # the models file's own head and labels: two classes, named
        assert sorted(p["label"] for p in job["predictions"]) == ["cat", "dog"]
    plain = json.loads(_invoke("results", batch_id, "--model", "plain", "--format", "json").stdout)
    assert [len(job["predictions"]) for job in plain] == [5, 5]

    table = _invoke("results", batch_id, "--limit", "1").stdout
    assert "… 3 more job(s)" in table
    assert table.count("cat.png") + table.count("dog.png") == 1
    assert "… 2 more job(s)" in _invoke("results", batch_id, "--limit", "2").stdout

    before = [(job.id, job.attempts, job.finished_at) for job in _job_rows(tmp_path, batch_id)]
    nothing = _invoke("resume", batch_id)
    assert nothing.exit_code == 0, nothing.output
    assert "0 failed job(s)" in nothing.output
    assert "nothing to resume: 4 job(s) succeeded" in nothing.output
    assert [(job.id, job.attempts, job.finished_at) for job in _job_rows(tmp_path, batch_id)] == before


def test_status_watch_refreshes_until_the_batch_is_done(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    from common.db import open_database
    from producer.submit import SubmitOptions, commit_plan, plan_submission

    data = tmp_path / "data.csv"
    data.write_text("image_uri\n" + "".join(f"s3://b/{i}.png\n" for i in range(3)))
    options = SubmitOptions(weights="random")
    db = open_database(get_settings())
    batch_id = commit_plan(db, plan_submission(data, options), options, mode="local").batch_id
    db.dispose()

    once = _invoke("status", batch_id)
    assert once.exit_code == 0
    assert once.stdout.count(f"batch {batch_id}") == 1  # without --watch: one view of a running batch

    log = tmp_path / "watch.log"
    producer = Path(sys.executable).parent / "producer"
    with log.open("w") as handle:
        watch = subprocess.Popen(
            [str(producer), "status", batch_id, "--watch"],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
        )
    try:
        deadline = time.monotonic() + 120
        while log.read_text().count(f"batch {batch_id}") < 2:  # refreshed at least once
            assert watch.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'vitscope.db'}")
        with engine.begin() as conn:
            conn.execute(
                sa.update(Job)
                .where(Job.batch_id == batch_id)
                .values(
                    state="failed", error_class="ImageError", error_message="gone", finished_at=sa.func.now()
                )
            )
        engine.dispose()
        assert watch.wait(timeout=120) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    output = log.read_text()
    assert "ImageError" in output.split(f"batch {batch_id}")[-1]  # the last view shows the end
