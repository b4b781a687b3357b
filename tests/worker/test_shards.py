"""The shards layout end to end: a real batch (``run_batch``, random-weight ``deit_tiny_patch16_224``
on the CPU) writes its artifacts as tar shards in a local folder and on a real S3 HTTP endpoint, and
every reader gets the same bytes back as from the objects layout: ``producer results``' URIs, the
``job_artifacts`` view, the ``webdataset`` library, ``producer artifacts``, the report and the figures.
Also: reuse points at the original's members, a retried micro-batch writes a new shard and leaves
the old one an orphan that ``producer shards orphans`` finds, and the flush rules close shards.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from common.db import open_database
from common.db.models import Artifact, Job, JobState
from common.db.reports import iter_job_results
from common.errors import StorageUnavailableError
from common.settings import Settings
from common.storage import LocalStore, open_store, read_uri
from common.storage.shards import SHARD_PREFIX, parse_member_uri
from producer.artifacts import materialize_artifacts, orphan_shards
from producer.cli import app
from producer.figures import FigureOptions, write_figures
from producer.site import ReportOptions, write_report
from producer.site.links import LinkMode
from producer.submit import SubmitOptions, commit_plan, plan_submission
from worker.local import run_batch
from worker.pipeline import Runtime

MODEL = "deit_tiny_patch16_224"
ARTIFACTS_PER_JOB = 10  # five .npy (attention.npy is opt-in) and five PNG


def _dataset(tmp_path: Path, write_image, count: int) -> Path:
    lines = ["id,image_uri"]
    for i in range(count):
        write_image(tmp_path / "img" / f"{i}.png", seed=i, size=(80 + 5 * i, 72))
        lines.append(f"img{i},img/{i}.png")
    csv = tmp_path / "data.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def _settings(database_url: str, storage_url: str, **overrides) -> Settings:
    values = {"batch_size": 2, "fetch_threads": 2, "upload_threads": 2, "device": "cpu", **overrides}
    return Settings(database_url=database_url, storage_url=storage_url, **values)


def _run(settings: Settings, csv: Path, *, store=None, explainer=None):
    options = SubmitOptions(models=[MODEL], weights="random")
    db = open_database(settings, migrate=True)
    runtime = Runtime.from_settings(settings, db=db, store=store)
    if explainer is not None:
        runtime.explainer = explainer(runtime.explainer)
    submission = commit_plan(db, plan_submission(csv, options), options, mode="local")
    run = run_batch(runtime, submission.batch_id, backoff_seconds=0.01)
    return runtime, submission.batch_id, run


def _rows(runtime: Runtime, batch_id: str) -> dict[str, list[Artifact]]:
    with runtime.db.session() as session:
        query = sa.select(Artifact).join(Job).where(Job.batch_id == batch_id).order_by(Artifact.shard_offset)
        found: dict[str, list[Artifact]] = {}
        for artifact in session.scalars(query):
            found.setdefault(artifact.job_id, []).append(artifact)
        return found


def _shard_keys(store_url: str) -> list[str]:
    return open_store(store_url).list(SHARD_PREFIX)


@pytest.fixture(params=["local", "s3"])
def shard_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return (tmp_path / "artifacts").as_uri()
    return f"s3://{request.getfixturevalue('s3_bucket')}/runs"


def test_a_sharded_batch_reads_back_through_every_reader(
    write_image, tmp_path, sqlite_url, shard_store
) -> None:
    csv = _dataset(tmp_path, write_image, 5)
    settings = _settings(sqlite_url, shard_store, artifact_layout="shards", shard_max_jobs=3)
    runtime, batch_id, run = _run(settings, csv)
    try:
        assert (run.succeeded, run.failed) == (5, 0)
        # Five jobs in micro-batches of two, closed at three jobs and at the chunk's end: 3 + 2.
        shards = _shard_keys(shard_store)
        assert len(shards) == 2
        assert open_store(shard_store).list() == shards, "an artifact was written outside a shard"
        rows = _rows(runtime, batch_id)
        assert sorted(Counter(a[0].shard_uri for a in rows.values()).values()) == [2, 3]
        for artifacts in rows.values():
            assert len(artifacts) == ARTIFACTS_PER_JOB
            # One job's members are next to each other, in one shard.
            assert len({a.shard_uri for a in artifacts}) == 1
            offsets = [a.shard_offset for a in artifacts]
            ends = [a.shard_offset + a.shard_length for a in artifacts]
            assert all(b - e <= 2 * tarfile.BLOCKSIZE for e, b in zip(ends, offsets[1:], strict=False))
            for a in artifacts:
                member = parse_member_uri(a.uri)
                assert member is not None
                assert (member.shard_uri, member.offset, member.length) == (
                    a.shard_uri,
                    a.shard_offset,
                    a.shard_length,
                )
                assert a.shard_length == a.bytes

        # producer results: every URI reads back the bytes its checksum names.
        with runtime.db.session() as session:
            results = list(iter_job_results(session, batch_id))
        pointed = {job["job_id"]: job["artifacts"] for job in results}
        for job_id, uris in pointed.items():
            assert len(uris) == ARTIFACTS_PER_JOB
            for a in rows[job_id]:
                assert hashlib.sha256(read_uri(uris[a.name])).hexdigest() == a.checksum

        # The job_artifacts view says where each member lies.
        with runtime.db.session() as session:
            view = session.execute(
                sa.text(
                    "SELECT job_id, name, uri, shard_uri, shard_offset, shard_length, bytes "
                    "FROM job_artifacts WHERE batch_id = :b"
                ),
                {"b": batch_id},
            ).all()
        assert len(view) == 5 * ARTIFACTS_PER_JOB
        assert all(row.shard_length == row.bytes and row.uri.startswith(row.shard_uri) for row in view)

        # The webdataset library reads each shard as it is: every job's arrays equal what results points at.
        keys = {
            a.uri.rsplit("#member=", 1)[1].split(".", 1)[0]: job for job, arts in rows.items() for a in arts
        }
        seen = set()
        for key in shards:
            local = tmp_path / "wds" / key.replace("/", "_")
            local.parent.mkdir(exist_ok=True)
            local.write_bytes(read_uri(open_store(shard_store).uri(key)))
            for sample in wds.WebDataset(str(local), shardshuffle=False).decode():
                job_id = keys[sample["__key__"]]
                seen.add(job_id)
                names = {k for k in sample if not k.startswith("__")}
                assert names == set(pointed[job_id])
                for name in names:
                    stored = read_uri(pointed[job_id][name])
                    if name.endswith(".npy"):
                        np.testing.assert_array_equal(sample[name], np.load(io.BytesIO(stored)))
                    else:
                        assert sample[name] == stored
        assert seen == set(rows)

        # producer artifacts: one file per artifact, the bytes the rows describe.
        with runtime.db.session() as session:
            written = materialize_artifacts(session, batch_id, tmp_path / "files")
        assert written.files == 5 * ARTIFACTS_PER_JOB
        assert written.requests == 2  # each shard read once, whole
        for job_id, artifacts in rows.items():
            for a in artifacts:
                data = (tmp_path / "files" / job_id / a.name).read_bytes()
                assert hashlib.sha256(data).hexdigest() == a.checksum

        # The report: copy mode extracts each picture; links that a browser would follow refuse shards.
        report = write_report(runtime.db, batch_id, tmp_path / "site", ReportOptions(links=LinkMode.COPY))
        copied = sorted((tmp_path / "site" / "img").rglob("*.png"))
        assert copied
        pictures = {a.checksum for arts in rows.values() for a in arts if a.name.endswith(".png")}
        assert {hashlib.sha256(path.read_bytes()).hexdigest() for path in copied} <= pictures
        assert report.jobs == 5
        refused = LinkMode.RELATIVE if shard_store.startswith("file:") else LinkMode.PRESIGNED
        with pytest.raises(ValueError, match="member of an artifact shard"):
            write_report(runtime.db, batch_id, tmp_path / "site2", ReportOptions(links=refused))

        # The figures read their pictures out of the shards.
        figures = write_figures(runtime.db, batch_id, tmp_path / "fig", FigureOptions(first=1, pdf=False))
        assert figures
        assert all(path.stat().st_size > 0 for path in figures)
    finally:
        runtime.close()


def test_both_layouts_store_identical_npy_bytes_and_png_pixels(write_image, tmp_path, sqlite_url) -> None:
    csv = _dataset(tmp_path, write_image, 3)
    files: dict[str, dict[str, bytes]] = {}
    for layout in ("objects", "shards"):
        settings = _settings(
            f"sqlite:///{tmp_path / layout}.db",
            (tmp_path / f"store-{layout}").as_uri(),
            artifact_layout=layout,
        )
        runtime, batch_id, run = _run(settings, csv)
        try:
            assert run.succeeded == 3
            out = tmp_path / f"files-{layout}"
            with runtime.db.session() as session:
                materialize_artifacts(session, batch_id, out)
                by_row = {job.row_id: job.id for job in session.scalars(sa.select(Job))}
            files[layout] = {
                f"{row}/{path.name}": path.read_bytes()
                for row, job_id in by_row.items()
                for path in (out / job_id).iterdir()
            }
        finally:
            runtime.close()
    assert _shard_keys((tmp_path / "store-objects").as_uri()) == []
    assert len(_shard_keys((tmp_path / "store-shards").as_uri())) == 1
    objects, shards = files["objects"], files["shards"]
    assert set(objects) == set(shards)
    assert len(objects) == 3 * ARTIFACTS_PER_JOB
    for name, data in objects.items():
        if name.endswith(".npy"):
            assert data == shards[name], name
        else:
            first, second = Image.open(io.BytesIO(data)), Image.open(io.BytesIO(shards[name]))
            np.testing.assert_array_equal(np.asarray(first), np.asarray(second), err_msg=name)


def test_a_reused_job_points_at_its_originals_members(write_image, tmp_path, database_url) -> None:
    csv = _dataset(tmp_path, write_image, 2)
    store_url = (tmp_path / "out").as_uri()
    settings = _settings(database_url, store_url, artifact_layout="shards")
    runtime, first, _ = _run(settings, csv)
    runtime.close()
    runtime, second, run = _run(settings, csv)
    try:
        assert (run.succeeded, run.reused) == (0, 2)
        assert len(_shard_keys(store_url)) == 1  # nothing written again
        with runtime.db.session() as session:
            jobs = {(j.batch_id, j.row_id): j.id for j in session.scalars(sa.select(Job))}
        old, new = _rows(runtime, first), _rows(runtime, second)
        for row in ("img0", "img1"):
            was = {
                (a.name, a.uri, a.shard_uri, a.shard_offset, a.shard_length) for a in old[jobs[first, row]]
            }
            now = {
                (a.name, a.uri, a.shard_uri, a.shard_offset, a.shard_length) for a in new[jobs[second, row]]
            }
            assert was == now
    finally:
        runtime.close()


class SyncFailsOnce(LocalStore):
    """A local folder whose first ``sync`` fails after the shard was written: the write is on disk,
    its durability unconfirmed — what a disk error or a killed worker between write and commit leaves."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failed = False

    def sync(self) -> None:
        if not self.failed:
            self.failed = True
            raise StorageUnavailableError("injected: the disk did not confirm the shard")
        super().sync()


def test_a_retried_micro_batch_writes_a_new_shard_and_the_old_one_is_an_orphan(
    write_image, tmp_path, sqlite_url, monkeypatch
) -> None:
    csv = _dataset(tmp_path, write_image, 2)
    store = SyncFailsOnce(tmp_path / "out")
    settings = _settings(sqlite_url, store.url, artifact_layout="shards", max_attempts=2)
    runtime, batch_id, run = _run(settings, csv, store=store)
    try:
        assert (run.succeeded, run.failed, run.rounds) == (2, 0, 2)
        with runtime.db.session() as session:
            assert [j.attempts for j in session.scalars(sa.select(Job))] == [2, 2]
            shards = store.list(SHARD_PREFIX)
            assert len(shards) == 2  # the retry never wrote into (or over) the first attempt's shard
            used = {a.shard_uri for arts in _rows(runtime, batch_id).values() for a in arts}
            (orphan,) = [key for key in shards if store.uri(key) not in used]
            assert orphan_shards(session, store, older_than=timedelta(0)) == [orphan]
            assert orphan_shards(session, store, older_than=timedelta(hours=1)) == []  # too young to tell
        # The command lists it, then deletes it; the recorded shard stays and still reads.
        monkeypatch.setenv("VITSCOPE_DATABASE_URL", sqlite_url)
        monkeypatch.setenv("VITSCOPE_STORAGE_URL", store.url)
        runner = CliRunner()
        listed = runner.invoke(app, ["shards", "orphans", "--older-than", "0"], catch_exceptions=False)
        assert listed.exit_code == 0
        assert listed.stdout.split() == [store.uri(orphan)]
        deleted = runner.invoke(
            app, ["shards", "orphans", "--older-than", "0", "--delete"], catch_exceptions=False
        )
        assert deleted.exit_code == 0
        assert store.list(SHARD_PREFIX) == [key for key in shards if key != orphan]
        for artifacts in _rows(runtime, batch_id).values():
            for a in artifacts:
                assert hashlib.sha256(read_uri(a.uri)).hexdigest() == a.checksum
    finally:
        runtime.close()


def test_a_slow_micro_batch_does_not_hold_finished_jobs_back_past_the_time_rule(
    write_image, tmp_path, sqlite_url
) -> None:
    """One job per micro-batch and no job-count rule in reach: the second micro-batch's compute
    waits until the first job is in the database, which only the time rule can bring about."""
    csv = _dataset(tmp_path, write_image, 3)
    store_url = (tmp_path / "out").as_uri()
    settings = _settings(
        sqlite_url,
        store_url,
        artifact_layout="shards",
        batch_size=1,
        shard_max_jobs=100,
        shard_max_seconds=0.5,
    )
    waited: list[float] = []

    def slow_after_the_first(explain):
        calls = 0

        def explainer(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == 2:
                start = time.monotonic()
                engine = sa.create_engine(sqlite_url)
                try:
                    while time.monotonic() - start < 60:
                        with engine.connect() as connection:
                            done = connection.scalar(
                                sa.select(sa.func.count()).where(Job.state == JobState.SUCCEEDED)
                            )
                        if done:
                            break
                        time.sleep(0.1)
                finally:
                    engine.dispose()
                waited.append(time.monotonic() - start)
            return explain(*args, **kwargs)

        return explainer

    runtime, _, run = _run(settings, csv, explainer=slow_after_the_first)
    try:
        assert run.succeeded == 3
        assert waited
        assert waited[0] < 30, "the first job was recorded only at the chunk's end"
        assert len(_shard_keys(store_url)) >= 2
    finally:
        runtime.close()


def test_a_shard_is_closed_at_the_size_rule(write_image, tmp_path, sqlite_url) -> None:
    csv = _dataset(tmp_path, write_image, 4)
    store_url = (tmp_path / "out").as_uri()
    # Any one job's artifacts are over 0.05 MiB: every job closes its own shard.
    settings = _settings(sqlite_url, store_url, artifact_layout="shards", shard_max_mib=0.05)
    runtime, batch_id, run = _run(settings, csv)
    try:
        assert run.succeeded == 4
        assert len(_shard_keys(store_url)) == 4
        assert len({arts[0].shard_uri for arts in _rows(runtime, batch_id).values()}) == 4
    finally:
        runtime.close()


def test_the_layout_setting(tmp_path) -> None:
    assert Settings(storage_url="s3://b/p").resolved_artifact_layout() == "shards"
    assert Settings(storage_url=tmp_path.as_uri()).resolved_artifact_layout() == "objects"
    assert Settings(storage_url="s3://b", artifact_layout="objects").resolved_artifact_layout() == "objects"
    assert (
        Settings(storage_url=tmp_path.as_uri(), artifact_layout="Shards").resolved_artifact_layout()
        == "shards"
    )
    with pytest.raises(ValueError, match="unknown artifact layout 'tar'"):
        Settings(artifact_layout="tar")


def test_the_cpu_pool_encodes_and_the_driving_process_writes_one_shard(
    write_image, tmp_path, sqlite_url
) -> None:
    """With a CPU pool the pool processes draw and encode; nothing is written per image, so even a
    store no other process can open (memory) gets its shard."""
    csv = _dataset(tmp_path, write_image, 3)
    store_url = f"memory://pooled-shards-{tmp_path.name}"
    settings = _settings(sqlite_url, store_url, artifact_layout="shards", cpu_workers=2)
    runtime, batch_id, run = _run(settings, csv)
    try:
        assert run.succeeded == 3
        assert runtime.cpu.workers == 2
        (shard,) = _shard_keys(store_url)
        assert open_store(store_url).list() == [shard]
        for artifacts in _rows(runtime, batch_id).values():
            assert len(artifacts) == ARTIFACTS_PER_JOB
            for a in artifacts:
                assert hashlib.sha256(read_uri(a.uri)).hexdigest() == a.checksum
    finally:
        runtime.close()
