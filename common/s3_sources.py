"""The S3 buckets (or bucket/prefixes) images and masks may be read from (``VITSCOPE_S3_SOURCES``).

An ``s3://`` row is read with the *worker's* credentials, which reach more than the submitter's
own data: the results store (every batch's crops and maps, other users' included), and whatever
other buckets the role happens to be granted. Without a bound, a dataset naming
``s3://other-bucket/secret.png`` or ``s3://results-bucket/artifacts/<someone's image>/input.png``
got that object decoded and rendered into overlays its submitter can download — the threat the
local-files policy (``common.local_files``) closes for the worker's disk. So:

- ``VITSCOPE_S3_SOURCES`` lists where inputs may come from, comma-separated: ``bucket`` (the whole
  bucket) or ``bucket/prefix`` (keys under that folder: ``photos/2024`` allows ``photos/2024/a.png``,
  not ``photos/2024-private/a.png``), with or without ``s3://``. ``*`` allows every bucket; an empty
  value allows none.
- Unset, the default is **the results store's own bucket, outside its prefix**: the one bucket the
  operator has certainly given vitscope, the usual place to upload inputs next to
  ``s3://bucket/results``. Any other bucket the credentials reach must be listed. With a local
  (``file://``) results store, unset allows no S3 input: there is no bucket the operator named.
- Whatever the list says, keys under the results store's prefix are never read as inputs: a batch
  must not turn another batch's outputs into its own.
- A key with a ``.``, ``..`` or empty segment (``a//b``, a leading ``/``) is refused: S3 keeps it
  literally, but gateways and S3-compatible servers that normalize paths would read another folder
  than the one checked.

The check is a pure function of the URI (no request is made to find out), so the producer can use
the same rules to warn at ``submit`` time about rows the workers will refuse.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from common.errors import ImageFetchRefusedError

__all__ = ["ANY_BUCKET", "SETTING", "S3Location", "S3Sources", "parse_s3_source"]

SETTING = "VITSCOPE_S3_SOURCES"
ANY_BUCKET = "*"


@dataclass(frozen=True)
class S3Location:
    """A bucket, or a folder of it: ``prefix`` is ``""`` (the whole bucket) or has no end slashes."""

    bucket: str
    prefix: str = ""

    def contains(self, bucket: str, key: str) -> bool:
        """Whether object ``key`` of ``bucket`` lies here (at a folder boundary, not a string prefix)."""
        if bucket != self.bucket:
            return False
        return not self.prefix or key == self.prefix or key.startswith(self.prefix + "/")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def parse_s3_source(entry: str) -> S3Location:
    """``bucket``, ``bucket/prefix`` or ``s3://bucket/prefix`` as a location; ``ValueError`` otherwise."""
    text = entry.strip()
    if text.lower().startswith("s3://"):
        text = text[len("s3://") :]
    bucket, _, prefix = text.partition("/")
    if not bucket or "*" in text:
        raise ValueError(f"{SETTING} entry {entry!r}: use bucket, bucket/prefix or {ANY_BUCKET} alone")
    return S3Location(bucket, prefix.strip("/"))


def _object(uri: str) -> tuple[str, str]:
    """``(bucket, key)`` of an ``s3://bucket/key`` URI (split by hand: a key may hold ``?`` and ``#``)."""
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return bucket, key


class S3Sources:
    """Where S3 inputs may be read from: the allowed locations, less the results store's prefix.

    ``sources`` is the setting's entries (``None`` = unset: the results store's bucket); ``results_url``
    the storage URL results are written to (``s3://bucket/prefix`` or anything else).
    """

    def __init__(self, sources: Iterable[str] | None, *, results_url: str | None) -> None:
        self.results: S3Location | None = None
        if results_url and results_url.lower().startswith("s3://"):
            self.results = parse_s3_source(results_url)
        self.any_bucket = False
        self.default = sources is None
        locations: list[S3Location] = []
        for entry in () if sources is None else sources:
            if entry.strip() == ANY_BUCKET:
                self.any_bucket = True
            elif entry.strip():
                locations.append(parse_s3_source(entry))
        if sources is None and self.results is not None:
            locations.append(S3Location(self.results.bucket))
        self.locations = tuple(dict.fromkeys(locations))

    def __repr__(self) -> str:
        allowed = [ANY_BUCKET] if self.any_bucket else [str(location) for location in self.locations]
        return f"S3Sources({allowed!r}, results={str(self.results) if self.results else None!r})"

    def refusal(self, uri: str) -> str | None:
        """Why reading ``uri`` (``s3://bucket/key``) is refused, or ``None`` when it is allowed."""
        bucket, key = _object(uri)
        if self.results is not None and self.results.contains(bucket, key):
            return (
                f"{uri} lies in the results store ({self.results}): the outputs of batches are never "
                "read as inputs, whatever " + SETTING + " says"
            )
        parts = key.split("/")
        if any(part in (".", "..") for part in parts) or "" in parts[:-1]:
            return (
                f"{uri}: a key with a '.', '..' or empty segment is refused (a server that normalizes "
                "paths would read another folder than the one checked)"
            )
        if self.any_bucket or any(location.contains(bucket, key) for location in self.locations):
            return None
        return (
            f"{uri} is outside the S3 sources images may be read from ({self._allowed()}); "
            f"add its bucket or folder to {SETTING} on the workers"
        )

    def check(self, uri: str) -> None:
        """Raise ``ImageFetchRefusedError`` (permanent: the job fails, nothing is read) unless allowed."""
        reason = self.refusal(uri)
        if reason is not None:
            raise ImageFetchRefusedError(reason)

    def _allowed(self) -> str:
        if self.default:
            if self.results is None:
                return f"none: {SETTING} is not set and results are not stored on S3"
            return f"{SETTING} is not set: the results store's bucket {self.results.bucket!r} only"
        if not self.locations:
            return f"none: {SETTING} is empty"
        return ", ".join(str(location) for location in self.locations)
