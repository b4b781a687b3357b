"""Local files are read only inside the allowed roots: hostile paths, links and races, on a real disk.

Every case goes through ``DefaultFetcher`` (what the worker calls) with the roots a local run gets
by default: the dataset's folder. The URIs are spelled as the producer stores them (absolute
``file://`` URIs, ``..`` folded, links not followed). Whether a refused file was opened is observed
with a Python audit hook on ``open`` events, not by mocking ``os.open``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import ImageError, ImageFetchRefusedError
from common.fetch import DefaultFetcher, FetchPolicy
from common.local_files import FileRoots
from common.settings import Settings

PICTURE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # the fetcher does not decode: any bytes do
SECRET = b"\x89PNG\r\n\x1a\n secret picture outside the roots"

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], str | bytes | os.PathLike):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # hooks cannot be removed; it records only inside ``opened_files``


@pytest.fixture
def opened_files() -> Iterator[list[str]]:
    """Every path this process opens while the test runs."""
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """data/ (the dataset folder: images/, images/sub/, links) and other/ beside it (outside)."""
    data, other = tmp_path / "data", tmp_path / "other"
    (data / "images" / "sub").mkdir(parents=True)
    other.mkdir()
    (data / "images" / "cat.png").write_bytes(PICTURE)
    (data / "images" / "sub" / "dog.png").write_bytes(PICTURE)
    (other / "secret.png").write_bytes(SECRET)
    (data / "images" / "passwd.png").symlink_to("/etc/passwd")
    (data / "images" / "other.png").symlink_to(other / "secret.png")
    (data / "images" / "elsewhere").symlink_to(other, target_is_directory=True)
    (data / "images" / "alias.png").symlink_to("sub/dog.png")  # a link that stays inside: fine
    return data


def _uri(data: Path, cell: str) -> str:
    """What the producer stores for a CSV cell: absolute, ``..`` folded, links untouched."""
    if "://" in cell:
        return cell
    return Path(os.path.normpath(data / cell)).as_uri()


@pytest.mark.parametrize(
    ("cell", "through_link"),
    [
        ("../../../../../../../../etc/passwd", False),
        ("images/../../x/../../../../../../etc/hostname", False),
        ("images/passwd.png", True),
        ("file:///etc/passwd", False),
        ("/etc/hostname", False),
        ("../other/secret.png", False),  # a valid picture outside the roots must not be read either
        ("images/other.png", True),
        ("images/elsewhere/secret.png", True),
    ],
)
def test_paths_outside_the_dataset_folder_are_refused_without_being_opened(
    tree: Path, opened_files: list[str], cell: str, through_link: bool
) -> None:
    fetcher = DefaultFetcher(FetchPolicy(file_roots=(tree,)))
    uri = _uri(tree, cell)
    with pytest.raises(ImageFetchRefusedError) as refused:
        fetcher.fetch(uri)
    message = str(refused.value)
    assert "VITSCOPE_FILE_ROOTS" in message
    assert ("through a symbolic link" in message) == through_link
    assert "root:" not in message
    assert "secret" not in message.replace(uri, "")
    assert opened_files == []


def test_a_refusal_does_not_tell_whether_the_file_exists(tree: Path) -> None:
    fetcher = DefaultFetcher(FetchPolicy(file_roots=(tree,)))
    messages = []
    for name in ("secret.png", "no-such-file.png"):
        uri = (tree.parent / "other" / name).as_uri()
        with pytest.raises(ImageFetchRefusedError) as refused:
            fetcher.fetch(uri)
        messages.append(str(refused.value).replace(uri, "URI"))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("cell", ["images/cat.png", "images/sub/dog.png", "images/alias.png"])
def test_files_inside_the_dataset_folder_are_read(tree: Path, opened_files: list[str], cell: str) -> None:
    assert DefaultFetcher(FetchPolicy(file_roots=(tree,))).fetch(_uri(tree, cell)) == PICTURE
    assert opened_files  # really read from disk


def test_roots_from_the_setting_allow_exactly_their_folders(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VITSCOPE_FILE_ROOTS", f"{tree.parent / 'other'}:{tree / 'images' / 'sub'}")
    fetcher = DefaultFetcher(FetchPolicy.from_settings(Settings()))
    assert fetcher.fetch(str(tree.parent / "other" / "secret.png")) == SECRET
    assert fetcher.fetch((tree / "images" / "sub" / "dog.png").as_uri()) == PICTURE
    with pytest.raises(ImageFetchRefusedError, match="VITSCOPE_FILE_ROOTS"):
        fetcher.fetch(str(tree / "images" / "cat.png"))


def test_without_roots_no_local_file_is_read(tree: Path, opened_files: list[str]) -> None:
    with pytest.raises(ImageFetchRefusedError, match=r"reads no local files .*s3://.*VITSCOPE_FILE_ROOTS"):
        DefaultFetcher().fetch((tree / "images" / "cat.png").as_uri())
    assert opened_files == []


def test_a_file_swapped_for_a_link_after_the_check_is_not_followed(tree: Path) -> None:
    roots = FileRoots([tree])
    target = tree / "images" / "cat.png"
    checked = roots.check(target.as_uri(), target)
    target.unlink()
    target.symlink_to(tree.parent / "other" / "secret.png")  # the attacker wins the race
    with pytest.raises(ImageFetchRefusedError, match="symbolic link appeared"):
        roots.read(checked, max_bytes=1 << 20)


def test_a_folder_swapped_for_a_link_after_the_check_is_not_followed(tree: Path) -> None:
    roots = FileRoots([tree])
    target = tree / "images" / "sub" / "dog.png"
    checked = roots.check(target.as_uri(), target)
    (tree.parent / "other" / "dog.png").write_bytes(SECRET)
    (tree / "images" / "sub").rename(tree / "images" / "sub.old")
    (tree / "images" / "sub").symlink_to(tree.parent / "other", target_is_directory=True)
    with pytest.raises(ImageFetchRefusedError, match="symbolic link appeared"):
        roots.read(checked, max_bytes=1 << 20)


def test_a_fifo_inside_the_roots_is_refused_without_blocking(tree: Path) -> None:
    fifo = tree / "images" / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageFetchRefusedError, match="not a regular file"):
        DefaultFetcher(FetchPolicy(file_roots=(tree,))).fetch(str(fifo))


def test_a_missing_file_inside_the_roots_is_an_image_error(tree: Path) -> None:
    with pytest.raises(ImageError, match="no such file") as caught:
        DefaultFetcher(FetchPolicy(file_roots=(tree,))).fetch(str(tree / "images" / "nope.png"))
    assert not isinstance(caught.value, ImageFetchRefusedError)


def test_roots_given_through_links_are_resolved(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "data-link").symlink_to(tree, target_is_directory=True)
    fetcher = DefaultFetcher(FetchPolicy(file_roots=(tmp_path / "data-link",)))
    assert fetcher.fetch(str(tree / "images" / "cat.png")) == PICTURE
    assert fetcher.fetch(str(tmp_path / "data-link" / "images" / "cat.png")) == PICTURE
    with pytest.raises(ImageFetchRefusedError):
        fetcher.fetch(str(tmp_path / "other" / "secret.png"))


# ---- hard links and the results folder ---------------------------------------------------------------


def test_a_hard_link_to_a_file_outside_the_roots_is_refused_unopened_beyond_its_fstat(tree: Path) -> None:
    """A hard link is the outside file under a second name: no path check sees it, the link count does."""
    os.link(tree.parent / "other" / "secret.png", tree / "images" / "innocent.png")
    with pytest.raises(ImageFetchRefusedError, match=r"2 hard links.*VITSCOPE_ALLOW_HARD_LINKS") as refused:
        DefaultFetcher(FetchPolicy(file_roots=(tree,))).fetch(str(tree / "images" / "innocent.png"))
    assert "secret" not in str(refused.value)


def test_hard_links_are_read_when_the_setting_allows_them(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.link(tree / "images" / "cat.png", tree / "images" / "cat-again.png")  # a deduplicated tree
    with pytest.raises(ImageFetchRefusedError, match="hard links"):
        DefaultFetcher(FetchPolicy(file_roots=(tree,))).fetch(str(tree / "images" / "cat.png"))
    monkeypatch.setenv("VITSCOPE_FILE_ROOTS", str(tree))
    monkeypatch.setenv("VITSCOPE_ALLOW_HARD_LINKS", "true")
    fetcher = DefaultFetcher(FetchPolicy.from_settings(Settings()))
    assert fetcher.fetch(str(tree / "images" / "cat.png")) == PICTURE
    assert fetcher.fetch(str(tree / "images" / "cat-again.png")) == PICTURE


def test_the_results_folder_is_never_read_as_an_input_even_inside_a_root(
    tree: Path, opened_files: list[str]
) -> None:
    """A local results store under a file root holds other batches' crops: a row must not read them."""
    results = tree / "results"
    (results / "artifacts" / "ab").mkdir(parents=True)
    (results / "artifacts" / "ab" / "input.png").write_bytes(SECRET)
    opened_files.clear()  # the write above
    fetcher = DefaultFetcher(FetchPolicy(file_roots=(tree,), results_url=results.as_uri()))
    for uri in (
        (results / "artifacts" / "ab" / "input.png").as_uri(),
        str(tree / "images/../results/artifacts/ab/input.png"),
    ):
        with pytest.raises(ImageFetchRefusedError, match="results store"):
            fetcher.fetch(uri)
    assert opened_files == []
    assert fetcher.fetch(str(tree / "images" / "cat.png")) == PICTURE
