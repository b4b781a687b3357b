"""How fast `producer submit` enqueues, and in how much memory: large CSVs into PostgreSQL and Redis.

For each size, runs the real CLI (start-up included) as a child process and reads its peak resident
memory from the kernel (``os.wait4``'s rusage, the child alone). Submit streams the file — a
validating pass, then an inserting pass inside the batch's transaction, then publishing from a
database cursor — so the peak should not grow with the number of rows. Unless ``--cli-only``, the
three stages are then also run in-process so the time can be attributed: reading + validating the
CSV, inserting the rows (the second pass), publishing the chunks.

    .venv/bin/python bench/bench_submit.py --rows 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from common.celery_app import make_celery
from common.db import Database
from common.settings import Settings
from producer.submit import SubmitOptions, commit_plan, enqueue, plan_submission

from _services import BIN, postgres_database, redis_broker

QUEUE = "vitscope.deit_tiny"


def write_csv(path: Path, rows: int) -> None:
    """``rows`` S3 image rows with an id and a metadata column, written in blocks (not held whole)."""
    with path.open("w") as handle:
        handle.write("id,image_uri,site\n")
        for start in range(0, rows, 100_000):
            end = min(rows, start + 100_000)
            handle.write(
                "".join(f"r{i},s3://bench/images/{i}.jpg,clinic-{i % 7}\n" for i in range(start, end))
            )


def cli_submit(env: dict[str, str], csv: Path, log: Path) -> tuple[float, float, int]:
    """``producer submit`` in a child process: (wall seconds, its CPU seconds, its peak RSS in bytes).

    The CPU time says what the producer itself costs when the machine is shared: on a loaded
    machine the wall time also counts waiting for a core and for PostgreSQL.
    """
    start = time.perf_counter()
    with log.open("w") as output:
        child = subprocess.Popen(
            [
                str(BIN / "producer"),
                "submit",
                str(csv),
                "--models",
                "deit_tiny_patch16_224",
                "--weights",
                "random",
            ],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"producer submit exited {child.returncode}:\n{log.read_text()[-2000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # Linux reports kilobytes


def in_process_stages(db_url: str, broker: str, csv: Path, chunk_size: int) -> dict[str, float]:
    settings = Settings(database_url=db_url, broker_url=broker, chunk_size=chunk_size)
    db = Database(db_url)
    options = SubmitOptions(models=["deit_tiny_patch16_224"], weights="random")
    t0 = time.perf_counter()
    plan = plan_submission(csv, options)
    t1 = time.perf_counter()
    submission = commit_plan(db, plan, options, mode="distributed")
    t2 = time.perf_counter()
    enqueue(make_celery(settings), db, submission.batch_id, chunk_size=chunk_size)
    t3 = time.perf_counter()
    db.dispose()
    return {
        "read_validate_seconds": round(t1 - t0, 2),
        "insert_seconds": round(t2 - t1, 2),
        "publish_seconds": round(t3 - t2, 2),
        "in_process_jobs_per_second": round(submission.jobs / (t3 - t0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000], help="one or more CSV sizes")
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--cli-only", action="store_true", help="skip the in-process stage breakdown")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, postgres_database() as db_url, redis_broker() as broker:
        env = {
            **os.environ,
            "VITSCOPE_DATABASE_URL": db_url,
            "VITSCOPE_BROKER_URL": broker,
            "VITSCOPE_CHUNK_SIZE": str(args.chunk_size),
        }
        queue = redis.Redis.from_url(broker, socket_timeout=10)
        for rows in args.rows:
            csv = Path(tmp) / f"{rows}.csv"
            write_csv(csv, rows)
            seconds, cpu_seconds, peak_rss = cli_submit(env, csv, Path(tmp) / f"{rows}.log")
            messages = queue.llen(QUEUE)
            queue.flushdb()
            result: dict[str, Any] = {
                "rows": rows,
                "csv_megabytes": round(csv.stat().st_size / 2**20, 1),
                "messages": messages,
                "cli_seconds": round(seconds, 2),
                "cli_jobs_per_second": round(rows / seconds),
                "cli_cpu_seconds": round(cpu_seconds, 2),
                "cli_peak_rss_megabytes": round(peak_rss / 2**20, 1),
                "load_average_1m": round(os.getloadavg()[0], 2),
            }
            if not args.cli_only:
                result |= in_process_stages(db_url, broker, csv, args.chunk_size)
                assert queue.llen(QUEUE) == messages
                queue.flushdb()
            csv.unlink()
            results.append(result)

    if args.json:
        print(json.dumps(results))
        return
    for r in results:
        print(
            f"producer submit, {r['rows']:,} rows ({r['csv_megabytes']} MB) -> {r['messages']:,} messages "
            f"of {args.chunk_size} (PostgreSQL + Redis), load average {r['load_average_1m']}"
        )
        print(f"  CLI end to end      {r['cli_seconds']:8.2f} s   {r['cli_jobs_per_second']:>9,} jobs/s")
        print(f"  CLI CPU time        {r['cli_cpu_seconds']:8.2f} s")
        print(f"  CLI peak RSS        {r['cli_peak_rss_megabytes']:8.1f} MB")
        if "insert_seconds" in r:
            print(f"  read + validate     {r['read_validate_seconds']:8.2f} s")
            print(f"  insert rows         {r['insert_seconds']:8.2f} s")
            print(f"  publish messages    {r['publish_seconds']:8.2f} s")
            print(f"  in-process total                {r['in_process_jobs_per_second']:>9,} jobs/s")


if __name__ == "__main__":
    main()
