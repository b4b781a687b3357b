"""The object-store interface every adapter implements, and the rules all adapters share.

Callers code against ``ObjectStore`` and get an implementation from ``open_store(url)``, so the
worker writes artifacts the same way to S3, a local folder or process memory, and tests run the
real code paths against the in-memory store instead of patching.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "ObjectStore",
    "PutItem",
    "aws_environment",
    "check_key",
    "check_prefix",
    "put_each",
    "unique_items",
]


def aws_environment() -> dict[str, str]:
    """This process's ``AWS_*`` variables: boto3's own configuration (endpoint, credentials, region),
    read where an S3 client is built and handed to the pool processes that write the same store."""
    return {name: value for name, value in os.environ.items() if name.startswith("AWS_")}


DEFAULT_CONTENT_TYPE = "application/octet-stream"

# One object to write: (key, bytes, content type).
PutItem = tuple[str, bytes, str]


@runtime_checkable
class ObjectStore(Protocol):
    """A flat namespace of keys ("a/b/c.npy") under one base URL.

    Keys are relative, "/"-separated and free of "." / ".." segments (``check_key``), so the same
    key names the same object on every backend and can never escape the store's base.
    """

    url: str

    def put(self, key: str, data: bytes, *, content_type: str = DEFAULT_CONTENT_TYPE) -> str:
        """Write (or overwrite) ``key`` and return its URI. Readers see the whole object or none of
        it at once; it survives a power loss once ``sync`` has returned."""
        ...

    def put_many(self, items: Iterable[PutItem]) -> dict[str, str]:
        """Write every item and return {key: uri}; raise the first error after all were tried."""
        ...

    def sync(self) -> None:
        """Make every ``put`` that has returned durable. Called before the database says a job's
        artifacts exist, once per micro-batch: a local disk commits its journal once for all of them
        instead of once per file; an object store that acknowledges durable writes does nothing."""
        ...

    def hand_over(self, keys: Iterable[str]) -> None:
        """Stop answering for the durability of ``keys``, written here on behalf of another process
        that opened the same URL: that process's ``take_over`` and ``sync`` make them durable."""
        ...

    def take_over(self, keys: Iterable[str]) -> None:
        """``keys`` another process wrote to this store (and handed over): the next ``sync`` makes
        them durable along with this store's own writes."""
        ...

    def get(self, key: str) -> bytes:
        """The bytes of ``key``; ``NotFoundError`` when it does not exist."""
        ...

    def exists(self, key: str) -> bool: ...

    def uri(self, key: str) -> str:
        """The absolute URI of ``key``, readable with ``read_uri``."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error (retries delete twice)."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix`` (a plain string prefix, as in S3), sorted."""
        ...


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ``ValueError``.

    Refused on every backend, not only on disk, so that a key accepted by the in-memory store in a
    test is never refused by the local store in production: empty keys, absolute paths, backslashes,
    NUL, empty segments ("a//b") and "." / ".." segments (which would escape a local store's folder).
    """
    if not key:
        raise ValueError("an object key must not be empty")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"object key {key!r} must be a relative '/'-separated path")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"object key {key!r} must not contain empty, '.' or '..' segments")
    return key


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if some valid key could start with it ("", "a/", "a/b"), else ``ValueError``.

    Appending one character turns a prefix into the shortest key it could match, so the key rules
    apply unchanged: "../" and "/a" are refused, "a/" and "a/.hid" are not.
    """
    if prefix:
        check_key(prefix + "_")
    return prefix


def unique_items(items: Iterable[PutItem]) -> list[PutItem]:
    """The items as a list, refusing a key given twice (which write would win is undefined)."""
    listed = list(items)
    seen: set[str] = set()
    for key, _, _ in listed:
        if key in seen:
            raise ValueError(f"put_many got key {key!r} more than once")
        seen.add(key)
    return listed


def put_each(put: Callable[..., str], items: Iterable[PutItem]) -> dict[str, str]:
    """Sequential ``put_many``: try every item, then raise the first error, if any.

    Trying the rest after a failure keeps the behaviour identical to the concurrent S3 version, where
    the other uploads are already in flight when one fails.
    """
    uris: dict[str, str] = {}
    first_error: Exception | None = None
    for key, data, content_type in unique_items(items):
        try:
            uris[key] = put(key, data, content_type=content_type)
        except Exception as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return uris
