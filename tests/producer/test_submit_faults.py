"""``producer submit`` when a service it needs is down: a non-zero exit within seconds, one line
saying what is unreachable, and never a half-made batch that nothing would finish.

The database is checked first (nothing can be written without it), then the broker, both before
anything is written. A broker that fails after the batch is committed — accepted connections but
refused the messages — leaves a saved, unpublished batch: the command says so and names
``producer resume``, which publishes all of it.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from common.db.models import Batch, Job
from common.db.session import upgrade

BIN = Path(sys.executable).parent
QUEUE = "vitscope.deit_tiny"
EXIT_UNAVAILABLE = 3
SECONDS = 20  # "within seconds", with room for a loaded machine's interpreter start-up


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _csv(tmp_path: Path, rows: int = 6) -> Path:
    csv = tmp_path / "data.csv"
    csv.write_text("image_uri\n" + "".join(f"s3://bucket/images/{i}.png\n" for i in range(rows)))
    return csv


def _producer(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = subprocess.run(
        [str(BIN / "producer"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result, time.monotonic() - start


def _submit(env: dict[str, str], csv: Path) -> tuple[subprocess.CompletedProcess, float]:
    return _producer(env, "submit", str(csv), "--models", "deit_tiny_patch16_224", "--weights", "random")


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def _batches(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(Batch)).scalar_one()
    engine.dispose()
    return count


def test_database_unreachable_exits_at_once_with_one_line(tmp_path, private_redis) -> None:
    env = {
        "VITSCOPE_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/test",
        "VITSCOPE_BROKER_URL": private_redis.url,
    }
    result, seconds = _submit(env, _csv(tmp_path))
    assert result.returncode == EXIT_UNAVAILABLE
    assert seconds < SECONDS
    assert "cannot connect to the database" in _one_line_error(result)
    assert private_redis.client().llen(QUEUE) == 0
    print(f"\ndatabase unreachable: submit exited {result.returncode} after {seconds:.1f} s")


def test_broker_unreachable_exits_at_once_and_creates_no_batch(tmp_path, postgres_url) -> None:
    upgrade(postgres_url)
    env = {
        "VITSCOPE_DATABASE_URL": postgres_url,
        "VITSCOPE_BROKER_URL": f"redis://127.0.0.1:{_closed_port()}/0",
    }
    result, seconds = _submit(env, _csv(tmp_path))
    assert result.returncode == EXIT_UNAVAILABLE
    assert seconds < SECONDS
    line = _one_line_error(result)
    assert "message broker redis://127.0.0.1" in line
    assert "unavailable" in line
    assert _batches(postgres_url) == 0  # checked before anything was written
    print(f"\nbroker unreachable: submit exited {result.returncode} after {seconds:.1f} s")


def test_broker_refusing_messages_after_commit_leaves_a_batch_that_resume_publishes(
    tmp_path, postgres_url, private_redis
) -> None:
    upgrade(postgres_url)
    env = {
        "VITSCOPE_DATABASE_URL": postgres_url,
        "VITSCOPE_BROKER_URL": private_redis.url,
        "VITSCOPE_CHUNK_SIZE": "4",
    }
    broker = private_redis.client()
    broker.config_set("maxmemory", "1")  # answers PING, refuses every write: OOM
    result, seconds = _submit(env, _csv(tmp_path, rows=6))
    assert result.returncode == EXIT_UNAVAILABLE
    assert seconds < SECONDS
    line = _one_line_error(result)
    assert "saved but not published" in line
    batch_id = line.split("producer resume ")[1].split("`")[0]
    engine = sa.create_engine(postgres_url)
    with sa.orm.Session(engine) as session:
        batch = session.get(Batch, batch_id)
        assert batch.published_at is None
        assert session.scalar(sa.select(sa.func.count()).where(Job.batch_id == batch_id)) == 6

    broker.config_set("maxmemory", "0")
    retried, _ = _producer(env, "resume", batch_id)
    assert retried.returncode == 0, retried.stderr
    assert "published 6 queued job(s) in 2 message(s)" in retried.stderr
    # Celery messages in Redis: JSON envelopes whose base64 body is [args, kwargs, embed].
    bodies = [json.loads(base64.b64decode(json.loads(raw)["body"])) for raw in broker.lrange(QUEUE, 0, -1)]
    published = sorted(job_id for args, _kwargs, _embed in bodies for job_id in args[0])
    with sa.orm.Session(engine) as session:
        assert published == sorted(session.scalars(sa.select(Job.id).where(Job.batch_id == batch_id)))
        assert session.get(Batch, batch_id).published_at is not None
    engine.dispose()
