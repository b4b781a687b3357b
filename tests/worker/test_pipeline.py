"""The pipeline end to end on real storage and databases: what lands where, and what one bad input costs.

Every test runs a real batch through ``run_batch`` (the code a worker runs) with a random-weight
``deit_tiny_patch16_224`` on the CPU, against SQLite and PostgreSQL, with artifacts in a local folder
or on a real S3 HTTP endpoint.
"""

from __future__ import annotations

import io
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from PIL import Image

from common.artifacts import ARRAY_ARTIFACTS, IMAGE_ARTIFACTS
from common.db import open_database
from common.db.jobs import claim_jobs
from common.db.models import Artifact, Job, JobState, Prediction, utcnow
from common.db.records import WorkerIdentity
from common.db.reports import iter_job_results
from common.errors import StorageUnavailableError
from common.fetch import content_sha256
from common.methods import MethodSettings
from common.settings import Settings
from common.storage import open_store, read_uri
from producer.output import write_csv
from producer.submit import SubmitOptions, commit_plan, plan_submission
from worker.attention import explain
from worker.local import run_batch
from worker.pipeline import ChunkReport, Runtime, process_jobs

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


@pytest.mark.parametrize("cpu_workers", [0, 2])
def test_transient_storage_failure_is_retried_then_recorded(
    write_image, tmp_path, sqlite_url, s3_env, monkeypatch, cpu_workers: int
) -> None:
    """Whether this process uploads (no CPU pool) or a pool process does (its error crosses back)."""
    write_image(tmp_path / "a.png")
    csv = tmp_path / "data.csv"
    csv.write_text("image_uri\na.png\n")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: a real outage
    # No riding out the outage (VITSCOPE_STORAGE_RETRY_SECONDS, 60 s by default): this test is about
    # what the pipeline does once the store gives up.
    settings = _settings(
        sqlite_url, "s3://vitscope-down/x", max_attempts=2, storage_retry_seconds=0, cpu_workers=cpu_workers
    )
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
                (job["row_id"], job["model"]): job for job in iter_job_results(session, submission.batch_id)
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


# ---- recovery paths, through the public entry points (``run_batch``, ``process_jobs``) ------------


def _http_csv(tmp_path: Path, image_server, write_image, rows: dict[str, bytes | int]) -> Path:
    """A dataset of images on the test's image server: {row id: seed or exact bytes}."""
    lines = ["id,image_uri"]
    for row, image in rows.items():
        data = (
            image
            if isinstance(image, bytes)
            else write_image(tmp_path / f"{row}.png", seed=image).read_bytes()
        )
        image_server.images[f"/{row}.png"] = data
        lines.append(f"{row},{image_server.url(f'/{row}.png')}")
    csv = tmp_path / "data.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def _recording_batch_sizes(runtime: Runtime, spec, poison: torch.Tensor | None = None) -> list[int]:
    """Record the size of every micro-batch the warm model computes; raise on a poisoned image.

    The fault goes in through the model's own hook API on the model the pipeline itself will use
    (the runtime's warm cache), so no pipeline function is replaced.
    """
    sizes: list[int] = []

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        (batch,) = args
        sizes.append(len(batch))
        if poison is not None and any(torch.equal(image, poison) for image in batch):
            raise RuntimeError("poisoned image in this micro-batch")

    runtime.models.get(spec).model.patch_embed.register_forward_pre_hook(hook)
    return sizes


def _local_settings(sqlite_url: str, tmp_path: Path, **overrides) -> Settings:
    values = {
        "database_url": sqlite_url,
        "storage_url": (tmp_path / "out").as_uri(),
        "batch_size": 4,
        "fetch_threads": 2,
        "upload_threads": 2,
        "device": "cpu",
        "allow_private_networks": True,
        **overrides,
    }
    return Settings(**values)


def _submit(settings: Settings, csv: Path, options: SubmitOptions):
    db = open_database(settings, migrate=True)
    plan = plan_submission(csv, options)
    return Runtime.from_settings(settings, db=db), plan, commit_plan(db, plan, options, mode="local")


def test_a_model_that_cannot_be_used_fails_its_whole_group_before_fetching(
    tmp_path: Path, sqlite_url: str, image_server, write_image
) -> None:
    (tmp_path / "models.toml").write_text(
        '[models.good]\narch = "deit_tiny_patch16_224"\nweights = "random"\n'
        '[models.missing]\narch = "deit_tiny_patch16_224"\nweights = "missing.safetensors"\n'
        '[models.gap]\narch = "test_vit3"\nweights = "random"\n'  # pools with attention: unexplainable
    )
    csv = _http_csv(tmp_path, image_server, write_image, {"a": 1, "b": 2})
    options = SubmitOptions(models=["good", "missing", "gap"], models_file=tmp_path / "models.toml")
    runtime, _, submission = _submit(_local_settings(sqlite_url, tmp_path), csv, options)
    try:
        run = run_batch(runtime, submission.batch_id, backoff_seconds=0.01)
        with runtime.db.session() as session:
            jobs = session.scalars(sa.select(Job).where(Job.batch_id == submission.batch_id)).all()
        by_model: dict[str, set[tuple]] = {}
        for job in jobs:
            by_model.setdefault(job.model, set()).add((job.state, job.error_class, job.attempts))
        assert by_model == {
            "good": {(JobState.SUCCEEDED, None, 1)},
            "missing": {(JobState.FAILED, "WeightsUnavailableError", 1)},
            "gap": {(JobState.FAILED, "UnsupportedModelError", 1)},
        }
        messages = {job.model: job.error_message for job in jobs}
        assert "missing.safetensors does not exist" in messages["missing"]
        assert "it pools with attention" in messages["gap"]
        assert (run.succeeded, run.failed, run.rounds) == (2, 4, 1)
        # The failed groups never fetched an image: each was fetched once, by the good model's group.
        assert image_server.requests == {"/a.png": 1, "/b.png": 1}
    finally:
        runtime.close()


def test_a_job_whose_model_its_batch_does_not_know_fails_with_the_reason(
    tmp_path: Path, sqlite_url: str, image_server, write_image
) -> None:
    """A row that named another model than the one validated (the CSV edited between submit's passes,
    before the digest caught it; a hand-edited row): that job fails, its chunk neighbour succeeds."""
    csv = _http_csv(tmp_path, image_server, write_image, {"a": 1, "b": 2})
    options = SubmitOptions(models=[MODEL], weights="random")
    runtime, _, submission = _submit(_local_settings(sqlite_url, tmp_path), csv, options)
    try:
        with runtime.db.session() as session:
            session.execute(
                sa.update(Job)
                .where(Job.batch_id == submission.batch_id, Job.row_id == "b")
                .values(model="vit_tiny_patch16_224")
            )
        seen: list[tuple[str, JobState]] = []
        run = run_batch(
            runtime, submission.batch_id, on_job=lambda job_id, state: seen.append((job_id, state))
        )
        jobs = _jobs(runtime, submission.batch_id)
        assert (jobs["a"].state, jobs["b"].state) == (JobState.SUCCEEDED, JobState.FAILED)
        assert jobs["b"].error_class == "UnknownModelError"
        assert "'vit_tiny_patch16_224' is not one of batch" in jobs["b"].error_message
        assert f"({MODEL})" in jobs["b"].error_message
        assert (run.succeeded, run.failed, run.rounds) == (1, 1, 1)
        assert sorted(state for _, state in seen) == sorted([JobState.SUCCEEDED, JobState.FAILED])
    finally:
        runtime.close()


def test_a_model_whose_weights_storage_is_down_requeues_its_group_with_the_reason(
    tmp_path: Path, sqlite_url: str, image_server, write_image, s3_env, monkeypatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: a real outage
    monkeypatch.setenv("VITSCOPE_STORAGE_RETRY_SECONDS", "0")  # give up at once instead of after 60 s
    (tmp_path / "models.toml").write_text(
        '[models.remote]\narch = "deit_tiny_patch16_224"\nweights = "s3://weights/deit.safetensors"\n'
    )
    csv = _http_csv(tmp_path, image_server, write_image, {"a": 1, "b": 2})
    options = SubmitOptions(models=["remote"], models_file=tmp_path / "models.toml")
    runtime, _, submission = _submit(_local_settings(sqlite_url, tmp_path, max_attempts=2), csv, options)
    reports: list[ChunkReport] = []
    try:
        with runtime.db.session() as session:
            ids = session.scalars(sa.select(Job.id).where(Job.batch_id == submission.batch_id)).all()
        reports.append(process_jobs(runtime, ids))
        assert sorted(reports[0].retry) == sorted(ids)  # handed back, to be published again
        with runtime.db.session() as session:
            jobs = session.scalars(sa.select(Job).where(Job.id.in_(ids))).all()
        assert {(j.state, j.error_class, j.attempts) for j in jobs} == {
            (JobState.QUEUED, "StorageUnavailableError", 1)
        }
        assert "weights" in jobs[0].error_message
        run = run_batch(runtime, submission.batch_id, backoff_seconds=0.01)  # the second and last attempt
        assert (run.failed, run.rounds) == (2, 1)
        with runtime.db.session() as session:
            jobs = session.scalars(sa.select(Job).where(Job.id.in_(ids))).all()
        assert {(j.state, j.error_class, j.attempts) for j in jobs} == {
            (JobState.FAILED, "StorageUnavailableError", 2)
        }
        assert not image_server.requests
    finally:
        runtime.close()


def test_a_micro_batch_that_raises_is_retried_image_by_image_so_only_the_bad_image_fails(
    tmp_path: Path, sqlite_url: str, image_server, write_image
) -> None:
    black = io.BytesIO()
    Image.new("RGB", (64, 64)).save(black, format="PNG")
    csv = _http_csv(
        tmp_path, image_server, write_image, {"ok0": 1, "bad": black.getvalue(), "ok1": 2, "ok2": 3}
    )
    options = SubmitOptions(models=[MODEL], weights="random")
    runtime, plan, submission = _submit(_local_settings(sqlite_url, tmp_path), csv, options)
    try:
        loaded = runtime.models.get(plan.specs[MODEL])
        poison = loaded.preprocessor(Image.new("RGB", (64, 64)))
        sizes = _recording_batch_sizes(runtime, plan.specs[MODEL], poison)
        run = run_batch(runtime, submission.batch_id, backoff_seconds=0.01)
        jobs = _jobs(runtime, submission.batch_id)
        assert sizes == [4, 1, 1, 1, 1]  # the batch, then each of its images alone
        assert (jobs["bad"].state, jobs["bad"].error_class) == (JobState.FAILED, "RuntimeError")
        assert "poisoned image" in jobs["bad"].error_message
        for row in ("ok0", "ok1", "ok2"):
            assert (jobs[row].state, jobs[row].attempts) == (JobState.SUCCEEDED, 1)
            assert set(_artifacts(runtime, jobs[row].id)) == EXPECTED
        assert (run.succeeded, run.failed) == (3, 1)
    finally:
        runtime.close()


class _FailFirstUpload:
    """An object store whose first upload of one image's artifacts fails as an outage would."""

    def __init__(self, store, sha256: str) -> None:
        self._store = store
        self._sha256 = sha256
        self.failed = False

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def put_many(self, items):
        items = list(items)
        if not self.failed and any(self._sha256 in key for key, _, _ in items):
            self.failed = True
            raise StorageUnavailableError("object store unreachable (injected)")
        return self._store.put_many(items)


def test_a_duplicate_whose_original_failed_is_computed_on_its_own(
    tmp_path: Path, sqlite_url: str, image_server, write_image
) -> None:
    image = write_image(tmp_path / "a.png", seed=1).read_bytes()
    csv = _http_csv(tmp_path, image_server, write_image, {"a": image, "b": 2, "copy": image})
    settings = _local_settings(sqlite_url, tmp_path)
    store = _FailFirstUpload(open_store(settings.resolved_storage_url()), content_sha256(image))
    db = open_database(settings, migrate=True)
    options = SubmitOptions(models=[MODEL], weights="random")
    plan = plan_submission(csv, options)
    submission = commit_plan(db, plan, options, mode="local")
    runtime = Runtime.from_settings(settings, db=db, store=store)
    try:
        sizes = _recording_batch_sizes(runtime, plan.specs[MODEL])
        run = run_batch(runtime, submission.batch_id, backoff_seconds=0.01)
        jobs = _jobs(runtime, submission.batch_id)
        assert store.failed
        # Round 1: "a" and "b" computed together; "a"'s upload failed, so "copy" — which waited to
        # reuse "a" — was computed alone. Round 2: "a" reuses "copy". Nothing computed twice more.
        assert sizes == [2, 1]
        assert (jobs["copy"].state, jobs["copy"].attempts, jobs["copy"].reused_from) == (
            JobState.SUCCEEDED,
            1,
            None,
        )
        assert (jobs["a"].state, jobs["a"].attempts, jobs["a"].reused_from) == (
            JobState.SUCCEEDED,
            2,
            jobs["copy"].id,
        )
        assert jobs["a"].error_class is None
        assert (run.succeeded, run.reused, run.failed, run.rounds) == (2, 1, 0, 2)
    finally:
        runtime.close()


def test_a_job_whose_lease_was_taken_over_is_not_recorded_by_the_old_owner(
    tmp_path: Path, sqlite_url: str, image_server, write_image
) -> None:
    csv = _http_csv(tmp_path, image_server, write_image, {"a": 1})
    held = image_server.hold("/a.png")
    options = SubmitOptions(models=[MODEL], weights="random")
    runtime, _, submission = _submit(_local_settings(sqlite_url, tmp_path), csv, options)
    (job_id,) = [job.id for job in _jobs(runtime, submission.batch_id).values()]
    seen: list[tuple[str, JobState]] = []
    reports: list[ChunkReport] = []
    chunk = threading.Thread(
        target=lambda: reports.append(process_jobs(runtime, [job_id], on_job=lambda *a: seen.append(a)))
    )
    try:
        chunk.start()
        image_server.wait_for_request("/a.png")
        rescuer = WorkerIdentity("elsewhere", "elsewhere:1")
        with runtime.db.session() as session:  # the lease ran out (as seen from an hour later) and
            taken = claim_jobs(  # another worker took the job over
                session,
                [job_id],
                worker=rescuer,
                lease_seconds=60,
                max_attempts=3,
                now=utcnow() + timedelta(hours=1),
            )
        assert [job.id for job in taken] == [job_id]
        held.set()
        chunk.join(timeout=300)
        assert [(r.succeeded, r.failed, r.retry, r.reused) for r in reports] == [([], [], [], [])]
        assert seen == []
        job = _jobs(runtime, submission.batch_id)["a"]
        assert (job.state, job.worker_id, job.attempts) == (JobState.RUNNING, rescuer.worker_id, 2)
        assert _artifacts(runtime, job_id) == {}
    finally:
        held.set()
        chunk.join(timeout=300)
        runtime.close()


def test_artifacts_are_flushed_to_disk_before_their_jobs_are_recorded(
    tmp_path: Path, sqlite_url: str, image_server, write_image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local store writes without an fsync per file and flushes once per micro-batch: the flush
    must come before the database says the job succeeded, and a disk that refuses it (EIO: a fault
    that cannot be caused for real here) sends the micro-batch back to the queue, not to ``failed``."""
    import ctypes
    import errno

    import common.storage.local as local

    csv = _http_csv(tmp_path, image_server, write_image, {"a": 1, "b": 2})
    runtime, _, submission = _submit(
        _local_settings(sqlite_url, tmp_path), csv, SubmitOptions(models=[MODEL], weights="random")
    )
    states_at_flush: list[set[JobState]] = []

    def syncfs(fd: int) -> int:
        states_at_flush.append({job.state for job in _jobs(runtime, submission.batch_id).values()})
        if len(states_at_flush) == 1:
            ctypes.set_errno(errno.EIO)
            return -1
        return 0

    monkeypatch.setattr(local, "_SYNCFS", syncfs)
    try:
        run = run_batch(runtime, submission.batch_id, backoff_seconds=0.01)
        jobs = _jobs(runtime, submission.batch_id)
        assert states_at_flush == [{JobState.RUNNING}, {JobState.RUNNING}]  # nothing recorded yet
        assert (run.succeeded, run.failed, run.rounds) == (2, 0, 2)
        assert {(job.state, job.attempts) for job in jobs.values()} == {(JobState.SUCCEEDED, 2)}
        for job in jobs.values():
            assert set(_artifacts(runtime, job.id)) == EXPECTED
    finally:
        runtime.close()
