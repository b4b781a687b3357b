"""LocalStore beyond the shared contract: atomic writes, no escape from its folder, file modes."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import NotFoundError, StorageConfigError, StorageUnavailableError
from common.storage import LocalStore, open_store


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.mark.parametrize("key", ["../outside.npy", "a/../../outside.npy", "/etc/outside.npy"])
def test_a_key_cannot_write_outside_the_store_folder(store: LocalStore, tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="key"):
        store.put(key, b"x")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == []


def test_readers_never_see_a_half_written_object(store: LocalStore) -> None:
    """Overwrite one key back and forth while another thread reads it: every read is whole."""
    versions = (b"A" * 2_000_000, b"B" * 1_500_000)
    store.put("big.npy", versions[0])
    done = threading.Event()
    reads: list[int] = []
    torn: list[int] = []
    errors: list[BaseException] = []

    def read_until_done() -> None:
        try:
            while not done.is_set():
                data = store.get("big.npy")
                reads.append(len(data))
                if data not in versions:
                    torn.append(len(data))
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read_until_done)
    reader.start()
    for i in range(40):
        store.put("big.npy", versions[i % 2])
    done.set()
    reader.join(timeout=30)
    assert errors == []
    assert torn == []
    assert len(reads) > 1


def test_a_failed_write_leaves_the_old_object_and_no_temporary_file(store: LocalStore) -> None:
    store.put("taken/inner.npy", b"kept")
    # Replacing a non-empty folder with a file fails inside os.replace, after the temp file exists.
    with pytest.raises(StorageConfigError, match="cannot write"):
        store.put("taken", b"new")
    assert store.get("taken/inner.npy") == b"kept"
    assert sorted(p.name for p in store.root.iterdir()) == ["taken"]
    assert store.list() == ["taken/inner.npy"]


def test_a_folder_removed_after_a_write_is_made_again_by_the_next(store: LocalStore) -> None:
    """``put`` remembers the folders it made; one deleted behind its back (a user clearing results,
    a cleanup job) must not make the next write into it fail."""
    store.put("image/model/a.npy", b"first")
    shutil.rmtree(store.root / "image")
    store.put("image/model/b.npy", b"second")
    assert store.get("image/model/b.npy") == b"second"
    assert not store.exists("image/model/a.npy")


def test_a_crashed_write_leftover_is_not_listed(store: LocalStore) -> None:
    store.put("a/real.npy", b"1")
    (store.root / "a" / ".vitscope-tmp-0123456789abcdef-real.npy").write_bytes(b"half")
    assert store.list() == ["a/real.npy"]


@pytest.fixture
def umask_027() -> Iterator[int]:
    previous = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(previous)


def test_written_files_get_the_umask_mode_not_a_private_temp_mode(store: LocalStore, umask_027: int) -> None:
    store.put("k.npy", b"1")
    assert (store.root / "k.npy").stat().st_mode & 0o777 == 0o666 & ~umask_027


def test_paths_with_spaces_and_hashes_round_trip_through_the_uri(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "my results #1"))
    uri = store.put("a b/c#d.npy", b"1")
    assert uri.startswith("file:///")
    assert " " not in uri
    assert "#" not in uri
    assert open_store(store.url).get("a b/c#d.npy") == b"1"
    assert (tmp_path / "my results #1" / "a b" / "c#d.npy").read_bytes() == b"1"


def test_a_key_below_an_existing_object_is_a_configuration_error(store: LocalStore) -> None:
    store.put("a.npy", b"1")
    with pytest.raises(StorageConfigError, match="cannot write"):
        store.put("a.npy/b.npy", b"2")
    with pytest.raises(NotFoundError, match="no such file"):
        store.get("a.npy/b.npy")
    assert not store.exists("a.npy/b.npy")


def test_sync_flushes_the_files_written_since_the_last_sync_once(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``syncfs`` (not Linux), ``sync`` fsyncs exactly the files written since the last one;
    ``put`` itself fsyncs nothing (ten journal commits per image were the cost this removes)."""
    import common.storage.local as local

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(local, "_SYNCFS", None)
    monkeypatch.setattr(local.os, "fsync", fsync)
    store.put_many([("a/1.npy", b"1", "x"), ("a/2.png", b"2", "x")])
    store.put("b/3.npy", b"3")
    assert synced == []
    store.sync()
    assert sorted(Path(p).relative_to(store.root).as_posix() for p in synced) == [
        "a/1.npy",
        "a/2.png",
        "b/3.npy",
    ]
    synced.clear()
    store.sync()
    assert synced == []  # nothing new
    store.put("a/1.npy", b"one")
    store.delete("b/3.npy")
    store.sync()
    assert [Path(p).relative_to(store.root).as_posix() for p in synced] == ["a/1.npy"]


def test_files_handed_over_are_synced_by_the_store_that_takes_them_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU-pool process writes through its own store of the same folder and hands the keys over;
    the pipeline's store takes them over and its ``sync`` flushes them (the ``fsync`` fallback needs
    their paths), while the writer forgets them instead of keeping every path it ever wrote."""
    import common.storage.local as local

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).relative_to(tmp_path / "store").as_posix())
        real_fsync(fd)

    monkeypatch.setattr(local, "_SYNCFS", None)
    monkeypatch.setattr(local.os, "fsync", fsync)
    writer, pipeline = LocalStore(tmp_path / "store"), LocalStore(tmp_path / "store")
    writer.put_many([("a/1.npy", b"1", "x"), ("a/2.png", b"2", "x")])
    writer.put("a/3.npy", b"3")
    writer.hand_over(["a/1.npy", "a/2.png"])
    pipeline.put("b/own.npy", b"own")
    pipeline.take_over(["a/1.npy", "a/2.png"])
    pipeline.sync()
    assert sorted(synced) == ["a/1.npy", "a/2.png", "b/own.npy"]
    synced.clear()
    writer.sync()
    assert synced == ["a/3.npy"]  # what it did not hand over is still its own to flush


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="syncfs is Linux's")
def test_sync_uses_one_syncfs_of_the_store_filesystem_on_linux(store: LocalStore) -> None:
    import common.storage.local as local

    assert local._SYNCFS is not None
    store.put_many([(f"k/{i}.npy", bytes([i]), "x") for i in range(20)])
    store.sync()  # really calls syncfs(2): returns 0 on a writable filesystem
    assert store.get("k/7.npy") == b"\x07"


def test_a_failed_sync_keeps_its_files_pending_and_reports_storage_unavailable(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush the disk refuses (EIO) is an outage for the caller, and the next sync tries again."""
    import common.storage.local as local

    calls: list[int] = []

    def failing_syncfs(fd: int) -> int:
        calls.append(fd)
        if len(calls) == 1:
            ctypes.set_errno(errno.EIO)
            return -1
        return 0

    monkeypatch.setattr(local, "_SYNCFS", failing_syncfs)
    store.put("a.npy", b"a")
    with pytest.raises(StorageUnavailableError, match="cannot sync"):
        store.sync()
    assert store._unsynced  # still pending
    store.sync()
    assert len(calls) == 2
    assert not store._unsynced
