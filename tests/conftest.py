"""Fixtures for the real services the tests run against: PostgreSQL, Redis and an S3 HTTP endpoint.

Nothing here skips when a service is missing: ``scripts/test`` starts PostgreSQL and Redis where none
runs, and a test that silently skips its database would be a test that cannot fail.
Override the addresses with ``VITSCOPE_TEST_POSTGRES_URL`` / ``VITSCOPE_TEST_REDIS_URL``.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

POSTGRES_ADMIN_URL = os.environ.get(
    "VITSCOPE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("VITSCOPE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# Keep torch from fighting over the two cores when a test also runs a worker process, and run the
# tests' pipelines (in this process and in the workers it starts) as the worker's entry points run
# theirs (``worker.cores.wait_passively_in_openmp``), before any test module loads torch.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Every test starts from a clean VITSCOPE_ environment and a private working directory."""
    from common.settings import get_settings

    for key in list(os.environ):
        if key.startswith("VITSCOPE_") and not key.startswith("VITSCOPE_TEST_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    import sqlalchemy as sa

    engine = sa.create_engine(POSTGRES_ADMIN_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # pragma: no cover - reported, not hidden
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    finally:
        engine.dispose()
    return POSTGRES_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    from common.db.scratch import scratch_database

    with scratch_database(postgres_admin_url, prefix="vitscope_test") as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'vitscope-test.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Every DB test runs on both embedded SQLite and real PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
    except Exception as exc:  # pragma: no cover - reported, not hidden
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}")
    finally:
        client.close()
    return REDIS_URL


# Each test file that talks to a broker has a Redis database of its own, flushed around each of its
# tests, so one file's flush can never drop another file's messages (CI may run files side by side).
REDIS_DATABASES = {
    "test_distributed.py": 15,
    "test_tasks.py": 14,
    "test_cli.py": 13,
    "test_install_footprint.py": 12,
}
assert len(set(REDIS_DATABASES.values())) == len(REDIS_DATABASES), "two test files share a Redis database"


@pytest.fixture
def broker_url(redis_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """This test file's own, empty Redis database (see ``REDIS_DATABASES``)."""
    import redis

    number = REDIS_DATABASES.get(request.path.name)
    if number is None:
        pytest.fail(f"{request.path.name} uses a broker: give it a database of its own in REDIS_DATABASES")
    url = redis_url.rsplit("/", 1)[0] + f"/{number}"
    client = redis.Redis.from_url(url, socket_timeout=5)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint (moto's server) for the whole session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Standard AWS variables pointing boto3 at the test endpoint, exactly as a MinIO user would."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_endpoint


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A new, empty bucket on the test endpoint."""
    import boto3

    name = f"vitscope-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def _write_image(
    path: Path, *, size: tuple[int, int] = (96, 80), seed: int = 0, fmt: str | None = None
) -> Path:
    """A small real photo-like image (smooth gradients plus noise) written in the format of its suffix."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)) + rng.uniform(0, 55, 3), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


@pytest.fixture
def write_image():
    """``write_image(path, size=(w, h), seed=0)``: write a small photo-like test image, return its path."""
    return _write_image


# --- Private service instances, for tests that restart or break a service. -------------------------
# Never the shared servers: each of these runs on its own free port and is killed after its test.


def _wait_until(check, timeout: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout} s")


class PrivateRedis:
    """A ``redis-server`` with an append-only file, as ``scripts/services`` and compose run it."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=5)

    def _answers(self) -> bool:
        import redis

        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        import subprocess

        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_until(self._answers, 30, f"redis-server on port {self.port} did not answer")

    def stop(self) -> None:
        """SIGTERM: Redis's own clean shutdown, which flushes the append-only file."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl as the ``postgres`` user) on a free port."""

    def __init__(self) -> None:
        import glob
        import shutil
        import tempfile

        versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
        if not versions:
            pytest.fail("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        self.bin = Path(versions[-1])
        self.port = _free_port()
        # Outside pytest's tmp_path: the postgres user must be able to reach it.
        self.dir = Path(tempfile.mkdtemp(prefix="vitscope-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/test"

    def _run(self, tool: str, *args: str) -> None:
        import subprocess

        as_postgres = [] if os.getuid() != 0 else ["runuser", "-u", "postgres", "--"]
        subprocess.run(
            [*as_postgres, str(self.bin / tool), *args], check=True, capture_output=True, timeout=120
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "pg.log"), "-w", "start"
        )

    def stop(self) -> None:
        """``-m fast``: open sessions are cut, as in a real restart."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self) -> None:
        import sqlalchemy as sa

        admin = sa.create_engine(
            f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres", isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.execute(sa.text("CREATE DATABASE test"))
        admin.dispose()

    def remove(self) -> None:
        import contextlib
        import shutil
        import subprocess

        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        server.create_database()
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def trained_model():
    """The small ViT trained on the coloured-square task (``tests/trained_vit.py``), cached on disk."""
    from tests.trained_vit import load_trained

    return load_trained()


@dataclass
class ImageServer:
    """A real HTTP image server on 127.0.0.1 whose faults a test controls.

    ``images`` maps a path (``/a.png``) to its bytes. ``hold(path)`` makes requests for it wait until
    the returned event is set — a chunk stopped mid-flight at a point the test can observe
    (``requests``), instead of a guess with ``sleep``. ``fail(path, n)`` answers the next ``n``
    requests with 503, a transient failure as a real server gives it.
    """

    base: str
    images: dict[str, bytes] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    holds: dict[str, threading.Event] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def url(self, path: str) -> str:
        return self.base + path

    def hold(self, path: str) -> threading.Event:
        return self.holds.setdefault(path, threading.Event())

    def fail(self, path: str, times: int) -> None:
        self.failures[path] = times

    def wait_for_request(self, path: str, count: int = 1, timeout: float = 180) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: self.requests[path] >= count, timeout=timeout):
                raise AssertionError(f"{path} was requested {self.requests[path]} time(s), not {count}")

    def release_all(self) -> None:
        for event in self.holds.values():
            event.set()


def _image_handler(server: ImageServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            """Keep the test output clean."""

        def do_GET(self) -> None:
            path = self.path
            with server.changed:
                server.requests[path] += 1
                server.changed.notify_all()
            hold = server.holds.get(path)
            if hold is not None:
                hold.wait(timeout=300)
            with server.changed:
                failing = server.failures[path] > 0
                if failing:
                    server.failures[path] -= 1
            body = server.images.get(path)
            status = 503 if failing else 200 if body is not None else 404
            body = body if status == 200 else b""
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client (a killed worker, say) hung up

    return Handler


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    """An ``ImageServer`` for one test; held requests are released when it ends."""
    state = ImageServer(base="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _image_handler(state))
    httpd.daemon_threads = True
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release_all()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
