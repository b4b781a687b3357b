"""Local image files, read only inside the folders the operator allowed (``VITSCOPE_FILE_ROOTS``).

A dataset CSV is often written by someone else, and every row naming a local file is a read that
the machine processing it performs on its own disk. Without a bound, ``../../etc/passwd``,
``file:///home/me/.ssh/id_rsa.png`` or a symbolic link in the images folder pointing anywhere would be
opened, and a valid picture found there rendered into overlays anyone can download. So a local
path is read only when it lies under one of the allowed roots, in two steps:

1. ``FileRoots.check`` resolves the path — every ``..`` and every symbolic link, with
   ``os.path.realpath`` — and compares the result with the roots (resolved the same way). This is
   decided *before* the file is opened, and the answer is the same whether the file exists or not,
   so a refusal never reveals anything about the disk.
2. ``FileRoots.read`` opens the checked path one component at a time, starting from the root's
   directory and passing each step ``O_NOFOLLOW``. The checked path contains no links, so if one
   has been swapped in since step 1, at any depth, the open fails instead of following it (the
   time-of-check/time-of-use race). The opened file must be a regular file: a FIFO would block the
   reader and a device could be endless. ``O_NONBLOCK`` keeps the open itself from waiting on a FIFO.

Hard links are not symbolic links: a hard link inside a root to a file outside it is the same file
under a second name, and no path check can see where else it lives. Whoever can write into a root
can make one to any file of the same filesystem they can see (Linux's ``protected_hardlinks`` only
stops links to files they could not read themselves), so a shared images folder would be a way to
read the worker's other files. ``FileRoots.read`` therefore refuses a regular file with more than
one link (``st_nlink > 1``, from the ``fstat`` of the opened file, so it is the file actually read),
unless ``VITSCOPE_ALLOW_HARD_LINKS`` is set for folders whose files are hard-linked on purpose
(deduplicated or snapshot trees).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from common.errors import ImageError, ImageFetchRefusedError, ImageTooLargeError

__all__ = ["HARD_LINKS_SETTING", "SETTING", "CheckedPath", "FileRoots"]

SETTING = "VITSCOPE_FILE_ROOTS"
HARD_LINKS_SETTING = "VITSCOPE_ALLOW_HARD_LINKS"

# Every component, folders included, is opened with the same flags: with O_DIRECTORY, Linux reports
# a link as ENOTDIR, indistinguishable from a file in the way; without it, a link is ELOOP, and
# whether a folder was found is checked with fstat.
_NO_FOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class CheckedPath:
    """A path found inside ``root``: ``parts`` are its components below the root, none a link."""

    uri: str
    root: Path
    parts: tuple[str, ...]

    @property
    def path(self) -> Path:
        return self.root.joinpath(*self.parts)


class FileRoots:
    """The folders local images may be read from; an empty set reads no local file at all."""

    def __init__(self, roots: Iterable[str | os.PathLike[str]], *, allow_hard_links: bool = False) -> None:
        self.roots = tuple(dict.fromkeys(Path(os.path.realpath(Path(root).expanduser())) for root in roots))
        self.allow_hard_links = allow_hard_links

    def __repr__(self) -> str:
        return f"FileRoots({[str(root) for root in self.roots]!r})"

    def check(self, uri: str, path: Path) -> CheckedPath:
        """``path`` (absolute; what ``uri`` names) resolved and found under a root, or a refusal.

        Raises ``ImageFetchRefusedError`` naming ``VITSCOPE_FILE_ROOTS``; the file itself is not touched.
        """
        if not self.roots:
            raise ImageFetchRefusedError(
                f"{uri}: this worker reads no local files ({SETTING} is not set on it); upload the image "
                f"to s3:// (or serve it over https://), or set {SETTING} on the workers to a folder holding it"
            )
        real = Path(os.path.realpath(path))
        for root in self.roots:
            if real == root or root in real.parents:
                return CheckedPath(uri=uri, root=root, parts=real.relative_to(root).parts)
        how = "" if Path(os.path.normpath(path)) == real else " through a symbolic link"
        allowed = ", ".join(str(root) for root in self.roots)
        raise ImageFetchRefusedError(
            f"{uri} leads{how} outside the folders local images may be read from ({allowed}); "
            f"move it under one of them or add its folder to {SETTING}"
        )

    def read(self, checked: CheckedPath, *, max_bytes: int) -> bytes:
        """The bytes of a checked path, opened without following any link; at most ``max_bytes``."""
        fd = self._open(checked)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise ImageFetchRefusedError(f"{checked.uri}: not a regular file")
        if info.st_nlink > 1 and not self.allow_hard_links:
            os.close(fd)
            raise ImageFetchRefusedError(
                f"{checked.uri}: the file has {info.st_nlink} hard links, and one may lie outside the "
                f"allowed folders; not read ({HARD_LINKS_SETTING}=true allows them)"
            )
        with os.fdopen(fd, "rb") as handle:
            if info.st_size > max_bytes:
                raise ImageTooLargeError(
                    f"{checked.uri} is {info.st_size} bytes, over the limit of {max_bytes}"
                )
            try:
                data = handle.read(max_bytes + 1)  # the file may grow after the fstat
            except OSError as exc:
                raise ImageError(f"cannot read {checked.uri}: {os.strerror(exc.errno or 0)}") from None
        if len(data) > max_bytes:
            raise ImageTooLargeError(f"{checked.uri} is over the limit of {max_bytes} bytes")
        return data

    def _open(self, checked: CheckedPath) -> int:
        """Walk from the root's directory, one ``O_NOFOLLOW`` step per component."""
        if not checked.parts:
            raise ImageFetchRefusedError(f"{checked.uri}: not a regular file (a folder)")
        try:
            directory = os.open(checked.root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise _open_error(checked, exc) from None
        try:
            for part in checked.parts[:-1]:
                child = os.open(part, _NO_FOLLOW, dir_fd=directory)
                os.close(directory)
                directory = child
                if not stat.S_ISDIR(os.fstat(directory).st_mode):
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            return os.open(checked.parts[-1], _NO_FOLLOW, dir_fd=directory)
        except OSError as exc:
            raise _open_error(checked, exc) from None
        finally:
            os.close(directory)


def _open_error(checked: CheckedPath, exc: OSError) -> ImageError:
    """A failed open in vitscope's terms: a link swapped in is refused, anything else is a bad image."""
    if exc.errno == errno.ELOOP:
        return ImageFetchRefusedError(
            f"{checked.uri}: a symbolic link appeared in its path after it was checked; not followed"
        )
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return ImageError(f"no such file: {checked.uri}")
    if exc.errno == errno.EACCES:
        return ImageError(f"permission denied reading {checked.uri}")
    return ImageError(f"cannot open {checked.uri}: {os.strerror(exc.errno or 0)}")
