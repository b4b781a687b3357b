"""Reading a dataset CSV into rows, with every problem reported by line before anything is enqueued.

The format: a header row; ``image_uri`` is required; ``model`` (one model name, or several separated
by ``;``), the target column (``target`` unless ``--target-column`` says otherwise) and ``id`` are
optional; every other column is kept as the job's metadata. Image URIs may be ``s3://``,
``http(s)://``, ``file://`` or plain paths, which are relative to the CSV's folder and are stored as
absolute ``file://`` URIs so any process can find them. Paths are made absolute without following
symbolic links: whether a path may be read is decided where it is read (``common.local_files``).

A file may have millions of rows, so it is read as a stream, twice: ``scan_dataset`` validates every
row and keeps only counts, the set of model names and a SHA-256 digest of the bytes it read;
``iter_rows`` then parses it again for the caller to insert row by row, digesting the bytes again.
Memory does not grow with the file. If the file changes between the two passes — any byte, even
with the same header and row count (a row's model swapped for another valid one, a file replaced),
``iter_rows`` raises once it has read the file and the caller's transaction rolls back: nothing is
submitted, and no row that pass 1 did not validate is ever run.

What the CSV module already gets right, and the tests hold it to: a UTF-8 byte-order mark is
dropped, CRLF and LF line ends are both fine, a quoted field may span lines (a row's line number is
the physical line where its record starts, as an editor shows it), and cells are kept as given —
``=1+1`` or ``@SUM(A1)`` is data here; only the CSV files the producer writes escape such cells
for spreadsheets (``producer.spreadsheet``). A NUL character is the one thing no cell may hold
(PostgreSQL cannot store it): it is reported with its line and column like any other problem.

Two metadata columns are checked because the localization metrics read them (``docs/metrics.md``):
``bbox`` (``x0,y0,x1,y1`` in the original image's pixels, ASCII decimal numbers, quoted in the CSV)
and ``mask_uri`` (a mask image, located like ``image_uri`` and stored as an absolute URI).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from common.errors import InvalidDatasetError, VitscopeError

__all__ = ["CheckS3", "Dataset", "DatasetRow", "DatasetScan", "iter_rows", "read_dataset", "scan_dataset"]

IMAGE_COLUMN = "image_uri"
MODEL_COLUMN = "model"
ID_COLUMN = "id"
DEFAULT_TARGET_COLUMN = "target"
BBOX_COLUMN = "bbox"
MASK_COLUMN = "mask_uri"
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


@dataclass(frozen=True)
class DatasetScan:
    """What the validating pass learned about a dataset file, in memory that does not grow with it."""

    path: Path
    columns: tuple[str, ...]
    target_column: str
    rows: int
    models: frozenset[str]  # every name found in `model` cells
    rows_without_model: int  # rows that take the submit's --models
    local_rows: int  # rows naming a local file (file:// or a path)
    sha256: str = ""  # of the bytes validated: the second pass must read the very same
    # Rows whose s3:// image or mask the given S3 check refuses, and the first reason found.
    refused_s3_rows: int = 0
    refused_s3_example: str | None = None


CheckModel = Callable[[str], object]
# Why an s3:// URI would be refused by the workers' S3 sources, or None (``S3Sources.refusal``).
CheckS3 = Callable[[str], str | None]
# A check of a whole parsed row (raises VitscopeError), e.g. its local path against the file roots.
CheckRow = Callable[[DatasetRow], object]


def scan_dataset(
    path: str | Path,
    *,
    target_column: str | None = None,
    check_model: CheckModel | None = None,
    check_s3: CheckS3 | None = None,
    check_row: CheckRow | None = None,
) -> DatasetScan:
    """Validate the whole file, streaming; raise one InvalidDatasetError listing every bad line.

    ``check_model`` is called with each model name found in a ``model`` cell and raises a
    VitscopeError for names it does not know, so unknown models are reported with their line;
    ``check_row`` likewise with each parsed row. ``check_s3`` judges each ``s3://`` image and mask;
    rows it refuses are counted, not rejected: the workers' own settings decide, and this is only
    what the submitting machine can tell.
    """
    path = Path(path)
    target_column = target_column or DEFAULT_TARGET_COLUMN
    errors: list[tuple[int, str]] = []
    rows = rows_without_model = local_rows = refused_s3_rows = 0
    refused_s3_example: str | None = None
    models: set[str] = set()
    digest = hashlib.sha256()
    with _parsed(path, target_column, check_model, digest) as (columns, header_line, parsed):
        for line, row in parsed:
            if check_row is not None and not isinstance(row, str):
                try:
                    check_row(row)
                except VitscopeError as exc:
                    row = str(exc)
            if isinstance(row, str):
                errors.append((line, row))
                if len(errors) >= MAX_REPORTED:
                    break
                continue
            rows += 1
            models.update(row.models)
            rows_without_model += not row.models
            local_rows += row.image_uri.startswith("file:")
            if check_s3 is not None:
                reason = _s3_refusal(row, check_s3)
                refused_s3_rows += reason is not None
                refused_s3_example = refused_s3_example or reason
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
    return DatasetScan(
        path=path,
        columns=columns,
        target_column=target_column,
        rows=rows,
        models=frozenset(models),
        rows_without_model=rows_without_model,
        local_rows=local_rows,
        sha256=digest.hexdigest(),
        refused_s3_rows=refused_s3_rows,
        refused_s3_example=refused_s3_example,
    )


def _s3_refusal(row: DatasetRow, check_s3: CheckS3) -> str | None:
    """The first refusal of the row's ``s3://`` image or mask, or ``None``."""
    for uri in (row.image_uri, row.metadata.get(MASK_COLUMN) or ""):
        if uri[:5].lower() == "s3://":
            reason = check_s3(uri)
            if reason is not None:
                return reason
    return None


def iter_rows(scan: DatasetScan) -> Iterator[DatasetRow]:
    """The rows of a scanned file, parsed again as a stream (the second pass).

    Raises InvalidDatasetError if the file no longer matches its scan — edited or replaced in
    between, any byte of it — so that a caller inserting inside one transaction rolls it back. The
    header and row count are checked as they are met; the digest of every byte once the file is read.
    """
    count = 0
    digest = hashlib.sha256()
    with _parsed(scan.path, scan.target_column, None, digest) as (columns, _, parsed):
        if columns != scan.columns:
            raise _changed(scan.path)
        for line, row in parsed:
            if isinstance(row, str):
                raise InvalidDatasetError(
                    f"{row} (the file changed while it was submitted)", line=line, path=str(scan.path)
                )
            count += 1
            yield row
    if count != scan.rows or (scan.sha256 and digest.hexdigest() != scan.sha256):
        raise _changed(scan.path)


def read_dataset(
    path: str | Path,
    *,
    target_column: str | None = None,
    check_model: CheckModel | None = None,
) -> Dataset:
    """Validate and read the whole file into memory: for small files and tests; submit streams."""
    scan = scan_dataset(path, target_column=target_column, check_model=check_model)
    return Dataset(path=scan.path, columns=scan.columns, rows=tuple(iter_rows(scan)))


def _changed(path: Path) -> InvalidDatasetError:
    return InvalidDatasetError(
        "the file changed while it was submitted; nothing was submitted", path=str(path)
    )


ParsedRows = Iterator[tuple[int, DatasetRow | str]]


class _DigestingReader(io.RawIOBase):
    """A binary file that feeds every byte read through it to ``digest``: what the CSV reader saw,
    byte for byte, whatever the text decoding made of it."""

    def __init__(self, raw: IO[bytes], digest: hashlib._Hash) -> None:
        self.raw = raw
        self.digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        count = self.raw.readinto(buffer)  # type: ignore[attr-defined]
        if count:
            self.digest.update(memoryview(buffer)[:count])
        return count

    def close(self) -> None:
        self.raw.close()
        super().close()


def _open_text(path: Path, digest: hashlib._Hash | None) -> IO[str]:
    if digest is None:
        return path.open(encoding="utf-8-sig", newline="")
    raw = io.BufferedReader(_DigestingReader(path.open("rb", buffering=0), digest))
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


@contextmanager
def _parsed(
    path: Path, target_column: str, check_model: CheckModel | None, digest: hashlib._Hash | None = None
) -> Iterator[tuple[tuple[str, ...], int, ParsedRows]]:
    """Open the file, check its header, and give (columns, header line, rows or per-line problems);
    every byte read goes through ``digest`` when one is given."""
    try:
        handle = _open_text(path, digest)
    except FileNotFoundError:
        raise InvalidDatasetError("file not found", path=str(path)) from None
    except IsADirectoryError:
        raise InvalidDatasetError("a folder, not a CSV file", path=str(path)) from None
    with handle:
        records = _records(handle, str(path))
        first = next(records, None)
        if first is None:
            raise InvalidDatasetError(
                "the file is empty; expected a header row with an image_uri column", path=str(path)
            )
        header_line, header = first
        columns = tuple(name.strip() for name in header)
        if _nul_column(list(columns), columns) is not None:
            raise InvalidDatasetError(
                "a NUL character (\\x00) in the header: remove it", line=header_line, path=str(path)
            )
        _check_header(
            columns,
            target_column,
            header_line,
            str(path),
            explicit_target=target_column != DEFAULT_TARGET_COLUMN,
        )
        reader = _RowReader(columns, target_column, path.resolve().parent, check_model)
        yield columns, header_line, reader.rows(records)


class _RowReader:
    """Turns one file's records into rows; column positions are worked out once per file, since
    this runs twice per row of files with millions of rows."""

    def __init__(
        self, columns: tuple[str, ...], target_column: str, base_dir: Path, check_model: CheckModel | None
    ) -> None:
        def position(name: str) -> int | None:
            return columns.index(name) if name in columns else None

        self.columns = columns
        self.width = len(columns)
        self.image = columns.index(IMAGE_COLUMN)
        self.model = position(MODEL_COLUMN)
        self.row_id = position(ID_COLUMN)
        self.target = position(target_column)
        special = {IMAGE_COLUMN, MODEL_COLUMN, ID_COLUMN, target_column}
        self.metadata = [(index, name) for index, name in enumerate(columns) if name not in special]
        self.base_dir = base_dir
        self.check_model = check_model

    def rows(self, records: Iterator[tuple[int, list[str]]]) -> ParsedRows:
        for line, values in records:
            nul = _nul_column(values, self.columns)
            if nul is not None:
                yield line, nul
                continue
            if len(values) != self.width:
                yield line, f"expected {self.width} fields as in the header, found {len(values)}"
                continue
            try:
                yield line, self._row(line, values)
            except VitscopeError as exc:
                yield line, str(exc)

    def _row(self, line: int, values: list[str]) -> DatasetRow:
        image_uri = values[self.image].strip()
        if not image_uri:
            raise InvalidDatasetError("empty image_uri")
        models: tuple[str, ...] = ()
        if self.model is not None and values[self.model].strip():
            models = tuple(name.strip() for name in values[self.model].split(";") if name.strip())
            if self.check_model is not None:
                for name in models:
                    self.check_model(name)
        metadata = {name: values[index].strip() for index, name in self.metadata}
        if metadata.get(BBOX_COLUMN):
            metadata[BBOX_COLUMN] = _bbox(metadata[BBOX_COLUMN])
        if metadata.get(MASK_COLUMN):
            metadata[MASK_COLUMN] = _absolute_uri(metadata[MASK_COLUMN], self.base_dir, column=MASK_COLUMN)
        return DatasetRow(
            line=line,
            image_uri=_absolute_uri(image_uri, self.base_dir),
            models=models,
            row_id=_cell(values, self.row_id),
            target=_cell(values, self.target),
            metadata=metadata,
        )


def _nul_column(values: list[str], columns: tuple[str, ...]) -> str | None:
    """The problem with a record holding a NUL character, or ``None``.

    PostgreSQL cannot store NUL in text (the insert failed with a ``DataError`` traceback) while
    SQLite stored it; no image URI, id or label holds one legitimately. So it is refused here, before
    anything is written, on both databases alike, with its line and column.
    """
    for index, value in enumerate(values):
        if "\x00" in value:
            column = repr(columns[index]) if index < len(columns) else f"number {index + 1}"
            return f"a NUL character (\\x00) in column {column}: remove it (binary data is not text)"
    return None


def _cell(values: list[str], index: int | None) -> str | None:
    """The trimmed cell at ``index``; None for an absent column or an empty cell."""
    if index is None:
        return None
    return values[index].strip() or None


def _records(handle: IO[str], path: str) -> Iterator[tuple[int, list[str]]]:
    """(starting line, fields) per non-blank CSV record; quoted fields may span lines.

    ``line_num`` counts physical lines read, so a record's first line is one past the previous
    record's last; blank lines (harmless) are skipped but counted.
    """
    reader = csv.reader(handle, strict=True)
    start = 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise InvalidDatasetError(f"malformed CSV: {exc}", line=reader.line_num, path=path) from None
        except UnicodeDecodeError:
            raise InvalidDatasetError(
                f"not UTF-8 text (at or after line {reader.line_num + 1})", path=path
            ) from None
        if any(value.strip() for value in values):
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


# An ASCII decimal number, as documented: Python's float() also takes "1_0", Arabic-Indic digits
# ("١٠") and full-width ones, which a reader of the CSV (or another tool reading it) sees otherwise.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def _bbox(value: str) -> str:
    """Check ``x0,y0,x1,y1`` (pixels of the original image, ``x0 < x1``, ``y0 < y1``, none negative):
    four ASCII decimal numbers."""
    parts = [part.strip() for part in value.split(",")]
    numbers = [float(part) for part in parts] if all(_DECIMAL.fullmatch(part) for part in parts) else []
    if len(numbers) != 4 or not all(math.isfinite(n) for n in numbers):
        raise InvalidDatasetError(f"bbox {value!r} must be four numbers x0,y0,x1,y1 (quote the cell)")
    x0, y0, x1, y1 = numbers
    if min(numbers) < 0 or x0 >= x1 or y0 >= y1:
        raise InvalidDatasetError(f"bbox {value!r} must have 0 <= x0 < x1 and 0 <= y0 < y1")
    return ",".join(parts)


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(//([^/?#]*))?")


def _absolute_uri(value: str, base_dir: Path, *, column: str = IMAGE_COLUMN) -> str:
    match = _SCHEME.match(value)
    scheme = match.group(1).lower() if match else ""
    if scheme in REMOTE_SCHEMES:
        if scheme in ("s3", "http", "https") and not (match and match.group(3)):
            raise InvalidDatasetError(f"{column} {value!r} has no host or bucket")
        return value
    if len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise InvalidDatasetError(
            f"{column} {value!r}: unsupported scheme {scheme!r} (use s3://, http(s)://, file:// or a path)"
        )
    path = Path(value).expanduser()
    # normpath, not resolve(): ".." is folded but no link is followed; the reader judges the real path.
    return Path(os.path.normpath(path if path.is_absolute() else base_dir / path)).as_uri()
