"""The shards layout's write: finished jobs gathered until a flush rule closes the shard, then one
tar written, made durable, and only then the jobs' rows pointed into it.

A shard is closed at whichever comes first (``ShardRules``): ``max_jobs`` jobs, ``max_bytes`` of
artifacts, ``max_seconds`` after its first job arrived, or the end of the chunk (whose jobs must be
recorded before its leases are let go). The record stage owns the open shard (``record.Recorder``);
this module only knows how a closed one is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from common.db.records import ArtifactRecord, JobOutcome
from common.settings import Settings
from common.storage import ObjectStore
from common.storage.shards import build_shard, member_uri, new_shard_key
from worker.pipeline.artifacts import Encoded

__all__ = ["ShardRules", "Unwritten", "write_shard"]

TAR_CONTENT_TYPE = "application/x-tar"


@dataclass(frozen=True)
class ShardRules:
    """When an open shard is closed and written (``VITSCOPE_SHARD_MAX_*``)."""

    max_jobs: int
    max_bytes: int
    max_seconds: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ShardRules:
        return cls(
            max_jobs=settings.shard_max_jobs,
            max_bytes=int(settings.shard_max_mib * 1024 * 1024),
            max_seconds=settings.shard_max_seconds,
        )


@dataclass(frozen=True)
class Unwritten:
    """A finished job whose artifacts wait in the open shard: its row (artifact URIs still empty)
    and its encoded files."""

    outcome: JobOutcome
    encoded: Encoded

    @property
    def size(self) -> int:
        return sum(len(data) for _, data in self.encoded.files)


def write_shard(store: ObjectStore, jobs: Sequence[Unwritten]) -> list[JobOutcome]:
    """Write ``jobs``' artifacts as one new shard, durably, and return their outcomes with every
    artifact pointing at its member (``uri`` a member URI, and the shard columns).

    One ``put`` under a fresh key (a multipart upload on S3 when large), then ``sync``: when this
    returns, the whole shard survives a power loss, and the caller may commit rows that point into
    it. Two jobs with the same sample key (the same image explained twice in one shard) get distinct
    keys ("_2", …), so every member name in a shard is unique.
    """
    members: list[tuple[str, bytes]] = []
    names: list[str] = []
    used: set[str] = set()
    for job in jobs:
        key, n = job.encoded.sample_key, 1
        while key in used:
            n += 1
            key = f"{job.encoded.sample_key}_{n}"
        used.add(key)
        names.append(key)
        members += [(f"{key}.{name}", data) for name, data in job.encoded.files]
    shard = build_shard(members)
    shard_uri = store.put(new_shard_key(), shard.data, content_type=TAR_CONTENT_TYPE)
    store.sync()
    outcomes: list[JobOutcome] = []
    position = 0
    for job, key in zip(jobs, names, strict=True):
        artifacts: list[ArtifactRecord] = []
        for record, (name, data) in zip(job.encoded.artifacts, job.encoded.files, strict=True):
            offset = shard.offsets[position]
            position += 1
            artifacts.append(
                dataclasses.replace(
                    record,
                    uri=member_uri(shard_uri, f"{key}.{name}", offset, len(data)),
                    shard_uri=shard_uri,
                    shard_offset=offset,
                    shard_length=len(data),
                )
            )
        outcomes.append(dataclasses.replace(job.outcome, artifacts=artifacts))
    return outcomes
