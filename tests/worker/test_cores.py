"""How ``worker start`` sizes each GPU worker's CPU pool, and how a setting overrides it."""

from __future__ import annotations

import pytest

from worker.cli import worker_commands
from worker.cores import cpu_workers_per_gpu


@pytest.mark.parametrize(
    ("cores", "gpus", "workers"),
    [(16, 1, 15), (16, 2, 7), (16, 8, 1), (64, 8, 7), (2, 1, 1), (2, 4, 0), (1, 1, 0)],
)
def test_each_gpu_gets_its_share_of_the_cores_less_one_and_none_from_a_single_core(
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
