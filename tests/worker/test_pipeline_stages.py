"""The pipeline's faster stages change no artifact: the CPU pool against inline work (and writing
the artifacts itself where it can open the store), the crops normalized per micro-batch against one
by one, overlapped chunks with duplicates across them, PNG levels.

Real batches through ``run_batch`` on SQLite and a local folder, deit_tiny with random weights.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from common.db import open_database
from common.db.models import Artifact, Job, JobState
from common.settings import Settings
from common.storage import LocalStore, MemoryStore, S3Store, read_uri
from producer.submit import SubmitOptions, commit_plan, plan_submission
from tests.worker.conftest import embedded_settings
from worker.local import run_batch
from worker.pipeline import Runtime

MODEL = "deit_tiny_patch16_224"
# What one neighbouring entry of matplotlib's jet table can change in an overlay channel: the
# table's largest step is 5/255, and a picture is divided by its peak, which is at least 0.5.
_JET_STEP = 10


def _run(settings: Settings, csv: Path) -> tuple[dict[str, dict[str, bytes]], dict[str, Job], object]:
    """Run the dataset; return each row's artifacts (name -> bytes), its job, and the run."""
    options = SubmitOptions(models=[MODEL], weights="random")
    db = open_database(settings, migrate=True)
    runtime = Runtime.from_settings(settings, db=db)
    try:
        submission = commit_plan(db, plan_submission(csv, options), options, mode="local")
        run = run_batch(runtime, submission.batch_id, backoff_seconds=0.01)
        with db.session() as session:
            jobs = {
                j.row_id: j
                for j in session.scalars(sa.select(Job).where(Job.batch_id == submission.batch_id))
            }
            artifacts = {
                row: {
                    a.name: read_uri(a.uri)
                    for a in session.scalars(sa.select(Artifact).where(Artifact.job_id == job.id))
                }
                for row, job in jobs.items()
            }
            session.expunge_all()
    finally:
        runtime.close()
    return artifacts, jobs, run


def _png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_the_cpu_pool_stores_what_inline_work_stores(write_image, tmp_path) -> None:
    """Decoding and PNG encoding in spawned processes give the same ``.npy`` bytes and the same
    pictures, up to a rare pixel at a colour-bin edge: torch's bilinear upsampling rounds its last
    bit differently with one thread (a pool process) than with several (this process)."""
    for i in range(4):
        write_image(tmp_path / f"{i}.png", seed=i, size=(160 + 9 * i, 120))
    write_image(tmp_path / "photo.jpg", seed=7, size=(2000, 1500))  # large enough for a draft decode
    csv = tmp_path / "data.csv"
    csv.write_text("id,image_uri\n" + "".join(f"r{i},{i}.png\n" for i in range(4)) + "big,photo.jpg\n")
    results = {}
    for workers in (0, 2):
        settings = embedded_settings(tmp_path, f"pool{workers}", batch_size=3, cpu_workers=workers)
        results[workers], _, run = _run(settings, csv)
        assert run.succeeded == 5
    for row, inline in results[0].items():
        pooled = results[2][row]
        assert set(pooled) == set(inline)
        for name, data in inline.items():
            if name.endswith(".npy"):
                assert pooled[name] == data, (row, name)
            else:  # see docs/performance.md "How images become pixels": a colour-bin edge may fall either way
                pooled_pixels, inline_pixels = _png_pixels(pooled[name]), _png_pixels(data)
                differ = np.any(pooled_pixels != inline_pixels, axis=2)
                assert differ.mean() < 1e-3, (row, name)
                assert np.abs(pooled_pixels.astype(int) - inline_pixels.astype(int)).max() <= _JET_STEP


def test_overlapped_chunks_compute_each_image_once_and_finish_every_job(write_image, tmp_path) -> None:
    """Batch size 2 makes chunks of 8 jobs: copies of one image sit in the same chunk and in the
    chunks after it, and each distinct image is still computed exactly once."""
    for i in range(7):
        write_image(tmp_path / f"{i}.png", seed=i)
    rows = [f"{i % 7}.png" for i in range(26)]  # 7 distinct images, each repeated across chunks
    csv = tmp_path / "data.csv"
    csv.write_text("id,image_uri\n" + "".join(f"r{n},{uri}\n" for n, uri in enumerate(rows)))
    settings = embedded_settings(tmp_path, batch_size=2, cpu_workers=0)
    artifacts, jobs, run = _run(settings, csv)
    assert (run.succeeded, run.reused, run.failed) == (7, 19, 0)
    assert all(job.state == JobState.SUCCEEDED for job in jobs.values())
    computed = {job.image_sha256 for job in jobs.values() if job.reused_from is None}
    assert len(computed) == 7
    for n, uri in enumerate(rows):  # a copy points at the artifacts of its image's one computation
        first = rows.index(uri)
        assert artifacts[f"r{n}"] == artifacts[f"r{first}"]


@pytest.mark.parametrize("kind", ["local", "s3", "memory"])
def test_pool_processes_write_the_artifacts_where_they_can_open_the_store(
    kind: str, write_image, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a CPU pool, a local folder or an S3 bucket is written by the pool processes themselves:
    this process's store writes nothing (its ``put`` and ``put_many`` fail here, which spawned
    processes do not inherit), yet every artifact is there, described by its size and SHA-256, and
    the local files were flushed by this process's ``sync`` before their jobs were recorded. An
    in-memory store lives in this process only, so this process writes it."""
    import common.storage.local as local

    for i in range(3):
        write_image(tmp_path / f"{i}.png", seed=i, size=(150 + 11 * i, 120))
    csv = tmp_path / "data.csv"
    csv.write_text("id,image_uri\n" + "".join(f"r{i},{i}.png\n" for i in range(3)))
    url = {
        "local": lambda: (tmp_path / "out").as_uri(),
        "s3": lambda: f"s3://{request.getfixturevalue('s3_bucket')}/pooled",
        "memory": lambda: f"memory://pooled-{os.getpid()}",
    }[kind]()
    shared = kind != "memory"
    if shared:

        def refuse(*args, **kwargs):
            raise AssertionError("the worker's own process wrote an artifact")

        for store_class in (LocalStore, S3Store):
            monkeypatch.setattr(store_class, "put", refuse)
            monkeypatch.setattr(store_class, "put_many", refuse)
    flushed: list[Path] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the fallback of a system without syncfs: it needs every path
        flushed.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(local, "_SYNCFS", None)
    monkeypatch.setattr(local.os, "fsync", fsync)
    # One object per artifact, written by the pool (in the shards layout, S3's default, the pool only
    # encodes and the driving process writes one shard per few dozen jobs: tests/worker/test_shards.py).
    settings = embedded_settings(
        tmp_path, storage_url=url, batch_size=2, cpu_workers=2, artifact_layout="objects"
    )
    options = SubmitOptions(models=[MODEL], weights="random")
    db = open_database(settings, migrate=True)
    runtime = Runtime.from_settings(settings, db=db)
    try:
        assert (runtime.store_target is not None) == shared
        assert isinstance(runtime.store, MemoryStore) == (not shared)
        submission = commit_plan(db, plan_submission(csv, options), options, mode="local")
        run = run_batch(runtime, submission.batch_id, backoff_seconds=0.01)
        assert (run.succeeded, run.failed) == (3, 0)
        with db.session() as session:
            artifacts = session.scalars(sa.select(Artifact)).all()
            described = [(a.uri, a.bytes, a.checksum, a.shape, a.name) for a in artifacts]
    finally:
        runtime.close()
    assert len(described) == 3 * 10
    for uri, size, checksum, shape, name in described:
        data = read_uri(uri)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, checksum)
        if name.endswith(".png"):
            width, height = Image.open(io.BytesIO(data)).size
            assert shape == f"{height}x{width}x3"
    if kind == "local":
        assert {Path(uri.removeprefix("file://")) for uri, *_ in described} <= set(flushed)


def test_every_png_level_gives_the_same_pixels(write_image, tmp_path: Path) -> None:
    """``VITSCOPE_PNG_LEVEL`` trades file size for CPU and nothing else: level 0 (stored) files are
    larger than those of levels 1 and 9 — but for the layer grid, kept at level 1 — and all three
    decode to the same pixels; the arrays are the same bytes. (Level 9 is not always smaller than 1
    on the noise of these test images.)"""
    for i in range(2):
        write_image(tmp_path / f"{i}.png", seed=i, size=(170, 130 + 9 * i))
    csv = tmp_path / "data.csv"
    csv.write_text("id,image_uri\n" + "".join(f"r{i},{i}.png\n" for i in range(2)))
    results = {}
    for level in (0, 1, 9):
        settings = embedded_settings(tmp_path, f"level{level}", cpu_workers=0, png_level=level)
        results[level], _, run = _run(settings, csv)
        assert run.succeeded == 2
    for row, default in results[1].items():
        for name, data in default.items():
            stored, smallest = results[0][row][name], results[9][row][name]
            if name.endswith(".npy"):
                assert stored == data == smallest, (row, name)
                continue
            if name == "layer_scores.png":  # flat colour, 29× larger stored: never below level 1
                assert stored == data, (row, name)
            else:
                assert len(stored) > max(len(data), len(smallest)), (row, name)
            np.testing.assert_array_equal(_png_pixels(stored), _png_pixels(data))
            np.testing.assert_array_equal(_png_pixels(smallest), _png_pixels(data))
