"""An object store in an S3 bucket (AWS S3, MinIO or any S3-compatible service).

Endpoint, credentials and region come from the standard AWS configuration (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``~/.aws/config``…), so a
MinIO deployment needs no vitscope-specific setting.

Addressing style: whenever an endpoint URL is configured, botocore sends path-style requests
(``http://endpoint/bucket/key``) unless the AWS config says ``s3.addressing_style = virtual``
(read in botocore 1.44's ``args.py``, and pinned by ``test_storage_s3.py``). Path style is what
MinIO needs; leaving the choice to botocore keeps the escape hatch for the few S3-compatible
services that demand virtual-hosted requests, which forcing "path" here would take away.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from common.errors import NotFoundError, ObjectTooLargeError, StorageConfigError, StorageUnavailableError
from common.settings import STORAGE_RETRY_SECONDS
from common.storage.base import (
    DEFAULT_CONTENT_TYPE,
    PutItem,
    aws_environment,
    check_key,
    check_prefix,
    unique_items,
)
from common.storage.s3_errors import translate_s3_error

__all__ = ["S3ClientOptions", "S3Store"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Objects of at least this size go up as a multipart upload of parts this size (S3's parts are 5 MiB
# to 5 GiB): a failed part is retried alone instead of the whole object, and no single request
# carries more than one part. Only shards get this large; an artifact object is far below it.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_PART_SIZE = 32 * 1024 * 1024

# Backoff between whole-request retries while the endpoint is unavailable: 0.5 s doubling to 8 s.
_FIRST_DELAY_SECONDS = 0.5
_MAX_DELAY_SECONDS = 8.0


@dataclass(frozen=True)
class S3ClientOptions:
    """The client settings vitscope chooses; everything else is the AWS configuration's.

    ``max_pool_connections`` must be at least the number of upload threads, or the threads queue
    for connections (and urllib3 warns "Connection pool is full"). ``max_attempts`` counts the first
    try; botocore's "standard" retry mode backs off exponentially with jitter and retries
    throttling, 5xx and connection errors.
    """

    max_pool_connections: int = 10
    max_attempts: int = 4
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def config(self) -> Config:
        return Config(
            max_pool_connections=self.max_pool_connections,
            # "total_max_attempts" includes the first request; botocore's "max_attempts" key would not.
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
        )


class _ProcessClients:
    """One boto3 client per option set in each process, created on first use.

    boto3 clients are thread-safe and expensive to build (tens of milliseconds, a parsed service
    model), so the upload threads share one. Sessions are not thread-safe, so each client is built
    from its own session under a lock. After ``fork`` a child must not touch the parent's clients:
    their pooled sockets are shared with the parent and interleaved requests corrupt both. The pid
    check catches every kind of fork (multiprocessing, Celery's prefork pool, a bare ``os.fork``);
    the lock is replaced too, since a parent thread may have held it at the moment of the fork.

    boto3 reads its endpoint and credentials from ``AWS_*`` variables when a client is built, so
    the cache key includes them: a process whose AWS environment changed (tests do this) gets a
    client that matches it instead of one pointing at the old endpoint.
    """

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._clients: dict[tuple[S3ClientOptions, frozenset[tuple[str, str]]], Any] = {}

    def get(self, options: S3ClientOptions) -> Any:
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._clients = {}
        cache_key = (options, frozenset(aws_environment().items()))
        client = self._clients.get(cache_key)
        if client is None:
            with self._lock:
                client = self._clients.get(cache_key)
                if client is None:
                    client = self._clients[cache_key] = _new_client(options)
        return client


def _new_client(options: S3ClientOptions) -> Any:
    try:
        return boto3.session.Session().client("s3", config=options.config())
    except (BotoCoreError, ValueError) as exc:
        # ValueError: botocore's verdict on a malformed AWS_ENDPOINT_URL.
        raise StorageConfigError(f"cannot create an S3 client from the AWS configuration: {exc}") from exc


_clients = _ProcessClients()


class S3Store:
    """Objects in ``bucket`` under an optional ``prefix``: key "a/b" is object "prefix/a/b".

    ``upload_threads`` bounds ``put_many``'s concurrency. ``put`` is a single PUT request below
    ``multipart_threshold`` bytes (64 MiB) and a multipart upload from there, so that a large shard's
    failed part is sent again alone and no part is ever visible before the whole object is.

    ``retry_seconds`` (60 s unless the caller passes the ``storage_retry_seconds`` setting) is how long a request that
    fails with ``StorageUnavailableError`` — endpoint down, connection refused or reset, 5xx,
    throttling — is tried again, with backoff from 0.5 s doubling to 8 s, after botocore's own few
    quick retries gave up. botocore's standard mode alone rides out only a few seconds (its retry
    quota even stops retrying after a burst of connection errors), so a MinIO restart or a 20 s
    network blip would otherwise cost every job in flight an attempt. Permanent errors (missing
    bucket, denied access) are never retried.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        upload_threads: int = 8,
        max_attempts: int = 4,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        retry_seconds: float = STORAGE_RETRY_SECONDS,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        multipart_part_size: int = MULTIPART_PART_SIZE,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        if upload_threads < 1:
            raise ValueError(f"upload_threads must be at least 1, got {upload_threads}")
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = check_key(prefix) if prefix else ""
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._upload_threads = upload_threads
        self._multipart_threshold = multipart_threshold
        self._multipart_part_size = multipart_part_size
        self._retry_seconds = max(0.0, retry_seconds)
        self._options = S3ClientOptions(
            max_pool_connections=max(10, upload_threads),
            max_attempts=max_attempts,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        # Set once the bucket is known to exist, so a missing object's 404 can be told apart from a
        # missing bucket's (a HEAD response has no body to say which) without asking every time.
        self._bucket_exists = False

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    @property
    def client(self) -> Any:
        """The boto3 client of the current process (a new one after a fork)."""
        return _clients.get(self._options)

    def put(self, key: str, data: bytes, *, content_type: str = DEFAULT_CONTENT_TYPE) -> str:
        object_key = self._object_key(key)
        if len(data) >= self._multipart_threshold:
            self._put_multipart(object_key, data, content_type)
            return self.uri(key)
        self._retrying(
            object_key,
            lambda: self.client.put_object(
                Bucket=self.bucket, Key=object_key, Body=data, ContentType=content_type
            ),
        )
        return self.uri(key)

    def _put_multipart(self, object_key: str, data: bytes, content_type: str) -> None:
        """One object in parts of ``multipart_part_size``: the object appears only when the upload is
        completed, whole. A failed upload is aborted (its parts would otherwise be billed until a
        bucket lifecycle rule removes them); one cut short by a killed process is not, which is why
        the docs ask for an ``AbortIncompleteMultipartUpload`` rule on the bucket."""
        client = self.client
        upload = self._retrying(
            object_key,
            lambda: client.create_multipart_upload(
                Bucket=self.bucket, Key=object_key, ContentType=content_type
            ),
        )["UploadId"]
        try:
            view = memoryview(data)
            parts = []
            for number, start in enumerate(range(0, len(data), self._multipart_part_size), 1):
                body = view[start : start + self._multipart_part_size].tobytes()

                def send(body: bytes = body, number: int = number) -> dict[str, Any]:
                    return client.upload_part(
                        Bucket=self.bucket, Key=object_key, UploadId=upload, PartNumber=number, Body=body
                    )

                answer = self._retrying(object_key, send)
                parts.append({"ETag": answer["ETag"], "PartNumber": number})
            self._retrying(
                object_key,
                lambda: client.complete_multipart_upload(
                    Bucket=self.bucket, Key=object_key, UploadId=upload, MultipartUpload={"Parts": parts}
                ),
            )
        except BaseException:
            with contextlib.suppress(Exception):
                client.abort_multipart_upload(Bucket=self.bucket, Key=object_key, UploadId=upload)
            raise

    def sync(self) -> None:
        """Nothing to do: S3 (and MinIO) answer a PUT only once the object is durable."""

    def hand_over(self, keys: Iterable[str]) -> None:
        """Nothing to hand over: every acknowledged PUT is already durable."""

    def take_over(self, keys: Iterable[str]) -> None:
        """Nothing to take over: every acknowledged PUT is already durable."""

    def put_many(self, items: Iterable[PutItem]) -> dict[str, str]:
        """Upload concurrently; after every upload finished, raise the first error in item order.

        Waiting for all before raising means no upload is still running, unobserved, when the
        caller handles the error (and, say, marks the job failed or retries it).
        """
        listed = unique_items(items)
        if not listed:
            return {}
        workers = min(self._upload_threads, len(listed))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-upload") as pool:
            futures = {
                key: pool.submit(self.put, key, data, content_type=content_type)
                for key, data, content_type in listed
            }
        uris: dict[str, str] = {}
        first_error: BaseException | None = None
        for key, future in futures.items():
            error = future.exception()
            if error is None:
                uris[key] = future.result()
            elif first_error is None:
                first_error = error
        if first_error is not None:
            raise first_error
        return uris

    def get(self, key: str) -> bytes:
        return self.read_object(self._object_key(key))

    def exists(self, key: str) -> bool:
        object_key = self._object_key(key)
        try:
            self._retrying(object_key, lambda: self.client.head_object(Bucket=self.bucket, Key=object_key))
        except NotFoundError:
            return False
        return True

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def delete(self, key: str) -> None:
        """S3 answers a DELETE of a missing key with success, which makes this idempotent."""
        object_key = self._object_key(key)
        self._retrying(object_key, lambda: self.client.delete_object(Bucket=self.bucket, Key=object_key))

    def list(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        return [key[len(base) :] for key in self.list_objects(base + check_prefix(prefix))]

    def read_object(
        self, object_key: str, *, max_bytes: int | None = None, byte_range: tuple[int, int] | None = None
    ) -> bytes:
        """The bytes of ``object_key`` (a full key in the bucket, not under the store's prefix).

        No key rules apply, since the key may come from a user's URI. With ``max_bytes``, a HEAD
        request checks the size before the download, and the download is capped too in case the
        object was replaced in between. With ``byte_range`` = (offset, length), only those bytes, in
        one ranged GET (a member of a shard); fewer bytes than asked is an error, not a short read.
        """
        if byte_range is not None:
            return self._read_range(object_key, *byte_range)

        def download() -> bytes:
            if max_bytes is not None:
                size = self.client.head_object(Bucket=self.bucket, Key=object_key)["ContentLength"]
                if size > max_bytes:
                    raise ObjectTooLargeError(
                        f"s3://{self.bucket}/{object_key} is {size} bytes, over the limit of {max_bytes}"
                    )
            answer = self.client.get_object(Bucket=self.bucket, Key=object_key)
            body = answer["Body"]
            try:
                data = body.read() if max_bytes is None else body.read(max_bytes + 1)
            finally:
                body.close()
            # botocore checks the length only of a read to the end: a capped read of a connection
            # that dropped mid-body returns what arrived, and a cut-off image must not be decoded.
            expected = answer.get("ContentLength")
            if (
                expected is not None
                and len(data) < expected
                and (max_bytes is None or len(data) <= max_bytes)
            ):
                raise StorageUnavailableError(
                    f"s3://{self.bucket}/{object_key} broke off after {len(data)} of {expected} bytes"
                )
            return data

        data = self._retrying(object_key, download)
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLargeError(f"s3://{self.bucket}/{object_key} is over the limit of {max_bytes}")
        return data

    def _read_range(self, object_key: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""

        def download() -> bytes:
            answer = self.client.get_object(
                Bucket=self.bucket, Key=object_key, Range=f"bytes={offset}-{offset + length - 1}"
            )
            body = answer["Body"]
            try:
                data = body.read(length + 1)
            finally:
                body.close()
            if len(data) != length:  # inside the retry: a connection that dropped mid-body
                raise StorageUnavailableError(
                    f"s3://{self.bucket}/{object_key} gave {len(data)} bytes at offset {offset}, "
                    f"not the {length} asked"
                )
            return data

        return self._retrying(object_key, download)

    def list_objects(self, object_prefix: str = "") -> builtins.list[str]:
        """Full keys in the bucket starting with ``object_prefix``, sorted."""

        def listing() -> builtins.list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=object_prefix
            )
            return [item["Key"] for page in pages for item in page.get("Contents", ())]

        return sorted(self._retrying(None, listing))

    def _object_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retrying(self, object_key: str | None, request: Callable[[], T]) -> T:
        """``request()`` with errors translated, tried again while storage is unavailable (see class doc)."""
        deadline = time.monotonic() + self._retry_seconds
        delay = _FIRST_DELAY_SECONDS
        while True:
            try:
                with self._errors(object_key):
                    return request()
            except StorageUnavailableError as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                if delay == _FIRST_DELAY_SECONDS:
                    log.warning("%s; retrying for up to %.0f s", exc, remaining)
                time.sleep(min(delay, remaining))
                delay = min(2 * delay, _MAX_DELAY_SECONDS)

    @contextlib.contextmanager
    def _errors(self, object_key: str | None) -> Iterator[None]:
        """Translate botocore's errors; a "not found" is checked against a missing bucket first."""
        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            error = translate_s3_error(exc, bucket=self.bucket, key=object_key)
            if isinstance(error, NotFoundError):
                self._require_bucket()
            raise error from exc

    def _require_bucket(self) -> None:
        if self._bucket_exists:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            error = translate_s3_error(exc, bucket=self.bucket)
            if isinstance(error, NotFoundError):
                error = StorageConfigError(f"S3 bucket {self.bucket!r} does not exist")
            raise error from exc
        except BotoCoreError as exc:
            raise translate_s3_error(exc, bucket=self.bucket) from exc
        self._bucket_exists = True
