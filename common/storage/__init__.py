"""Object storage behind one small interface, chosen by URL (see ``uri.py`` for the schemes).

The worker writes artifacts through ``ObjectStore``, one object each or many jobs' in one tar shard
(``shards.py``); the producer and the worker read single objects (images, weights, one member of a
shard) by URI with ``read_uri``. boto3 is imported here but never torch, so the producer
can use this package.
"""

from __future__ import annotations

from common.storage.base import ObjectStore, PutItem
from common.storage.local import LocalStore
from common.storage.memory import MemoryStore
from common.storage.s3 import S3Store
from common.storage.uri import list_uri, open_store, read_uri

__all__ = [
    "LocalStore",
    "MemoryStore",
    "ObjectStore",
    "PutItem",
    "S3Store",
    "list_uri",
    "open_store",
    "read_uri",
]
