"""An S3 store rides out an endpoint that is down for a while (``VITSCOPE_STORAGE_RETRY_SECONDS``)
and gives up with ``StorageUnavailableError`` once that budget is spent; permanent errors are never
retried. Against moto's real HTTP server, started late on the port the store was pointed at."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from moto.server import ThreadedMotoServer

from common.errors import StorageConfigError, StorageUnavailableError
from common.settings import Settings
from common.storage import S3Store


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_default_budget_rides_out_a_20_second_outage() -> None:
    assert Settings().storage_retry_seconds >= 20


def test_a_put_waits_for_an_endpoint_that_comes_up_late(s3_bucket, monkeypatch) -> None:
    port = _free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # nothing listens there yet
    store = S3Store(s3_bucket, max_attempts=1, retry_seconds=60)
    late = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    started = threading.Event()

    def start_late() -> None:
        time.sleep(2)  # the outage
        late.start()  # moto's state is per process: the bucket made through the other server is here
        started.set()

    threading.Thread(target=start_late, daemon=True).start()
    try:
        uri = store.put("a/b.npy", b"payload")
        assert started.is_set(), "the put cannot have succeeded before the endpoint was up"
        assert store.get("a/b.npy") == b"payload"
        assert uri == f"s3://{s3_bucket}/a/b.npy"
    finally:
        started.wait(30)
        late.stop()


def test_the_budget_is_a_bound(monkeypatch, s3_env) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    store = S3Store("bucket", max_attempts=1, connect_timeout=1, retry_seconds=2)
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError):
        store.put("k", b"v")
    assert 2 <= time.monotonic() - started < 30


def test_permanent_errors_are_not_retried(s3_env) -> None:
    store = S3Store("no-such-bucket-anywhere", retry_seconds=60)
    started = time.monotonic()
    with pytest.raises(StorageConfigError):
        store.put("k", b"v")
    assert time.monotonic() - started < 30  # well under the budget: answered, not retried
