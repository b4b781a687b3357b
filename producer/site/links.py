"""How a report's pages point at artifact pictures: a copy beside the pages, a relative path, or a presigned URL.

Whatever the mode, a page never holds an absolute path of the machine that wrote it, so the report
folder can be moved, zipped or uploaded next to the artifacts:

    copy       each picture is copied into ``DIR/img/`` (named by a digest of its URI, so a picture
               shared by reused jobs is copied once, and a second run copies only what is new)
    relative   local storage only: a path relative to ``DIR`` (nothing copied; keep both together)
    presigned  s3:// storage only: a presigned GET URL valid for ``expires`` seconds (nothing copied)

Artifacts stored in shards (``VITSCOPE_ARTIFACT_LAYOUT=shards``, the default on S3) are members of a
tar: copy mode extracts each picture with one ranged read; relative and presigned mode refuse them,
since a browser's ``<img>`` cannot send the ``Range`` header that picks a member out of its shard.
Run ``producer artifacts BATCH --out DIR`` to get one file per artifact instead.
"""

from __future__ import annotations

import enum
import hashlib
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import quote

from common.errors import StorageConfigError
from common.storage import read_uri
from common.storage.shards import parse_member_uri
from common.storage.uri import file_uri_path, uri_scheme

__all__ = ["ArtifactLinks", "CopyLinks", "LinkMode", "PresignedLinks", "RelativeLinks", "make_links"]

# SigV4 presigned URLs live at most 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
COPY_FOLDER = "img"


class LinkMode(enum.StrEnum):
    COPY = "copy"
    RELATIVE = "relative"
    PRESIGNED = "presigned"


class ArtifactLinks(Protocol):
    """Turns an artifact URI into what an ``<img src>`` on a page of the report's root folder holds."""

    def href(self, uri: str) -> str: ...


class CopyLinks:
    """Copies each picture into ``out/img/<digest>.<ext>`` and links to it relatively."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def href(self, uri: str) -> str:
        digest = hashlib.sha256(uri.encode()).hexdigest()
        member = parse_member_uri(uri)  # a member of a shard: its own name, and only its bytes
        suffix = PurePosixPath(member.member if member else uri).suffix.lower() or ".bin"
        relative = f"{COPY_FOLDER}/{digest[:2]}/{digest[2:24]}{suffix}"
        target = self.out / relative
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial")
            if uri_scheme(uri) == "file" and member is None:
                shutil.copyfile(file_uri_path(uri), partial)
            else:
                partial.write_bytes(read_uri(uri))
            # Renamed into place only when whole: an interrupted run never leaves a truncated picture
            # that the next run would then take as already copied.
            partial.replace(target)
        return relative


class RelativeLinks:
    """Links to the pictures where they lie in local storage, by a path relative to the report folder."""

    def __init__(self, out: Path) -> None:
        self.out = out.resolve()

    def href(self, uri: str) -> str:
        if uri_scheme(uri) != "file":
            raise ValueError(f"--links relative needs local (file://) storage; {uri!r} is not local")
        _refuse_member(uri, "relative")
        relative = os.path.relpath(file_uri_path(uri), self.out)
        return quote(Path(relative).as_posix())


class PresignedLinks:
    """Presigned S3 GET URLs, valid for ``expires_seconds`` from when the report is written.

    Signed with SigV4 (botocore may otherwise pick the deprecated SigV2 query signature), whose
    URLs live at most 7 days. Signing is local: no request is made, so a wrong credential shows
    only when a browser follows the link.
    """

    def __init__(self, expires_seconds: int) -> None:
        if not 1 <= expires_seconds <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"--expires must be between 1 and {MAX_PRESIGN_SECONDS} seconds (7 days)")
        self.expires_seconds = expires_seconds
        self._client: Any = None

    def href(self, uri: str) -> str:
        if uri_scheme(uri) != "s3":
            raise ValueError(f"--links presigned needs s3:// storage; {uri!r} is not in S3")
        _refuse_member(uri, "presigned")
        bucket, _, key = uri.split("://", 1)[1].partition("/")
        if self._client is None:
            import boto3  # here: the producer's other commands start faster without it
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError

            try:
                self._client = boto3.session.Session().client("s3", config=Config(signature_version="s3v4"))
            except (BotoCoreError, ValueError) as exc:
                raise StorageConfigError(
                    f"cannot create an S3 client from the AWS configuration: {exc}"
                ) from exc
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.expires_seconds
        )


def _refuse_member(uri: str, mode: str) -> None:
    """A link cannot name a member of a shard: only a ranged read gets its bytes out of the tar."""
    if parse_member_uri(uri) is not None:
        raise ValueError(
            f"--links {mode} cannot point at {uri!r}: it is a member of an artifact shard "
            "(VITSCOPE_ARTIFACT_LAYOUT=shards), and a browser <img> cannot send the Range header that "
            "reads one member. Use --links copy (it extracts each picture into the report folder), or "
            "`producer artifacts BATCH --out DIR` for one file per artifact."
        )


def make_links(mode: LinkMode, out: Path, *, expires_seconds: int) -> ArtifactLinks:
    """The link strategy for ``mode``; its refusals (wrong storage) come on the first picture."""
    if mode is LinkMode.COPY:
        return CopyLinks(out)
    if mode is LinkMode.RELATIVE:
        return RelativeLinks(out)
    return PresignedLinks(expires_seconds)
