"""The one place where vitscope's failures are named.

Callers catch at the level they can act on: a job shell retries ``TransientError`` with backoff and
fails the job for good on ``PermanentError``; the CLI turns any ``VitscopeError`` into a one-line
message and a non-zero exit code instead of a traceback.

    VitscopeError
    ├── PermanentError            retrying cannot help: fail the job (or refuse the command)
    │   ├── InvalidDatasetError   a CSV that cannot be submitted (carries the line number)
    │   ├── InvalidModelSpecError a models file entry that is wrong
    │   ├── UnknownModelError     a name that is neither a timm model nor a models-file entry
    │   ├── UnsupportedModelError a model without standard, hookable self-attention
    │   ├── WeightsUnavailableError  weights that cannot be found or downloaded
    │   ├── InvalidTargetError    a target class that the model does not have
    │   ├── ImageError            an image that cannot be used
    │   │   ├── ImageTooLargeError
    │   │   └── ImageFetchRefusedError  e.g. a private address when those are not allowed
    │   ├── NotFoundError         a batch, job or stored object that does not exist
    │   ├── ObjectTooLargeError   a stored object over the size limit asked for
    │   ├── MissingDependencyError  an optional library a command needs is not installed
    │   └── StorageConfigError    a missing bucket, denied access, bad credentials
    └── TransientError            the world may heal: retry with backoff
        ├── StorageUnavailableError
        ├── DatabaseUnavailableError
        ├── BrokerUnavailableError    the queue (Redis) unreachable or refusing messages
        ├── ImageFetchTransientError  timeouts, 5xx, connection resets
        └── CpuProcessLostError       a CPU-pool process died (killed, out of memory) mid-job
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailableError",
    "CpuProcessLostError",
    "DatabaseUnavailableError",
    "ImageError",
    "ImageFetchRefusedError",
    "ImageFetchTransientError",
    "ImageTooLargeError",
    "InvalidDatasetError",
    "InvalidModelSpecError",
    "InvalidTargetError",
    "MissingDependencyError",
    "NotFoundError",
    "ObjectTooLargeError",
    "PermanentError",
    "StorageConfigError",
    "StorageUnavailableError",
    "TransientError",
    "UnknownModelError",
    "UnsupportedModelError",
    "VitscopeError",
    "WeightsUnavailableError",
]


class VitscopeError(Exception):
    """Base of every error vitscope raises on purpose; its message is meant for the user."""


class PermanentError(VitscopeError):
    """The same input will fail the same way: record it and move on."""


class TransientError(VitscopeError):
    """Caused by something outside the input (a service, the network): worth retrying."""


class InvalidDatasetError(PermanentError):
    """A dataset file that cannot be submitted. ``line`` is 1-based as in an editor (header = 1)."""

    def __init__(self, message: str, *, line: int | None = None, path: str | None = None) -> None:
        self.line = line
        self.path = path
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        elif line is not None:
            where = f"line {line}: "
        super().__init__(f"{where}{message}")


class InvalidModelSpecError(PermanentError):
    """A models-file entry (or command-line model option) that is inconsistent or incomplete."""


class UnknownModelError(PermanentError):
    """A model name that neither timm nor the models file knows."""


class UnsupportedModelError(PermanentError):
    """A model whose attention cannot be captured (no ``blocks[l].attn.attn_drop``, no patch grid)."""


class WeightsUnavailableError(PermanentError):
    """Weights that cannot be loaded: a missing file, an unreachable hub, a mismatched checkpoint."""


class InvalidTargetError(PermanentError):
    """A target class index out of range or a class name the model's labels do not contain."""


class ImageError(PermanentError):
    """An image that cannot be decoded or used: missing, truncated, not an image, unsupported."""


class ImageTooLargeError(ImageError):
    """An image over the configured byte or pixel limit (a guard against decompression bombs)."""


class ImageFetchRefusedError(ImageError):
    """A fetch refused by policy, e.g. a private or link-local address or a disallowed scheme."""


class NotFoundError(PermanentError):
    """A batch, job or object that does not exist."""


class ObjectTooLargeError(PermanentError):
    """A stored object larger than the reader's limit (weights, images read through storage)."""


class MissingDependencyError(PermanentError):
    """An optional library a command needs is not installed (e.g. matplotlib for ``producer figures``)."""


class StorageConfigError(PermanentError):
    """Storage that is misconfigured rather than down: no such bucket, access denied, bad credentials."""


class StorageUnavailableError(TransientError):
    """The object store could not be reached or refused a write for a reason that may pass."""


class DatabaseUnavailableError(TransientError):
    """The SQL database could not be reached or the transaction could not be committed."""


class BrokerUnavailableError(TransientError):
    """The message broker could not be reached, or refused a message (e.g. out of memory)."""


class ImageFetchTransientError(TransientError):
    """Fetching an image failed for a reason that may pass (timeout, 5xx, connection reset)."""


class CpuProcessLostError(TransientError):
    """A worker's CPU-pool process died while decoding or drawing an image (the kernel's OOM killer, a
    signal, a crashing codec). Transient: the pool is restarted and the job retried; an image that
    kills its process every time uses up its attempts and fails on its own."""
