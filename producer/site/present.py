"""From a job's results to what a report card shows: pictures, predictions, target, state, reason.

Everything the templates print is decided here, as plain strings, so the templates only lay it out.
Text that came from the machine that ran the job (error messages, weights sources) passes through
``hide_local_paths`` first: a report is meant to be shared, and must not reveal (or depend on) the
folders of the machine that produced it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from common.artifacts import LAYER_GRID, PANELS
from common.db.reports import job_error
from common.metric_settings import METHODS, Metric
from common.storage.uri import uri_scheme
from producer.compare import BETTER
from producer.site.links import ArtifactLinks
from producer.site.selection import ImageEntry, image_name

__all__ = [
    "RANDOM_SOURCE",
    "STATE_FILTERS",
    "ImageCard",
    "JobCard",
    "MetricRow",
    "MetricTable",
    "Picture",
    "PredictionLine",
    "hide_local_paths",
    "image_card",
    "is_random",
    "job_card",
    "metric_table",
    "settings_text",
]

# How a job's weights_source starts when it ran with random weights (``worker.weights.build_model``).
RANDOM_SOURCE = "RANDOM"
REUSED = "reused"
# What the state filter offers: a reused job is a succeeded one whose results were computed before.
STATE_FILTERS = ("succeeded", REUSED, "failed", "queued", "running")

_FILE_URI = re.compile(r"file://[^\s'\"<>]+")
# An absolute POSIX path of two or more segments not inside a URL ("s3://b/k", "http://h/p" are kept).
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s/'\"<>]+/)+([^\s/'\"<>]+)")


def hide_local_paths(text: str | None) -> str:
    """``text`` with file URIs and absolute local paths cut to their file name (``…/name``)."""
    if not text:
        return ""
    text = _FILE_URI.sub(lambda m: "…/" + image_name(m.group(0)), text)
    return _ABSOLUTE_PATH.sub(lambda m: "…/" + m.group(1), text)


@dataclass(frozen=True)
class Picture:
    title: str
    href: str | None  # None: not stored (an older batch without input.png, or the job did not finish)


@dataclass(frozen=True)
class PredictionLine:
    rank: int
    label: str
    index: int
    percent: float


@dataclass(frozen=True)
class MetricRow:
    metric: str
    better: str  # how to read it ("lower is better"), shown on hover
    values: list[str]  # one per method of the table, "" where the job has none


@dataclass(frozen=True)
class MetricTable:
    """A job's faithfulness scores (``--metrics``): a row per metric, a column per method."""

    methods: list[str]
    rows: list[MetricRow]


@dataclass(frozen=True)
class JobCard:
    model: str
    state: str  # succeeded, reused, failed, queued or running: what the filter and the badge show
    pictures: list[Picture]
    layer_grid: str | None
    predictions: list[PredictionLine]
    top1: str  # the top-1 label, "" when none
    target: str
    error: str
    weights: str
    timings: str
    note: str  # what the artifacts leave out (e.g. a headless backbone has no gradient maps)
    metrics: MetricTable | None = None


@dataclass(frozen=True)
class ImageCard:
    row: int
    row_id: str
    name: str
    source: str  # the image's URI when remote (s3://, https://); "" for a local file
    jobs: list[JobCard]


def _label(prediction: dict[str, Any]) -> str:
    """The first of an ImageNet label's synonyms ("tabby, tabby cat" -> "tabby"), or "class N"."""
    return (prediction["label"] or "").split(",")[0].strip() or f"class {prediction['index']}"


def _target(job: dict[str, Any]) -> str:
    """Which class the gradient maps explain, and whether the CSV asked for it or it is the top-1."""
    index = job["target_index"]
    if index is None:
        return "-" if job["state"] != "succeeded" else "top-1"
    named = next((p for p in job["predictions"] if p["index"] == index), None)
    what = f"{index} ({_label(named)})" if named and named["label"] else str(index)
    return f"{what}, as asked ({job['target']})" if job["target"] else f"{what}, the top-1"


def _timings(job: dict[str, Any]) -> str:
    parts = [
        f"{stage} {job[f'{stage}_seconds']:.2f} s"
        for stage in ("fetch", "compute", "store")
        if job.get(f"{stage}_seconds") is not None
    ]
    return " · ".join(parts)


def is_random(job: dict[str, Any]) -> bool:
    """Whether the job ran with untrained weights: its maps show no trained model's attention."""
    return (job.get("weights_source") or "").startswith(RANDOM_SOURCE)


def metric_table(values: dict[str, dict[str, float]] | None) -> MetricTable | None:
    """``{method: {metric: value}}`` as a table in the order of ``docs/metrics.md``: the methods as
    ``producer compare`` lists them (the random baseline last), the metrics as ``Metric`` does."""
    if not values:
        return None
    methods = [m for m in METHODS if m in values] + sorted(set(values) - set(METHODS))
    present = {metric for by_metric in values.values() for metric in by_metric}
    metrics = [m.value for m in Metric if m.value in present] + sorted(present - {m.value for m in Metric})

    def cell(method: str, metric: str) -> str:
        value = values[method].get(metric)
        return "" if value is None else f"{value:.3f}"

    rows = [
        MetricRow(metric, BETTER.get(metric, ""), [cell(m, metric) for m in methods]) for metric in metrics
    ]
    return MetricTable(methods, rows)


# Settings whose field name reads badly as words.
_SETTING_NAMES = {"top_k": "top-k", "layer_score_reduction": "layer scores"}


def _setting_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(_setting_value(item) for item in value) or "none"
    return str(value)


def _settings_words(settings: dict[str, Any]) -> list[str]:
    """``name value`` per setting, sorted by name; unset ones (``None``: the default) left out."""
    return [
        f"{_SETTING_NAMES.get(key, key.replace('_', ' '))} {_setting_value(value)}"
        for key, value in sorted(settings.items())
        if value is not None and not isinstance(value, dict)
    ]


def settings_text(settings: dict[str, Any] | None) -> str:
    """A batch's stored settings as a reader says them: ``discard ratio 0.9 · head fusion mean · …``;
    a group (the metric settings) as ``metrics deletion, insertion (deletion baseline mean · …)``."""
    settings = settings or {}
    parts = _settings_words(settings)
    for key, group in sorted((k, v) for k, v in settings.items() if isinstance(v, dict)):
        group = dict(group)
        families = group.pop("families", None)
        head = f"{key.replace('_', ' ')} {_setting_value(families)}" if families is not None else key
        details = " · ".join(_settings_words(group))
        parts.append(f"{head} ({details})" if details else head)
    return " · ".join(parts)


def job_card(job: dict[str, Any], links: ArtifactLinks) -> JobCard:
    artifacts: dict[str, str] = job["artifacts"]

    def link(name: str) -> str | None:
        uri = artifacts.get(name)
        return links.href(uri) if uri else None

    predictions = [
        PredictionLine(rank, _label(p), p["index"], round(100 * p["prob"], 1))
        for rank, p in enumerate(job["predictions"], 1)
    ]
    state = REUSED if job["state"] == "succeeded" and job["reused_from"] else job["state"]
    return JobCard(
        model=job["model"],
        state=state,
        pictures=[Picture(panel.title, link(panel.name)) for panel in PANELS] if artifacts else [],
        layer_grid=link(LAYER_GRID),
        predictions=predictions,
        top1=predictions[0].label if predictions else "",
        target=_target(job),
        error=hide_local_paths(job_error(job)),
        weights=hide_local_paths(job["weights_source"]),
        timings=_timings(job),
        note=hide_local_paths(job.get("note")),
        metrics=metric_table(job.get("metrics")),
    )


def image_card(entry: ImageEntry, links: ArtifactLinks) -> ImageCard:
    return ImageCard(
        row=entry.row,
        row_id=entry.row_id or "",
        name=entry.name,
        # A local file's folder says nothing to a reader of the report: its name is the heading.
        source="" if uri_scheme(entry.image_uri) in ("file", "") else entry.image_uri,
        jobs=[job_card(job, links) for job in entry.jobs],
    )
