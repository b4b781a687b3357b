"""The pipeline end to end on real storage and databases: what lands where, and what one bad input costs.

Every test runs a real batch through ``run_batch`` (the code a worker runs) with a random-weight
``deit_tiny_patch16_224`` on the CPU, against SQLite and PostgreSQL, with artifacts in a local folder
or on a real S3 HTTP endpoint.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from PIL import Image

from common.db import open_database
from common.db.models import Artifact, Job, JobState, Prediction
from common.db.reports import iter_job_results
from common.methods import ARRAY_ARTIFACTS, IMAGE_ARTIFACTS, MethodSettings
from common.settings import Settings
from common.storage import read_uri
from producer.report import write_csv
from producer.submit import SubmitOptions, commit_plan, plan_submission
from worker.attention import explain
from worker.local import run_batch
from worker.pipeline import Runtime

MODEL = "deit_tiny_patch16_224"
EXPECTED = {name for name in ARRAY_ARTIFACTS if name != "attention.npy"} | set(IMAGE_ARTIFACTS)


@pytest.fixture(params=["local", "s3"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return (tmp_path / "artifacts").as_uri()
    return f"s3://{request.getfixturevalue('s3_bucket')}/runs/v1"


def _settings(database_url: str, storage_url: str, **overrides) -> Settings:
    return Settings(
        database_url=database_url,
        storage_url=storage_url,
        batch_size=3,
        fetch_threads=2,
        upload_threads=2,
        device="cpu",
        **overrides,
    )


def _run(settings: Settings, csv: Path, *, options: SubmitOptions | None = None):
    options = options or SubmitOptions(models=[MODEL], weights="random")
    db = open_database(settings, migrate=True)
    runtime = Runtime.from_settings(settings, db=db)
    submission = commit_plan(db, plan_submission(csv, options), options, mode="local")
    run = run_batch(runtime, submission.batch_id, backoff_seconds=0.01)
    return runtime, submission, run


def _jobs(runtime: Runtime, batch_id: str) -> dict[str, Job]:
    with runtime.db.session() as session:
        jobs = session.scalars(sa.select(Job).where(Job.batch_id == batch_id)).all()
        return {job.row_id: job for job in jobs}


def _artifacts(runtime: Runtime, job_id: str) -> dict[str, Artifact]:
    with runtime.db.session() as session:
        return {a.name: a for a in session.scalars(sa.select(Artifact).where(Artifact.job_id == job_id))}


def test_good_images_get_every_artifact_and_bad_ones_fail_alone(
    write_image, tmp_path, database_url, storage_url
) -> None:
    images = tmp_path / "images"
    for i in range(4):
        write_image(images / f"ok{i}.png", seed=i, size=(90 + 7 * i, 70))
    write_image(images / "photo.jpg", seed=9)
    (images / "truncated.png").write_bytes(write_image(images / "full.png", seed=5).read_bytes()[:300])
    (images / "text.png").write_text("this is not an image")
    write_image(images / "huge.png", size=(600, 500))
    rows = ["ok0", "ok1", "ok2", "ok3", "photo.jpg", "truncated", "text", "missing", "huge"]
    files = {
        "ok0": "images/ok0.png",
        "ok1": "images/ok1.png",
        "ok2": "images/ok2.png",
        "ok3": "images/ok3.png",
        "photo.jpg": "images/photo.jpg",
        "truncated": "images/truncated.png",
        "text": "images/text.png",
        "missing": "images/nowhere.png",
        "huge": "images/huge.png",
    }
    csv = tmp_path / "data.csv"
    csv.write_text("id,image_uri\n" + "".join(f"{row},{files[row]}\n" for row in rows))
    settings = _settings(database_url, storage_url, max_image_pixels=200_000)

    runtime, submission, run = _run(settings, csv)
    try:
        jobs = _jobs(runtime, submission.batch_id)
        assert (run.succeeded, run.failed) == (5, 4)
        failures = {
            row: (jobs[row].error_class, jobs[row].error_message)
            for row in rows
            if jobs[row].state == "failed"
        }
        assert set(failures) == {"truncated", "text", "missing", "huge"}
        assert failures["huge"][0] == "ImageTooLargeError"
        assert failures["missing"][0] == "ImageError"
        assert "no such file" in failures["missing"][1]
        assert failures["text"][0] == "ImageError"
        assert "not an image" in failures["text"][1]
        assert failures["truncated"][0] == "ImageError"
        for row in ("ok0", "ok1", "ok2", "ok3", "photo.jpg"):
            job = jobs[row]
            assert job.state == JobState.SUCCEEDED
            assert job.attempts == 1
            assert job.device == "cpu"
            assert "RANDOM" in job.weights_source
            artifacts = _artifacts(runtime, job.id)
            assert set(artifacts) == EXPECTED
            for artifact in artifacts.values():
                data = read_uri(artifact.uri)
                assert len(data) == artifact.bytes
                assert artifact.uri.startswith(storage_url)
                assert job.image_sha256 in artifact.uri
            rollout = np.load(io.BytesIO(read_uri(artifacts["rollout.npy"].uri)))
            assert rollout.shape == (14, 14)
            assert artifacts["rollout.npy"].shape == "14x14"
            assert Image.open(io.BytesIO(read_uri(artifacts["rollout.png"].uri))).size == (224, 224)
    finally:
        runtime.close()


def test_stored_maps_equal_the_compute_core_on_the_same_model(write_image, tmp_path, sqlite_url) -> None:
    """What the pipeline stores is exactly what ``explain`` gives for that image and model."""
    for i in range(5):
        write_image(tmp_path / f"{i}.png", seed=i)
    csv = tmp_path / "data.csv"
    csv.write_text(
        "id,image_uri,target\n" + "".join(f"r{i},{i}.png,{'' if i % 2 else 7}\n" for i in range(5))
    )
    settings = _settings(sqlite_url, (tmp_path / "out").as_uri())
    runtime, submission, _ = _run(settings, csv)
    try:
        jobs = _jobs(runtime, submission.batch_id)
        spec = submission.specs[MODEL]
        loaded = runtime.models.get(spec)  # the same warm model the pipeline used
        for i in range(5):
            job = jobs[f"r{i}"]
            image = Image.open(tmp_path / f"{i}.png").convert("RGB")
            (expected,) = explain(
                loaded.model, loaded.preprocessor(image)[None], MethodSettings(), [None if i % 2 else 7]
            )
            artifacts = _artifacts(runtime, job.id)
            for name, array in expected.arrays().items():
                stored = np.load(io.BytesIO(read_uri(artifacts[name].uri)))
                np.testing.assert_allclose(stored, array, atol=2e-5, err_msg=name)
            assert job.target_index == (expected.target if i % 2 else 7)
            with runtime.db.session() as session:
                top = session.scalars(
                    sa.select(Prediction).where(Prediction.job_id == job.id).order_by(Prediction.rank)
                ).all()
            assert [p.class_index for p in top] == expected.top_indices.tolist()
            assert top[0].label is not None  # ImageNet class names for a 1000-class model
    finally:
        runtime.close()


def test_resubmitting_reuses_and_duplicates_compute_once(write_image, tmp_path, database_url) -> None:
    write_image(tmp_path / "a.png", seed=1)
    write_image(tmp_path / "b.png", seed=2)
    (tmp_path / "a-copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    csv = tmp_path / "data.csv"
    csv.write_text("id,image_uri\na,a.png\nb,b.png\ncopy,a-copy.png\n")
    settings = _settings(database_url, (tmp_path / "out").as_uri())
    runtime, first, run = _run(settings, csv)
    runtime.close()
    assert (run.succeeded, run.reused) == (2, 1)  # the copy has the same bytes: computed once
    runtime, second, run = _run(settings, csv)
    try:
        assert (run.succeeded, run.reused, run.failed) == (0, 3, 0)
        old, new = _jobs(runtime, first.batch_id), _jobs(runtime, second.batch_id)
        for row in ("a", "b", "copy"):
            assert new[row].reused_from is not None
            assert {a.uri for a in _artifacts(runtime, new[row].id).values()} == {
                a.uri for a in _artifacts(runtime, old[row].id).values()
            }
        different = SubmitOptions(
            models=[MODEL], weights="random", settings=MethodSettings(discard_ratio=0.5)
        )
        runtime.close()
        runtime, _, run = _run(settings, csv, options=different)
        assert (run.succeeded, run.reused) == (2, 1)  # other settings: other artifacts
    finally:
        runtime.close()


def test_transient_storage_failure_is_retried_then_recorded(
    write_image, tmp_path, sqlite_url, s3_env, monkeypatch
) -> None:
    write_image(tmp_path / "a.png")
    csv = tmp_path / "data.csv"
    csv.write_text("image_uri\na.png\n")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: a real outage
    settings = _settings(sqlite_url, "s3://vitscope-down/x", max_attempts=2)
    runtime, submission, run = _run(settings, csv)
    try:
        (job,) = _jobs(runtime, submission.batch_id).values()
        assert (run.rounds, run.failed) == (2, 1)
        assert (job.state, job.attempts, job.error_class) == (JobState.FAILED, 2, "StorageUnavailableError")
    finally:
        runtime.close()


def test_targets_by_name_and_index_and_invalid(write_image, tmp_path, sqlite_url) -> None:
    write_image(tmp_path / "a.png")
    csv = tmp_path / "data.csv"
    csv.write_text(
        "id,image_uri,target\nname,a.png,tabby\nindex,a.png,281\nbad,a.png,unicorn\nrange,a.png,1000\n"
    )
    runtime, submission, _ = _run(_settings(sqlite_url, (tmp_path / "out").as_uri()), csv)
    try:
        jobs = _jobs(runtime, submission.batch_id)
        assert jobs["name"].target_index == 281
        assert jobs["index"].target_index == 281
        assert jobs["index"].reused_from is None  # "281" and "tabby" are separate configurations
        assert (jobs["bad"].state, jobs["bad"].error_class) == (JobState.FAILED, "InvalidTargetError")
        assert "unicorn" in jobs["bad"].error_message
        assert jobs["range"].error_class == "InvalidTargetError"
    finally:
        runtime.close()


def test_custom_checkpoint_from_a_models_file(write_image, tmp_path, sqlite_url) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, num_classes=2)
    save_file(model.state_dict(), tmp_path / "lesion.safetensors")
    (tmp_path / "models.toml").write_text(
        '[models.lesion]\narch = "deit_tiny_patch16_224"\nweights = "lesion.safetensors"\n'
        'labels = ["healthy", "lesion"]\npreprocess = "paper"\n'
    )
    write_image(tmp_path / "a.png")
    csv = tmp_path / "data.csv"
    csv.write_text("id,image_uri,target\na,a.png,lesion\n")
    options = SubmitOptions(models=["lesion"], models_file=tmp_path / "models.toml")
    runtime, submission, _ = _run(_settings(sqlite_url, (tmp_path / "out").as_uri()), csv, options=options)
    try:
        (job,) = _jobs(runtime, submission.batch_id).values()
        assert job.state == JobState.SUCCEEDED, job.error_message
        assert job.target_index == 1
        with runtime.db.session() as session:
            labels = session.scalars(sa.select(Prediction.label).where(Prediction.job_id == job.id)).all()
        assert sorted(labels) == ["healthy", "lesion"]  # top-k is capped by the number of classes
        assert "lesion.safetensors" in job.weights_source
    finally:
        runtime.close()


def test_headless_average_pooled_and_unexplainable_models_each_get_what_they_can(
    write_image, tmp_path, sqlite_url
) -> None:
    """A backbone without a head gets the class-agnostic artifacts and says so; a model without a
    class token has no cls_attention; a model the core cannot explain fails at load, naming why."""
    write_image(tmp_path / "a.png")
    csv = tmp_path / "data.csv"
    csv.write_text("id,image_uri,target\nplain,a.png,\ntargeted,a.png,3\n")
    headless, no_class_token, map_pooled = "eva02_tiny_patch14_224", "test_vit2", "test_vit3"
    options = SubmitOptions(models=[headless, no_class_token, map_pooled], weights="random")
    runtime, submission, _ = _run(_settings(sqlite_url, (tmp_path / "out").as_uri()), csv, options=options)
    try:
        with runtime.db.session() as session:
            jobs = {
                (job.row_id, job.model): job
                for job in session.scalars(sa.select(Job).where(Job.batch_id == submission.batch_id))
            }
            predictions = {
                key: session.scalars(sa.select(Prediction).where(Prediction.job_id == job.id)).all()
                for key, job in jobs.items()
            }
            results = {
                (row.row_id, row.model): row
                for row in session.execute(
                    sa.text("SELECT * FROM job_results WHERE batch_id = :b"), {"b": submission.batch_id}
                )
            }
            reported = {
                (job["id"], job["model"]): job for job in iter_job_results(session, submission.batch_id)
            }
            csv_out = io.StringIO()
            write_csv(reported.values(), csv_out)
        job = jobs["plain", headless]
        assert job.state == JobState.SUCCEEDED, job.error_message
        assert (job.readout, job.target_index, predictions["plain", headless]) == ("avg", None, [])
        assert "no classification head" in job.note
        assert set(_artifacts(runtime, job.id)) == {
            "input.png",  # the model's input crop is stored for every model
            "layer_scores.npy",
            "layer_scores.png",
            "rollout.npy",
            "rollout.png",
            "cls_attention.npy",
        }
        row = results["plain", headless]
        assert (row.readout, row.top1_index, row.grad_rollout_uri, row.relevance_uri) == (
            "avg",
            None,
            None,
            None,
        )
        assert row.rollout_uri is not None
        assert row.cls_attention_uri is not None
        report = reported["plain", headless]
        assert (report["readout"], report["note"], report["predictions"]) == ("avg", job.note, [])
        assert "relevance.npy" not in report["artifacts"]
        assert ",readout,note," in csv_out.getvalue().splitlines()[0]
        failed = jobs["targeted", headless]
        assert (failed.state, failed.error_class) == (JobState.FAILED, "InvalidTargetError")
        assert "no classification head" in failed.error_message

        job = jobs["plain", no_class_token]
        assert job.state == JobState.SUCCEEDED, job.error_message
        assert (job.readout, job.note) == ("avg", "no class token: no cls_attention")
        names = set(_artifacts(runtime, job.id))
        assert "cls_attention.npy" not in names
        assert {"grad_rollout.npy", "relevance.npy"} <= names
        assert len(predictions["plain", no_class_token]) == 5

        for row_id in ("plain", "targeted"):
            job = jobs[row_id, map_pooled]
            assert (job.state, job.error_class) == (JobState.FAILED, "UnsupportedModelError")
            assert f"model {map_pooled!r} is not supported: it pools with attention" in job.error_message
    finally:
        runtime.close()
