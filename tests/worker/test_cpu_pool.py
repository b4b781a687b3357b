"""The CPU pool survives the death of one of its processes: real processes, killed for real."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from common.db import open_database
from common.db.models import Job, JobState
from common.errors import CpuProcessLostError
from producer.submit import SubmitOptions, commit_plan, plan_submission
from tests.worker.conftest import embedded_settings, wait_until
from worker.local import run_batch
from worker.pipeline import Runtime
from worker.pipeline.cpu import CpuPool


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _pid() -> int:
    return os.getpid()


def _slow_pid(started: str, release: str) -> int:
    """Says it started, then waits until ``release`` exists: a call running when a sibling dies."""
    Path(started).touch()
    wait_until(lambda: os.path.exists(release), 60, f"{release} in a pool process", every=0.01)
    return os.getpid()


def test_a_call_whose_process_is_killed_fails_transiently_and_the_pool_heals() -> None:
    pool = CpuPool(1)
    try:
        first = pool.run(_pid)
        with pytest.raises(CpuProcessLostError, match="died while running _die"):
            pool.run(_die)
        assert pool.restarts == 1
        assert pool.run(_pid) != first  # a fresh process, and the pool works again
        assert pool.restarts == 1
    finally:
        pool.close()


def test_every_call_the_death_broke_fails_and_the_pool_is_replaced_once(tmp_path: Path) -> None:
    """A process's death fails the call running beside it in the other process too (the executor
    stops the whole pool); both callers see ``CpuProcessLostError``, the pool is replaced once, and
    later calls succeed."""
    pool = CpuPool(2)
    try:
        with ThreadPoolExecutor(2) as threads:
            # Both processes started first: Python 3.11's executor only watches a process spawned
            # for a call from its next wake-up on, so a death in a brand-new one is seen late.
            warm = [
                threads.submit(pool.run, _slow_pid, str(tmp_path / f"s{i}"), str(tmp_path / "go"))
                for i in (0, 1)
            ]
            wait_until((tmp_path / "s0").exists, 60, str(tmp_path / "s0"), every=0.01)
            wait_until((tmp_path / "s1").exists, 60, str(tmp_path / "s1"), every=0.01)
            (tmp_path / "go").touch()
            assert len({f.result(timeout=60) for f in warm}) == 2
            started, release = tmp_path / "started", tmp_path / "release"
            try:
                running = threads.submit(pool.run, _slow_pid, str(started), str(release))
                wait_until(started.exists, 60, str(started), every=0.01)
                dying = threads.submit(pool.run, _die)
                with pytest.raises(CpuProcessLostError):
                    dying.result(timeout=60)
                with pytest.raises(CpuProcessLostError):
                    running.result(timeout=60)
            finally:
                release.touch()  # nothing is left waiting, whatever failed
        assert pool.restarts == 1
        assert pool.run(_pid) > 0
        assert pool.restarts == 1
    finally:
        pool.close()


def test_a_closed_pool_refuses_calls_instead_of_running_them_here() -> None:
    pool = CpuPool(1)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(_pid)


def test_a_batch_survives_a_pool_process_killed_mid_run(write_image, tmp_path: Path) -> None:
    """SIGKILL one of the pool's processes once the first job is recorded: the jobs whose images it
    held go back to the queue and are done on the next round; every job ends succeeded.

    Twenty images in chunks of eight: the third chunk starts only once the first is recorded, so its
    pictures are drawn after the death, by a pool that must have been replaced."""
    count = 20
    for i in range(count):
        write_image(tmp_path / f"{i}.png", seed=i, size=(120 + 7 * i, 100))
    csv = tmp_path / "data.csv"
    csv.write_text("id,image_uri\n" + "".join(f"r{i},{i}.png\n" for i in range(count)))
    settings = embedded_settings(tmp_path, batch_size=2, cpu_workers=2)
    options = SubmitOptions(models=["deit_tiny_patch16_224"], weights="random")
    db = open_database(settings, migrate=True)
    runtime = Runtime.from_settings(settings, db=db)
    killed: list[int] = []

    def on_job(job_id: str, state: JobState) -> None:
        if not killed and state == JobState.SUCCEEDED:
            pid = next(iter(runtime.cpu._executor._processes))  # a real pool process
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    try:
        submission = commit_plan(db, plan_submission(csv, options), options, mode="local")
        run = run_batch(runtime, submission.batch_id, on_job=on_job, backoff_seconds=0.01)
        with db.session() as session:
            states = session.execute(sa.select(Job.state, Job.attempts)).all()
    finally:
        runtime.close()
    assert killed
    assert runtime.cpu.restarts >= 1
    assert (run.succeeded, run.failed) == (count, 0)
    assert {state for state, _ in states} == {JobState.SUCCEEDED}
    assert max(attempts for _, attempts in states) <= 2  # at most the one retry the death cost


# Runs in a fresh interpreter: in this one, earlier tests have already compiled the kernels.
_WARM_UP_THEN_RUN = """
import json, sys
from pathlib import Path

from numba.core.registry import CPUDispatcher
from PIL import Image

import worker.png, worker.render, worker.resample
from common.db import open_database
from producer.submit import SubmitOptions, commit_plan, plan_submission
from tests.conftest import _write_image
from tests.worker.conftest import embedded_settings
from worker.local import run_batch
from worker.pipeline import Runtime

def signatures():
    modules = (worker.png, worker.render, worker.resample)
    return {f"{m.__name__}.{n}": len(o.signatures) for m in modules for n, o in vars(m).items()
            if isinstance(o, CPUDispatcher)}

tmp = Path(sys.argv[1])
settings = embedded_settings(tmp, cpu_workers=0, batch_size=2)
db = open_database(settings, migrate=True)
runtime = Runtime.from_settings(settings, db=db)
runtime.warm_up()
before = signatures()
_write_image(tmp / "wide.png", size=(300, 120), seed=1)
_write_image(tmp / "tall.png", size=(90, 260), seed=2)
Image.open(tmp / "wide.png").convert("RGB").save(tmp / "photo.jpg", quality=90)
(tmp / "data.csv").write_text("image_uri\\nwide.png\\ntall.png\\nphoto.jpg\\n")
options = SubmitOptions(models=["deit_tiny_patch16_224"], weights="random")
submission = commit_plan(db, plan_submission(tmp / "data.csv", options), options, mode="local")
run = run_batch(runtime, submission.batch_id)
runtime.close()
after = signatures()
print(json.dumps({"succeeded": run.succeeded, "warm": before,
                  "compiled_during_jobs": {k: after[k] - before[k] for k in after if after[k] != before[k]}}))
"""


def test_warm_up_leaves_no_kernel_to_compile_inside_a_job(tmp_path: Path) -> None:
    """After ``Runtime.warm_up`` a real run compiles nothing more: no job's fetch or store seconds
    carry a compilation (17.9 s per job after a fresh install)."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-c", _WARM_UP_THEN_RUN, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["succeeded"] == 3
    entry_kernels = (
        "png._huffman_deflate",
        "render._compose_kernel",
        "render._paint_panels",
        "resample._resize_crop_kernel",
    )
    assert all(report["warm"][f"worker.{name}"] >= 1 for name in entry_kernels), report["warm"]
    assert report["compiled_during_jobs"] == {}
