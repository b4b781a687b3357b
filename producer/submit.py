"""Turning a dataset into a batch of jobs, and a batch's queued jobs into queue messages.

Everything is validated before anything is written: an invalid file or an unknown model name
creates no batch. The batch and its jobs are committed in one transaction, and messages are
published only after that commit (a worker must find the rows its message names).

Nothing here holds the dataset in memory: the file is validated in one streaming pass
(``scan_dataset``), its rows are streamed again into the database (COPY on PostgreSQL) inside the
batch's transaction, and the queued jobs are streamed back out of the database to be published. A
million-row CSV costs the same memory as a thousand-row one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery

from common.celery_app import queue_for
from common.db import Database
from common.db.batches import add_jobs, create_batch, iter_queued_jobs, mark_published
from common.db.jobs import republish_queued
from common.db.records import NewJob, QueuedJob
from common.errors import ImageFetchRefusedError, InvalidDatasetError, VitscopeError
from common.keys import config_fingerprint, new_batch_id
from common.local_files import FileRoots
from common.methods import MethodSettings, Preprocess
from common.metric_settings import MetricSettings
from common.modelspec import ModelSpec, check_target, load_models_file, resolve_model
from common.publish import broker_lost_data, publish_jobs
from common.storage.uri import file_uri_path
from producer.dataset import MASK_COLUMN, CheckRow, CheckS3, DatasetRow, DatasetScan, iter_rows, scan_dataset

__all__ = [
    "DEFAULT_MODEL",
    "Plan",
    "RowChecks",
    "Submission",
    "SubmitOptions",
    "check_models",
    "commit_plan",
    "enqueue",
    "plan_jobs",
    "plan_submission",
]

# The paper's best-behaved model and the cheapest; used when neither --models nor a `model` column says.
DEFAULT_MODEL = "deit_tiny_patch16_224"


@dataclass(frozen=True)
class SubmitOptions:
    models: Sequence[str] = ()
    models_file: Path | None = None
    settings: MethodSettings = field(default_factory=MethodSettings)
    preprocess: Preprocess | None = None
    weights: str | None = None
    target_column: str | None = None
    name: str | None = None
    metrics: MetricSettings = field(default_factory=MetricSettings)


@dataclass(frozen=True)
class Submission:
    batch_id: str
    name: str | None
    jobs: int
    specs: Mapping[str, ModelSpec]


def _resolver(options: SubmitOptions) -> Callable[[str], ModelSpec]:
    models_map = load_models_file(options.models_file) if options.models_file else {}
    cache: dict[str, ModelSpec] = {}

    def resolve(name: str) -> ModelSpec:
        if name not in cache:
            cache[name] = resolve_model(
                name, models_map, preprocess=options.preprocess, weights=options.weights
            )
        return cache[name]

    return resolve


def plan_jobs(
    rows: Iterable[DatasetRow], options: SubmitOptions, resolve: Callable[[str], ModelSpec]
) -> Iterator[NewJob]:
    """Rows × models, as a stream of jobs: a row's own ``model`` cell wins over ``--models``."""
    default_models = list(options.models) or [DEFAULT_MODEL]
    for name in default_models:
        resolve(name)  # an unknown --models name is reported before any row
    settings = options.settings
    fingerprints: dict[tuple[str, str | None], str] = {}
    queues: dict[str, str] = {}
    for row in rows:
        for name in row.models or default_models:
            key = (name, row.target)
            if key not in fingerprints:
                fingerprints[key] = config_fingerprint(resolve(name), settings, row.target)
            if name not in queues:
                queues[name] = queue_for(resolve(name))
            yield NewJob(
                row_number=row.line,
                image_uri=row.image_uri,
                model=name,
                queue=queues[name],
                config_fingerprint=fingerprints[key],
                row_id=row.row_id,
                target=row.target,
                row_metadata=row.metadata,
            )


@dataclass(frozen=True)
class RowChecks:
    """Row checks that need to know where the jobs will run, asked for by the CLI before any model loads.

    ``file_roots``: the folders a local run may read images from; a row naming a local file outside
    them is refused with its line (None: not checked, as for distributed workers, whose roots are
    their own). ``targets``: refuse a target that a model's class names, where known without building
    it, lack (``common.modelspec.check_target``); otherwise the worker fails that job alone.
    """

    file_roots: FileRoots | None = None
    targets: bool = True

    def checker(self, default_models: Sequence[str], resolve: Callable[[str], ModelSpec]) -> CheckRow:
        """One row's check; a target is judged once per model, however many rows repeat it."""
        verdicts: dict[tuple[str, str], str | None] = {}

        def check(row: DatasetRow) -> None:
            if self.file_roots is not None:
                for column, uri in (
                    ("", row.image_uri),
                    (f"{MASK_COLUMN}: ", row.metadata.get(MASK_COLUMN) or ""),
                ):
                    if uri.startswith("file:"):
                        try:
                            path = file_uri_path(uri)
                            self.file_roots.check(uri, path)
                        except ValueError as exc:  # file://otherhost/x
                            raise InvalidDatasetError(f"{column}{exc}") from None
                        except ImageFetchRefusedError as exc:  # the mask's column named, as the worker does
                            raise type(exc)(f"{column}{exc}") from None
            if not (self.targets and row.target):
                return
            for name in row.models or default_models:
                key = (name, row.target)
                if key not in verdicts:
                    try:
                        check_target(resolve(name), row.target)
                        verdicts[key] = None
                    except VitscopeError as exc:
                        verdicts[key] = str(exc)
                if verdicts[key] is not None:
                    raise InvalidDatasetError(verdicts[key] or "")

        return check


@dataclass(frozen=True)
class Plan:
    """A validated dataset and how its rows become jobs, before anything is written.

    It holds the scan's counts, not the rows: ``jobs()`` reads the file again as a stream.
    """

    path: Path
    scan: DatasetScan
    options: SubmitOptions
    specs: Mapping[str, ModelSpec]
    resolve: Callable[[str], ModelSpec]

    @property
    def local_rows(self) -> int:
        """Rows naming a local file, which distributed workers read only under their own roots."""
        return self.scan.local_rows

    def jobs(self) -> Iterator[NewJob]:
        return plan_jobs(iter_rows(self.scan), self.options, self.resolve)


def check_models(options: SubmitOptions) -> None:
    """Resolve every ``--models`` name (and the models file), raising for an unknown or unexplainable
    one: instant, so the CLI asks before it opens a database or reads the dataset."""
    resolve = _resolver(options)
    for name in list(options.models) or [DEFAULT_MODEL]:
        resolve(name)


def plan_submission(
    path: str | Path,
    options: SubmitOptions,
    *,
    replace: Mapping[str, ModelSpec] | None = None,
    check_s3: CheckS3 | None = None,
    checks: RowChecks | None = None,
) -> Plan:
    """Validate the dataset and every model name; ``replace`` swaps in specs by name
    (the local runner's explicit random-weights fallback); ``check_s3`` counts the rows whose
    ``s3://`` objects the S3 sources refuse (``Plan.scan.refused_s3_rows``), for a warning;
    ``checks`` adds per-row checks."""
    resolve_named = _resolver(options)

    def resolve(name: str) -> ModelSpec:
        return (replace or {}).get(name) or resolve_named(name)

    def check_model(name: str) -> None:
        try:
            resolve(name)
        except VitscopeError as exc:
            raise InvalidDatasetError(str(exc)) from exc

    default_models = list(options.models) or [DEFAULT_MODEL]
    for name in default_models:
        resolve(name)  # an unknown --models name is reported before the file is read
    check_row = checks.checker(default_models, resolve) if checks is not None else None
    scan = scan_dataset(
        path,
        target_column=options.target_column,
        check_model=check_model,
        check_s3=check_s3,
        check_row=check_row,
    )
    names = set(scan.models) | (set(default_models) if scan.rows_without_model else set())
    return Plan(
        path=Path(path),
        scan=scan,
        options=options,
        specs={name: resolve(name) for name in sorted(names)},
        resolve=resolve,
    )


def _batch_settings(options: SubmitOptions) -> dict[str, object]:
    """The method settings, plus the metric settings under ``"metrics"`` when metrics are asked for."""
    settings: dict[str, object] = options.settings.to_dict()
    if options.metrics.enabled:
        settings["metrics"] = options.metrics.to_dict()
    return settings


def commit_plan(db: Database, plan: Plan, options: SubmitOptions, *, mode: str) -> Submission:
    """Create the batch and its queued jobs in one transaction, streaming the rows into it."""
    batch_id = new_batch_id()
    with db.session() as session:
        create_batch(
            session,
            batch_id=batch_id,
            name=options.name,
            source=str(plan.path.resolve()),
            mode=mode,
            settings=_batch_settings(options),
            models={"names": sorted(plan.specs), "specs": {n: s.to_dict() for n, s in plan.specs.items()}},
        )
        count = add_jobs(session, batch_id, plan.jobs())
    return Submission(batch_id=batch_id, name=options.name, jobs=count, specs=plan.specs)


def enqueue(
    app: Celery,
    db: Database,
    batch_id: str,
    *,
    chunk_size: int,
    jobs: Sequence[QueuedJob] | None = None,
) -> int:
    """Publish jobs of the batch — the given ones, or all its queued jobs — and stamp them enqueued.

    Returns the number of messages sent. Call only after the jobs' rows are committed. All queued
    jobs are streamed from the database in model order, never held in memory at once.

    First, should the broker have lost its data since the last publication (its marker is gone and
    this call recreated it), the queued jobs of every published distributed batch are published
    again too: recreating the marker without healing the loss would hide it from the workers.
    """
    if broker_lost_data(app):
        with db.session() as session:
            lost = republish_queued(session, exclude=batch_id)
        if lost:
            publish_jobs(app, lost, chunk_size=chunk_size)
    if jobs is None:
        with db.session() as session:
            messages = publish_jobs(
                app, iter_queued_jobs(session, batch_id), chunk_size=chunk_size, grouped=True
            )
    else:
        messages = publish_jobs(app, jobs, chunk_size=chunk_size)
    with db.session() as session:
        mark_published(session, batch_id)
    return messages
