"""Object storage behind one small interface, chosen by URL (see ``uri.py`` for the schemes).

The worker writes artifacts through ``ObjectStore``, one object each or many jobs' in one tar shard
(``shards.py``); the producer and the worker read single objects (images, weights, one member of a
shard) by URI with ``read_uri``. boto3 is imported when an S3 store is first used, and torch
never, so the producer can use this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.storage.base import ObjectStore, PutItem, aws_environment
from common.storage.local import LocalStore
from common.storage.memory import MemoryStore
from common.storage.uri import list_uri, open_store, read_uri

if TYPE_CHECKING:
    from common.storage.s3 import S3Store

__all__ = [
    "LocalStore",
    "MemoryStore",
    "ObjectStore",
    "PutItem",
    "S3Store",
    "aws_environment",
    "list_uri",
    "open_store",
    "read_uri",
]


def __getattr__(name: str) -> object:
    """``S3Store`` on first use: importing boto3 costs a command that never talks to S3 ~0.15 s."""
    if name == "S3Store":
        from common.storage.s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
