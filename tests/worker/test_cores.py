"""How ``worker start`` sizes each GPU worker's CPU pool, and how a setting overrides it."""

from __future__ import annotations

import os

import pytest

from worker.cli import worker_commands
from worker.cores import cpu_workers_per_gpu


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


def test_a_cpu_worker_keeps_its_own_default() -> None:
    (env,) = _environments(gpus=[])
    assert "VITSCOPE_CPU_WORKERS" not in env  # unset: no pool, the model uses the cores


def test_importing_the_worker_makes_openmp_threads_wait_passively_unless_told_otherwise() -> None:
    """A fresh interpreter, as a CLI or Celery child starts: the policy is set before torch loads."""
    import subprocess
    import sys

    probe = "import os, worker, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    default = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert default.stdout.strip() == "PASSIVE"
    chosen = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert chosen.stdout.strip() == "ACTIVE"
