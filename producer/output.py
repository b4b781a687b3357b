"""How batches and results look on a terminal and in files: status tables, CSV rows, JSON objects."""

from __future__ import annotations

import csv
import itertools
import json
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import IO, Any, Literal

from rich import box
from rich.cells import cell_len
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from common.artifacts import ARRAY_ARTIFACTS, IMAGE_ARTIFACTS
from common.db.models import WorkerHeartbeat
from common.db.reports import RESULT_COLUMNS, BatchStatus, BatchSummary, artifact_column, job_error
from producer.spreadsheet import FORMULA_PREFIXES, spreadsheet_row, spreadsheet_safe
from producer.terminal_text import show_controls
from producer.terminal_text import terminal_literal as literal

__all__ = [
    "CSV_COLUMNS",
    "FORMULA_PREFIXES",
    "batches_table",
    "cell",
    "fitted_table",
    "metadata_columns",
    "results_table",
    "spreadsheet_safe",
    "status_view",
    "write_csv",
    "write_json",
    "write_jsonl",
]

# The CSV's columns before the dataset's own: the result's fields, then one URI column per artifact,
# named as in the ``job_results`` view.
CSV_COLUMNS: tuple[str, ...] = (
    *RESULT_COLUMNS,
    *(artifact_column(name) for name in (*ARRAY_ARTIFACTS, *IMAGE_ARTIFACTS)),
)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return str(timedelta(seconds=round(seconds)))


def status_view(status: BatchStatus, workers: list[WorkerHeartbeat] | None, *, width: int = 80) -> Group:
    """Counts by state and model, throughput, ETA, failures grouped by reason, live workers."""
    title = f"batch {literal(status.batch_id)}" + (f" ({literal(status.name)})" if status.name else "")
    counts = status.counts
    rows = [
        (cell(model), str(sum(by_state.values())), *(str(by_state[s]) for s in counts))
        for model, by_state in status.models.items()
    ]
    rows.append(("all", str(status.total), *(str(counts[s]) for s in counts)))
    columns: tuple[str, ...] = ("model", "total", "queued", "running", "succeeded", "failed")
    summary = fitted_table(columns, rows, width=width, title=title, title_justify="left")
    rate = "-"
    if status.images_per_second is not None:
        rate = f"{status.images_per_second:.2f} images/s ({status.computed} computed; reused, failed not counted)"
    lines = Table.grid(padding=(0, 2))
    lines.add_row("done", f"{status.done}/{status.total}" + (" (finished)" if status.finished else ""))
    lines.add_row("reused", f"{status.reused} job(s) pointed at earlier identical results")
    lines.add_row("throughput", rate)
    lines.add_row("eta", "-" if status.finished else _duration(status.eta_seconds))
    if status.stale_queued:
        lines.add_row(
            "unpublished",
            f"{status.stale_queued} queued job(s) with no recent publication (message lost?): a live "
            f"worker's reaper publishes them again, or run `producer resume {status.batch_id}`",
        )
    parts: list[Any] = [summary, lines]
    if status.failures:
        rows = [
            (str(f.count), cell(f.error_class), cell(f.message), cell(f.example_uri)) for f in status.failures
        ]
        parts.append(
            fitted_table(
                ("count", "error", "message", "example image"),
                rows,
                width=width,
                first=("message", "example image"),
                title="failures by reason (full text: results --state failed --format csv)",
                title_justify="left",
            )
        )
    if workers is not None:
        rows = [
            (
                cell(f"{w.node} ({w.worker_id})" if w.node else w.worker_id),
                cell(w.device),
                cell(_queues(w.queues)),
                str(w.running_jobs),
                cell(w.current_model),
                str(w.jobs_done),
                w.last_seen_at.strftime("%H:%M:%S"),
            )
            for w in workers
        ]
        columns = ("worker", "device", "queues", "running", "model", "done", "last seen")
        if rows:
            parts.append(fitted_table(columns, rows, width=width, title="live workers", title_justify="left"))
        else:
            parts.append("live workers: none heard from recently")
    return Group(*parts)


def batches_table(batches: Sequence[BatchSummary], console: Console) -> None:
    """``producer batches``: one line per batch, newest first, its id never shortened; ``done`` counts
    succeeded and failed jobs of all, the rest being queued or running (``producer status`` splits them)."""
    if not batches:
        console.print("no batches in this database yet: producer submit DATASET.csv creates one")
        return
    rows = [
        (
            b.batch_id,
            cell(b.name),
            b.mode,
            b.created_at.astimezone().strftime("%b %d %H:%M"),  # the reader's local time
            cell(", ".join(b.models)),
            f"{b.counts['succeeded'] + b.counts['failed']}/{b.total}",
            str(b.counts["failed"]),
        )
        for b in batches
    ]
    columns = ("id", "name", "mode", "created", "models", "done", "failed")
    console.print(
        fitted_table(columns, rows, width=console.width, whole=("id", "created"), first=("models",))
    )


def _queues(queues: str | None) -> str:
    names = [q for q in (queues or "").split(",") if q]
    return ", ".join(names) if len(names) <= 4 else f"{len(names)} queues ({', '.join(names[:3])}, …)"


def metadata_columns(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """The CSV column each of the dataset's own columns is written to: its own name, or
    ``metadata.<name>`` when that name is already a result column (a dataset column called ``state``)."""
    return {key: f"metadata.{key}" if key in CSV_COLUMNS else key for key in metadata or {}}


def _flat(job: dict[str, Any], extra: Mapping[str, str]) -> dict[str, Any]:
    row = {key: job.get(key) for key in RESULT_COLUMNS}
    row |= {artifact_column(name): uri for name, uri in job["artifacts"].items()}
    metadata = job.get("metadata") or {}
    row |= {column: metadata.get(key) for key, column in extra.items()}
    return row


def write_csv(jobs: Iterable[dict[str, Any]], out: IO[str]) -> int:
    """One row per job: ``CSV_COLUMNS``, then the dataset's own columns (``metadata_columns``); text
    cells are made safe to open in a spreadsheet (``spreadsheet_safe``).

    A batch comes from one dataset, so its first job names the dataset's columns for every row. The
    database keeps every value as given: only this export, meant for spreadsheets, escapes.
    """
    stream = iter(jobs)
    first = next(stream, None)
    extra = metadata_columns(first.get("metadata") if first else None)
    writer = csv.DictWriter(out, fieldnames=(*CSV_COLUMNS, *extra.values()), extrasaction="ignore")
    writer.writeheader()
    count = 0
    for job in itertools.chain([first] if first else [], stream):
        writer.writerow(spreadsheet_row(_flat(job, extra)))
        count += 1
    return count


def write_json(jobs: Iterable[dict[str, Any]], out: IO[str]) -> int:
    """A JSON array, one object per job, streamed (a 100,000-job batch never sits in memory)."""
    count = 0
    out.write("[")
    for job in jobs:
        out.write(("\n" if count == 0 else ",\n") + json.dumps(job))
        count += 1
    out.write("\n]\n" if count else "]\n")
    return count


def write_jsonl(jobs: Iterable[dict[str, Any]], out: IO[str]) -> int:
    count = 0
    for job in jobs:
        out.write(json.dumps(job) + "\n")
        count += 1
    return count


def cell(value: object) -> str:
    """A value as one table cell's text: the one place every table's user-supplied text passes through
    on its way to the terminal ("-" for nothing). Control and bidi characters are shown as escapes;
    ``fitted_table`` adds cells as plain text, so rich markup in them is never parsed."""
    return "-" if value is None or value == "" else show_controls(str(value))


_NUMBER = re.compile(r"-|[-+]?[\d,]+(\.\d+)?|\d+/\d+")

# Columns are never narrowed below this (or their heading), so a shortened cell still shows its start.
MIN_COLUMN_WIDTH = 6


def fitted_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    width: int,
    whole: Collection[str] = (),
    first: Collection[str] = (),
    **options: Any,
) -> Table:
    """A table at most ``width`` cells wide with one line per row: a column with nothing in any row is
    left out, and the widest columns are narrowed first, their cells shortened with "…", never wrapped.

    Columns named in ``first`` (free text: messages, file names) give up their width before the
    others; those in ``whole`` (ids a user copies into the next command) never do.
    """
    keep = [i for i in range(len(columns)) if any(row[i] != "-" for row in rows)] or list(range(len(columns)))
    natural = [max(cell_len(columns[i]), *(cell_len(row[i]) for row in rows)) for i in keep]
    floors = [
        natural[k] if columns[i] in whole else min(natural[k], max(MIN_COLUMN_WIDTH, cell_len(columns[i])))
        for k, i in enumerate(keep)
    ]
    widths = list(natural)
    budget = width - 3 * (len(keep) - 1)  # one space either side of each column, one between them
    for group in ([k for k, i in enumerate(keep) if columns[i] in first], range(len(keep))):
        while sum(widths) > budget:
            narrowable = [k for k in group if widths[k] > floors[k]]
            if not narrowable:
                break
            widest = max(narrowable, key=lambda k: widths[k])
            widths[widest] -= 1
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, **options)
    for k, i in enumerate(keep):
        numeric = all(_NUMBER.fullmatch(row[i]) for row in rows)
        justify: Literal["right", "left"] = "right" if numeric and rows else "left"
        table.add_column(columns[i], no_wrap=True, overflow="ellipsis", width=widths[k], justify=justify)
    for row in rows:
        table.add_row(*(Text(row[i]) for i in keep))
    return table


def results_table(jobs: Iterator[dict[str, Any]], console: Console, *, limit: int) -> int:
    """A compact overview, one line per job; the artifact URIs are in the csv/json formats."""
    rows: list[tuple[str, ...]] = []
    count = 0
    for job in jobs:
        count += 1
        if count > limit:
            continue
        top = job["predictions"][0] if job["predictions"] else {}
        label = (top.get("label") or str(top.get("index", ""))).split(",")[0]
        prob = f"{top['prob']:.3f}" if "prob" in top else None
        state = "reused" if job["state"] == "succeeded" and job["reused_from"] else job["state"]
        rows.append(
            tuple(
                cell(value)
                for value in (
                    job["row_number"],
                    job["row_id"],
                    job["image_uri"].rsplit("/", 1)[-1],
                    job["model"],
                    state,
                    label,
                    prob,
                    job_error(job),
                )
            )
        )
    if rows:
        columns = ("row", "id", "image", "model", "state", "top-1", "prob", "error")
        flexible = ("error", "image", "id", "top-1")
        console.print(fitted_table(columns, rows, width=console.width, first=flexible))
    if count > limit:
        console.print(
            f"… {count - limit} more job(s); --format csv or json lists them all, with artifact URIs"
        )
    return count
