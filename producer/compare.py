"""``producer compare``: the faithfulness scores of a batch per model × method × metric, with 95 % intervals
and each method's paired difference against a reference method (the random map unless ``--against``).

Three formats of the same rows (``common.db.metric_summaries.MetricSummary``): a terminal table grouped by
model and metric, with which direction is better and the random baseline beside the methods; CSV;
and JSON, a list of objects with keys ``model, method, metric, n, mean, ci_low, ci_high, interval``
and ``vs_<reference>_n, _mean, _ci_low, _ci_high, _p, _interval`` (``vs_random_…`` by default).
``interval`` names the mean's interval: ``t`` (Student t) or ``wilson`` (0/1 metrics). The paired
difference is ``method − reference`` per image, with its interval (``t``, or ``newcombe`` for 0/1
metrics) and Wilcoxon signed-rank p value; it is empty for the reference itself and where the
reference has no value.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import IO, Any

from rich.console import Console
from rich.table import Table

from common.db.metric_summaries import MetricSummary
from common.metric_settings import RANDOM_METHOD, Metric
from producer.spreadsheet import spreadsheet_row
from producer.terminal_text import terminal_literal as literal

__all__ = [
    "COMPARE_COLUMNS",
    "compare_columns",
    "compare_table",
    "method_label",
    "write_compare_csv",
    "write_compare_json",
]

COMPARE_COLUMNS = ("model", "method", "metric", "n", "mean", "ci_low", "ci_high", "interval")
_PAIRED_FIELDS = ("n", "mean", "ci_low", "ci_high", "p", "interval")

# How to read each metric (docs/metrics.md).
BETTER: dict[str, str] = {
    Metric.DELETION_AUC: "lower is better",
    Metric.INSERTION_AUC: "higher is better",
    Metric.ENTROPY: "lower = more concentrated",
    Metric.POINTING_GAME: "higher is better",
    Metric.MASS_INSIDE: "higher is better",
    Metric.SANITY_SPEARMAN: "lower = more model-dependent",
}


def compare_columns(against: str = RANDOM_METHOD) -> tuple[str, ...]:
    """The CSV header and JSON keys: the summary's, then ``vs_<against>_n, _mean, _ci_low, _ci_high, _p,
    _interval``."""
    return (*COMPARE_COLUMNS, *(f"vs_{against}_{field}" for field in _PAIRED_FIELDS))


def method_label(method: str, metric: str) -> str:
    """How a row names its method: the random map is the baseline, except for entropy, where it is
    the entropy of uniform noise (close to the maximum), not a chance level a method should beat."""
    if method != RANDOM_METHOD:
        return method
    return f"{method} (noise entropy)" if metric == Metric.ENTROPY else f"{method} (baseline)"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _difference(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def _p_value(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def compare_table(summaries: Sequence[MetricSummary], console: Console, against: str = RANDOM_METHOD) -> None:
    """One table per model: a block of rows per metric, the random baseline last in each block, and
    each method's paired difference against ``against``."""
    if not summaries:
        console.print("no metrics in this batch (submit with --metrics)")
        return
    models = sorted({s.model for s in summaries})
    for model in models:
        table = Table(
            title=literal(model),
            title_justify="left",
            show_header=True,
            caption=f"Δ = method − {against} on the same images: mean, 95% interval (t; Newcombe's "
            "paired score interval for 0/1 metrics), two-sided Wilcoxon signed-rank p. CI of the mean: "
            "t, or Wilson for 0/1 metrics. docs/metrics.md says how to read them.",
            caption_justify="left",
        )
        for column, justify in (
            ("metric", "left"),
            ("method", "left"),
            ("n", "right"),
            ("mean", "right"),
            ("95% CI", "right"),
            (f"Δ vs {against}", "right"),
            ("95% CI of Δ", "right"),
            ("p", "right"),
        ):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        rows = [s for s in summaries if s.model == model]
        previous = None
        for row in rows:
            if previous is not None and row.metric != previous:
                table.add_section()
            first = row.metric != previous
            reading = f"{BETTER.get(row.metric, '')}; {row.interval} interval"
            label = f"{literal(row.metric)}\n[dim]{reading}[/dim]" if first else ""
            method = literal(method_label(row.method, row.metric))
            if row.method == RANDOM_METHOD:
                method = f"[dim]{method}[/dim]"
            interval = "-" if row.ci_low is None else f"[{_number(row.ci_low)}, {_number(row.ci_high)}]"
            paired = row.paired
            cells = ("-", "-", "-")
            if paired is not None:
                spread = (
                    "-"
                    if paired.ci_low is None
                    else f"[{_difference(paired.ci_low)}, {_difference(paired.ci_high)}]"
                )
                cells = (_difference(paired.mean), spread, _p_value(paired.p))
            table.add_row(label, method, str(row.n), _number(row.mean), interval, *cells)
            previous = row.metric
        console.print(table)


def _flat(summary: MetricSummary, against: str) -> dict[str, Any]:
    row = {key: value for key, value in asdict(summary).items() if key in COMPARE_COLUMNS}
    row["interval"] = str(summary.interval)
    paired = asdict(summary.paired) if summary.paired is not None else {}
    if summary.paired is not None:
        paired["interval"] = str(summary.paired.interval)
    row |= {f"vs_{against}_{field}": paired.get(field) for field in _PAIRED_FIELDS}
    return row


def write_compare_csv(
    summaries: Sequence[MetricSummary], handle: IO[str], against: str = RANDOM_METHOD
) -> int:
    """One row per summary; a model (or method) named like a formula is written as text
    (``producer.spreadsheet``), as in every CSV the producer writes."""
    writer = csv.DictWriter(handle, fieldnames=compare_columns(against), lineterminator="\n")
    writer.writeheader()
    for summary in summaries:
        writer.writerow(spreadsheet_row(_flat(summary, against)))
    return len(summaries)


def write_compare_json(
    summaries: Sequence[MetricSummary], handle: IO[str], against: str = RANDOM_METHOD
) -> int:
    json.dump([_flat(summary, against) for summary in summaries], handle, indent=2)
    handle.write("\n")
    return len(summaries)
