"""``producer compare``: the faithfulness scores of a batch per model × method × metric, with 95 % intervals.

Three formats of the same rows (``common.db.metrics.MetricSummary``): a terminal table grouped by
model and metric, with which direction is better and the random baseline beside the methods; CSV;
and JSON, a list of objects with keys ``model, method, metric, n, mean, ci_low, ci_high``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import IO

from rich.console import Console
from rich.table import Table

from common.db.metrics import MetricSummary
from common.metrics import RANDOM_METHOD, Metric
from producer.spreadsheet import spreadsheet_row
from producer.terminal_text import terminal_literal as literal

__all__ = ["COMPARE_COLUMNS", "compare_table", "write_compare_csv", "write_compare_json"]

COMPARE_COLUMNS = ("model", "method", "metric", "n", "mean", "ci_low", "ci_high")

# How to read each metric (docs/metrics.md).
BETTER: dict[str, str] = {
    Metric.DELETION_AUC: "lower is better",
    Metric.INSERTION_AUC: "higher is better",
    Metric.ENTROPY: "lower = more concentrated",
    Metric.POINTING_GAME: "higher is better",
    Metric.MASS_INSIDE: "higher is better",
    Metric.SANITY_SPEARMAN: "lower = more model-dependent",
}


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def compare_table(summaries: Sequence[MetricSummary], console: Console) -> None:
    """One table per model: a block of rows per metric, the random baseline last in each block."""
    if not summaries:
        console.print("no metrics in this batch (submit with --metrics)")
        return
    models = sorted({s.model for s in summaries})
    for model in models:
        table = Table(title=literal(model), title_justify="left", show_header=True)
        for column, justify in (
            ("metric", "left"),
            ("method", "left"),
            ("n", "right"),
            ("mean", "right"),
            ("95% CI", "right"),
        ):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        rows = [s for s in summaries if s.model == model]
        previous = None
        for row in rows:
            if previous is not None and row.metric != previous:
                table.add_section()
            first = row.metric != previous
            label = f"{literal(row.metric)}\n[dim]{BETTER.get(row.metric, '')}[/dim]" if first else ""
            method = literal(row.method)
            method = f"[dim]{method} (baseline)[/dim]" if row.method == RANDOM_METHOD else method
            interval = "-" if row.ci_low is None else f"[{_number(row.ci_low)}, {_number(row.ci_high)}]"
            table.add_row(label, method, str(row.n), _number(row.mean), interval)
            previous = row.metric
        console.print(table)


def write_compare_csv(summaries: Sequence[MetricSummary], handle: IO[str]) -> int:
    """One row per summary; a model (or method) named like a formula is written as text
    (``producer.spreadsheet``), as in every CSV the producer writes."""
    writer = csv.DictWriter(handle, fieldnames=COMPARE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for summary in summaries:
        writer.writerow(spreadsheet_row(asdict(summary)))
    return len(summaries)


def write_compare_json(summaries: Sequence[MetricSummary], handle: IO[str]) -> int:
    json.dump([asdict(summary) for summary in summaries], handle, indent=2)
    handle.write("\n")
    return len(summaries)
