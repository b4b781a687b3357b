"""From a URL to the adapter that serves it: the one place that knows the supported schemes.

    file:///abs/dir  or a plain path   LocalStore
    s3://bucket[/prefix]               S3Store
    memory://name                      MemoryStore (process-local)

S3 and memory URIs are split by hand rather than with ``urllib.parse``: an S3 key may contain "?"
and "#", which a URL parser would cut off as query and fragment. File URIs are real URLs
(``Path.as_uri`` percent-encodes such characters), so they are parsed as URLs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from urllib.request import url2pathname

from common.errors import ObjectTooLargeError
from common.settings import STORAGE_RETRY_SECONDS
from common.storage.base import ObjectStore
from common.storage.local import LocalStore, list_files, read_file, read_file_range
from common.storage.memory import MemoryStore, read_memory_object, read_memory_range
from common.storage.shards import MemberRef, parse_member_uri

if TYPE_CHECKING:
    from common.storage.s3 import S3Store

__all__ = ["file_uri_path", "list_uri", "open_store", "read_uri", "uri_scheme"]

_SUPPORTED = "file:///absolute/dir (or a plain directory path), s3://bucket[/prefix] or memory://name"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _s3_store(
    bucket: str, prefix: str = "", *, upload_threads: int = 8, retry_seconds: float = STORAGE_RETRY_SECONDS
) -> S3Store:
    """An ``S3Store``, importing boto3 only now: it is a quarter of the producer's start-up, and
    most commands (``status``, ``results``, a local run on files) never talk to S3."""
    from common.storage.s3 import S3Store

    return S3Store(bucket, prefix, upload_threads=upload_threads, retry_seconds=retry_seconds)


def uri_scheme(uri: str) -> str:
    """The lower-case scheme of ``uri`` ("s3", "file", "https"…), or "" for a plain path."""
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else ""


def open_store(
    url: str, *, upload_threads: int = 8, retry_seconds: float = STORAGE_RETRY_SECONDS
) -> ObjectStore:
    """The object store for a storage URL; ``ValueError`` naming the supported schemes otherwise.

    A local folder is created if missing, so a fresh machine can write results at once.
    ``upload_threads`` is the concurrency of ``put_many`` on S3 (local and memory writes are
    sequential); ``retry_seconds`` how long an S3 request rides out an unavailable endpoint (the
    worker passes its ``storage_retry_seconds`` setting).
    """
    scheme = uri_scheme(url)
    if scheme == "" and url:
        return LocalStore(url)
    if scheme == "file":
        return LocalStore(file_uri_path(url))
    if scheme == "s3":
        bucket, _, prefix = _after_scheme(url).partition("/")
        if not bucket:
            raise ValueError(f"storage URL {url!r} names no bucket: use s3://bucket[/prefix]")
        return _s3_store(bucket, prefix, upload_threads=upload_threads, retry_seconds=retry_seconds)
    if scheme == "memory":
        name, _, rest = _after_scheme(url).partition("/")
        if rest:
            raise ValueError(f"storage URL {url!r}: a memory store takes a name only (memory://name)")
        return MemoryStore(name)
    raise ValueError(f"unsupported storage URL {url!r}: use {_SUPPORTED}")


def read_uri(
    uri: str, *, max_bytes: int | None = None, retry_seconds: float = STORAGE_RETRY_SECONDS
) -> bytes:
    """The bytes of one object named by an absolute URI (s3://, file://, memory://) or a local path.

    ``retry_seconds``: how long an S3 read rides out an unavailable endpoint.
    ``NotFoundError`` when it does not exist, ``ObjectTooLargeError`` when ``max_bytes`` is given and
    the object is larger (checked before downloading, and the read is capped as well).

    A member URI of an artifact shard (``…/shards/….tar#member=…&offset=…&length=…``, see
    ``common.storage.shards``) reads that member's bytes alone: one ranged GET on S3, one seek on disk.
    """
    scheme = uri_scheme(uri)
    if scheme in ("file", "s3", "memory"):
        member = parse_member_uri(uri)
        if member is not None:
            return _read_member(member, max_bytes=max_bytes, retry_seconds=retry_seconds)
    if scheme == "" and uri:
        return read_file(Path(uri), max_bytes=max_bytes)
    if scheme == "file":
        return read_file(file_uri_path(uri), max_bytes=max_bytes)
    if scheme in ("s3", "memory"):
        container, _, key = _after_scheme(uri).partition("/")
        if not container or not key:
            raise ValueError(f"{uri!r} does not name an object: use {scheme}://<name>/<key>")
        if scheme == "s3":
            return _s3_store(container, retry_seconds=retry_seconds).read_object(key, max_bytes=max_bytes)
        return read_memory_object(container, key, max_bytes=max_bytes)
    raise ValueError(f"cannot read {uri!r}: use an s3://, file:// or memory:// URI or a local path")


def _read_member(member: MemberRef, *, max_bytes: int | None, retry_seconds: float) -> bytes:
    """The ``length`` bytes at ``offset`` of the shard, and nothing else of it."""
    if max_bytes is not None and member.length > max_bytes:
        raise ObjectTooLargeError(f"{member.uri} is {member.length} bytes, over the limit of {max_bytes}")
    shard, scheme = member.shard_uri, uri_scheme(member.shard_uri)
    if scheme == "file":
        return read_file_range(file_uri_path(shard), member.offset, member.length)
    container, _, key = _after_scheme(shard).partition("/")
    if not container or not key:
        raise ValueError(f"{member.uri!r} does not name a shard: use {scheme}://<name>/<key>#member=…")
    if scheme == "s3":
        store = _s3_store(container, retry_seconds=retry_seconds)
        return store.read_object(key, byte_range=(member.offset, member.length))
    return read_memory_range(container, key, member.offset, member.length)


def list_uri(prefix_uri: str, *, retry_seconds: float = STORAGE_RETRY_SECONDS) -> list[str]:
    """Absolute URIs of the objects whose URI starts with ``prefix_uri``, sorted.

    The prefix is a plain string prefix as in S3: "s3://b/img/cat" lists "s3://b/img/cat1.jpg" and
    "s3://b/img/cats/a.jpg". For local files, ".../dir/" lists the files under dir, recursively.
    """
    scheme = uri_scheme(prefix_uri)
    if scheme in ("", "file"):
        raw = file_uri_path(prefix_uri) if scheme == "file" else Path(prefix_uri)
        # normpath drops "." and duplicate "/" segments, which a key prefix may not contain, and
        # the trailing "/", which would be what restricts the listing to the folder's contents.
        path = os.path.normpath(os.path.abspath(raw))
        if prefix_uri.endswith("/") and not path.endswith("/"):
            path += "/"
        root = Path("/")
        return [(root / key).as_uri() for key in list_files(root, path.lstrip("/"))]
    if scheme in ("s3", "memory"):
        container, _, prefix = _after_scheme(prefix_uri).partition("/")
        if not container:
            raise ValueError(f"{prefix_uri!r} names no bucket or store: use {scheme}://<name>/<prefix>")
        if scheme == "s3":
            listed = _s3_store(container, retry_seconds=retry_seconds).list_objects(prefix)
            return [f"s3://{container}/{key}" for key in listed]
        store = MemoryStore(container)
        return [store.uri(key) for key in store.list(prefix)]
    raise ValueError(f"cannot list {prefix_uri!r}: use an s3://, file:// or memory:// URI or a local path")


def file_uri_path(uri: str) -> Path:
    """The absolute local path of a file URI; ``ValueError`` for remote hosts or relative paths.

    "file://localhost/x" is the same as "file:///x" (RFC 8089); any other host would be a network
    share this process cannot read.
    """
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file URI {uri!r} names the host {parts.netloc!r}; only file:///path is supported")
    path = url2pathname(parts.path)
    if not os.path.isabs(path):
        raise ValueError(f"file URI {uri!r} must hold an absolute path (file:///abs/path)")
    return Path(path)


def _after_scheme(uri: str) -> str:
    return uri.split("://", 1)[1]
