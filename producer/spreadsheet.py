"""Cells of the CSV files the producer writes, made safe to open in a spreadsheet.

OWASP's "CSV Injection": a spreadsheet treats a cell that starts with ``=``, ``+``, ``-`` or ``@``
as a formula (a tab or carriage return in front can hide one), so ``=HYPERLINK("http://…")`` in a
dataset's id column, or as the name of a models-file entry, would run on the machine of whoever
opens the results. Every CSV the producer writes (``results --format csv``, ``compare --format
csv``) passes its rows through ``spreadsheet_row``: one rule, one place. The database and the JSON
formats keep values exactly as given; only files meant for spreadsheets are escaped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["FORMULA_PREFIXES", "spreadsheet_row", "spreadsheet_safe"]

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell that starts like a formula, prefixed with a single quote (OWASP's rule), else as is.

    Only text is touched: numbers the database produced (a negative duration, a negative mean) stay
    numbers. Quotes and separators inside cells are escaped by the csv module's quoting.
    """
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def spreadsheet_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Every cell of ``row`` through ``spreadsheet_safe``."""
    return {key: spreadsheet_safe(value) for key, value in row.items()}
