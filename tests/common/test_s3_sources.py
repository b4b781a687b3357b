"""Which S3 objects a dataset may have read (``VITSCOPE_S3_SOURCES``), decided before any request.

The rules as a table, then the fetcher against a real S3 HTTP endpoint (moto's ThreadedMotoServer),
then a whole local run whose rows name another bucket and the results prefix: refused and warned.
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from common.errors import ImageFetchRefusedError
from common.fetch import DefaultFetcher, FetchPolicy
from common.s3_sources import S3Sources
from common.settings import Settings, get_settings
from producer.cli import app

PICTURE = b"\x89PNG\r\n\x1a\n any bytes: the fetcher does not decode"


@pytest.mark.parametrize(
    ("sources", "results", "uri", "allowed"),
    [
        # Unset: the results store's bucket, outside its prefix; no other bucket.
        (None, "s3://store/results", "s3://store/images/a.png", True),
        (None, "s3://store/results", "s3://other/a.png", False),
        (None, "s3://store/results", "s3://store/results/artifacts/x/input.png", False),
        (None, "s3://store/results", "s3://store/results", False),
        (None, "s3://store/results", "s3://store/results-old/a.png", True),  # a folder, not a string prefix
        (None, "s3://store", "s3://store/images/a.png", False),  # results fill the whole bucket
        (None, "file:///srv/results", "s3://store/a.png", False),  # no bucket was ever named
        # Listed buckets and folders.
        (["photos"], "s3://store/results", "s3://photos/2024/a.png", True),
        (["photos"], "s3://store/results", "s3://store/images/a.png", False),  # the list replaces the default
        (["photos/2024"], None, "s3://photos/2024/a.png", True),
        (["photos/2024/"], None, "s3://photos/2024/sub/a.png", True),
        (["s3://photos/2024"], None, "s3://photos/2024-private/a.png", False),
        (["photos/2024"], None, "s3://photos/2024/../private/a.png", False),  # no dot segments
        (["photos"], None, "s3://photos/./a.png", False),
        (None, "s3://store/results", "s3://store//results/artifacts/x/input.png", False),  # nor empty ones
        (None, "s3://store/results", "s3://store/images//a.png", False),
        (["photos"], None, "s3://photosx/a.png", False),
        ([], "s3://store/results", "s3://store/images/a.png", False),  # empty: none at all
        # Any bucket, but never the results prefix.
        (["*"], "s3://store/results", "s3://anything/a.png", True),
        (["*"], "s3://store/results", "s3://store/results/artifacts/x/input.png", False),
        (["store"], "s3://store/results", "s3://store/results/a.png", False),
    ],
)
def test_the_rules(sources: list[str] | None, results: str | None, uri: str, allowed: bool) -> None:
    reason = S3Sources(sources, results_url=results).refusal(uri)
    assert (reason is None) == allowed, reason
    if reason is not None and "/results/" in uri:
        assert "results store" in reason or "empty segment" in reason


def test_a_refusal_names_the_setting_and_what_it_allows() -> None:
    reason = S3Sources(None, results_url="s3://store/results").refusal("s3://other/a.png")
    assert reason is not None
    assert "VITSCOPE_S3_SOURCES is not set" in reason
    assert "'store'" in reason
    listed = S3Sources(["photos", "scans/2024"], results_url=None).refusal("s3://other/a.png")
    assert listed is not None
    assert "s3://photos, s3://scans/2024" in listed


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("photos", ["photos"]), (" photos , scans/2024 ", ["photos", "scans/2024"]), ("", []), ("*", ["*"])],
)
def test_the_setting_is_a_comma_separated_list(
    monkeypatch: pytest.MonkeyPatch, value: str, parsed: list[str]
) -> None:
    monkeypatch.setenv("VITSCOPE_S3_SOURCES", value)
    assert Settings().s3_sources == parsed


@pytest.mark.parametrize("value", ["/prefix-without-bucket", "photos, s3://", "photo*"])
def test_a_malformed_entry_stops_the_settings(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("VITSCOPE_S3_SOURCES", value)
    with pytest.raises(ValidationError, match="VITSCOPE_S3_SOURCES entry"):
        Settings()


# ---- the fetcher against a real S3 endpoint ----------------------------------------------------------


@pytest.fixture
def buckets(s3_bucket: str) -> tuple[str, str]:
    """The results store's bucket (inputs under images/, outputs under results/) and another one."""
    s3 = boto3.client("s3")
    other = s3_bucket + "-other"
    s3.create_bucket(Bucket=other)
    s3.put_object(Bucket=s3_bucket, Key="images/cat.png", Body=PICTURE)
    s3.put_object(Bucket=s3_bucket, Key="results/artifacts/ab/input.png", Body=b"another batch's crop")
    s3.put_object(Bucket=other, Key="secret.png", Body=b"a picture the submitter may not see")
    return s3_bucket, other


def _fetcher(monkeypatch: pytest.MonkeyPatch, store: str, sources: str | None) -> DefaultFetcher:
    monkeypatch.setenv("VITSCOPE_STORAGE_URL", f"s3://{store}/results")
    if sources is not None:
        monkeypatch.setenv("VITSCOPE_S3_SOURCES", sources)
    return DefaultFetcher(FetchPolicy.from_settings(Settings()))


def test_by_default_only_the_results_bucket_outside_its_prefix_is_read(
    buckets: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, other = buckets
    fetcher = _fetcher(monkeypatch, store, None)
    assert fetcher.fetch(f"s3://{store}/images/cat.png") == PICTURE
    with pytest.raises(ImageFetchRefusedError, match="outside the S3 sources"):
        fetcher.fetch(f"s3://{other}/secret.png")
    with pytest.raises(ImageFetchRefusedError, match="results store"):
        fetcher.fetch(f"s3://{store}/results/artifacts/ab/input.png")


def test_listed_buckets_are_read_and_the_results_prefix_never(
    buckets: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, other = buckets
    fetcher = _fetcher(monkeypatch, store, f"{other}, {store}")
    assert fetcher.fetch(f"s3://{other}/secret.png").startswith(b"a picture")
    assert fetcher.fetch(f"s3://{store}/images/cat.png") == PICTURE
    with pytest.raises(ImageFetchRefusedError, match="whatever VITSCOPE_S3_SOURCES says"):
        fetcher.fetch(f"s3://{store}/results/artifacts/ab/input.png")
    everything = _fetcher(monkeypatch, store, "*")
    assert everything.fetch(f"s3://{other}/secret.png").startswith(b"a picture")
    with pytest.raises(ImageFetchRefusedError, match="results store"):
        everything.fetch(f"s3://{store}/results/artifacts/ab/input.png")


# ---- end to end: a local run that stores its results on S3 -------------------------------------------


def test_a_run_refuses_other_buckets_and_the_results_prefix_and_submit_warns(
    buckets: tuple[str, str], tmp_path: Path, write_image, caplog: pytest.LogCaptureFixture
) -> None:
    """The attack of the issue: rows naming another bucket and another batch's stored crop."""
    store, other = buckets
    s3 = boto3.client("s3")
    s3.upload_file(str(write_image(tmp_path / "cat.png")), store, "images/real-cat.png")
    s3.upload_file(str(write_image(tmp_path / "secret.png", seed=9)), other, "secret-photo.png")
    s3.upload_file(str(write_image(tmp_path / "crop.png", seed=4)), store, "results/artifacts/zz/input.png")
    data = tmp_path / "data.csv"
    data.write_text(
        "id,image_uri\n"
        f"mine,s3://{store}/images/real-cat.png\n"
        f"theirs,s3://{other}/secret-photo.png\n"
        f"crop,s3://{store}/results/artifacts/zz/input.png\n"
        f"title,s3://{other}/\x1b]0;owned\x07.png\n"  # an escape sequence in the worker's log
    )
    env = {
        "COLUMNS": "200",
        "VITSCOPE_DATABASE_URL": f"sqlite:///{tmp_path / 'vitscope.db'}",
        "VITSCOPE_STORAGE_URL": f"s3://{store}/results",
    }
    get_settings.cache_clear()
    result = CliRunner().invoke(
        app,
        ["submit", str(data), "--local", "--weights", "random"],
        env=env,
        catch_exceptions=False,
    )
    assert result.exit_code == 1, result.output  # two jobs fail, one succeeds
    assert "WARNING: 3 row(s) name S3 objects outside VITSCOPE_S3_SOURCES" in result.output
    batch_id = result.stdout.strip().splitlines()[-1]
    get_settings.cache_clear()
    listed = CliRunner().invoke(
        app,
        ["results", batch_id, "--format", "json"],
        env=env,
        catch_exceptions=False,
    )
    jobs = {job["row_id"]: job for job in json.loads(listed.stdout)}
    assert jobs["mine"]["state"] == "succeeded"
    for refused in ("theirs", "crop", "title"):
        assert jobs[refused]["state"] == "failed"
        assert jobs[refused]["error_class"] == "ImageFetchRefusedError"
        assert jobs[refused]["image_sha256"] is None  # never read: nothing of it is known
    assert "results store" in jobs["crop"]["error_message"]
    logged = [
        record.getMessage()
        for record in caplog.records
        if "failed: ImageFetchRefusedError" in record.getMessage()
    ]
    assert len(logged) == 3
    assert not any("\x1b" in line or "\x07" in line for line in logged)
    assert any("\\x1b]0;owned\\x07" in line for line in logged)
