"""Where an image's artifacts are written from: which stores a CPU-pool process may open itself, and
the settings that reach it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pydantic
import pytest

import worker.pipeline.artifacts as artifacts
from common.errors import StorageConfigError
from common.settings import Settings
from common.storage import LocalStore, aws_environment
from worker.pipeline.artifacts import ImageArtifacts, StoreTarget, Written
from worker.pipeline.cpu import CpuPool


@pytest.mark.parametrize(
    ("url", "shareable"),
    [
        ("file:///srv/results", True),
        ("/srv/results", True),
        ("s3://bucket/prefix", True),
        ("memory://results", False),  # lives in one process: a pool process would write elsewhere
    ],
)
def test_only_stores_another_process_reaches_by_url_are_shared(url: str, shareable: bool) -> None:
    target = StoreTarget.of(url, upload_threads=2, retry_seconds=1.0)
    assert (target is not None) == shareable


def test_a_pool_process_writes_with_the_aws_environment_its_runtime_had(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool process spawned after the environment changed (the pool starts on first use, and is
    replaced when a process dies) still gets the ``AWS_*`` variables the runtime opened its store
    with, all of them and only them; opening a store there changes no variable."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)  # so that the test's own changes are all undone afterwards
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "pipeline")
    pool = CpuPool(1, aws_environment=aws_environment())
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "stale")
        monkeypatch.setenv("AWS_PROFILE", "stale")
        assert pool.run(aws_environment) == {
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            "AWS_ACCESS_KEY_ID": "pipeline",
        }
    finally:
        pool.close()
    assert CpuPool(0, aws_environment={"AWS_PROFILE": "x"}).run(aws_environment) == aws_environment()
    target = StoreTarget.of((tmp_path / "out").as_uri(), upload_threads=2, retry_seconds=1.0)
    assert target is not None
    monkeypatch.setattr(artifacts, "_opened", {})
    before = dict(os.environ)
    store = artifacts._open(target)
    assert isinstance(store, LocalStore)
    assert store.root == (tmp_path / "out").resolve()
    assert artifacts._open(target) is store  # opened once per process
    assert dict(os.environ) == before


def test_the_png_level_is_a_setting_within_libdeflates_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().png_level == 1
    monkeypatch.setenv("VITSCOPE_PNG_LEVEL", "0")
    assert Settings().png_level == 0
    monkeypatch.setenv("VITSCOPE_PNG_LEVEL", "13")
    with pytest.raises(pydantic.ValidationError, match="png_level"):
        Settings()


def test_a_relative_results_folder_is_shared_by_its_absolute_url(tmp_path: Path) -> None:
    """A pool process may start from another working directory: it gets the folder the pipeline
    opened, not the relative name."""
    from worker.pipeline import Runtime

    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", storage_url="results", device="cpu", cpu_workers=1
    )
    runtime = Runtime.from_settings(settings)
    try:
        assert runtime.store_target is not None
        assert runtime.store_target.url == (tmp_path / "results").resolve().as_uri()  # cwd is tmp_path
    finally:
        runtime.close()


def test_one_image_that_cannot_be_written_fails_alone_in_a_pool_call(tmp_path: Path) -> None:
    """``write_artifacts_many`` carries a micro-batch's share in one pool call; an image whose
    folder cannot be made (a file is in its way) returns its error, and the others are written."""
    rng = np.random.default_rng(0)
    target = StoreTarget.of((tmp_path / "results").as_uri(), upload_threads=1, retry_seconds=0.0)
    images = [
        ImageArtifacts(
            image_sha256=f"{i:02d}" * 32,
            model="deit_tiny_patch16_224",
            config="c" * 16,
            crop=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            arrays={"rollout.npy": rng.random((2, 2)).astype(np.float32)},
            overlays=None,
            title="t",
            png_level=1,
        )
        for i in range(3)
    ]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / images[1].image_sha256[:2]).write_bytes(b"in the way")
    results = artifacts.write_artifacts_many(target, images)
    assert isinstance(results[1], StorageConfigError)
    store = LocalStore(tmp_path / "results")
    for image, result in zip(images, results, strict=True):
        if image is images[1]:
            continue
        assert isinstance(result, Written)
        assert sorted(a.name for a in result.artifacts) == ["input.png", "rollout.npy", "rollout.png"]
        for record in result.artifacts:
            data = store.get(image.key(record.name))
            assert hashlib.sha256(data).hexdigest() == record.checksum
