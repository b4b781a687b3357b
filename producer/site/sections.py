"""The summary tables at the top of a report, each built by one function from the selection.

A section is a titled table of plain strings, so the template needs no knowledge of what it shows.
``SECTION_BUILDERS`` is the hook for more: a function ``(session, selection) -> Section | None``
appended there (``None`` when it has nothing to say, e.g. faithfulness metrics not computed for this
batch) becomes one more table on the report's first page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from common.db.metric_summaries import metric_summaries
from producer.compare import BETTER, method_label
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
    rows: Sequence[tuple[str, ...]]
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
    """``producer compare`` as a table: per model × metric × method, n, mean and 95 % interval (t, or
    Wilson for 0/1 metrics), and the paired difference against the random map on the same images:
    mean, 95 % interval, Wilcoxon signed-rank p. Absent when the batch was submitted without
    ``--metrics``."""
    summaries = [
        s
        for s in metric_summaries(session, selection.batch_id)
        if selection.models is None or s.model in selection.models
    ]
    if not summaries:
        return None

    def interval(low: float | None, high: float | None, sign: str = "") -> str:
        return "-" if low is None or high is None else f"[{low:{sign}.4f}, {high:{sign}.4f}]"

    rows = []
    for s in summaries:
        paired = s.paired
        rows.append(
            (
                s.model,
                s.metric,
                method_label(s.method, s.metric),
                str(s.n),
                f"{s.mean:.4f}",
                f"{interval(s.ci_low, s.ci_high)} {s.interval}",
                "-" if paired is None else f"{paired.mean:+.4f}",
                "-" if paired is None else interval(paired.ci_low, paired.ci_high, "+"),
                "-" if paired is None or paired.p is None else f"{paired.p:.2g}",
                BETTER.get(s.metric, ""),
            )
        )
    return Section(
        title="Faithfulness of the maps",
        columns=(
            "model",
            "metric",
            "method",
            "n",
            "mean",
            "95% CI",
            "Δ vs random",
            "95% CI of Δ",
            "p",
            "reading",
        ),
        rows=rows,
        note="Over every job of the batch with metrics (producer compare); docs/metrics.md defines them. "
        "Δ vs random: the method's score minus the random map's on the same image, averaged, with its "
        "t interval and the two-sided Wilcoxon signed-rank p; judge a method by Δ, not by whether the "
        "two means' intervals overlap. The mean's interval is Student t, or Wilson for 0/1 metrics "
        "(pointing game). For entropy the random row is the entropy of noise, not a chance level.",
    )


SECTION_BUILDERS: list[Callable[[Session, Selection], Section | None]] = [
    models_section,
    agreement_section,
    faithfulness_section,
]


def summary_sections(session: Session, selection: Selection) -> list[Section]:
    """Every builder's section, in order, leaving out those with nothing to show."""
    return [section for build in SECTION_BUILDERS if (section := build(session, selection)) is not None]
