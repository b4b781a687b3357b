"""One file per artifact from either layout (``producer artifacts``), and the shards no row points
into (``producer shards orphans``).

Materializing reads each shard a batch needs once, whole, when it needs more than one job's members
from it, and otherwise each member with one ranged read; every file's SHA-256 is checked against its
row before it is renamed into place, so an interrupted run leaves no truncated file behind.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from common.db.models import Artifact, Job
from common.errors import StorageConfigError
from common.storage import ObjectStore, read_uri
from common.storage.shards import SHARD_PREFIX, parse_member_uri, shard_created_at

__all__ = ["Materialized", "delete_orphan_shards", "materialize_artifacts", "orphan_shards"]

# Members of one job in a shard: more than this many members wanted from a shard and it is read whole.
_MEMBERS_PER_JOB = 16


@dataclass(frozen=True)
class Materialized:
    files: int
    bytes: int
    requests: int  # reads made: a whole shard or one member or object each


def materialize_artifacts(
    session: Session,
    batch_id: str,
    out: Path,
    *,
    job_ids: Collection[str] | None = None,
    models: Collection[str] | None = None,
    on_file: Callable[[], None] | None = None,
) -> Materialized:
    """Write every artifact of the batch (or of ``job_ids`` / ``models``) to ``out/<job id>/<name>``,
    whatever the layout it is stored in; returns how many files, bytes and reads it took."""
    query = (
        sa.select(Artifact.job_id, Artifact.name, Artifact.uri, Artifact.checksum, Artifact.shard_uri)
        .join(Job, Job.id == Artifact.job_id)
        .where(Job.batch_id == batch_id)
        .order_by(Artifact.shard_uri, Artifact.shard_offset, Artifact.job_id, Artifact.name)
    )
    if job_ids is not None:
        query = query.where(Job.id.in_(list(job_ids)))
    if models is not None:
        query = query.where(Job.model.in_(list(models)))
    files = size = requests = 0
    rows = session.execute(query.execution_options(yield_per=1000))
    for shard_uri, group in itertools.groupby(rows, key=lambda row: row.shard_uri):
        members = list(group) if shard_uri is not None else None
        whole = read_uri(shard_uri) if members is not None and len(members) > _MEMBERS_PER_JOB else None
        requests += whole is not None
        for row in members if members is not None else group:
            if whole is not None:
                member = parse_member_uri(row.uri)
                if member is None:
                    raise StorageConfigError(f"artifact row {row.job_id}/{row.name} names no shard member")
                data = whole[member.offset : member.offset + member.length]
            else:
                data = read_uri(row.uri)
                requests += 1
            _write_checked(out / row.job_id / row.name, data, row.checksum, row.uri)
            files += 1
            size += len(data)
            if on_file is not None:
                on_file()
    return Materialized(files, size, requests)


def _write_checked(path: Path, data: bytes, checksum: str, uri: str) -> None:
    if hashlib.sha256(data).hexdigest() != checksum:
        raise StorageConfigError(f"{uri}: the bytes read do not match the SHA-256 recorded for them")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def orphan_shards(
    session: Session, store: ObjectStore, *, older_than: timedelta, now: datetime | None = None
) -> list[str]:
    """Keys of the shards in ``store`` that no artifact row points into and that were written more
    than ``older_than`` ago.

    A shard's rows are committed right after it is written, so a young shard without rows may be
    one whose commit is still under way; only ``older_than`` tells the two apart. An orphan is the
    shard of an attempt whose jobs were never recorded: its worker was killed between the write and
    the commit, or the database refused the commit and the micro-batch was computed again.
    """
    cutoff = (now or datetime.now(UTC)) - older_than
    referenced = set(_referenced_shards(session))
    found: list[str] = []
    for key in store.list(SHARD_PREFIX):
        written = shard_created_at(key)
        if written is not None and written < cutoff and store.uri(key) not in referenced:
            found.append(key)
    return found


def _referenced_shards(session: Session) -> Iterator[str]:
    query = sa.select(Artifact.shard_uri).where(Artifact.shard_uri.is_not(None)).distinct()
    for uri in session.scalars(query.execution_options(yield_per=10_000)):
        if uri is not None:  # the query excludes NULL; the column's type does not know
            yield uri


def delete_orphan_shards(store: ObjectStore, keys: Collection[str]) -> int:
    """Delete the shards ``orphan_shards`` found; returns how many."""
    for key in keys:
        store.delete(key)
    return len(keys)
