"""Where an image's artifacts are written from: which stores a CPU-pool process may open itself, and
the settings that reach it."""

from __future__ import annotations

import os
from pathlib import Path

import pydantic
import pytest

import worker.pipeline.artifacts as artifacts
from common.settings import Settings
from common.storage import LocalStore
from worker.pipeline.artifacts import StoreTarget


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


def test_a_pool_process_adopts_the_aws_environment_of_the_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spawned process keeps the environment of the moment it started; the target carries the
    pipeline's ``AWS_*`` variables as they are now, and opening it replaces the process's own (a
    variable the pipeline no longer has is removed, not kept)."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)  # so that the test's own changes are all undone afterwards
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "pipeline")
    target = StoreTarget.of((tmp_path / "out").as_uri(), upload_threads=2, retry_seconds=1.0)
    assert target is not None
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "stale")
    monkeypatch.setenv("AWS_PROFILE", "stale")
    monkeypatch.setattr(artifacts, "_opened", {})
    store = artifacts._open(target)
    assert isinstance(store, LocalStore)
    assert store.root == (tmp_path / "out").resolve()
    assert artifacts._open(target) is store  # opened once per process
    assert {k: v for k, v in os.environ.items() if k.startswith("AWS_")} == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "pipeline",
    }


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
