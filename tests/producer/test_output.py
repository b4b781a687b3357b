"""Result files: the CSV export is safe to open in a spreadsheet (OWASP's CSV-injection rule)."""

from __future__ import annotations

import csv
import io

import pytest

from common.db.reports import RESULT_COLUMNS
from producer.output import spreadsheet_safe, write_csv


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("=1+1", "'=1+1"),
        ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1:A2)", "'@SUM(A1:A2)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("cat", "cat"),
        ("a=b", "a=b"),
        ("", ""),
        (-1.5, -1.5),  # numbers the database produced stay numbers
        (None, None),
    ],
)
def test_formula_like_text_is_prefixed_with_a_quote(value: object, expected: object) -> None:
    assert spreadsheet_safe(value) == expected


def _job(**fields: object) -> dict:
    base = {key: None for key in RESULT_COLUMNS}
    base |= {"predictions": [], "artifacts": {}, "metadata": {}, "row_number": 2, "state": "failed"}
    return base | fields


def test_written_rows_are_escaped_and_quoted() -> None:
    out = io.StringIO()
    jobs = [
        _job(
            row_id='=HYPERLINK("http://evil","x")',
            image_uri="s3://b/=x.png",
            error_message="no such file: -x",
        ),
        _job(row_id="plain, with comma", target="@home"),
    ]
    assert write_csv(jobs, out) == 2
    first, second = csv.DictReader(io.StringIO(out.getvalue()))
    assert first["row_id"] == '\'=HYPERLINK("http://evil","x")'
    assert first["image_uri"] == "s3://b/=x.png"  # only a leading character matters
    assert first["error_message"] == "no such file: -x"
    assert (second["row_id"], second["target"]) == ("plain, with comma", "'@home")


def test_csv_has_the_datasets_own_columns_after_the_result_columns() -> None:
    """json keeps a row's other CSV columns under ``metadata``; csv gives each its own column, renamed
    ``metadata.<name>`` when the name is already a result column."""
    out = io.StringIO()
    jobs = [
        _job(
            row_id="a", metadata={"site": "north", "state": "CA"}, artifacts={"rollout.png": "file:///r.png"}
        ),
        _job(row_id="b", metadata={"site": "south", "state": "=1+1"}, weights_source="timm hub: deit"),
    ]
    assert write_csv(jobs, out) == 2
    header = out.getvalue().splitlines()[0].split(",")
    assert header[: len(RESULT_COLUMNS)] == list(RESULT_COLUMNS)
    assert header[-2:] == ["site", "metadata.state"]
    first, second = csv.DictReader(io.StringIO(out.getvalue()))
    assert (first["state"], first["metadata.state"], first["rollout_png_uri"]) == (
        "failed",
        "CA",
        "file:///r.png",
    )
    assert (second["site"], second["metadata.state"], second["weights_source"]) == (
        "south",
        "'=1+1",
        "timm hub: deit",
    )
