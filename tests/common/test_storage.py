"""The ObjectStore contract, run unchanged against every adapter, and the URL dispatch around it.

Each store is opened through ``open_store`` from its URL, as production code does: a local folder,
a real S3 HTTP endpoint (moto) with and without a key prefix, and process memory.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from common.errors import NotFoundError, ObjectTooLargeError
from common.storage import (
    LocalStore,
    MemoryStore,
    ObjectStore,
    S3Store,
    list_uri,
    open_store,
    read_uri,
)

STORE_KINDS = ["local", "s3", "s3-prefixed", "memory"]


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    kind = request.param
    if kind == "local":
        return open_store((tmp_path / "results").as_uri())
    if kind == "memory":
        return open_store(f"memory://test-{uuid.uuid4().hex}")
    bucket = request.getfixturevalue("s3_bucket")
    if kind == "s3":
        return open_store(f"s3://{bucket}")
    return open_store(f"s3://{bucket}/runs/2026")


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", bytes(range(256)) * 4, os.urandom(300_000)],
    ids=["empty", "nul", "all-byte-values", "300kB-random"],
)
def test_put_then_get_returns_the_same_bytes(store: ObjectStore, data: bytes) -> None:
    store.put("a/b/object.bin", data)
    assert store.get("a/b/object.bin") == data


def test_put_returns_the_uri_of_the_key_and_read_uri_reads_it_back(store: ObjectStore) -> None:
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(1000)
    uri = store.put("3f/3f9a/deit/5d41/rollout.png", data, content_type="image/png")
    assert uri == store.uri("3f/3f9a/deit/5d41/rollout.png")
    assert uri == f"{store.url}/3f/3f9a/deit/5d41/rollout.png"
    assert read_uri(uri) == data


def test_store_satisfies_the_protocol(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)


def test_overwriting_a_key_keeps_only_the_last_bytes(store: ObjectStore) -> None:
    first = store.put("k.npy", b"first version")
    second = store.put("k.npy", b"second")
    assert first == second
    assert store.get("k.npy") == b"second"
    assert store.list() == ["k.npy"]


def test_putting_the_same_bytes_twice_changes_nothing(store: ObjectStore) -> None:
    store.put("k.npy", b"same")
    store.put("k.npy", b"same")
    assert store.get("k.npy") == b"same"
    assert store.list() == ["k.npy"]


def test_exists_follows_put_and_delete(store: ObjectStore) -> None:
    assert not store.exists("x/y.npy")
    store.put("x/y.npy", b"1")
    assert store.exists("x/y.npy")
    assert not store.exists("x")  # a "folder" is not an object
    store.delete("x/y.npy")
    assert not store.exists("x/y.npy")


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.put("gone.npy", b"1")
    store.delete("gone.npy")
    store.delete("gone.npy")
    store.delete("never-existed.npy")
    assert store.list() == []


def test_a_missing_key_is_not_found(store: ObjectStore) -> None:
    with pytest.raises(NotFoundError, match="no-such"):
        store.get("no-such/key.npy")
    with pytest.raises(NotFoundError):
        read_uri(store.uri("no-such/key.npy"))


KEYS = ["b/2.npy", "a/1.npy", "a/10.npy", "a/sub/3.npy", "ab/x.png", "c.json"]


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("", sorted(KEYS)),
        ("a/", ["a/1.npy", "a/10.npy", "a/sub/3.npy"]),
        ("a", ["a/1.npy", "a/10.npy", "a/sub/3.npy", "ab/x.png"]),
        ("a/1", ["a/1.npy", "a/10.npy"]),
        ("a/sub/", ["a/sub/3.npy"]),
        ("c", ["c.json"]),
        ("zzz", []),
        ("zzz/", []),
    ],
)
def test_list_returns_the_sorted_keys_starting_with_a_string_prefix(
    store: ObjectStore, prefix: str, expected: list[str]
) -> None:
    for key in KEYS:
        store.put(key, key.encode())
    assert store.list(prefix) == expected


def test_list_uri_names_the_same_objects_as_list(store: ObjectStore) -> None:
    for key in KEYS:
        store.put(key, key.encode())
    assert list_uri(f"{store.url}/a/") == [store.uri(key) for key in store.list("a/")]
    assert [read_uri(uri) for uri in list_uri(f"{store.url}/a/")] == [b"a/1.npy", b"a/10.npy", b"a/sub/3.npy"]


def test_put_many_writes_every_item_and_returns_their_uris(store: ObjectStore) -> None:
    items = [(f"batch/{i:02d}.npy", f"payload {i}".encode(), "application/octet-stream") for i in range(20)]
    uris = store.put_many(items)
    assert uris == {key: store.uri(key) for key, _, _ in items}
    assert [store.get(key) for key, _, _ in items] == [data for _, data, _ in items]


def test_put_many_of_nothing_writes_nothing(store: ObjectStore) -> None:
    assert store.put_many([]) == {}
    assert store.list() == []


def test_put_many_tries_every_item_before_raising_the_first_error(store: ObjectStore) -> None:
    items = [
        ("ok/1.npy", b"1", "application/octet-stream"),
        ("../escape.npy", b"2", "application/octet-stream"),
        ("ok/2.npy", b"3", "application/octet-stream"),
        ("/absolute.npy", b"4", "application/octet-stream"),
    ]
    with pytest.raises(ValueError, match=r"\.\./escape"):
        store.put_many(items)
    assert store.list() == ["ok/1.npy", "ok/2.npy"]


def test_put_many_refuses_a_key_given_twice(store: ObjectStore) -> None:
    with pytest.raises(ValueError, match="more than once"):
        store.put_many([("k", b"1", "text/plain"), ("k", b"2", "text/plain")])
    assert store.list() == []


BAD_KEYS = ["", "/abs/key", "../up", "a/../../up", "a/..", "./a", "a/./b", "a//b", "a\\b", "nul\x00byte"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_every_store_refuses_keys_that_could_escape_its_base(store: ObjectStore, key: str) -> None:
    for operation in (
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.uri(key),
    ):
        with pytest.raises(ValueError, match="key"):
            operation()


@pytest.mark.parametrize("prefix", ["/", "/a", "../", "a/../../", "a//"])
def test_every_store_refuses_prefixes_that_no_valid_key_starts_with(store: ObjectStore, prefix: str) -> None:
    with pytest.raises(ValueError, match="key"):
        store.list(prefix)


@pytest.mark.parametrize(("max_bytes", "fits"), [(99, False), (100, True), (10_000, True)])
def test_read_uri_enforces_max_bytes_on_every_store(store: ObjectStore, max_bytes: int, fits: bool) -> None:
    uri = store.put("sized.bin", bytes(100))
    if fits:
        assert read_uri(uri, max_bytes=max_bytes) == bytes(100)
    else:
        with pytest.raises(ObjectTooLargeError, match="limit of 99"):
            read_uri(uri, max_bytes=max_bytes)


# ---- open_store: which adapter a URL selects --------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind", "normalized"),
    [
        ("s3://bucket", S3Store, "s3://bucket"),
        ("s3://bucket/", S3Store, "s3://bucket"),
        ("s3://bucket/runs/2026/", S3Store, "s3://bucket/runs/2026"),
        ("S3://bucket/p", S3Store, "s3://bucket/p"),
        ("memory://dry-run", MemoryStore, "memory://dry-run"),
        ("memory://dry-run/", MemoryStore, "memory://dry-run"),
    ],
)
def test_open_store_selects_the_adapter_by_scheme(url: str, kind: type, normalized: str) -> None:
    store = open_store(url)
    assert isinstance(store, kind)
    assert store.url == normalized


@pytest.mark.parametrize(
    "spelling", ["file_uri", "file_uri_localhost", "absolute_path", "relative_path", "trailing_slash"]
)
def test_open_store_opens_and_creates_a_local_folder(tmp_path: Path, spelling: str) -> None:
    folder = tmp_path / "new results" / "nested"
    url = {
        "file_uri": folder.as_uri(),
        "file_uri_localhost": "file://localhost" + folder.as_uri().removeprefix("file://"),
        "absolute_path": str(folder),
        "relative_path": "new results/nested",  # the autouse fixture chdirs into tmp_path
        "trailing_slash": f"{folder}/",
    }[spelling]
    store = open_store(url)
    assert isinstance(store, LocalStore)
    assert folder.is_dir()
    assert store.url == folder.as_uri()
    store.put("k.npy", b"1")
    assert (folder / "k.npy").read_bytes() == b"1"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "unsupported storage URL"),
        ("ftp://host/dir", "unsupported storage URL"),
        ("https://bucket.example.com/x", "unsupported storage URL"),
        ("gs://bucket", "unsupported storage URL"),
        ("s3://", "names no bucket"),
        ("file://fileserver/share", "host"),
        ("memory://name/with/path", "name only"),
        ("memory://", "memory store name"),
    ],
)
def test_open_store_refuses_other_urls_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url)


def test_the_refusal_lists_the_supported_schemes() -> None:
    with pytest.raises(ValueError, match=r"file:///.*s3://bucket\[/prefix\].*memory://name"):
        open_store("gs://bucket")


def test_memory_stores_of_the_same_name_share_their_objects() -> None:
    name = f"shared-{uuid.uuid4().hex}"
    open_store(f"memory://{name}").put("k", b"v")
    assert open_store(f"memory://{name}").get("k") == b"v"
    assert not open_store(f"memory://other-{name}").exists("k")


# ---- read_uri / list_uri on paths and URIs no store wrote --------------------------------------


def test_read_uri_reads_plain_paths_and_file_uris(tmp_path: Path) -> None:
    path = tmp_path / "a dir" / "img #1.jpg"
    path.parent.mkdir()
    path.write_bytes(b"jpeg bytes")
    assert read_uri(str(path)) == b"jpeg bytes"
    assert read_uri(path.as_uri()) == b"jpeg bytes"
    assert read_uri("a dir/img #1.jpg") == b"jpeg bytes"  # relative to the working directory


@pytest.mark.parametrize("target", ["missing_file", "directory"])
def test_read_uri_of_a_path_without_a_file_is_not_found(tmp_path: Path, target: str) -> None:
    path = tmp_path / "missing.jpg" if target == "missing_file" else tmp_path
    with pytest.raises(NotFoundError, match=str(path)):
        read_uri(str(path))


@pytest.mark.parametrize(
    "uri", ["ftp://host/x.jpg", "https://example.com/x.jpg", "s3://bucket", "s3://bucket/", "memory://x", ""]
)
def test_read_uri_refuses_uris_that_name_no_readable_object(uri: str) -> None:
    with pytest.raises(ValueError, match="use"):
        read_uri(uri)


def test_read_uri_keeps_s3_keys_with_url_special_characters(s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}")
    uri = store.put("odd name?v=1#frag.jpg", b"odd")
    assert uri == f"s3://{s3_bucket}/odd name?v=1#frag.jpg"
    assert read_uri(uri) == b"odd"
    assert list_uri(f"s3://{s3_bucket}/odd") == [uri]


def test_list_uri_lists_local_files_recursively_under_a_folder(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for relative in ["cats/1.jpg", "cats/2.jpg", "dogs/1.jpg"]:
        (images / relative).parent.mkdir(parents=True, exist_ok=True)
        (images / relative).write_bytes(relative.encode())
    (tmp_path / "images-not-these.txt").write_bytes(b"")
    expected = [(images / r).as_uri() for r in ["cats/1.jpg", "cats/2.jpg", "dogs/1.jpg"]]
    assert list_uri(images.as_uri() + "/") == expected
    assert list_uri(f"{images}/") == expected
    assert list_uri("images/") == expected
    assert list_uri(f"{images}/cats/") == expected[:2]
    assert list_uri(f"{images}/nothing-here/") == []


def test_list_uri_of_an_s3_prefix_returns_absolute_uris(s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/data")
    for key in ["img/b.jpg", "img/a.jpg", "other/c.jpg"]:
        store.put(key, b"x")
    assert list_uri(f"s3://{s3_bucket}/data/img/") == [
        f"s3://{s3_bucket}/data/img/a.jpg",
        f"s3://{s3_bucket}/data/img/b.jpg",
    ]
    assert len(list_uri(f"s3://{s3_bucket}")) == 3
