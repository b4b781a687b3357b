"""Artifact shards: many jobs' artifacts in one uncompressed POSIX tar, and URIs of single members.

Writing each artifact as its own object costs one request per artifact (ten per job on S3, about
2 ms of boto3 CPU and $0.005 per 1,000 each); a shard costs one request per few dozen jobs. The
tar follows the WebDataset convention, so ``tar``, Python's ``tarfile`` and the ``webdataset``
library read a shard as it is:

    <sample key>.<artifact name>      e.g.  3f9a…e1_5d41402abc4b2a76.rollout.npy  (image sha256, config)

A sample key has no "." (WebDataset splits the member name at its first dot) and all of one job's
members are next to each other. Each member's data sits at a 512-byte-aligned offset; the database
keeps the shard's URI, that offset and the data's length, so one artifact is one ranged GET
(``Range: bytes=offset-(offset+length-1)``) or one seek, without reading the tar's headers.

A member is addressed by a *member URI*: the shard's URI with a fragment that says which bytes::

    s3://bucket/prefix/shards/20261203/20261203T194501Z-9f2c4b1e7a3d5c60.tar#member=<name>&offset=1536&length=6272

``read_uri`` understands it (one ranged read); to anything else it is the shard's URI plus a
fragment. Shard keys never contain "#", so the fragment is never part of a key.

Shards are written once, under a fresh random key, and never appended to: a retried micro-batch
writes a new shard, and a shard whose jobs were never recorded (its writer died, or the database
refused the commit) is an orphan that ``producer shards orphans`` lists and deletes.
"""

from __future__ import annotations

import re
import secrets
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "SHARD_PREFIX",
    "MemberRef",
    "Shard",
    "build_shard",
    "member_uri",
    "new_shard_key",
    "parse_member_uri",
    "shard_created_at",
]

# Where shards live under the storage URL, beside the per-artifact objects' "<sha[:2]>/…" folders.
SHARD_PREFIX = "shards/"
_BLOCK = tarfile.BLOCKSIZE  # 512: every header and every member's data starts on such a boundary
_RECORD = tarfile.RECORDSIZE  # 10240: a tar ends padded to a whole record, as tar and tarfile write it
_MEMBER_FRAGMENT = re.compile(r"#member=(?P<member>[^#&/]+)&offset=(?P<offset>\d+)&length=(?P<length>\d+)$")
_SHARD_KEY = re.compile(r"(?:^|/)shards/\d{8}/(?P<stamp>\d{8}T\d{6}Z)-[0-9a-f]{16}\.tar$")


@dataclass(frozen=True)
class MemberRef:
    """Where one member's data lies: in the shard ``shard_uri``, ``length`` bytes from ``offset``."""

    shard_uri: str
    member: str
    offset: int
    length: int

    @property
    def uri(self) -> str:
        return member_uri(self.shard_uri, self.member, self.offset, self.length)


def member_uri(shard_uri: str, member: str, offset: int, length: int) -> str:
    """The URI of one member's data in a shard (see the module docstring for the form)."""
    return f"{shard_uri}#member={member}&offset={offset}&length={length}"


def parse_member_uri(uri: str) -> MemberRef | None:
    """The member a member URI names; None for any other URI (a plain object or a shard itself)."""
    match = _MEMBER_FRAGMENT.search(uri)
    if match is None:
        return None
    return MemberRef(
        shard_uri=uri[: match.start()],
        member=match.group("member"),
        offset=int(match.group("offset")),
        length=int(match.group("length")),
    )


def new_shard_key(now: datetime | None = None) -> str:
    """A fresh key for a shard: a day folder, the UTC time of writing and 64 random bits.

    The time in the name is what ``producer shards orphans`` reads a shard's age from (a listing of
    keys carries no dates on every backend); the randomness makes every write, including a retry of
    the same jobs, a new object, so no write ever replaces or extends a shard a row points into.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{SHARD_PREFIX}{now:%Y%m%d}/{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(8)}.tar"


def shard_created_at(key: str) -> datetime | None:
    """When the shard under ``key`` was written (from its name); None if the key is not a shard's."""
    match = _SHARD_KEY.search(key)
    if match is None:
        return None
    return datetime.strptime(match.group("stamp"), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class Shard:
    """A tar in pieces (headers, data and padding, joined only once, by ``data``) and where each
    member's data starts."""

    parts: list[bytes]
    offsets: list[int]  # of each member's data, in the order given to ``build_shard``
    size: int

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)


def build_shard(members: Sequence[tuple[str, bytes]], *, mtime: float | None = None) -> Shard:
    """An uncompressed POSIX tar of ``members`` (name, data), in the order given.

    Headers come from ``tarfile`` (so the format is the standard library's, not a hand-rolled one):
    plain ustar headers, with a POSIX.1-2001 (pax) extended header only for a name over 100 bytes,
    which the worker's names never are (``common.keys.sample_key``). The data is never copied until
    ``Shard.data`` joins the pieces. Names must be relative, unique and free of ".." — a shard's
    names are made by the worker, so a bad one is a bug.
    """
    stamp = int(mtime if mtime is not None else datetime.now(UTC).timestamp())
    parts: list[bytes] = []
    offsets: list[int] = []
    position = 0
    seen: set[str] = set()
    for name, data in members:
        if not name or name in seen or name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"invalid or repeated shard member name {name!r}")
        seen.add(name)
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = stamp
        info.mode = 0o644
        header = info.tobuf(format=tarfile.PAX_FORMAT)
        parts.append(header)
        position += len(header)
        offsets.append(position)
        parts.append(data)
        position += len(data)
        padding = -len(data) % _BLOCK
        if padding:
            parts.append(bytes(padding))
            position += padding
    end = 2 * _BLOCK  # two zero blocks end the archive
    end += -(position + end) % _RECORD
    parts.append(bytes(end))
    return Shard(parts, offsets, position + end)
