"""How batches and results look on a terminal and in files: status tables, CSV rows, JSON objects."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import IO, Any

from rich.console import Console, Group
from rich.table import Table

from common.db.models import WorkerHeartbeat
from common.db.reports import BatchStatus
from common.methods import ARRAY_ARTIFACTS, IMAGE_ARTIFACTS
from producer.spreadsheet import FORMULA_PREFIXES, spreadsheet_row, spreadsheet_safe
from producer.terminal_text import terminal_literal as literal

__all__ = [
    "CSV_COLUMNS",
    "FORMULA_PREFIXES",
    "results_table",
    "spreadsheet_safe",
    "status_view",
    "write_csv",
    "write_json",
    "write_jsonl",
]

CSV_COLUMNS = (
    "job_id",
    "batch_id",
    "row",
    "id",
    "image_uri",
    "image_sha256",
    "model",
    "status",
    "error",
    "target",
    "target_index",
    "readout",
    "note",
    "top1_index",
    "top1_label",
    "top1_prob",
    "reused_from",
    "attempts",
    "worker_host",
    "device",
    "started_at",
    "finished_at",
    "fetch_seconds",
    "compute_seconds",
    "store_seconds",
    *ARRAY_ARTIFACTS,
    *IMAGE_ARTIFACTS,
)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return str(timedelta(seconds=round(seconds)))


def status_view(status: BatchStatus, workers: list[WorkerHeartbeat] | None) -> Group:
    """Counts by state and model, throughput, ETA, failures grouped by reason, live workers."""
    title = f"batch {literal(status.batch_id)}" + (f" ({literal(status.name)})" if status.name else "")
    counts = status.counts
    summary = Table(title=title, show_header=True, title_justify="left")
    for column in ("model", "total", "queued", "running", "succeeded", "failed"):
        summary.add_column(column, justify="left" if column == "model" else "right")
    for model, by_state in status.models.items():
        summary.add_row(literal(model), str(sum(by_state.values())), *(str(by_state[s]) for s in counts))
    summary.add_row("[b]all[/b]", str(status.total), *(f"[b]{counts[s]}[/b]" for s in counts))
    rate = f"{status.jobs_per_second:.2f} jobs/s" if status.jobs_per_second else "-"
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
        failures = Table(title="failures by reason", title_justify="left")
        for column in ("count", "error", "message", "example image"):
            failures.add_column(column, overflow="fold")
        for f in status.failures:
            failures.add_row(str(f.count), literal(f.error_class), literal(f.message), literal(f.example_uri))
        parts.append(failures)
    if workers is not None:
        table = Table(title="live workers", title_justify="left")
        for column in ("worker", "device", "queues", "running", "model", "done", "last seen"):
            table.add_column(column, overflow="fold")
        for w in workers:
            table.add_row(
                literal(f"{w.node} ({w.worker_id})" if w.node else w.worker_id),
                literal(w.device or "-"),
                literal(_queues(w.queues)),
                str(w.running_jobs),
                literal(w.current_model or "-"),
                str(w.jobs_done),
                w.last_seen_at.strftime("%H:%M:%S"),
            )
        if not workers:
            table.add_row("(none heard from recently)", "", "", "", "", "", "")
        parts.append(table)
    return Group(*parts)


def _queues(queues: str | None) -> str:
    names = [q for q in (queues or "").split(",") if q]
    return ", ".join(names) if len(names) <= 4 else f"{len(names)} queues ({', '.join(names[:3])}, …)"


def _flat(job: dict[str, Any]) -> dict[str, Any]:
    top = job["predictions"][0] if job["predictions"] else {}
    row = {key: job.get(key) for key in CSV_COLUMNS if key in job}
    row |= {"top1_index": top.get("index"), "top1_label": top.get("label"), "top1_prob": top.get("prob")}
    row |= {
        key: job["timings"].get(key)
        for key in ("started_at", "finished_at", "fetch_seconds", "compute_seconds", "store_seconds")
    }
    row |= {name: job["artifacts"].get(name) for name in (*ARRAY_ARTIFACTS, *IMAGE_ARTIFACTS)}
    return row


def write_csv(jobs: Iterable[dict[str, Any]], out: IO[str]) -> int:
    """One row per job; text cells are made safe to open in a spreadsheet (``spreadsheet_safe``).

    The database keeps every value as given: only this export, meant for spreadsheets, escapes.
    """
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    count = 0
    for job in jobs:
        writer.writerow(spreadsheet_row(_flat(job)))
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


def results_table(jobs: Iterator[dict[str, Any]], console: Console, *, limit: int) -> int:
    """A compact overview; the artifact URIs are in the csv/json formats."""
    table = Table()
    for column in ("row", "id", "image", "model", "status", "top-1", "prob", "error"):
        table.add_column(column, overflow="fold")
    count = 0
    for job in jobs:
        count += 1
        if count > limit:
            continue
        top = job["predictions"][0] if job["predictions"] else {}
        label = (top.get("label") or str(top.get("index", "-"))).split(",")[0]
        prob = f"{top['prob']:.3f}" if "prob" in top else "-"
        image = job["image_uri"].rsplit("/", 1)[-1]
        status = job["status"] + (" (reused)" if job["reused_from"] else "")
        table.add_row(
            str(job["row"]),
            literal(job["id"] or "-"),
            literal(image),
            literal(job["model"]),
            literal(status),
            literal(label),
            prob,
            literal(job["error"]),
        )
    console.print(table)
    if count > limit:
        console.print(
            f"… {count - limit} more job(s); --format csv or json lists them all, with artifact URIs"
        )
    return count
