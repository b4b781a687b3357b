"""``bench/gpu_check.py``'s verdict: maps that agree pass, a map that does not fails the check; and
the whole check runs on a CPU (``--device cpu --quick``), as it will on a GPU machine."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from worker.attention import Explanation
from worker.attention.readout import Readout

REPO = Path(__file__).resolve().parents[2]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _explanation(seed: int) -> Explanation:
    rng = np.random.default_rng(seed)
    return Explanation(
        readout=Readout.TOKEN,
        top_indices=np.arange(5),
        top_probs=np.full(5, 0.2, dtype=np.float32),
        target=0,
        cls_attention=rng.random((2, 3, 4, 4)).astype(np.float32),
        layer_scores=rng.random((2, 4, 4)).astype(np.float32),
        rollout=rng.random((4, 4)).astype(np.float32),
        grad_rollout=rng.random((4, 4)).astype(np.float32),
        relevance=np.zeros((4, 4), dtype=np.float32),  # flat: nothing to correlate
    )


def test_identical_and_slightly_perturbed_maps_pass() -> None:
    check = _gpu_check()
    cpu = _explanation(0)
    nudged = dataclasses.replace(cpu, rollout=cpu.rollout * (1 + 1e-5), grad_rollout=cpu.grad_rollout + 1e-6)
    correlations = check.map_correlations(cpu, nudged)
    assert set(correlations) == {
        "cls_attention.npy",
        "layer_scores.npy",
        "rollout.npy",
        "grad_rollout.npy",
        "relevance.npy",
    }
    assert min(correlations.values()) >= check.MIN_CORRELATION


@pytest.mark.parametrize("name", ["rollout", "relevance", "cls_attention"])
def test_one_disagreeing_map_fails(name: str) -> None:
    check = _gpu_check()
    cpu = _explanation(0)
    wrong = getattr(_explanation(1), name).copy()
    if name == "relevance":  # flat on the CPU, not flat on the device
        wrong = np.random.default_rng(4).random((4, 4)).astype(np.float32)
    if name == "cls_attention":  # one head of one block only
        wrong = cpu.cls_attention.copy()
        wrong[1, 2] = np.random.default_rng(5).random((4, 4))
    correlations = check.map_correlations(cpu, dataclasses.replace(cpu, **{name: wrong}))
    assert correlations[f"{name}.npy"] < check.MIN_CORRELATION
    assert all(v >= check.MIN_CORRELATION for k, v in correlations.items() if k != f"{name}.npy")


@pytest.mark.slow
def test_the_whole_check_runs_on_a_cpu(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_check.py"),
            "--device",
            "cpu",
            "--quick",
            "--no-ceiling",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failures"] == []
    assert [row["batch_size"] for row in report["compute"]] == [1, 2]
    assert report["largest_batch"] == {"deit_tiny_patch16_224": 2}
    (row,) = report["agreement"]
    assert min(row["float32"]["min_correlation"].values()) >= 0.999999
    assert "lowest map correlation" in done.stdout
