"""Reading a dataset CSV into rows, with every problem reported by line before anything is enqueued.

The format: a header row; ``image_uri`` is required; ``model`` (one model name, or several separated
by ``;``), the target column (``target`` unless ``--target-column`` says otherwise) and ``id`` are
optional; every other column is kept as the job's metadata. Image URIs may be ``s3://``,
``http(s)://``, ``file://`` or plain paths, which are relative to the CSV's folder and are stored as
absolute ``file://`` URIs so any process can find them.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import InvalidDatasetError, VitscopeError

__all__ = ["Dataset", "DatasetRow", "read_dataset"]

IMAGE_COLUMN = "image_uri"
MODEL_COLUMN = "model"
ID_COLUMN = "id"
DEFAULT_TARGET_COLUMN = "target"
REMOTE_SCHEMES = ("s3", "http", "https", "file")
# Problems listed before giving up: enough to fix a file in one pass, not a wall of text.
MAX_REPORTED = 20


@dataclass(frozen=True)
class DatasetRow:
    line: int  # 1-based line where the record starts (the header is line 1)
    image_uri: str
    models: tuple[str, ...]  # from the row's `model` cell; empty = the submit's --models
    row_id: str | None = None
    target: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Dataset:
    path: Path
    columns: tuple[str, ...]
    rows: tuple[DatasetRow, ...]


def read_dataset(
    path: str | Path,
    *,
    target_column: str | None = None,
    check_model: Callable[[str], object] | None = None,
) -> Dataset:
    """Parse and validate the whole file; raise one InvalidDatasetError listing every bad line.

    ``check_model`` is called with each model name found in a ``model`` cell and raises a
    VitscopeError for names it does not know, so unknown models are reported with their line.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise InvalidDatasetError("file not found", path=str(path)) from None
    except UnicodeDecodeError as exc:
        raise InvalidDatasetError(f"not UTF-8 text (byte {exc.start})", path=str(path)) from None
    if not text.strip():
        raise InvalidDatasetError(
            "the file is empty; expected a header row with an image_uri column", path=str(path)
        )

    records = _records(text, str(path))
    header_line, header = next(records)
    columns = tuple(name.strip() for name in header)
    target_column = target_column or DEFAULT_TARGET_COLUMN
    _check_header(
        columns, target_column, header_line, str(path), explicit_target=target_column != DEFAULT_TARGET_COLUMN
    )

    base_dir = path.resolve().parent
    errors: list[tuple[int, str]] = []
    rows: list[DatasetRow] = []
    for line, values in records:
        if not any(value.strip() for value in values):
            continue  # blank lines are harmless
        if len(values) != len(columns):
            errors.append((line, f"expected {len(columns)} fields as in the header, found {len(values)}"))
            continue
        cells = {name: value.strip() for name, value in zip(columns, values, strict=True)}
        try:
            rows.append(_row(line, cells, target_column, base_dir, check_model))
        except VitscopeError as exc:
            errors.append((line, str(exc)))
        if len(errors) >= MAX_REPORTED:
            break
    if errors:
        listing = "\n".join(f"  line {line}: {message}" for line, message in errors)
        more = f" (stopped at the first {MAX_REPORTED})" if len(errors) >= MAX_REPORTED else ""
        raise InvalidDatasetError(
            f"{len(errors)} invalid row(s){more}; nothing was submitted:\n{listing}",
            line=errors[0][0],
            path=str(path),
        )
    if not rows:
        raise InvalidDatasetError("no data rows after the header", line=header_line, path=str(path))
    return Dataset(path=path, columns=columns, rows=tuple(rows))


def _records(text: str, path: str) -> Iterator[tuple[int, list[str]]]:
    """(starting line, fields) per CSV record; quoted fields may span lines."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise InvalidDatasetError(f"malformed CSV: {exc}", line=reader.line_num, path=path) from None
        yield start, values
        start = reader.line_num + 1


def _check_header(
    columns: tuple[str, ...], target_column: str, line: int, path: str, *, explicit_target: bool
) -> None:
    if IMAGE_COLUMN not in columns:
        found = ", ".join(repr(c) for c in columns)
        raise InvalidDatasetError(
            f"the header has no {IMAGE_COLUMN!r} column (found: {found})", line=line, path=path
        )
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise InvalidDatasetError(
            f"duplicate column name(s) in the header: {duplicates}", line=line, path=path
        )
    if "" in columns:
        raise InvalidDatasetError("the header has an empty column name", line=line, path=path)
    if explicit_target and target_column not in columns:
        raise InvalidDatasetError(
            f"--target-column {target_column!r} is not in the header", line=line, path=path
        )


def _row(
    line: int,
    cells: dict[str, str],
    target_column: str,
    base_dir: Path,
    check_model: Callable[[str], object] | None,
) -> DatasetRow:
    image_uri = cells[IMAGE_COLUMN]
    if not image_uri:
        raise InvalidDatasetError("empty image_uri")
    models = tuple(name.strip() for name in cells.get(MODEL_COLUMN, "").split(";") if name.strip())
    if check_model is not None:
        for name in models:
            check_model(name)
    metadata = {
        k: v for k, v in cells.items() if k not in (IMAGE_COLUMN, MODEL_COLUMN, ID_COLUMN, target_column)
    }
    return DatasetRow(
        line=line,
        image_uri=_absolute_uri(image_uri, base_dir),
        models=models,
        row_id=cells.get(ID_COLUMN) or None,
        target=cells.get(target_column) or None,
        metadata=metadata,
    )


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(//([^/?#]*))?")


def _absolute_uri(value: str, base_dir: Path) -> str:
    match = _SCHEME.match(value)
    scheme = match.group(1).lower() if match else ""
    if scheme in REMOTE_SCHEMES:
        if scheme in ("s3", "http", "https") and not (match and match.group(3)):
            raise InvalidDatasetError(f"image_uri {value!r} has no host or bucket")
        return value
    if len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise InvalidDatasetError(
            f"image_uri {value!r}: unsupported scheme {scheme!r} (use s3://, http(s)://, file:// or a path)"
        )
    path = Path(value).expanduser()
    return (path if path.is_absolute() else base_dir / path).resolve().as_uri()
