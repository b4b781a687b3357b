"""``producer``: submit datasets, follow batches, read results, retry failures, migrate the database,
and see the results: a browsable HTML report (``report``) and the paper's figures (``figures``).

A thin shell: it parses options, calls ``producer.submit`` / ``common.db`` and prints. Distributed
mode publishes by task name and never imports torch; only ``--local`` (the default without a
broker) imports the worker package to run the same pipeline in this process.
"""

from __future__ import annotations

import difflib
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import sqlalchemy as sa
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from sqlalchemy.orm import Session

from common.db import Database, open_database, require_existing
from common.db.batches import check_name_free, get_batch, retry_failed
from common.db.jobs import republish_stale
from common.db.metrics import metric_summaries
from common.db.models import JobState
from common.db.reports import batch_contents, batch_status, iter_job_results, recent_batches
from common.db.session import current_revision, downgrade, head_revision, upgrade
from common.db.workers import live_workers
from common.errors import (
    DatabaseUnavailableError,
    NotFoundError,
    TransientError,
    VitscopeError,
    WeightsUnavailableError,
)
from common.local_files import FileRoots
from common.methods import HeadFusion, LayerScoreReduction, MethodSettings, Preprocess
from common.metrics import MetricSettings, load_metrics_section, parse_metrics_option
from common.modelspec import RANDOM, ModelSpec, resolve_models_option
from common.settings import Settings, get_settings
from producer.compare import compare_table, write_compare_csv, write_compare_json
from producer.report import batches_table, results_table, status_view, write_csv, write_json, write_jsonl
from producer.site.links import MAX_PRESIGN_SECONDS, LinkMode
from producer.submit import (
    Plan,
    RowChecks,
    SubmitOptions,
    check_models,
    commit_plan,
    enqueue,
    plan_submission,
)

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["app", "main"]

app = typer.Typer(
    help="Submit ViT attention-explanation batches and read their results.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema migrations (Alembic).", no_args_is_help=True)
app.add_typer(db_app, name="db")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


# Exit status of a command stopped by an unreachable service (database, broker): retrying may help,
# unlike invalid input (2).
EXIT_UNAVAILABLE = 3


def _flag(*names: str, help: str) -> typer.models.OptionInfo:
    """A boolean option shown in help as the flag it is: typer labels every option with its type,
    and ``--local <bool>`` reads as if it took a value (``--local true`` is refused)."""
    return typer.Option(*names, help=help, metavar="")


def _fail(message: str, code: int = 2) -> typer.Exit:
    # Escaped: messages quote user input and commands such as pip install 'vitscope[report]', whose
    # brackets rich would otherwise take for markup and drop. One line, for logs and scripts.
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[green]{task.fields[ok]} ok[/green] [red]{task.fields[failed]} failed[/red]"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
    )


@app.command()
def submit(
    dataset: Annotated[Path, typer.Argument(help="CSV with an image_uri column (see README).")],
    models: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated timm ViT names or models-file entries; 'paper' = the paper's four."
        ),
    ] = None,
    models_file: Annotated[
        Path | None, typer.Option(help="TOML file of named models (or VITSCOPE_MODELS_FILE).")
    ] = None,
    local: Annotated[
        bool, _flag("--local", help="Process in this process (default when no broker is set).")
    ] = False,
    wait: Annotated[bool, _flag("--wait", help="Follow a distributed batch until it is done.")] = False,
    name: Annotated[str | None, typer.Option(help="A unique name to refer to the batch by.")] = None,
    head_fusion: Annotated[HeadFusion, typer.Option(help="Rollout head fusion.")] = HeadFusion.MEAN,
    discard_ratio: Annotated[
        float, typer.Option(help="Fraction of lowest attention discarded per block.")
    ] = 0.9,
    preprocess: Annotated[
        Preprocess | None, typer.Option(help="Override every model's preprocessing.")
    ] = None,
    raw_attention: Annotated[
        bool, _flag("--raw-attention", help="Also store attention.npy [L,H,N,N] (large).")
    ] = False,
    target_column: Annotated[
        str | None, typer.Option(help="Column with the target class (default: target).")
    ] = None,
    top_k: Annotated[int, typer.Option(help="Predictions kept per job.")] = 5,
    layer_scores: Annotated[
        LayerScoreReduction, typer.Option(help="Per-layer score reduction.")
    ] = LayerScoreReduction.QUERY_MAX,
    weights: Annotated[
        str | None, typer.Option(help="Weights for every model: 'pretrained', 'random', a path, s3://…")
    ] = None,
    random_if_offline: Annotated[
        bool,
        _flag(
            "--random-if-offline",
            help="--local only: use RANDOM weights (labelled) when pretrained ones are unreachable.",
        ),
    ] = False,
    metrics: Annotated[
        str | None,
        typer.Option(
            help="Faithfulness metrics: all, standard (all but sanity), or a list of deletion, insertion, "
            "localization, sanity (see docs/metrics.md).",
        ),
    ] = None,
) -> None:
    """Create a batch of image × model jobs and run it (locally) or enqueue it (with a broker)."""
    settings = get_settings()
    distributed = bool(settings.broker_url) and not local
    if random_if_offline and distributed:
        raise _fail("--random-if-offline needs --local: only a local run can check weights before submitting")
    try:
        models_file = models_file or settings.models_file
        options = SubmitOptions(
            models=resolve_models_option(models),
            models_file=models_file,
            settings=MethodSettings(
                head_fusion=head_fusion,
                discard_ratio=discard_ratio,
                layer_score_reduction=layer_scores,
                raw_attention=raw_attention,
                top_k=top_k,
            ),
            preprocess=preprocess,
            weights=weights,
            target_column=target_column,
            name=name,
            metrics=_metric_settings(models_file, metrics),
        )
        # Every refusal comes before any model loads and before the batch exists, cheapest first: the
        # --models names, the services (exit 3 in seconds, not after reading a million rows), the
        # name, then each row (its models, its local file, its target). The embedded SQLite file,
        # which cannot be unreachable, is opened (created) only once the input is known to be valid.
        check_models(options)
        embedded = sa.make_url(settings.resolved_database_url()).get_backend_name() == "sqlite"
        db = None if embedded else _checked_database(settings, name)
        celery = _reachable_broker(settings) if distributed else None
        roots = None if distributed else FileRoots(settings.file_roots or [dataset.resolve().parent])
        plan = plan_submission(dataset, options, checks=RowChecks(file_roots=roots))
        db = db or _checked_database(settings, name)
        if celery is not None:
            _submit_distributed(settings, db, celery, plan, options, wait=wait)
        else:
            _submit_local(settings, db, plan, options, random_if_offline=random_if_offline)
    except TransientError as exc:
        raise _fail(str(exc), EXIT_UNAVAILABLE) from None
    except (VitscopeError, ValueError) as exc:
        raise _fail(str(exc)) from None


def _metric_settings(models_file: Path | None, option: str | None) -> MetricSettings:
    """The models file's ``[metrics]`` section (or the defaults), with ``--metrics`` choosing the families."""
    base = load_metrics_section(models_file) if models_file else MetricSettings()
    return base if option is None else base.with_families(parse_metrics_option(option))


def _checked_database(settings: Settings, name: str | None) -> Database:
    """The database, opened (exit 3 if unreachable), with ``--name`` known to be free in it."""
    db = open_database(settings)
    if name is not None:
        with db.session() as session:
            check_name_free(session, name)
    return db


def _reachable_broker(settings: Settings) -> Celery:
    """The Celery app, once its broker has answered: an unreachable one stops the submission before
    the dataset is read and leaves no batch behind."""
    from common.celery_app import make_celery
    from common.publish import check_broker

    celery = make_celery(settings)
    check_broker(celery)
    return celery


def _submit_distributed(
    settings: Settings, db: Database, celery: Celery, plan: Plan, options: SubmitOptions, *, wait: bool
) -> None:
    if plan.local_rows:
        err.print(
            f"[bold yellow]WARNING: {plan.local_rows:,} row(s) name local files (file:// or paths). Workers read "
            "local files only under their own VITSCOPE_FILE_ROOTS (none by default), so these jobs fail unless "
            "that folder is shared with the workers and set there; s3:// works everywhere.[/bold yellow]"
        )
    start = time.perf_counter()
    submission = commit_plan(db, plan, options, mode="distributed")
    try:
        messages = enqueue(celery, db, submission.batch_id, chunk_size=settings.chunk_size)
    except TransientError as exc:
        # Committed but not (fully) published: the batch is kept, and completed by `producer retry`
        # (or by a worker's reaper after VITSCOPE_REPUBLISH_AFTER_SECONDS).
        raise TransientError(
            f"{exc}; batch {submission.batch_id} is saved but not published: run `producer retry "
            f"{submission.batch_id}` once the broker is back"
        ) from exc
    elapsed = time.perf_counter() - start
    err.print(
        f"enqueued {submission.jobs} job(s) in {messages} message(s) in {elapsed:.1f} s "
        f"({submission.jobs / max(elapsed, 1e-9):,.0f} jobs/s)"
    )
    if not wait:
        _next(f"producer status {submission.batch_id} --watch")
    code = _follow(db, submission.batch_id) if wait else 0
    out.print(submission.batch_id)
    raise typer.Exit(code)


def _submit_local(
    settings: Settings, db: Database, plan: Plan, options: SubmitOptions, *, random_if_offline: bool
) -> None:
    from worker.local import load_models, run_batch, unavailable_weights
    from worker.pipeline import Runtime

    specs = dict(plan.specs)
    missing = unavailable_weights(specs, weights_dir=settings.weights_dir)
    if missing and not random_if_offline:
        raise WeightsUnavailableError(_offline_message(missing))
    specs |= {name: ModelSpec.from_dict({**specs[name].to_dict(), "weights": RANDOM}) for name in missing}
    runtime = Runtime.from_settings(settings, db=db)
    try:
        err.print(f"loading {len(specs)} model(s) on {runtime.device} …")
        warming = time.perf_counter()
        replacements = {name: specs[name] for name in missing}
        replacements |= load_models(runtime, specs, random_fallback=random_if_offline)
        runtime.warm_up()
        warmup = time.perf_counter() - warming
        _random_notice(specs, offline=sorted(replacements))
        if replacements:
            plan = plan_submission(plan.path, options, replace=replacements)
        submission = commit_plan(db, plan, options, mode="local")
        err.print(f"batch {submission.batch_id}: {submission.jobs} job(s)")
        with _progress() as progress:
            task = progress.add_task("explaining", total=submission.jobs, ok=0, failed=0)
            tally = {"ok": 0, "failed": 0}

            def on_job(_job_id: str, state: JobState) -> None:
                if state is JobState.QUEUED:
                    return
                tally["ok" if state is JobState.SUCCEEDED else "failed"] += 1
                progress.update(task, advance=1, **tally)

            def on_score(what: str, done: int, total: int) -> None:
                # Metrics can take minutes per micro-batch, whose jobs all finish at its end.
                scoring = f"explaining · scoring ({what}) {done}/{total}"
                progress.update(task, description="explaining" if done >= total else scoring)

            runtime.on_score_progress = on_score
            run = run_batch(runtime, submission.batch_id, on_job=on_job)
    finally:
        runtime.close()
    storage = settings.resolved_storage_url()
    err.print(
        f"done in {run.seconds:.1f} s: {run.succeeded} computed, {run.reused} reused, {run.failed} failed "
        f"({run.succeeded / max(run.seconds, 1e-9):.2f} computed images/s)\n"
        f"warm-up:   {warmup:.1f} s before the first job (loading models, compiling image kernels)\n"
        f"artifacts: {storage}\n"
        f"database:  {_safe_url(settings.resolved_database_url())}"
    )
    _next(f"producer status {submission.batch_id}", f"producer results {submission.batch_id} --format csv")
    out.print(submission.batch_id)
    raise typer.Exit(1 if run.failed else 0)


def _next(*commands: str) -> None:
    """``next:`` hints, one command per line, each printed whole: a terminal may break the line at
    its edge, but never inside a command at a space, where a copy would lose its second half."""
    for index, command in enumerate(commands):
        err.print(f"{'next:' if index == 0 else '':<11}{escape(command)}", soft_wrap=True)


def _offline_message(missing: Mapping[str, str]) -> str:
    """One message for every model whose pretrained weights cannot be got, and the two ways on."""
    reasons = "; ".join(f"{name}: {reason.split(' Options: ', 1)[0]}" for name, reason in missing.items())
    names = ", ".join(missing)
    return (
        f"cannot get pretrained weights for {len(missing)} model(s) ({names}). {reasons}. To run anyway: "
        f"--random-if-offline uses RANDOM weights for just these, or --weights random for every model "
        "(smoke runs: maps of an untrained network); or put <arch>.safetensors in VITSCOPE_WEIGHTS_DIR"
    )


def _random_notice(specs: Mapping[str, ModelSpec], *, offline: Sequence[str]) -> None:
    """One warning for every model running with RANDOM weights, however many there are."""
    chosen = [name for name, spec in specs.items() if spec.is_random and name not in offline]
    parts = []
    if offline:
        parts.append(f"{', '.join(offline)} (pretrained weights unreachable, as --random-if-offline allows)")
    if chosen:
        parts.append(f"{', '.join(chosen)} (asked for)")
    if parts:
        err.print(
            f"[bold yellow]WARNING: RANDOM weights for {'; '.join(escape(p) for p in parts)}. Their maps show an "
            "untrained network, not what a trained model attends to; their jobs record weights_source = "
            "RANDOM.[/bold yellow]"
        )


def _safe_url(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


def _follow(db: Database, batch_id: str, poll_seconds: float = 1.0) -> int:
    """A live progress bar until every job is done; non-zero when any failed."""
    with _progress() as progress:
        task = progress.add_task("waiting", total=None, ok=0, failed=0)
        while True:
            try:
                with db.session() as session:
                    status = batch_status(session, get_batch(session, batch_id))
            except DatabaseUnavailableError:
                # The workers ride out a database restart; so does the one following them.
                progress.update(task, description="waiting (database unreachable, retrying)")
                time.sleep(poll_seconds)
                continue
            progress.update(task, description="waiting")
            counts = status.counts
            progress.update(
                task,
                total=status.total,
                completed=status.done,
                ok=counts[JobState.SUCCEEDED],
                failed=counts[JobState.FAILED],
            )
            if status.finished:
                break
            time.sleep(poll_seconds)
    return 1 if status.counts[JobState.FAILED] else 0


@app.command()
def status(
    batch: Annotated[str, typer.Argument(help="Batch id or name.")],
    watch: Annotated[bool, _flag("--watch", help="Refresh every 2 s until the batch is done.")] = False,
) -> None:
    """Counts by state, throughput, ETA, failures with reasons, live workers."""
    settings = get_settings()
    try:
        db = open_database(settings, create=False)
        while True:
            with db.session() as session:
                found = get_batch(session, batch)
                state = batch_status(session, found, stale_after_seconds=settings.republish_after_seconds)
                workers = None
                if found.mode == "distributed":
                    workers = live_workers(session, stale_after_seconds=3 * settings.heartbeat_seconds)
            out.print(status_view(state, workers, width=out.width))
            if not watch or state.finished:
                break
            time.sleep(2)
    except VitscopeError as exc:
        raise _fail(str(exc)) from None


@app.command()
def results(
    batch: Annotated[str, typer.Argument(help="Batch id or name.")],
    model: Annotated[str | None, typer.Option(help="Only this model's jobs.")] = None,
    state: Annotated[
        JobState | None, typer.Option("--state", "--status", help="Only jobs in this state.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv, json (an array) or jsonl.")] = "table",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to a file instead of stdout.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Rows shown by --format table.")] = 50,
) -> None:
    """Every job's state, prediction and artifact URIs; csv and json have the same columns, named as
    in the job_results SQL view, and the dataset's own columns."""
    writers = {"csv": write_csv, "json": write_json, "jsonl": write_jsonl}
    if fmt not in (*writers, "table"):
        raise _fail(f"unknown --format {fmt!r}: use table, csv, json or jsonl")
    try:
        db = open_database(get_settings(), create=False)
        with db.session() as session:
            found = get_batch(session, batch)
            jobs = iter_job_results(session, found.id, model=model, state=state)
            if fmt == "table":
                count = results_table(jobs, out, limit=limit)
            elif output is not None:
                with output.open("w", newline="") as handle:
                    count = writers[fmt](jobs, handle)
                err.print(f"wrote {count} job(s) to {output}")
            else:
                count = writers[fmt](jobs, sys.stdout)
            if not count and (model is not None or state is not None):
                asked = {"models": [model] if model else [], "states": [state.value] if state else []}
                err.print(escape(_nothing_matched(session, found.id, **asked)))
    except VitscopeError as exc:
        raise _fail(str(exc)) from None


def _nothing_matched(
    session: Session, batch_id: str, *, models: Sequence[str] = (), states: Sequence[str] = ()
) -> str:
    """What a filter that matched no job could have matched: the batch's models (with the closest to
    a model name given) and its jobs by state."""
    present, counts = batch_contents(session, batch_id)
    asked = " and ".join(
        part
        for part in (
            f"--model {','.join(models)}" if models else "",
            f"--state {','.join(states)}" if states else "",
        )
        if part
    )
    close: list[str] = []
    for model in models:
        if model not in present:
            close += [name for name in present if model in name] or difflib.get_close_matches(
                model, present, n=3
            )
    hint = f" (did you mean {', '.join(dict.fromkeys(close))}?)" if close else ""
    jobs = ", ".join(f"{count} {name}" for name, count in counts.items()) or "no jobs"
    return (
        f"no job of batch {batch_id} matches {asked}{hint}. "
        f"Its models: {', '.join(present) or 'none'}; its jobs: {jobs}."
    )


def _require_match(
    db: Database, batch: str, models: Sequence[str] | None, states: Sequence[str] | None
) -> None:
    """Refuse model or state filters under which the batch has no job at all, saying what it has."""
    if not models and not states:
        return
    with db.session() as session:
        found = get_batch(session, batch)
        present, counts = batch_contents(session, found.id)
        if any(model not in present for model in models or ()) or (
            states and not any(counts.get(state) for state in states)
        ):
            raise NotFoundError(_nothing_matched(session, found.id, models=models or (), states=states or ()))


@app.command()
def batches(
    limit: Annotated[int, typer.Option(help="How many of the newest batches to list.")] = 20,
) -> None:
    """The newest batches: id, name, mode, when created, models, jobs done and failed."""
    try:
        db = open_database(get_settings(), create=False)
        with db.session() as session:
            found = recent_batches(session, limit=limit)
        batches_table(found, out)
    except VitscopeError as exc:
        raise _fail(str(exc)) from None


@app.command()
def compare(
    batch: Annotated[str, typer.Argument(help="Batch id or name.")],
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json (a list of objects).")] = "table",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to a file instead of stdout.")
    ] = None,
) -> None:
    """Faithfulness metrics per model × method × metric: n, mean, 95% CI; the random map as a baseline."""
    writers = {"csv": write_compare_csv, "json": write_compare_json}
    if fmt not in (*writers, "table"):
        raise _fail(f"unknown --format {fmt!r}: use table, csv or json")
    try:
        db = open_database(get_settings(), create=False)
        with db.session() as session:
            found = get_batch(session, batch)
            summaries = metric_summaries(session, found.id)
        if fmt == "table":
            compare_table(summaries, out)
        elif output is not None:
            with output.open("w", newline="") as handle:
                count = writers[fmt](summaries, handle)
            err.print(f"wrote {count} row(s) to {output}")
        else:
            writers[fmt](summaries, sys.stdout)
    except VitscopeError as exc:
        raise _fail(str(exc)) from None


@app.command()
def retry(
    batch: Annotated[str, typer.Argument(help="Batch id or name.")],
    local: Annotated[bool, _flag("--local", help="Run the retried jobs in this process.")] = False,
) -> None:
    """Re-enqueue the batch's failed jobs (with a fresh attempt budget).

    A distributed batch whose messages were never all sent (the producer died between committing
    the jobs and publishing them) has every queued job published again as well, and so are queued
    jobs with no publication for VITSCOPE_REPUBLISH_AFTER_SECONDS (lost messages).
    """
    settings = get_settings()
    try:
        db = open_database(settings, create=False)
        with db.session() as session:
            found = get_batch(session, batch)
            unpublished = found.mode == "distributed" and found.published_at is None
            lost = []
            if found.mode == "distributed" and not unpublished:
                lost = republish_stale(
                    session, older_than_seconds=settings.republish_after_seconds, batch_id=found.id
                )
            jobs = retry_failed(session, found.id)
        err.print(f"{len(jobs)} failed job(s) of batch {found.id} queued again")
        if unpublished:
            err.print("the batch was never fully published: enqueueing all its queued jobs")
        if lost:
            err.print(f"{len(lost)} queued job(s) with no recent publication published again")
        jobs = [*jobs, *lost]
        if not jobs and not unpublished:
            return
        if settings.broker_url and not local:
            from common.celery_app import make_celery

            everything = None if unpublished else jobs
            enqueue(make_celery(settings), db, found.id, chunk_size=settings.chunk_size, jobs=everything)
            return
        from worker.local import run_batch
        from worker.pipeline import Runtime

        runtime = Runtime.from_settings(settings, db=db)
        try:
            runtime.warm_up()
            run = run_batch(runtime, found.id)
        finally:
            runtime.close()
        err.print(f"{run.succeeded} succeeded, {run.reused} reused, {run.failed} failed")
        raise typer.Exit(1 if run.failed else 0)
    except TransientError as exc:
        raise _fail(str(exc), EXIT_UNAVAILABLE) from None
    except VitscopeError as exc:
        raise _fail(str(exc)) from None


def _names(option: str | None) -> tuple[str, ...] | None:
    """A comma-separated option as a tuple of its non-empty items; None when not given."""
    if option is None:
        return None
    return tuple(item.strip() for item in option.split(",") if item.strip())


def _states(option: str | None) -> tuple[JobState, ...] | None:
    names = _names(option)
    if names is None:
        return None
    allowed = ", ".join(state.value for state in JobState)
    unknown = [name for name in names if name not in {state.value for state in JobState}]
    if unknown:
        raise ValueError(f"unknown --state {', '.join(unknown)}: use {allowed}")
    return tuple(JobState(name) for name in names)


@app.command()
def report(
    batch: Annotated[str, typer.Argument(help="Batch id or name.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the site into (created).")],
    models: Annotated[str | None, typer.Option(help="Only these models (comma-separated).")] = None,
    state: Annotated[
        str | None, typer.Option(help="Only jobs in these states (comma-separated: succeeded,failed,…).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N images.")] = None,
    per_page: Annotated[int, typer.Option(help="Images per page.")] = 50,
    links: Annotated[
        LinkMode,
        typer.Option(
            help="copy pictures into the folder, link them relatively (local storage) or presigned (S3)."
        ),
    ] = LinkMode.COPY,
    expires: Annotated[
        int, typer.Option(help="Seconds presigned links stay valid (at most 7 days).")
    ] = MAX_PRESIGN_SECONDS,
) -> None:
    """Write a static, self-contained HTML report of a batch: every image's maps, predictions and state."""
    from producer.site import ReportOptions, write_report

    try:
        options = ReportOptions(
            models=_names(models),
            states=_states(state),
            limit=limit,
            per_page=per_page,
            links=links,
            expires_seconds=expires,
        )
        db = open_database(get_settings(), create=False)
        _require_match(db, batch, options.models, [s.value for s in options.states or ()])
        with _report_progress() as progress:
            task = progress.add_task("writing report", total=None)
            written = write_report(
                db,
                batch,
                out_dir,
                options,
                on_start=lambda images: progress.update(task, total=images),
                on_image=lambda: progress.advance(task),
            )
    except (VitscopeError, ValueError) as exc:
        raise _fail(str(exc)) from None
    err.print(f"{written.images} image(s), {written.jobs} job(s) on {written.pages} page(s)")
    out.print(str(written.index))


def _report_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
    )


@app.command()
def figures(
    batch: Annotated[str, typer.Argument(help="Batch id or name.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the figures into (created).")],
    images: Annotated[
        str | None,
        typer.Option(help="Images by CSV id or file name (comma-separated); default: the first N."),
    ] = None,
    first: Annotated[int, typer.Option(help="How many images when --images is not given.")] = 4,
    models: Annotated[str | None, typer.Option(help="Only these models (comma-separated).")] = None,
    pdf: Annotated[bool, _flag("--pdf/--no-pdf", help="Also write each figure as PDF.")] = True,
) -> None:
    """The paper's figures from a batch: Fig. 4.1 layer-score grids, Figs. 4.2-4.3 map panels (PNG, PDF)."""
    try:
        from producer.figures import FigureOptions, write_figures

        db = open_database(get_settings(), create=False)
        _require_match(db, batch, _names(models), None)
        written = write_figures(
            db,
            batch,
            out_dir,
            FigureOptions(images=_names(images), first=first, models=_names(models), pdf=pdf),
        )
    except (VitscopeError, ValueError) as exc:
        raise _fail(str(exc)) from None
    for path in written:
        out.print(str(path))


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    url = get_settings().resolved_database_url()
    upgrade(url, revision)
    err.print(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision, e.g. base or -1.")]) -> None:
    """Revert migrations down to REVISION."""
    downgrade(get_settings().resolved_database_url(), revision)
    err.print(f"database at {revision}")


@db_app.command("current")
def db_current() -> None:
    """Print the database's schema revision and the newest one."""
    try:
        require_existing(get_settings())  # asking must not create it
    except NotFoundError as exc:
        raise _fail(str(exc)) from None
    db = Database(get_settings().resolved_database_url())
    out.print(f"current: {current_revision(db.engine) or 'none'}  head: {head_revision()}")
    db.dispose()


def main() -> None:
    app()
