"""An object store in a local folder, and size-capped reads of local files.

Used for single-machine runs (the default ``./results``) and for shared filesystems. Writes are
atomic: a reader, a crashed worker or a retry never sees half an artifact. They are made durable
together by ``sync`` — one ``syncfs(2)`` of the store's filesystem per micro-batch on Linux, before
the database records the jobs — instead of an ``fsync`` per file: on ext4 each fsync is a journal
commit, and ten of them per image cost more CPU than encoding its pictures.

Filesystem failures are reported in the terms of ``common.errors``, like S3's: a missing file is
``NotFoundError``; denied access or a key that collides with a folder is ``StorageConfigError``
(retrying will not help); anything else (a full disk, an NFS hiccup) is
``StorageUnavailableError``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from common.errors import NotFoundError, ObjectTooLargeError, StorageConfigError, StorageUnavailableError
from common.storage.base import DEFAULT_CONTENT_TYPE, PutItem, check_key, check_prefix, put_each

__all__ = ["LocalStore", "list_files", "read_file", "read_file_range"]

# Prefix of the temporary files of writes in progress; ``list`` never reports them.
_TEMP_PREFIX = ".vitscope-tmp-"
# Folders ``put`` remembers having made before it forgets them all and starts again.
_FOLDERS_REMEMBERED = 4096
_PERMANENT_OS_ERRORS = (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


@contextlib.contextmanager
def _os_errors(action: str, path: Path | str) -> Iterator[None]:
    try:
        yield
    except _PERMANENT_OS_ERRORS as exc:
        raise StorageConfigError(f"cannot {action} {path}: {exc}") from exc
    except OSError as exc:
        raise StorageUnavailableError(f"cannot {action} {path}: {exc}") from exc


class LocalStore:
    """Objects as files under ``root``: key "a/b.npy" is the file ``root/a/b.npy``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        with _os_errors("create the store folder", self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()
        # The write path works on strings: building ``Path`` objects for an image's ten files cost
        # about as much CPU as writing them.
        self._root_text = str(self.root)
        self._unsynced: set[str] = set()  # files written since the last ``sync``
        self._folders: set[str] = set()  # folders known to exist (bounded: see _FOLDERS_REMEMBERED)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"

    def put(self, key: str, data: bytes, *, content_type: str = DEFAULT_CONTENT_TYPE) -> str:
        """Write through a temporary file in the target folder, then ``os.replace`` it into place.

        ``os.replace`` is atomic within one filesystem, which is why the temporary file lives in the
        same folder. The bytes reach the disk at the next ``sync`` (the pipeline syncs before it
        records a job), so after a power loss no recorded job names an empty file. ``content_type``
        has no place on a filesystem and is ignored.
        """
        path = self._file(key)
        folder, _, name = path.rpartition("/")
        temp = f"{folder}/{_TEMP_PREFIX}{secrets.token_hex(8)}-{name}"
        with _os_errors("write", path):
            if folder not in self._folders:  # one mkdir per folder, not per file: an image's ten share one
                os.makedirs(folder, exist_ok=True)
            try:
                # os.open with mode 0o666 honours the umask, unlike tempfile's private 0o600 files.
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileNotFoundError:  # the folder was removed since: make it again
                os.makedirs(folder, exist_ok=True)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                finally:
                    os.close(fd)
                os.replace(temp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                raise
        with self._lock:
            self._unsynced.add(path)
            if len(self._folders) >= _FOLDERS_REMEMBERED:
                self._folders.clear()
            self._folders.add(folder)
        return _file_uri(path)

    def sync(self) -> None:
        """Every file written since the last call, on disk: one ``syncfs`` of the store's filesystem
        on Linux (data and the renames), elsewhere an ``fsync`` of each file. On failure the files
        stay pending, so the next call tries them again."""
        with self._lock:
            paths, self._unsynced = self._unsynced, set()
        if not paths:
            return
        try:
            with _os_errors("sync", self.root):
                _sync_files(self.root, paths)
        except BaseException:
            with self._lock:
                self._unsynced |= paths
            raise

    def hand_over(self, keys: Iterable[str]) -> None:
        """Forget ``keys`` until someone else syncs them (a pool process writing for the pipeline
        would otherwise keep every path it ever wrote)."""
        paths = {self._file(key) for key in keys}
        with self._lock:
            self._unsynced -= paths

    def take_over(self, keys: Iterable[str]) -> None:
        """Count ``keys`` written by another process among this store's pending files: ``syncfs``
        flushes them anyway, the ``fsync`` fallback needs their paths."""
        paths = {self._file(key) for key in keys}
        with self._lock:
            self._unsynced |= paths

    def put_many(self, items: Iterable[PutItem]) -> dict[str, str]:
        """Sequential: a local disk gains nothing from concurrent small writes."""
        return put_each(self.put, items)

    def get(self, key: str) -> bytes:
        return read_file(self._path(key))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def delete(self, key: str) -> None:
        path = self._path(key)
        with _os_errors("delete", path):
            path.unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        return list_files(self.root, prefix)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _file(self, key: str) -> str:
        """``_path`` as a string, for the write path (a checked key has no empty or dot segments)."""
        return f"{self._root_text}/{check_key(key)}"


def _file_uri(path: str) -> str:
    """``Path(path).as_uri()`` for an absolute POSIX path, without building the ``Path``."""
    return "file://" + urllib.parse.quote_from_bytes(os.fsencode(path))


def _libc_syncfs() -> Callable[[int], int] | None:
    """glibc's ``syncfs(fd)`` (the os module has no binding for it), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
    return function


_SYNCFS = _libc_syncfs()


def _sync_files(root: Path, paths: set[str]) -> None:
    """Flush ``paths`` (all under ``root``) to disk: the whole filesystem at once where the kernel
    can, else file by file (a file deleted meanwhile needs no flushing)."""
    if _SYNCFS is not None:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _SYNCFS(fd) != 0:
                error = ctypes.get_errno()
                raise OSError(error, os.strerror(error))
        finally:
            os.close(fd)
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_file(path: Path, *, max_bytes: int | None = None) -> bytes:
    """The bytes of the file at ``path``, refusing more than ``max_bytes``.

    The size is checked with ``stat`` before reading and the read itself is capped as well, because
    the file may grow between the two (or be a pipe or /dev/zero, whose size says nothing).
    """
    with _os_errors("read", path):
        try:
            handle = path.open("rb")
        except (FileNotFoundError, NotADirectoryError) as exc:
            # NotADirectoryError: a path through a file ("a.jpg/b"), which names nothing either.
            raise NotFoundError(f"no such file: {path}") from exc
        except IsADirectoryError as exc:
            raise NotFoundError(f"not a file (a directory): {path}") from exc
        with handle:
            if max_bytes is None:
                return handle.read()
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise ObjectTooLargeError(f"{path} is {size} bytes, over the limit of {max_bytes}")
            data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ObjectTooLargeError(f"{path} is over the limit of {max_bytes} bytes")
    return data


def read_file_range(path: Path, offset: int, length: int) -> bytes:
    """``length`` bytes of the file at ``path`` from ``offset`` (one member of a shard): one seek.

    A file too short to hold them is reported as unavailable, not silently cut: a row that points
    past the end of its shard means the shard is not the one that was written.
    """
    with _os_errors("read", path):
        try:
            handle = path.open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise NotFoundError(f"no such file: {path}") from exc
        with handle:
            handle.seek(offset)
            data = handle.read(length)
    if len(data) != length:
        raise StorageUnavailableError(
            f"{path} holds {len(data)} bytes at offset {offset}, not the {length} its row names"
        )
    return data


def list_files(root: Path, prefix: str = "") -> list[str]:
    """Relative "/"-separated paths of the files under ``root`` that start with ``prefix``, sorted.

    ``prefix`` is a plain string prefix, as in S3 ("ab" matches "ab/c" and "abc"), so only the folder
    part of it narrows the walk; the rest filters names.
    """
    folder = root / check_prefix(prefix).rpartition("/")[0]
    if not folder.is_dir():
        return []
    keys: list[str] = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            if name.startswith(_TEMP_PREFIX):
                continue
            key = (Path(dirpath) / name).relative_to(root).as_posix()
            if key.startswith(prefix):
                keys.append(key)
    return sorted(keys)
