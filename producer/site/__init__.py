"""``producer report``: a batch as a static, self-contained website of image cards and a summary.

``build.write_report`` writes the pages; ``selection`` reads what goes in from the database as a
stream; ``present`` decides what each card says; ``sections`` builds the summary tables;
``links`` decides how pages point at the pictures. Templates and assets are package data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from producer.site.links import LinkMode

if TYPE_CHECKING:
    from producer.site.build import ReportOptions, ReportSummary, write_report

__all__ = ["LinkMode", "ReportOptions", "ReportSummary", "write_report"]


def __getattr__(name: str) -> object:
    """The page builder on first use: ``producer`` imports ``links`` for its options, and every
    command would otherwise load the templates' and tables' modules at start-up."""
    if name in ("ReportOptions", "ReportSummary", "write_report"):
        from producer.site import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
