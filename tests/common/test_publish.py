"""Chunking queued jobs into messages: one model per message, repeated images kept together."""

from __future__ import annotations

from common.db.records import QueuedImageJob, QueuedJob
from common.publish import MAX_STRETCH, chunk_jobs


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
