"""How ``worker start`` sizes each GPU worker's CPU pool, and how a setting overrides it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.worker.conftest import embedded_settings
from worker.cli import worker_commands
from worker.cores import (
    PIPELINE_NICENESS,
    available_cores,
    cpu_workers_per_gpu,
    decode_threads,
    yield_cores_to_the_model,
)


@pytest.mark.parametrize(
    ("cores", "gpus", "workers"),
    [(16, 1, 8), (16, 2, 4), (16, 8, 1), (64, 8, 4), (2, 1, 1), (3, 1, 1), (3, 2, 0), (2, 4, 0), (1, 1, 0)],
)
def test_each_gpu_gets_a_process_per_two_cores_of_its_share_and_none_from_a_single_core(
    cores: int, gpus: int, workers: int
) -> None:
    assert cpu_workers_per_gpu(gpus, cores) == workers


def _environments(**overrides: object) -> list[dict[str, str]]:
    options = {
        "queues": ["vitscope.default"],
        "concurrency": 1,
        "pool": "prefork",
        "loglevel": "info",
        "hostname": None,
    }
    return [env for _, env in worker_commands(**{**options, **overrides})]


def test_gpu_workers_get_a_sized_pool_and_a_setting_overrides_it() -> None:
    sized = _environments(gpus=["0", "1"])
    assert [env["VITSCOPE_CPU_WORKERS"] for env in sized] == [str(cpu_workers_per_gpu(2))] * 2
    assert [env["CUDA_VISIBLE_DEVICES"] for env in sized] == ["0", "1"]
    assert [env["VITSCOPE_CPU_WORKERS"] for env in _environments(gpus=["0", "1"], cpu_workers=3)] == [
        "3",
        "3",
    ]


@pytest.mark.parametrize(
    ("pool", "cores", "threads"), [(0, 1, 1), (1, 2, 1), (0, 2, 2), (8, 16, 8), (4, 3, 1)]
)
def test_decoding_gets_the_cores_the_pool_leaves_and_at_least_one(
    pool: int, cores: int, threads: int
) -> None:
    assert decode_threads(pool, cores) == threads


def test_gpu_workers_decode_on_their_share_less_their_pool_unless_the_setting_is_given() -> None:
    share = available_cores() // 2
    expected = str(decode_threads(cpu_workers_per_gpu(2), share))
    assert [env["VITSCOPE_DECODE_THREADS"] for env in _environments(gpus=["0", "1"])] == [expected] * 2
    assert all("VITSCOPE_DECODE_THREADS" not in env for env in _environments(gpus=["0", "1"], decode_slots=5))


@pytest.mark.parametrize("given", [None, "5"])
def test_worker_start_reads_the_decode_setting_through_the_settings(
    given: str | None, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``VITSCOPE_DECODE_THREADS`` given, the GPU workers inherit it instead of their computed share."""
    from typer.testing import CliRunner

    from common.settings import get_settings
    from worker.cli import app

    monkeypatch.setenv("VITSCOPE_BROKER_URL", redis_url)
    if given is not None:
        monkeypatch.setenv("VITSCOPE_DECODE_THREADS", given)
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["start", "--gpus", "0,1", "--dry-run"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "celery" in line]
    assert len(lines) == 2
    assert all(("VITSCOPE_DECODE_THREADS=" in line) is (given is None) for line in lines)
    assert all("VITSCOPE_WORKER_NODE=gpu" in line for line in lines)


def test_the_runtime_sizes_its_decode_slots_from_the_setting(tmp_path: Path) -> None:
    from common.settings import Settings
    from worker.pipeline import Runtime

    def slots(**overrides: object) -> int:
        settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
            storage_url=(tmp_path / "results").as_uri(),
            device="cpu",
            **overrides,
        )
        runtime = Runtime.from_settings(settings)
        try:
            semaphore = runtime.decode_slots
            taken = 0
            while semaphore.acquire(blocking=False):
                taken += 1
            return taken
        finally:
            runtime.close()

    assert slots(decode_threads=3) == 3
    assert slots(cpu_workers=0) == decode_threads(0, available_cores())


def test_a_cpu_worker_keeps_its_own_default() -> None:
    (env,) = _environments(gpus=[])
    assert "VITSCOPE_CPU_WORKERS" not in env  # unset: no pool, the model uses the cores


def _fresh_python(code: str, *, policy: str | None = None, cwd: Path | None = None) -> str:
    """The last line ``code`` prints in a new interpreter, started with ``OMP_WAIT_POLICY`` as given."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_importing_the_worker_or_the_notebook_api_leaves_the_openmp_policy_alone() -> None:
    """A library import must not reconfigure the process: a notebook's compute would be 15-20 % slower."""
    probe = "import os, worker, worker.pipeline, vitscope, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert _fresh_python(probe) == "None"


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_worker_start_runs_its_celery_workers_with_passive_openmp_threads(
    given: str | None, expected: str
) -> None:
    """``worker``'s entry point sets the policy its exec'd or spawned Celery workers inherit, unless
    the environment names one."""
    probe = (
        "import os, sys\n"
        "from worker.cli import main\n"
        "sys.argv = ['worker', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('OMP_WAIT_POLICY'))"
    )
    assert _fresh_python(probe, policy=given) == expected


def test_a_local_submit_sets_passive_openmp_threads_before_torch_loads(tmp_path: Path, write_image) -> None:
    """``producer submit --local`` runs the pipeline in its own process: the policy is set there, and
    before anything has loaded torch (OpenMP reads it once, when it starts)."""
    write_image(tmp_path / "a.png", size=(80, 64))
    (tmp_path / "d.csv").write_text("image_uri\na.png\n")
    probe = (
        "import os, sys\n"
        "import worker.cores as cores\n"
        "original, torch_loaded = cores.wait_passively_in_openmp, []\n"
        "def spy():\n    torch_loaded.append('torch' in sys.modules)\n    original()\n"
        "cores.wait_passively_in_openmp = spy\n"
        "from producer.cli import main\n"
        "sys.argv = ['producer', 'submit', 'd.csv', '--local', '--models', 'deit_tiny_patch16_224', '--weights', 'random']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print(torch_loaded, os.environ.get('OMP_WAIT_POLICY'))"
    )
    assert _fresh_python(probe, cwd=tmp_path) == "[False] PASSIVE"


def _niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_a_cpu_runtimes_pipeline_threads_yield_the_cores_to_the_models_threads(tmp_path: Path) -> None:
    """On a CPU device the fetch, store and record threads run ``PIPELINE_NICENESS`` below the
    thread that runs the model; the model's own thread is left as it was."""
    from common.db import open_database
    from worker.pipeline import Runtime

    settings = embedded_settings(tmp_path, device="cpu")
    runtime = Runtime.from_settings(settings, db=open_database(settings, migrate=True))
    try:
        mine = _niceness()
        for pool in (runtime.fetch_pool, runtime.store_pool, runtime.record_pool):
            assert pool.submit(_niceness).result() == min(19, mine + PIPELINE_NICENESS)
        assert _niceness() == mine
    finally:
        runtime.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_yielding_raises_only_the_calling_threads_niceness_and_stops_at_19() -> None:
    seen: list[int] = []

    def twice() -> None:
        yield_cores_to_the_model()
        seen.append(_niceness())
        for _ in range(3):
            yield_cores_to_the_model()
        seen.append(_niceness())

    before = _niceness()
    thread = threading.Thread(target=twice)
    thread.start()
    thread.join()
    assert seen == [min(19, before + PIPELINE_NICENESS), 19]
    assert _niceness() == before
