"""Artifact shards: the tar is what ``tarfile`` and ``tar`` read, each member's offset is where its
data is, and a member URI reads one member alone — one seek on disk, one ranged GET on a real S3
endpoint — on every backend."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest

from common.errors import ObjectTooLargeError, StorageUnavailableError
from common.keys import sample_key
from common.storage import open_store, read_uri
from common.storage.s3 import S3Store
from common.storage.shards import (
    build_shard,
    member_uri,
    new_shard_key,
    parse_member_uri,
    shard_created_at,
)

MEMBERS = [
    ("aa_01.rollout.npy", b"\x93NUMPY" + bytes(range(200))),
    ("aa_01.rollout.png", b"\x89PNG" + b"x" * 511),  # exactly one block of data with the 4-byte head
    ("aa_01.empty.bin", b""),
    ("bb_02.rollout.npy", bytes(3000)),
]


def test_a_shard_is_a_tar_whose_offsets_point_at_each_members_data(tmp_path: Path) -> None:
    shard = build_shard(MEMBERS, mtime=1_700_000_000)
    data = shard.data
    assert len(data) == shard.size
    assert shard.size % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [name for name, _ in MEMBERS]
        assert [m.offset_data for m in members] == shard.offsets
        for member, (_, content) in zip(members, MEMBERS, strict=True):
            assert member.isfile()
            assert member.mtime == 1_700_000_000
            assert tar.extractfile(member).read() == content  # type: ignore[union-attr]
    for offset, (_, content) in zip(shard.offsets, MEMBERS, strict=True):
        assert data[offset : offset + len(content)] == content
        assert offset % tarfile.BLOCKSIZE == 0
    if shutil.which("tar"):
        (tmp_path / "s.tar").write_bytes(data)
        listed = subprocess.run(
            ["tar", "tf", str(tmp_path / "s.tar")], capture_output=True, text=True, check=True
        )
        assert listed.stdout.split() == [name for name, _ in MEMBERS]
        assert listed.stderr == ""


def test_a_long_member_name_gets_a_pax_header_and_still_reads_back() -> None:
    name = "k" * 90 + ".layer_scores.png"
    shard = build_shard([(name, b"abc")])
    with tarfile.open(fileobj=io.BytesIO(shard.data), mode="r:") as tar:
        (member,) = tar.getmembers()
        assert member.name == name
        assert member.offset_data == shard.offsets[0]


@pytest.mark.parametrize("name", ["", "/abs.npy", "../up.npy", "a/../b.npy"])
def test_bad_member_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="member name"):
        build_shard([(name, b"x")])


def test_a_repeated_member_name_is_refused() -> None:
    with pytest.raises(ValueError, match="repeated"):
        build_shard([("a.npy", b"x"), ("a.npy", b"y")])


def test_sample_keys_have_no_dot_and_member_names_fit_a_ustar_header() -> None:
    key = sample_key("f" * 64, "5d41402abc4b2a76")
    assert "." not in key
    assert "/" not in key
    assert len(f"{key}.layer_scores.png") <= 100


def test_member_uris_round_trip_and_other_uris_are_not_members() -> None:
    uri = member_uri("s3://b/p/shards/20261203/x.tar", "k.rollout.npy", 1536, 6272)
    assert uri == "s3://b/p/shards/20261203/x.tar#member=k.rollout.npy&offset=1536&length=6272"
    ref = parse_member_uri(uri)
    assert ref is not None
    assert ref.uri == uri
    assert (ref.shard_uri, ref.member, ref.offset, ref.length) == (
        "s3://b/p/shards/20261203/x.tar",
        "k.rollout.npy",
        1536,
        6272,
    )
    for plain in ("s3://b/a#b.npy", "file:///x/y.npy", "s3://b/k.tar#member=a&offset=x&length=1"):
        assert parse_member_uri(plain) is None


def test_shard_keys_are_new_every_time_and_carry_their_time() -> None:
    now = datetime(2026, 12, 3, 19, 45, 1, tzinfo=UTC)
    first, second = new_shard_key(now), new_shard_key(now)
    assert first != second
    assert first.startswith("shards/20261203/20261203T194501Z-")
    assert first.endswith(".tar")
    assert shard_created_at(first) == now
    assert shard_created_at("prefix/" + first) == now
    assert shard_created_at("ab/abcd/model/cfg/rollout.npy") is None


@pytest.fixture(params=["local", "memory", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return (tmp_path / "store").as_uri()
    if request.param == "memory":
        return f"memory://shards-{tmp_path.name}"
    return f"s3://{request.getfixturevalue('s3_bucket')}/runs"


def test_read_uri_reads_one_member_from_a_shard_on_every_backend(store_url: str) -> None:
    store = open_store(store_url)
    shard = build_shard(MEMBERS)
    shard_uri = store.put(new_shard_key(), shard.data)
    for offset, (name, content) in zip(shard.offsets, MEMBERS, strict=True):
        assert read_uri(member_uri(shard_uri, name, offset, len(content))) == content
    name, content = MEMBERS[0]
    with pytest.raises(ObjectTooLargeError):
        read_uri(member_uri(shard_uri, name, shard.offsets[0], len(content)), max_bytes=len(content) - 1)
    # A row that points past the shard's end is an error, never a short read.
    with pytest.raises(StorageUnavailableError, match="not the"):
        read_uri(member_uri(shard_uri, name, shard.size - 10, 100))


def test_a_member_is_one_ranged_get_on_s3(s3_bucket: str) -> None:
    store = S3Store(s3_bucket, "runs")
    shard = build_shard(MEMBERS)
    shard_uri = store.put(new_shard_key(), shard.data)
    sent: list[tuple[str, str | None]] = []

    def record(request, **_) -> None:
        value = request.headers.get("Range")
        sent.append((request.method, value.decode() if isinstance(value, bytes) else value))

    client = S3Store(s3_bucket).client  # the process's shared client, which read_uri uses too
    client.meta.events.register("before-send.s3", record)
    try:
        name, content = MEMBERS[3]
        assert read_uri(member_uri(shard_uri, name, shard.offsets[3], len(content))) == content
    finally:
        client.meta.events.unregister("before-send.s3", record)
    start = shard.offsets[3]
    assert sent == [("GET", f"bytes={start}-{start + len(content) - 1}")]


def test_a_large_object_goes_up_in_parts_and_reads_back_whole(s3_bucket: str) -> None:
    part = 5 * 1024 * 1024  # S3's smallest part
    store = S3Store(s3_bucket, "runs", multipart_threshold=part, multipart_part_size=part)
    data = bytes(range(256)) * (2 * part // 256 + 1000)
    sent: list[str] = []

    def record(model, **_) -> None:
        sent.append(model.name)

    store.client.meta.events.register("before-call.s3", record)
    try:
        uri = store.put("shards/big.tar", data)
    finally:
        store.client.meta.events.unregister("before-call.s3", record)
    assert sent == [
        "CreateMultipartUpload",
        "UploadPart",
        "UploadPart",
        "UploadPart",
        "CompleteMultipartUpload",
    ]
    assert read_uri(uri) == data
    assert boto3.client("s3").list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
