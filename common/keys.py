"""Identifiers and storage keys that must be the same on every machine and every retry.

Artifact keys are derived from what determines their content — the image bytes, the model (arch,
weights, classes, preprocessing), the method settings and the target class — so a retried job
overwrites its own objects instead of leaving orphans, and an image already explained with the same
configuration is recognised by a database lookup and reused instead of recomputed.

Layout under the storage URL (documented in docs/architecture.md, "Storage layout"):
    <sha[:2]>/<sha>/<model>/<config>/<artifact>
e.g. ``3f/3f9a…e1/deit_tiny_patch16_224/5d41402abc4b2a76/rollout.npy``.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import uuid
from datetime import UTC, datetime

from common.methods import MethodSettings
from common.modelspec import ModelSpec

__all__ = ["artifact_key", "config_fingerprint", "new_batch_id", "new_job_id", "sample_key"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Bump when an artifact's definition changes, so old objects are never reused for new math.
ARTIFACT_FORMAT_VERSION = 1


def config_fingerprint(spec: ModelSpec, settings: MethodSettings, target: str | None) -> str:
    """Digest of everything besides the image that determines a job's artifacts."""
    payload = {
        "format": ARTIFACT_FORMAT_VERSION,
        "model": spec.fingerprint(),
        "settings": settings.to_dict(),
        "target": (target or "").strip(),
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def artifact_key(image_sha256: str, model_name: str, config: str, artifact: str) -> str:
    model = _UNSAFE.sub("_", model_name).strip("._") or "model"
    return f"{image_sha256[:2]}/{image_sha256}/{model}/{config}/{artifact}"


def sample_key(image_sha256: str, config: str) -> str:
    """The WebDataset sample key of a job's artifacts in a shard (``common.storage.shards``):
    ``<image sha256>_<config>``, the parts of ``artifact_key`` that determine the content (the
    configuration digests the model). No "." (WebDataset splits a member name at its first dot) and
    no "/"; 81 characters, so every member name fits a plain ustar header (100 bytes)."""
    return f"{image_sha256}_{config}"


def new_batch_id(now: datetime | None = None) -> str:
    """Sortable and short enough to type: ``20261125-151012-3f9a2c``."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def new_job_id() -> str:
    return uuid.uuid4().hex
