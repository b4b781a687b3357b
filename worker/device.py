"""Where the compute core runs and in which precision, from the ``device`` and ``autocast`` settings.

Both functions turn a settings string into a torch object once, at worker start, and refuse anything
they do not understand: a worker told to use a GPU it does not have must stop with a clear message
rather than quietly run 50× slower on the CPU.
"""

from __future__ import annotations

import contextlib

import torch

from common.settings import CUDA_DEVICE, check_autocast, check_device

__all__ = ["autocast", "autocast_dtype", "select_device"]

_AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "off": None,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def select_device(setting: str = "auto") -> torch.device:
    """The device named by ``setting``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    ``auto`` is the first CUDA device when one is available, else the CPU. Asking for CUDA explicitly
    on a machine without it (or for an index past the last GPU) raises ``ValueError``.
    """
    value = check_device(setting)
    if value == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    match = CUDA_DEVICE.fullmatch(value)
    assert match is not None  # check_device let only cuda or cuda:N through
    if not torch.cuda.is_available():
        raise ValueError(f"device {setting!r} requested but CUDA is not available on this machine")
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device {setting!r} requested but this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``setting`` on ``device``; ``None`` means full float32.

    ``auto`` on CUDA picks bfloat16 where the GPU supports it (Ampere and newer), else float16.
    bfloat16 first because the gradient maps need ``∂ logit / ∂ A``, whose entries are often below
    float16's smallest normal number, and a single logit's gradient is taken without loss scaling;
    bfloat16 has float32's exponent range. On other devices ``auto`` is ``None``: CPU autocast is
    rarely faster. ``off``, ``float16`` and ``bfloat16`` mean what they say on any device. Anything
    else raises ``ValueError``.
    """
    value = check_autocast(setting)
    if value == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if _cuda_supports_bfloat16() else torch.float16
    return _AUTOCAST_DTYPES[value]


def _cuda_supports_bfloat16() -> bool:
    """Asked of the current GPU: hosts mix GPU generations rarely, and a worker sees one GPU."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; no change of precision for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
