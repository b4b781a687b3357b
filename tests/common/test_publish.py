"""Chunking queued jobs into messages: one model per message, repeated images kept together; the
marker every publication leaves on the broker, and the warning about Redis eviction policies."""

from __future__ import annotations

import pytest

from common.celery_app import make_celery
from common.db.records import QueuedImageJob, QueuedJob
from common.errors import BrokerUnavailableError
from common.publish import BROKER_MARKER_KEY, MAX_STRETCH, broker_lost_data, chunk_jobs, publish_jobs
from common.settings import Settings, get_settings


def _jobs(model: str, uris: list[str]) -> list[QueuedImageJob]:
    return [QueuedImageJob(f"{model}-{i}", model, f"q-{model}", uri) for i, uri in enumerate(uris)]


def test_chunks_hold_one_model_and_at_most_chunk_size_ids() -> None:
    jobs = _jobs("a", [f"s3://b/{i}" for i in range(7)]) + _jobs("b", ["s3://b/x", "s3://b/y"])
    chunks = list(chunk_jobs(iter(jobs), 3))
    assert [(queue, len(ids)) for queue, ids in chunks] == [("q-a", 3), ("q-a", 3), ("q-a", 1), ("q-b", 2)]
    assert [i for _, ids in chunks for i in ids] == [job.id for job in jobs]


def test_a_run_of_one_image_is_not_split_across_messages() -> None:
    uris = ["s3://b/1", "s3://b/2", "s3://b/dup", "s3://b/dup", "s3://b/dup", "s3://b/3"]
    chunks = [ids for _, ids in chunk_jobs(_jobs("a", uris), 3)]
    assert chunks == [["a-0", "a-1", "a-2", "a-3", "a-4"], ["a-5"]]


def test_a_long_run_is_split_at_the_stretch_limit() -> None:
    chunks = [ids for _, ids in chunk_jobs(_jobs("a", ["s3://b/same"] * 50), 4)]
    assert [len(ids) for ids in chunks] == [4 * MAX_STRETCH] * 3 + [50 - 12 * MAX_STRETCH]


def test_jobs_without_a_uri_are_chunked_by_size_alone() -> None:
    jobs = [QueuedJob(str(i), "m", "q") for i in range(5)]  # retries and the reaper send these
    assert [len(ids) for _, ids in chunk_jobs(jobs, 2)] == [2, 2, 1]


# --- The broker's marker: how a worker learns that the broker lost its data -------------------------


def test_the_marker_tells_exactly_one_caller_that_the_broker_lost_its_data(private_redis) -> None:
    app = make_celery(Settings(broker_url=private_redis.url))
    client = private_redis.client()
    assert broker_lost_data(app)  # a new broker: the first caller creates the marker (and republishes)
    publish_jobs(app, [QueuedJob("j1", "m", "vitscope.m")], chunk_size=4)
    assert not broker_lost_data(app)  # the marker is there: nothing was lost
    client.flushall()  # what a restart without persistence, a failover or FLUSHALL leaves
    assert [broker_lost_data(app) for _ in range(3)] == [True, False, False]  # one caller republishes
    assert client.exists(BROKER_MARKER_KEY)


def test_an_unreachable_broker_is_a_transient_error_within_seconds() -> None:
    app = make_celery(Settings(broker_url="redis://127.0.0.1:9/0"))  # a closed port
    with pytest.raises(BrokerUnavailableError, match="unavailable"):
        broker_lost_data(app)


@pytest.mark.parametrize(
    ("policy", "warned"),
    [
        ("noeviction", False),
        ("volatile-lru", False),  # only keys with a TTL: the queues have none
        ("allkeys-lru", True),
        ("allkeys-lfu", True),
        ("allkeys-random", True),
    ],
)
def test_worker_start_warns_when_redis_may_evict_the_queues(
    private_redis, monkeypatch: pytest.MonkeyPatch, policy: str, warned: bool
) -> None:
    from typer.testing import CliRunner

    from worker.cli import app as worker_app

    private_redis.client().config_set("maxmemory-policy", policy)
    monkeypatch.setenv("VITSCOPE_BROKER_URL", private_redis.url)
    get_settings.cache_clear()
    result = CliRunner().invoke(worker_app, ["start", "--gpus", "none", "--dry-run"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "celery" in result.output  # the dry run's command line, printed as before
    warning = f"the broker's Redis has maxmemory-policy {policy}"
    assert (warning in result.output) is warned
    if warned:
        assert "Set maxmemory-policy noeviction" in result.output
