"""An interrupted local run, as a user meets it, and ``producer resume``, the one command that finishes it.

Real ``producer submit --local`` processes (random-weight ``deit_tiny_patch16_224`` on the CPU,
SQLite, a results folder, images from the test's HTTP server) are interrupted with Ctrl-C (SIGINT)
or killed with SIGKILL once a job has succeeded; the test watches the database and the server, never
a fixed time. One image per pass, so the run always has jobs in hand when the signal comes.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import sqlalchemy as sa

from common.db.models import Job, JobState
from tests.conftest import ImageServer
from tests.worker.conftest import http_dataset, wait_until

BIN = Path(sys.executable).parent
IMAGES = 12


def _env(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("VITSCOPE_")}
    return {
        **env,
        "VITSCOPE_DATABASE_URL": f"sqlite:///{tmp_path / 'vitscope.db'}",
        "VITSCOPE_STORAGE_URL": (tmp_path / "results").as_uri(),
        "VITSCOPE_DEVICE": "cpu",
        "VITSCOPE_BATCH_SIZE": "1",  # chunks of four jobs: always some in hand
        "VITSCOPE_ALLOW_PRIVATE_NETWORKS": "true",  # the image server is on 127.0.0.1
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "200",
    }


class Run:
    """``producer submit --local`` in the background, and the database it writes."""

    def __init__(self, tmp_path: Path, csv: Path) -> None:
        self.env = _env(tmp_path)
        self.engine = sa.create_engine(self.env["VITSCOPE_DATABASE_URL"])
        self.process = subprocess.Popen(
            [str(BIN / "producer"), "submit", str(csv), "--local", "--weights", "random"],
            env=self.env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def jobs(self) -> list[Job]:
        try:
            with sa.orm.Session(self.engine) as session:
                return list(session.scalars(sa.select(Job).order_by(Job.row_number)))
        except sa.exc.OperationalError:  # the file or its tables not made yet
            return []

    def wait_for_a_success_and_jobs_in_hand(self) -> None:
        def seen() -> bool:
            states = [job.state for job in self.jobs()]
            return JobState.SUCCEEDED in states and JobState.RUNNING in states

        wait_until(seen, 300, "a job succeeded while others are running", every=0.05)

    def producer(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "producer"), *args], env=self.env, capture_output=True, text=True, timeout=600
        )


def test_ctrl_c_hands_the_jobs_back_at_once_and_resume_finishes_the_batch(
    tmp_path: Path, write_image, image_server: ImageServer
) -> None:
    """Ctrl-C while the run waits on a download that hangs (the server holds it): the run must not
    wait for that download's timeout (30 s) to stop."""
    csv = http_dataset(tmp_path, image_server, write_image, IMAGES)
    hung = image_server.hold("/1.png")  # the second job of the first chunk (URIs sort 0, 1, 10, 11, 2 …)
    run = Run(tmp_path, csv)
    try:
        run.wait_for_a_success_and_jobs_in_hand()
        image_server.wait_for_request("/1.png")
        run.process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, err = run.process.communicate(timeout=60)
        stopped = time.monotonic() - sent
    finally:
        if run.process.poll() is None:
            run.process.kill()
        hung.set()
    assert run.process.returncode == 130, err
    assert stopped < 15, f"took {stopped:.1f} s to stop"
    batch_id = out.strip().splitlines()[-1]
    assert "stopping: handing the jobs in hand back to the queue (Ctrl-C again exits at once" in err
    assert "interrupted" in err
    assert "went back to the queue" in err
    assert f"producer resume {batch_id}" in err
    assert "Traceback" not in err
    jobs = run.jobs()
    states = [job.state for job in jobs]
    assert JobState.RUNNING not in states, "a job was left running"
    assert JobState.QUEUED in states
    assert JobState.SUCCEEDED in states
    assert all(job.attempts == 0 for job in jobs if job.state == JobState.QUEUED), "an attempt was spent"

    resumed = run.producer("resume", batch_id)
    assert resumed.returncode == 0, resumed.stderr
    assert "loading 1 model(s) on cpu" in resumed.stderr
    assert "RANDOM weights" in resumed.stderr
    assert f"{IMAGES}/{IMAGES}" in resumed.stderr  # the bar counts the whole batch
    assert resumed.stdout.strip().splitlines()[-1] == batch_id
    jobs = run.jobs()
    assert [job.state for job in jobs] == [JobState.SUCCEEDED] * IMAGES
    assert [job.attempts for job in jobs] == [1] * IMAGES
    run.engine.dispose()
    print(f"\nCtrl-C: the local run stopped {stopped:.1f} s after the signal, its jobs in hand queued again")


def test_kill_9_leaves_jobs_running_that_resume_takes_back(
    tmp_path: Path, write_image, image_server: ImageServer
) -> None:
    run = Run(tmp_path, http_dataset(tmp_path, image_server, write_image, IMAGES))
    try:
        run.wait_for_a_success_and_jobs_in_hand()
        run.process.kill()  # SIGKILL: nothing is cleaned up
        run.process.communicate(timeout=60)
    finally:
        if run.process.poll() is None:
            run.process.kill()
    killed = [job for job in run.jobs() if job.state == JobState.RUNNING]
    assert killed, "the killed run should have left jobs running"
    assert {job.worker_id.rsplit(":", 1)[1] for job in killed} == {str(run.process.pid)}
    batch_id = killed[0].batch_id

    started = time.monotonic()
    resumed = run.producer("resume", batch_id)  # long before their lease (180 s) would run out
    seconds = time.monotonic() - started
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(killed)} job(s) were running in a process that is gone: taken back" in resumed.stderr
    jobs = {job.id: job for job in run.jobs()}
    assert [job.state for job in jobs.values()] == [JobState.SUCCEEDED] * IMAGES
    assert all(jobs[job.id].interruptions == 1 for job in killed)
    run.engine.dispose()
    print(
        f"\nkill -9: resume took back {len(killed)} running job(s) and finished the batch in {seconds:.1f} s"
    )


def test_a_second_ctrl_c_exits_at_once_even_while_the_first_one_is_cleaning_up(
    tmp_path: Path, write_image, image_server: ImageServer
) -> None:
    """The clean-up after the first Ctrl-C is held on purpose: the test keeps SQLite's write lock, so
    handing the jobs back waits in the database's busy loop (C code, where no Python handler runs).
    The second Ctrl-C must end the process anyway, and ``resume`` then takes back what it left."""
    csv = http_dataset(tmp_path, image_server, write_image, 8)
    hung = image_server.hold("/1.png")
    run = Run(tmp_path, csv)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(run.process.stderr), daemon=True)
    reader.start()
    lock = sqlite3.connect(tmp_path / "vitscope.db", timeout=30)
    try:
        run.wait_for_a_success_and_jobs_in_hand()
        image_server.wait_for_request("/1.png")  # the run waits on it: no write of its own in flight
        lock.execute("BEGIN IMMEDIATE")
        run.process.send_signal(signal.SIGINT)
        wait_until(lambda: any("stopping:" in line for line in lines), 30, "the first Ctrl-C's message")
        run.process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        run.process.wait(timeout=30)
        stopped = time.monotonic() - sent
    finally:
        lock.rollback()
        lock.close()
        if run.process.poll() is None:
            run.process.kill()
        hung.set()
    assert run.process.returncode == -signal.SIGINT, "".join(lines)
    assert stopped < 2, f"the second Ctrl-C took {stopped:.1f} s"
    left = [job for job in run.jobs() if job.state == JobState.RUNNING]
    assert left, "the clean-up was held: the jobs in hand are still marked running"
    resumed = run.producer("resume", left[0].batch_id)
    assert resumed.returncode == 0, resumed.stderr
    assert "were running in a process that is gone: taken back" in resumed.stderr
    assert [job.state for job in run.jobs()] == [JobState.SUCCEEDED] * 8
    run.engine.dispose()
