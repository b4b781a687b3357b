"""How fast `producer submit` enqueues: a large CSV into PostgreSQL and Redis.

Runs the real CLI (start-up included) and, in the same run, the three stages in-process so the
time can be attributed: reading + validating the CSV, committing the rows, publishing the chunks.

    .venv/bin/python bench/bench_submit.py --rows 100000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import redis

from common.celery_app import make_celery
from common.db import Database
from common.settings import Settings
from producer.submit import SubmitOptions, commit_plan, enqueue, plan_submission

from _services import postgres_database, redis_broker, submit

QUEUE = "vitscope.deit_tiny"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, postgres_database() as db_url, redis_broker() as broker:
        csv = Path(tmp) / "big.csv"
        csv.write_text(
            "id,image_uri\n" + "".join(f"r{i},s3://bench/images/{i}.jpg\n" for i in range(args.rows))
        )
        env = {
            **os.environ,
            "VITSCOPE_DATABASE_URL": db_url,
            "VITSCOPE_BROKER_URL": broker,
            "VITSCOPE_CHUNK_SIZE": str(args.chunk_size),
        }
        queue = redis.Redis.from_url(broker, socket_timeout=10)

        start = time.perf_counter()
        submit(env, csv)
        cli_seconds = time.perf_counter() - start
        messages = queue.llen(QUEUE)
        queue.flushdb()

        settings = Settings(database_url=db_url, broker_url=broker, chunk_size=args.chunk_size)
        db = Database(db_url)
        options = SubmitOptions(models=["deit_tiny_patch16_224"], weights="random")
        t0 = time.perf_counter()
        plan = plan_submission(csv, options)
        t1 = time.perf_counter()
        submission = commit_plan(db, plan, options, mode="distributed")
        t2 = time.perf_counter()
        sent = enqueue(make_celery(settings), db, submission.batch_id, chunk_size=args.chunk_size)
        t3 = time.perf_counter()
        assert queue.llen(QUEUE) == sent == messages
        db.dispose()

    result = {
        "rows": args.rows,
        "messages": messages,
        "cli_seconds": round(cli_seconds, 2),
        "cli_jobs_per_second": round(args.rows / cli_seconds),
        "read_validate_seconds": round(t1 - t0, 2),
        "commit_seconds": round(t2 - t1, 2),
        "publish_seconds": round(t3 - t2, 2),
        "in_process_jobs_per_second": round(args.rows / (t3 - t0)),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"producer submit, {args.rows:,} rows -> {messages:,} messages of {args.chunk_size} (PostgreSQL + Redis)"
    )
    print(
        f"  CLI end to end      {result['cli_seconds']:8.2f} s   {result['cli_jobs_per_second']:>9,} jobs/s"
    )
    print(f"  read + validate     {result['read_validate_seconds']:8.2f} s")
    print(f"  commit rows         {result['commit_seconds']:8.2f} s")
    print(f"  publish messages    {result['publish_seconds']:8.2f} s")
    print(f"  in-process total    {t3 - t0:8.2f} s   {result['in_process_jobs_per_second']:>9,} jobs/s")


if __name__ == "__main__":
    main()
