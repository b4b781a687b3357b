"""An object store in process memory, for tests and dry runs.

Stores are named: every ``MemoryStore("x")`` in a process sees the same objects, so a producer and
an in-process worker opened from the same ``memory://x`` URL share their artifacts, and
``read_uri("memory://x/key")`` finds what was written. Nothing survives the process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from common.errors import NotFoundError, ObjectTooLargeError, StorageUnavailableError
from common.storage.base import DEFAULT_CONTENT_TYPE, PutItem, check_key, check_prefix, put_each

__all__ = ["MemoryStore", "read_memory_object", "read_memory_range"]

_registry_lock = threading.Lock()
# name -> key -> bytes. Guarded by _registry_lock: a worker uploads from several threads.
_registry: dict[str, dict[str, bytes]] = {}


class MemoryStore:
    """Objects in a process-wide dictionary under ``name``; thread-safe."""

    def __init__(self, name: str) -> None:
        if not name or "/" in name:
            raise ValueError(f"a memory store name must be non-empty and contain no '/': {name!r}")
        self.name = name
        self.url = f"memory://{name}"
        with _registry_lock:
            self._objects = _registry.setdefault(name, {})

    def __repr__(self) -> str:
        return f"MemoryStore({self.name!r})"

    def put(self, key: str, data: bytes, *, content_type: str = DEFAULT_CONTENT_TYPE) -> str:
        """Store a copy of ``data`` (a caller's later change to a bytearray must not alter it)."""
        stored = bytes(data)
        with _registry_lock:
            self._objects[check_key(key)] = stored
        return self.uri(key)

    def put_many(self, items: Iterable[PutItem]) -> dict[str, str]:
        return put_each(self.put, items)

    def sync(self) -> None:
        """Nothing outlives the process here: nothing to flush."""

    def hand_over(self, keys: Iterable[str]) -> None:
        """Nothing to hand over: nothing is flushed."""

    def take_over(self, keys: Iterable[str]) -> None:
        """Nothing to take over: nothing is flushed."""

    def get(self, key: str) -> bytes:
        with _registry_lock:
            data = self._objects.get(check_key(key))
        if data is None:
            raise NotFoundError(f"no such object: {self.uri(key)}")
        return data

    def exists(self, key: str) -> bool:
        with _registry_lock:
            return check_key(key) in self._objects

    def uri(self, key: str) -> str:
        return f"{self.url}/{check_key(key)}"

    def delete(self, key: str) -> None:
        with _registry_lock:
            self._objects.pop(check_key(key), None)

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        with _registry_lock:
            return sorted(key for key in self._objects if key.startswith(prefix))


def read_memory_object(name: str, key: str, *, max_bytes: int | None = None) -> bytes:
    """The bytes of ``memory://name/key``, refusing more than ``max_bytes``."""
    data = MemoryStore(name).get(key)
    if max_bytes is not None and len(data) > max_bytes:
        raise ObjectTooLargeError(
            f"memory://{name}/{key} is {len(data)} bytes, over the limit of {max_bytes}"
        )
    return data


def read_memory_range(name: str, key: str, offset: int, length: int) -> bytes:
    """``length`` bytes of ``memory://name/key`` from ``offset`` (one member of a shard)."""
    data = MemoryStore(name).get(key)[offset : offset + length]
    if len(data) != length:
        raise StorageUnavailableError(
            f"memory://{name}/{key} holds {len(data)} bytes at offset {offset}, not the {length} its row names"
        )
    return data
