"""One typed settings object, read once from the environment (prefix ``VITSCOPE_``).

Everything that differs between a laptop and a GPU fleet lives here, and every other module
receives what it needs from this object: none reads a ``VITSCOPE_`` variable itself. The only
other variables read are other tools' own (boto3's ``AWS_*``, by ``common.storage`` where S3 clients
are built and handed to pool processes; CUDA's ``CUDA_VISIBLE_DEVICES``, by ``worker start``), and
only entry points set process-wide variables (the OpenMP wait policy, a pool process's ``AWS_*``).
Unset values fall back to the embedded defaults: a SQLite file and a ``results/`` folder in the
working directory, and in-process execution without a broker.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.s3_sources import ANY_BUCKET, parse_s3_source

__all__ = [
    "ARTIFACT_LAYOUTS",
    "AUTOCAST_CHOICES",
    "CUDA_DEVICE",
    "STORAGE_RETRY_SECONDS",
    "Settings",
    "check_autocast",
    "check_device",
    "get_settings",
]

ARTIFACT_LAYOUTS = ("auto", "objects", "shards")
AUTOCAST_CHOICES = ("auto", "off", "float16", "bfloat16")
# How long an S3 request rides out an unavailable endpoint: the setting's default, and what
# ``common.storage`` uses when its caller passes no setting.
STORAGE_RETRY_SECONDS = 60.0
# ``cuda`` or ``cuda:N``; group 1 is N.
CUDA_DEVICE = re.compile(r"cuda(?::(\d+))?")


class Settings(BaseSettings):
    """vitscope's configuration. Each field is ``VITSCOPE_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="VITSCOPE_", extra="ignore")

    # Where things live.
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; unset = SQLite file vitscope.db in the working directory."
    )
    storage_url: str | None = Field(
        default=None, description="file://DIR or s3://bucket/prefix; unset = file:// + ./results."
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker, e.g. redis://host:6379/0; unset = process in-process."
    )
    models_file: Path | None = Field(default=None, description="TOML file of named model entries.")
    weights_dir: Path | None = Field(
        default=None,
        description="Directory searched for <arch>.safetensors/.pth before any download; also the cache "
        "for weights fetched from object storage.",
    )

    # Compute.
    batch_size: int = Field(default=8, ge=1, description="Images per forward/backward pass.")
    device: str = Field(default="auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:N.")
    autocast: str = Field(
        default="auto",
        description="auto (bfloat16 on CUDA, float16 on older GPUs, off on CPU), off, float16, bfloat16.",
    )

    # Image fetching: size limits and network policy.
    max_image_bytes: int = Field(default=50 * 1024 * 1024, ge=1, description="Largest image file accepted.")
    max_image_pixels: int = Field(default=64_000_000, ge=1, description="Largest decoded image (w × h).")
    fetch_timeout_seconds: float = Field(default=30.0, gt=0, description="Per-request timeout for http(s).")
    allow_private_networks: bool = Field(
        default=False, description="Allow http(s) image URLs that resolve to private/loopback/link-local IPs."
    )
    file_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders (separated by ':' as in PATH) that file:// URIs and paths may read images from. "
        "Unset: a local run reads only the dataset CSV's folder, a distributed worker no local files at all.",
    )
    allow_hard_links: bool = Field(
        default=False,
        description="Read local images that have more than one hard link (st_nlink > 1). Off: a hard link "
        "inside a file root may name a file outside it, which no path check can see.",
    )
    s3_sources: Annotated[list[str] | None, NoDecode] = Field(
        default=None,
        description="Buckets or bucket/prefixes (comma-separated) that s3:// images and masks may be read "
        "from; '*' = any bucket, empty = none. Unset: the results store's bucket (outside its prefix) "
        "when results are on S3, else none. The results prefix itself is never read as an input.",
    )
    fetch_threads: int = Field(default=8, ge=1, description="Concurrent image downloads per worker.")
    decode_threads: int | None = Field(
        default=None,
        ge=1,
        description="Images a worker decodes and resizes at once; the other fetch threads wait for a slot. "
        "Unset: the cores the worker may run on less its CPU pool's processes (more only contend for them).",
    )
    upload_threads: int = Field(default=8, ge=1, description="Concurrent artifact uploads per worker.")
    storage_retry_seconds: float = Field(
        default=STORAGE_RETRY_SECONDS,
        ge=0,
        description="How long one object-store request keeps retrying an unreachable or failing endpoint "
        "(with backoff) before the job's attempt fails; rides out restarts and short outages.",
    )
    artifact_layout: str = Field(
        default="auto",
        description="How artifacts are stored (docs/storage.md): objects (one file or object per artifact), "
        "shards (one uncompressed tar per few dozen jobs, WebDataset member names; one PUT instead of ten per "
        "job), or auto: shards on s3://, objects in a local folder (where people browse the files) and in memory.",
    )
    shard_max_jobs: int = Field(
        default=64,
        ge=1,
        description="A shard is closed and written after this many jobs (also at the end of every chunk).",
    )
    shard_max_mib: float = Field(
        default=64.0, gt=0, description="… or once its artifacts reach this many MiB, whichever comes first."
    )
    shard_max_seconds: float = Field(
        default=10.0,
        gt=0,
        description="… or this many seconds after its first job finished, so a slow micro-batch never holds "
        "finished jobs back from the database for longer.",
    )
    png_level: int = Field(
        default=1,
        ge=0,
        le=12,
        description="Level of the PNG pictures: 1 (default) codes the input crop and the overlays with "
        "Huffman coding only (smaller than libdeflate's level 1 for photo-like pictures, in 40 % of its time); "
        "0 stores them uncompressed (files 1.4-1.8x larger) for a GPU host whose CPUs cannot keep up; 2-12 "
        "are libdeflate's levels, up to the smallest files. The layer grid (flat colour) is always deflated "
        "with LZ77 matches, at level 1 or above. Pixels are the same at every level.",
    )
    cpu_workers: int | None = Field(
        default=None,
        ge=0,
        description="Processes drawing, encoding and writing the pictures for one worker (images are "
        "decoded in its fetch threads); 0 = in its threads; "
        "unset: the cores of this worker's share of the host on a GPU, 0 on the CPU (worker start sets it).",
    )

    # What a worker reports about itself (``producer workers``); ``worker start`` sets both for each
    # Celery worker it starts.
    worker_node: str | None = Field(
        default=None, description="The Celery node name a worker reports in its heartbeat."
    )
    worker_queues: str | None = Field(
        default=None, description="The model-family queues a worker consumes, comma-separated, as reported."
    )

    # Distributed delivery (see docs/architecture.md, "Delivery and recovery").
    chunk_size: int = Field(default=32, ge=1, description="Jobs of one model per queue message.")
    lease_seconds: float = Field(
        default=180.0, gt=0, description="A claimed job not renewed for this long is reclaimable."
    )
    heartbeat_seconds: float = Field(default=30.0, gt=0, description="How often a worker renews its leases.")
    reaper_interval_seconds: float = Field(
        default=60.0, gt=0, description="How often a worker looks for expired leases and re-enqueues them."
    )
    visibility_timeout_seconds: int = Field(
        default=7200, ge=1, description="Redis redelivery of unacked messages (> time limit)."
    )
    task_time_limit_seconds: int = Field(default=3600, ge=1, description="Hard limit for one chunk.")
    max_attempts: int = Field(default=3, ge=1, description="Attempts per job before it fails for good.")
    republish_after_seconds: float = Field(
        default=7200.0,
        gt=0,
        description="A queued job with no message published for this long is published again by the "
        "reaper: its message was lost (broker restarted without persistence, queue purged).",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        """Checked here, so a typo stops every process at start — the producer too, which never
        selects a device — rather than a worker at its first chunk. Whether CUDA is there is the
        worker's question (``worker.device.select_device``)."""
        return check_device(value)

    @field_validator("autocast")
    @classmethod
    def _known_autocast(cls, value: str) -> str:
        return check_autocast(value)

    @field_validator("artifact_layout")
    @classmethod
    def _known_layout(cls, value: str) -> str:
        return _one_of(value, ARTIFACT_LAYOUTS, "artifact layout")

    @field_validator("file_roots", mode="before")
    @classmethod
    def _split_file_roots(cls, value: Any) -> Any:
        """``/data/a:/data/b`` in the environment, like PATH; empty entries are dropped."""
        if isinstance(value, str):
            return [part for part in value.split(os.pathsep) if part.strip()]
        return value

    @field_validator("s3_sources", mode="before")
    @classmethod
    def _split_s3_sources(cls, value: Any) -> Any:
        """``bucket-a, bucket-b/photos`` in the environment; an empty value is an empty list (no bucket)."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        for entry in value or ():
            if isinstance(entry, str) and entry.strip() != ANY_BUCKET:
                parse_s3_source(entry)  # a malformed entry stops the process at start, not a job later
        return value

    def resolved_database_url(self) -> str:
        """The configured URL, or the embedded SQLite default (an absolute path, so cwd changes are safe)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(Path.cwd() / 'vitscope.db').resolve()}"

    def resolved_artifact_layout(self, storage_url: str | None = None) -> str:
        """``objects`` or ``shards`` for artifacts written to ``storage_url`` (default: the configured
        one); ``auto`` is shards on S3 only (measured in docs/storage.md: ten PUTs per job cost more CPU
        than the rest of the pipeline, while a local folder's files cost little and stay browsable)."""
        if self.artifact_layout != "auto":
            return self.artifact_layout
        url = storage_url or self.resolved_storage_url()
        return "shards" if url.lower().startswith("s3://") else "objects"

    def resolved_storage_url(self) -> str:
        if self.storage_url:
            return self.storage_url
        return (Path.cwd() / "results").resolve().as_uri()


def check_device(value: str) -> str:
    """``value`` normalized (trimmed, lower case) if it names a device: auto, cpu, cuda or cuda:N."""
    device = value.strip().lower()
    if device not in ("auto", "cpu") and CUDA_DEVICE.fullmatch(device) is None:
        raise ValueError(f"unknown device {value!r}: expected auto, cpu, cuda or cuda:N")
    return device


def check_autocast(value: str) -> str:
    """``value`` normalized if it is one of ``AUTOCAST_CHOICES``."""
    return _one_of(value, AUTOCAST_CHOICES, "autocast setting")


def _one_of(value: str, choices: tuple[str, ...], what: str) -> str:
    """``value`` normalized (trimmed, lower case) if it is one of ``choices``; else the error names them."""
    choice = value.strip().lower()
    if choice not in choices:
        raise ValueError(f"unknown {what} {value!r}: use one of {', '.join(choices)}")
    return choice


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
