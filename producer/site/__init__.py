"""``producer report``: a batch as a static, self-contained website of image cards and a summary.

``build.write_report`` writes the pages; ``selection`` reads what goes in from the database as a
stream; ``present`` decides what each card says; ``sections`` builds the summary tables;
``links`` decides how pages point at the pictures. Templates and assets are package data.
"""

from __future__ import annotations

from producer.site.build import ReportOptions, ReportSummary, write_report
from producer.site.links import LinkMode

__all__ = ["LinkMode", "ReportOptions", "ReportSummary", "write_report"]
