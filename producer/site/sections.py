"""The summary tables at the top of a report, each built by one function from the selection.

A section is a titled table of plain strings, so the template needs no knowledge of what it shows.
``SECTION_BUILDERS`` is the hook for more: a function ``(session, selection) -> Section | None``
appended there (``None`` when it has nothing to say, e.g. faithfulness metrics not computed for this
batch) becomes one more table on the report's first page.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from common.db.metrics import metric_summaries
from common.metrics import RANDOM_METHOD
from producer.compare import BETTER
from producer.site.selection import Selection, model_summaries, top1_agreement

__all__ = [
    "SECTION_BUILDERS",
    "Section",
    "agreement_section",
    "faithfulness_section",
    "models_section",
    "summary_sections",
]


@dataclass(frozen=True)
class Section:
    """One summary table: a title, column headers, rows of cell texts, and a note under it."""

    title: str
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]
    note: str = ""


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def models_section(session: Session, selection: Selection) -> Section | None:
    """Jobs per model by outcome, and the mean seconds per stage of the jobs computed in this batch."""
    summaries = model_summaries(session, selection)
    if not summaries:
        return None
    rows = [
        (
            s.model,
            str(s.jobs),
            str(s.succeeded),
            str(s.reused),
            str(s.failed),
            str(s.pending),
            _seconds(s.fetch_seconds),
            _seconds(s.compute_seconds),
            _seconds(s.store_seconds),
        )
        for s in summaries
    ]
    return Section(
        title="Models",
        columns=(
            "model",
            "jobs",
            "succeeded",
            "reused",
            "failed",
            "pending",
            "fetch s",
            "compute s",
            "store s",
        ),
        rows=rows,
        note="succeeded = computed in this batch; reused = identical earlier results pointed at. "
        "Mean seconds per job and stage, over computed jobs.",
    )


def agreement_section(session: Session, selection: Selection) -> Section | None:
    """Top-1 agreement for every pair of models on the images both classified."""
    pairs = top1_agreement(session, selection)
    if not pairs:
        return None
    rows = [
        (
            p.model_a,
            p.model_b,
            str(p.images),
            str(p.agree),
            "-" if p.rate is None else f"{100 * p.rate:.1f} %",
        )
        for p in pairs
    ]
    return Section(
        title="Top-1 agreement between models",
        columns=("model", "model", "images", "same top-1", "agreement"),
        rows=rows,
        note="Images where both models produced predictions; classes compared by index.",
    )


def faithfulness_section(session: Session, selection: Selection) -> Section | None:
    """``producer compare`` as a table: per model × metric × method, n, mean and 95 % interval, the
    random map as the baseline row; absent when the batch was submitted without ``--metrics``."""
    summaries = [
        s
        for s in metric_summaries(session, selection.batch_id)
        if selection.models is None or s.model in selection.models
    ]
    if not summaries:
        return None
    rows = [
        (
            s.model,
            s.metric,
            f"{s.method} (baseline)" if s.method == RANDOM_METHOD else s.method,
            str(s.n),
            f"{s.mean:.4f}",
            "-" if s.ci_low is None or s.ci_high is None else f"[{s.ci_low:.4f}, {s.ci_high:.4f}]",
            BETTER.get(s.metric, ""),
        )
        for s in summaries
    ]
    return Section(
        title="Faithfulness of the maps",
        columns=("model", "metric", "method", "n", "mean", "95% CI", "reading"),
        rows=rows,
        note="Over every job of the batch with metrics (producer compare); docs/metrics.md defines them.",
    )


SECTION_BUILDERS: list[Callable[[Session, Selection], Section | None]] = [
    models_section,
    agreement_section,
    faithfulness_section,
]


def summary_sections(session: Session, selection: Selection) -> list[Section]:
    """Every builder's section, in order, leaving out those with nothing to show."""
    return [section for build in SECTION_BUILDERS if (section := build(session, selection)) is not None]
