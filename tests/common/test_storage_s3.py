"""S3Store beyond the shared contract: the failures production meets, forks, and client settings.

Everything runs against moto's real HTTP server; the only faults not caused for real are S3 error
responses moto cannot be made to send (denied access, throttling), which the translation table
covers with botocore's own exception objects.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
)

from common.errors import (
    NotFoundError,
    PermanentError,
    StorageConfigError,
    StorageUnavailableError,
    TransientError,
)
from common.storage import S3Store, open_store, read_uri
from common.storage.s3_errors import translate_s3_error


@contextmanager
def on_request(store: S3Store, handler: Callable[..., None]) -> Iterator[None]:
    """Run ``handler(request=...)`` before each request the store's client sends.

    The client is shared by every store of the process, so the hook is removed again afterwards.
    """
    events = store.client.meta.events
    events.register("before-send.s3", handler)
    try:
        yield
    finally:
        events.unregister("before-send.s3", handler)


def test_put_records_the_content_type(s3_bucket: str) -> None:
    store = S3Store(s3_bucket, "runs")
    store.put("a/overlay.png", b"\x89PNG", content_type="image/png")
    store.put("a/rollout.npy", b"\x93NUMPY")
    head = boto3.client("s3").head_object
    assert head(Bucket=s3_bucket, Key="runs/a/overlay.png")["ContentType"] == "image/png"
    assert head(Bucket=s3_bucket, Key="runs/a/rollout.npy")["ContentType"] == "application/octet-stream"


def test_a_configured_endpoint_is_addressed_path_style(
    s3_bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MinIO needs http://endpoint/bucket/key; botocore chooses it for any configured endpoint.

    A host name (not an IP, for which path style is the only choice) makes the test meaningful.
    """
    endpoint = s3_endpoint.replace("127.0.0.1", "localhost")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    store = S3Store(s3_bucket)
    urls: list[str] = []
    with on_request(store, lambda request, **_: urls.append(request.url)):
        store.put("k/v.npy", b"1")
    assert urls == [f"{endpoint}/{s3_bucket}/k/v.npy"]


def test_put_many_uploads_concurrently_with_upload_threads(s3_bucket: str) -> None:
    """Four uploads must be in flight together to pass the barrier; sequential uploads would time out."""
    store = S3Store(s3_bucket, upload_threads=4)
    barrier = threading.Barrier(4, timeout=10)
    threads: set[str] = set()

    def wait_for_three_others(**_: Any) -> None:
        threads.add(threading.current_thread().name)
        barrier.wait()

    items = [(f"k{i}.npy", bytes([i]), "application/octet-stream") for i in range(8)]
    with on_request(store, wait_for_three_others):
        uris = store.put_many(items)
    assert sorted(uris) == [key for key, _, _ in items]
    assert len(threads) == 4
    assert all(name.startswith("s3-upload") for name in threads)


@pytest.mark.parametrize(("upload_threads", "pool"), [(1, 10), (8, 10), (10, 10), (32, 32)])
def test_the_connection_pool_is_never_smaller_than_the_upload_threads(
    s3_env: str, upload_threads: int, pool: int
) -> None:
    config = S3Store("bucket", upload_threads=upload_threads).client.meta.config
    assert config.max_pool_connections == pool
    assert config.retries == {"mode": "standard", "total_max_attempts": 4}


def test_stores_share_one_client_per_process_and_configuration(s3_env: str) -> None:
    assert S3Store("a").client is S3Store("b", "prefix").client
    assert S3Store("a").client is not S3Store("a", upload_threads=64).client


def test_a_changed_aws_environment_gets_a_matching_client(
    s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = S3Store("a").client
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    after = S3Store("a").client
    assert after is not before
    assert after.meta.endpoint_url == "http://127.0.0.1:1"


def test_a_forked_child_builds_its_own_client_and_the_parent_keeps_working(s3_bucket: str) -> None:
    store = S3Store(s3_bucket, "fork")
    store.put("parent-before.npy", b"p")
    parent_client = store.client
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status, never return into pytest
        status = 1
        try:
            if store.client is not parent_client:
                store.put("child.npy", b"c")
                status = 0 if store.get("child.npy") == b"c" else 3
            else:
                status = 2
        finally:
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert store.client is parent_client
    assert store.get("child.npy") == b"c"
    store.put("parent-after.npy", b"p")
    assert store.list() == ["child.npy", "parent-after.npy", "parent-before.npy"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


STORE_OPERATIONS: dict[str, Callable[[S3Store], object]] = {
    "put": lambda store: store.put("k.npy", b"1"),
    "put_many": lambda store: store.put_many([("k.npy", b"1", "application/octet-stream")]),
    "get": lambda store: store.get("k.npy"),
    "exists": lambda store: store.exists("k.npy"),
    "delete": lambda store: store.delete("k.npy"),
    "list": lambda store: store.list(),
}


@pytest.mark.parametrize("operation", list(STORE_OPERATIONS))
def test_an_unreachable_endpoint_is_transient_and_fails_fast(
    s3_env: str, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    store = S3Store("bucket", max_attempts=2, connect_timeout=1, read_timeout=1, retry_seconds=0)
    sent: list[str] = []
    started = time.monotonic()
    with (
        on_request(store, lambda request, **_: sent.append(request.url)),
        pytest.raises(StorageUnavailableError, match="unreachable"),
    ):
        STORE_OPERATIONS[operation](store)
    # Fast means bounded by the store's own retry budget, counted exactly; the clock only guards
    # against a hang, with margin for a loaded machine.
    assert len(sent) == 2
    assert time.monotonic() - started < 30


class _TruncatingS3:
    """An HTTP endpoint whose first ``cut`` GET answers promise 1000 bytes, send 10 and hang up —
    what a worker saw when S3 went away mid-download — and whose later answers are whole."""

    BODY = bytes(range(256)) * 3 + bytes(232)

    def __init__(self, cut: int) -> None:
        import http.server

        outer = self
        self.cut, self.gets = cut, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.gets += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.BODY)))
                self.end_headers()
                if outer.gets <= outer.cut:
                    self.wfile.write(outer.BODY[:10])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(outer.BODY)

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.BODY)))
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_READS: dict[str, Callable[[S3Store], Callable[[], bytes]]] = {
    "get": lambda store: lambda: store.get("k.png"),
    "capped": lambda store: lambda: store.read_object("k.png", max_bytes=10_000),  # an image source
    "ranged": lambda store: lambda: store.read_object("k.png", byte_range=(0, 1000)),  # a shard member
}


@pytest.mark.parametrize("read", list(_READS))
def test_a_download_cut_off_mid_body_is_transient_and_retried(
    s3_env: str, monkeypatch: pytest.MonkeyPatch, read: str
) -> None:
    endpoint = _TruncatingS3(cut=10**6)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.url)
    try:
        store = S3Store("bucket", max_attempts=1, read_timeout=5, retry_seconds=0)
        store._bucket_exists = True
        fetch = _READS[read](store)
        with pytest.raises(StorageUnavailableError):  # not a configuration error failing the job
            fetch()
        assert endpoint.gets >= 1
        endpoint.cut, endpoint.gets = 1, 0  # the next download is whole: the store's own retry gets it
        store = S3Store("bucket", max_attempts=1, read_timeout=5, retry_seconds=30)
        store._bucket_exists = True
        fetch = _READS[read](store)
        assert fetch() == _TruncatingS3.BODY
        assert endpoint.gets == 2
    finally:
        endpoint.close()


@pytest.mark.parametrize("operation", list(STORE_OPERATIONS))
def test_a_missing_bucket_is_a_permanent_error_naming_the_bucket(s3_env: str, operation: str) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    with pytest.raises(StorageConfigError, match=bucket):
        STORE_OPERATIONS[operation](S3Store(bucket))


def test_read_uri_in_a_missing_bucket_is_a_permanent_error(s3_env: str) -> None:
    with pytest.raises(StorageConfigError, match="missing-bucket-xyz"):
        read_uri("s3://missing-bucket-xyz/image.jpg", max_bytes=1000)


def test_a_missing_object_in_an_existing_bucket_is_only_not_found(s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}")
    assert store.exists("nope.npy") is False
    with pytest.raises(NotFoundError):
        read_uri(f"s3://{s3_bucket}/nope.npy", max_bytes=1000)


def test_missing_credentials_are_a_configuration_error(
    s3_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageConfigError, match="credentials"):
        S3Store("bucket").put("k", b"1")


def _client_error(code: str, status: int) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": "msg"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "PutObject")


def _error_id(value: object) -> str:
    if isinstance(value, ClientError):
        metadata = value.response["ResponseMetadata"]
        return f"{value.response['Error']['Code'] or 'no-code'}-{metadata['HTTPStatusCode']}"
    return getattr(value, "__name__", type(value).__name__)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_client_error("NoSuchKey", 404), NotFoundError),
        (_client_error("404", 404), NotFoundError),  # HEAD responses carry only the status
        (_client_error("NoSuchBucket", 404), StorageConfigError),
        (_client_error("AccessDenied", 403), StorageConfigError),
        (_client_error("403", 403), StorageConfigError),
        (_client_error("InvalidAccessKeyId", 403), StorageConfigError),
        (_client_error("SignatureDoesNotMatch", 403), StorageConfigError),
        (_client_error("PermanentRedirect", 301), StorageConfigError),
        (_client_error("InvalidArgument", 400), StorageConfigError),
        (_client_error("SlowDown", 503), StorageUnavailableError),
        (_client_error("InternalError", 500), StorageUnavailableError),
        (_client_error("", 502), StorageUnavailableError),
        (_client_error("TooManyRequests", 429), StorageUnavailableError),
        (_client_error("RequestTimeout", 400), StorageUnavailableError),
        (EndpointConnectionError(endpoint_url="http://minio:9000"), StorageUnavailableError),
        (ReadTimeoutError(endpoint_url="http://minio:9000"), StorageUnavailableError),
        # a download whose connection dropped mid-body (seen when S3 went away during a GET)
        (IncompleteReadError(actual_bytes=0, expected_bytes=12074), StorageUnavailableError),
        (NoCredentialsError(), StorageConfigError),
    ],
    ids=lambda value: _error_id(value),
)
def test_botocore_errors_map_onto_the_hierarchy(error: Exception, expected: type[Exception]) -> None:
    translated = translate_s3_error(error, bucket="my-bucket", key="a/b.npy")  # type: ignore[arg-type]
    assert type(translated) is expected
    assert isinstance(translated, TransientError) != isinstance(translated, PermanentError)
    if expected is StorageConfigError:
        assert "my-bucket" in str(translated)
    if expected is NotFoundError:
        assert "s3://my-bucket/a/b.npy" in str(translated)
