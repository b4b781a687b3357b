"""Turning the ``device`` and ``autocast`` settings into torch objects."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from common.settings import Settings
from worker.device import autocast, autocast_dtype, select_device

requires_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize(("setting", "expected"), [("cpu", "cpu"), ("CPU", "cpu"), (" cpu ", "cpu")])
def test_cpu_is_always_available(setting: str, expected: str) -> None:
    assert select_device(setting) == torch.device(expected)


def test_auto_is_cuda_exactly_when_cuda_is_available() -> None:
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert select_device("auto") == expected
    assert select_device() == expected


@requires_no_cuda
@pytest.mark.parametrize("setting", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_requested_without_cuda_is_a_clear_error(setting: str) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        select_device(setting)


@pytest.mark.parametrize("setting", ["gpu", "cuda:x", "cuda:", "tpu", ""])
def test_unknown_devices_are_rejected(setting: str) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        select_device(setting)


# bfloat16 where the GPU has it; float16 on older GPUs and when there is no GPU to ask (as here).
CUDA_AUTO = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [
        ("auto", "cuda", CUDA_AUTO),
        ("auto", "cuda:1", CUDA_AUTO),
        ("auto", "cpu", None),
        ("off", "cuda", None),
        ("off", "cpu", None),
        ("float16", "cuda", torch.float16),
        ("float16", "cpu", torch.float16),
        ("bfloat16", "cuda", torch.bfloat16),
        ("bfloat16", "cpu", torch.bfloat16),
        ("BFloat16", "cpu", torch.bfloat16),
    ],
)
def test_autocast_dtype_table(setting: str, device: str, expected: torch.dtype | None) -> None:
    assert autocast_dtype(setting, torch.device(device)) is expected


@pytest.mark.parametrize("setting", ["fp16", "float32", "on", "half", ""])
def test_unknown_autocast_settings_are_rejected(setting: str) -> None:
    with pytest.raises(ValueError, match="unknown autocast setting"):
        autocast_dtype(setting, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA machine")
def test_a_cuda_index_past_the_last_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="CUDA device"):
        select_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize(("value", "kept"), [(" CUDA:1 ", "cuda:1"), ("Auto", "auto"), ("cpu", "cpu")])
def test_the_device_setting_is_normalized(value: str, kept: str) -> None:
    assert Settings(device=value).device == kept


@pytest.mark.parametrize(
    ("variable", "value", "refusal"),
    [
        *[("VITSCOPE_DEVICE", value, "unknown device") for value in ["gpu", "cuda:x", "cuda:", "mps", ""]],
        *[
            ("VITSCOPE_AUTOCAST", value, "unknown autocast setting")
            for value in ["fp16", "float32", "on", ""]
        ],
    ],
)
def test_an_unknown_device_or_autocast_setting_stops_the_process_at_start(
    variable: str, value: str, refusal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings are read when a process starts — the producer's too — not when a worker first computes."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=refusal):
        Settings()


def test_the_autocast_setting_is_normalized() -> None:
    assert Settings(autocast=" BFloat16 ").autocast == "bfloat16"


@pytest.mark.parametrize(("dtype", "expected"), [(None, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_the_autocast_context_runs_matmuls_in_its_dtype_and_none_changes_nothing(
    dtype: torch.dtype | None, expected: torch.dtype
) -> None:
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(torch.device("cpu"), dtype):
        product = a @ b
    assert product.dtype == expected
    assert torch.is_autocast_enabled("cpu") is False  # left as it was found
