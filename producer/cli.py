"""``producer``: submit datasets, follow batches, read results, retry failures, migrate the database,
and see the results: a browsable HTML report (``report``) and the paper's figures (``figures``).

A thin shell: it parses options, calls ``producer.submit`` / ``common.db`` and prints. Distributed
mode publishes by task name and never imports torch; only ``--local`` (the default without a
broker) imports the worker package to run the same pipeline in this process.
"""

from __future__ import annotations

import difflib
import enum
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, NoReturn

import sqlalchemy as sa
import typer
from rich.console import Console
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
from common.db.jobs import reap_expired
from common.db.metric_summaries import metric_summaries
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
from common.metric_settings import (
    METHODS,
    RANDOM_METHOD,
    MetricSettings,
    load_metrics_section,
    parse_metrics_option,
)
from common.modelspec import RANDOM, ModelSpec, resolve_models_option
from common.s3_sources import SETTING as S3_SOURCES_SETTING
from common.s3_sources import S3Sources
from common.settings import Settings, get_settings
from producer.compare import compare_table, write_compare_csv, write_compare_json
from producer.output import batches_table, results_table, status_view, write_csv, write_json, write_jsonl
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
from producer.terminal_text import terminal_literal as literal

if TYPE_CHECKING:
    from celery import Celery

    from worker.pipeline import Runtime

__all__ = ["app", "main"]


class _Command(typer.core.TyperCommand):
    """A command whose flags typer adds itself (``--help``) are listed as flags, like ``_flag``'s."""

    def get_params(self, ctx: Any) -> list[Any]:  # typer's vendored click.Context and .Parameter
        return _bare_flags(super().get_params(ctx))


class _Group(typer.core.TyperGroup):
    """The same for a group's ``--help``, ``--install-completion`` and ``--show-completion``."""

    def get_params(self, ctx: Any) -> list[Any]:  # typer's vendored click.Context and .Parameter
        return _bare_flags(super().get_params(ctx))


def _bare_flags(params: list[Any]) -> list[Any]:
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # typer would label it ``<bool>``, as if it took a value
    return params


app = typer.Typer(
    cls=_Group, help="Submit ViT attention-explanation batches and read their results.", no_args_is_help=True
)
db_app = typer.Typer(cls=_Group, help="Database schema migrations (Alembic).", no_args_is_help=True)
app.add_typer(db_app, name="db")
shards_app = typer.Typer(cls=_Group, help="Artifact shards (docs/storage.md).", no_args_is_help=True)
app.add_typer(shards_app, name="shards")

# No emoji codes: ":warning:" in an id is text to show (``producer.terminal_text`` does the rest).
out = Console(highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False)


# Exit status of a command stopped by an unreachable service (database, broker): retrying may help,
# unlike invalid input (2).
EXIT_UNAVAILABLE = 3
# Exit status of a local run stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


def _flag(*names: str, help: str) -> typer.models.OptionInfo:
    """A boolean option shown in help as the flag it is: typer labels every option with its type,
    and ``--local <bool>`` reads as if it took a value (``--local true`` is refused)."""
    return typer.Option(*names, help=help, metavar="")


def _fail(message: str, code: int = 2) -> typer.Exit:
    # Literal: messages quote user input (markup, escape sequences) and commands such as
    # pip install 'vitscope[report]', whose brackets rich would otherwise take for markup and drop.
    err.print(f"[red]error:[/red] {literal(message, newlines=True)}", soft_wrap=True)
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


@app.command(cls=_Command)
def submit(
    dataset: Annotated[Path, typer.Argument(help="CSV with an image_uri column (see README).")],
    models: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated timm ViT names, hf:<hub id or folder> (transformers) or models-file entries; 'paper' = the paper's four."
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
        plan = plan_submission(
            dataset,
            options,
            check_s3=_s3_check(settings, distributed=distributed),
            checks=RowChecks(file_roots=roots),
        )
        _warn_refused_s3(plan, distributed=distributed)
        db = db or _checked_database(settings, name)
        if celery is not None:
            _submit_distributed(settings, db, celery, plan, options, wait=wait)
        else:
            _submit_local(settings, db, plan, options, random_if_offline=random_if_offline)
    except KeyboardInterrupt:
        raise _fail("interrupted", EXIT_INTERRUPTED) from None
    except TransientError as exc:
        raise _fail(str(exc), EXIT_UNAVAILABLE) from None
    except (VitscopeError, ValueError) as exc:
        raise _fail(str(exc)) from None


def _s3_check(settings: Settings, *, distributed: bool) -> Callable[[str], str | None] | None:
    """The S3 sources' verdict on a URI, where this machine can tell what the readers will decide.

    A local run reads with these very settings. Distributed workers have their own, and the
    submitting machine's are a fair guess only when it names S3 sources or stores results on S3
    itself (as the workers' machines do); otherwise nothing is said.
    """
    results = settings.resolved_storage_url()
    if distributed and settings.s3_sources is None and not results.startswith("s3://"):
        return None
    return S3Sources(settings.s3_sources, results_url=results).refusal


def _warn_refused_s3(plan: Plan, *, distributed: bool) -> None:
    scan = plan.scan
    if not scan.refused_s3_rows:
        return
    who = "the workers refuse them unless their own setting allows" if distributed else "their jobs will fail"
    err.print(
        f"[bold yellow]WARNING: {scan.refused_s3_rows:,} row(s) name S3 objects outside "
        f"{S3_SOURCES_SETTING} ({who}); the first: {literal(scan.refused_s3_example)}[/bold yellow]"
    )


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
        # Committed but not (fully) published: the batch is kept, and completed by `producer resume`
        # (or by a worker's reaper after VITSCOPE_REPUBLISH_AFTER_SECONDS).
        raise TransientError(
            f"{exc}; batch {submission.batch_id} is saved but not published: run `producer resume "
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


def _become_a_worker() -> None:
    """Run the pipeline in this process as ``worker start`` runs it: with passive OpenMP threads, set
    before the worker's first import loads torch (``worker.cores.wait_passively_in_openmp``)."""
    from worker.cores import wait_passively_in_openmp

    wait_passively_in_openmp()


def _submit_local(
    settings: Settings, db: Database, plan: Plan, options: SubmitOptions, *, random_if_offline: bool
) -> None:
    _become_a_worker()
    from worker.local import load_models, unavailable_weights
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
        _run_local(settings, runtime, submission.batch_id, warmup=warmup)
    finally:
        runtime.close()


def _run_local(
    settings: Settings, runtime: Runtime, batch_id: str, *, warmup: float | None = None
) -> NoReturn:
    """Run the batch's queued jobs here with a progress bar, then say how it went and exit: 0 when
    every job succeeded, 1 when some failed, 130 when Ctrl-C stopped it (the jobs in hand handed back;
    ``producer resume`` runs the rest). ``submit --local`` and ``resume`` share it, output and all."""
    from worker.local import RunInterrupted, run_batch

    with runtime.db.session() as session:
        status = batch_status(session, get_batch(session, batch_id))
    ok = status.counts[JobState.SUCCEEDED]
    tally = {"ok": ok, "failed": status.counts[JobState.FAILED]}
    with _progress() as progress, _second_interrupt_exits(batch_id):
        task = progress.add_task(
            "explaining", total=status.total, completed=ok, ok=tally["ok"], failed=tally["failed"]
        )

        def on_job(_job_id: str, state: JobState) -> None:
            if state is JobState.QUEUED:
                return
            tally["ok" if state is JobState.SUCCEEDED else "failed"] += 1
            progress.update(task, advance=1, ok=tally["ok"], failed=tally["failed"])

        def on_score(what: str, done: int, total: int) -> None:
            # Metrics can take minutes per micro-batch, whose jobs all finish at its end.
            scoring = f"explaining · scoring ({what}) {done}/{total}"
            progress.update(task, description="explaining" if done >= total else scoring)

        runtime.on_score_progress = on_score
        try:
            run = run_batch(runtime, batch_id, on_job=on_job)
        except RunInterrupted as stopped:
            progress.update(task, description="[yellow]interrupted[/yellow]")
            progress.stop()
            err.print(
                f"interrupted after {stopped.run.seconds:.1f} s: {stopped.run.succeeded} computed, "
                f"{stopped.run.reused} reused, {stopped.run.failed} failed; {stopped.run.released} job(s) in "
                "hand went back to the queue (no attempt spent)\n"
                f"resume:    producer resume {batch_id}"
            )
            out.print(batch_id)
            _exit_at_once(EXIT_INTERRUPTED)
    storage = settings.resolved_storage_url()
    err.print(
        f"done in {run.seconds:.1f} s: {run.succeeded} computed, {run.reused} reused, {run.failed} failed "
        f"({run.succeeded / max(run.seconds, 1e-9):.2f} computed images/s)\n"
        + (
            f"warm-up:   {warmup:.1f} s before the first job (loading models, compiling image kernels)\n"
            if warmup is not None
            else ""
        )
        + f"artifacts: {literal(storage)}\n"
        f"database:  {literal(_safe_url(settings.resolved_database_url()))}"
    )
    _next(f"producer status {batch_id}", f"producer results {batch_id} --format csv")
    out.print(batch_id)
    raise typer.Exit(1 if run.failed else 0)


@contextmanager
def _second_interrupt_exits(batch_id: str) -> Iterator[None]:
    """The first Ctrl-C raises ``KeyboardInterrupt`` in the run (which hands its jobs back) and says
    so; from then on SIGINT has the system's default action, so a second Ctrl-C ends the process at
    once, whatever it is blocked in (a Python handler would wait for the call in progress to return)."""
    interrupted = False

    def first(_signum: int, _frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        err.print(
            "\nstopping: handing the jobs in hand back to the queue (Ctrl-C again exits at once; "
            f"`producer resume {batch_id}` then takes back what is left)"
        )
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        if not interrupted:
            signal.signal(signal.SIGINT, previous)


def _exit_at_once(code: int) -> NoReturn:
    """Exit without waiting for this process's threads: after Ctrl-C, a download or upload in flight
    would hold a normal exit for up to its timeout (30-60 s), and nothing it could still do matters —
    the jobs are back in the queue and everything recorded is committed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _next(*commands: str) -> None:
    """``next:`` hints, one command per line, each printed whole: a terminal may break the line at
    its edge, but never inside a command at a space, where a copy would lose its second half."""
    for index, command in enumerate(commands):
        err.print(f"{'next:' if index == 0 else '':<11}{literal(command)}", soft_wrap=True)


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
            f"[bold yellow]WARNING: RANDOM weights for {'; '.join(literal(p) for p in parts)}. Their maps show an "
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


@app.command(cls=_Command)
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


class ResultsFormat(enum.StrEnum):
    TABLE = "table"
    CSV = "csv"
    JSON = "json"
    JSONL = "jsonl"


class CompareFormat(enum.StrEnum):
    TABLE = "table"
    CSV = "csv"
    JSON = "json"


def _table_of(summaries: Sequence[Any], against: str) -> int:
    compare_table(summaries, out, against)
    return len(summaries)


def _emit(
    table: Callable[[], int],
    write: Callable[[IO[str]], int] | None,
    output: Path | None,
    noun: str,
) -> int:
    """The output block of ``results`` and ``compare``: a table on the terminal (``write`` is None),
    else the file format to ``--output`` (saying how many ``noun`` it wrote) or to stdout."""
    if write is None:
        return table()
    if output is None:
        return write(sys.stdout)
    with output.open("w", newline="") as handle:
        count = write(handle)
    err.print(f"wrote {count} {noun} to {literal(output)}")
    return count


@app.command(cls=_Command)
def results(
    batch: Annotated[str, typer.Argument(help="Batch id or name.")],
    model: Annotated[str | None, typer.Option(help="Only this model's jobs.")] = None,
    state: Annotated[
        JobState | None, typer.Option("--state", "--status", help="Only jobs in this state.")
    ] = None,
    fmt: Annotated[
        ResultsFormat, typer.Option("--format", help="table, csv, json (an array) or jsonl.")
    ] = ResultsFormat.TABLE,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to a file instead of stdout.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Rows shown by --format table.")] = 50,
) -> None:
    """Every job's state, prediction and artifact URIs (member URIs for shards: docs/storage.md); csv
    and json have the same columns, named as in the job_results SQL view, and the dataset's own columns."""
    writers = {ResultsFormat.CSV: write_csv, ResultsFormat.JSON: write_json, ResultsFormat.JSONL: write_jsonl}
    try:
        db = open_database(get_settings(), create=False)
        with db.session() as session:
            found = get_batch(session, batch)
            jobs = iter_job_results(session, found.id, model=model, state=state)
            count = _emit(
                lambda: results_table(jobs, out, limit=limit),
                None if fmt is ResultsFormat.TABLE else lambda handle: writers[fmt](jobs, handle),
                output,
                "job(s)",
            )
            if not count and (model is not None or state is not None):
                asked = {"models": [model] if model else [], "states": [state.value] if state else []}
                err.print(literal(_nothing_matched(session, found.id, **asked)))
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


@app.command(cls=_Command)
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


@app.command(cls=_Command)
def compare(
    batch: Annotated[str, typer.Argument(help="Batch id or name.")],
    fmt: Annotated[
        CompareFormat, typer.Option("--format", help="table, csv or json (a list of objects).")
    ] = CompareFormat.TABLE,
    against: Annotated[
        str,
        typer.Option(
            "--against",
            help="The method every other is paired with, image by image: random (default), rollout, "
            "grad_rollout, relevance or last_layer_score.",
        ),
    ] = RANDOM_METHOD,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to a file instead of stdout.")
    ] = None,
) -> None:
    """Faithfulness metrics per model × method × metric: n, mean, 95% CI, and the paired difference
    against the random map (or --against METHOD): mean, 95% CI, Wilcoxon signed-rank p."""
    writers = {CompareFormat.CSV: write_compare_csv, CompareFormat.JSON: write_compare_json}
    if against not in METHODS:
        raise _fail(f"unknown --against method {against!r}: use one of {', '.join(METHODS)}")
    try:
        db = open_database(get_settings(), create=False)
        with db.session() as session:
            found = get_batch(session, batch)
            summaries = metric_summaries(session, found.id, against=against)
        _emit(
            lambda: _table_of(summaries, against),
            None if fmt is CompareFormat.TABLE else lambda handle: writers[fmt](summaries, handle, against),
            output,
            "row(s)",
        )
    except VitscopeError as exc:
        raise _fail(str(exc)) from None


@app.command(cls=_Command)
def resume(
    batch: Annotated[str, typer.Argument(help="Batch id or name.")],
    local: Annotated[
        bool, _flag("--local", help="Run a distributed batch's jobs in this process instead.")
    ] = False,
    wait: Annotated[bool, _flag("--wait", help="Follow a distributed batch until it is done.")] = False,
) -> None:
    """Run every job of the batch that has not succeeded: one command for any interrupted batch.

    Failed jobs get a fresh attempt budget; running jobs whose process is gone (a local run killed
    with SIGKILL, a worker whose lease expired) are taken back; then every queued job is run here
    (a local batch, or --local) or published again at once (a distributed batch): a broker that lost
    its messages loses nothing. Jobs running in a live process are left to it. Output and exit codes
    are submit's: 0 all succeeded, 1 some failed, 2 bad input, 3 a service unreachable, 130 Ctrl-C.
    """
    settings = get_settings()
    try:
        db = open_database(settings, create=False)
        with db.session() as session:
            found = get_batch(session, batch)
            batch_id, mode = found.id, found.mode
            specs = {
                name: ModelSpec.from_dict(spec) for name, spec in (found.models.get("specs") or {}).items()
            }
        if mode == "distributed" and not local:
            _resume_distributed(settings, db, batch_id, wait=wait)
        else:
            _resume_local(settings, db, batch_id, specs)
    except KeyboardInterrupt:
        raise _fail(f"interrupted; `producer resume {batch}` starts again", EXIT_INTERRUPTED) from None
    except TransientError as exc:
        raise _fail(str(exc), EXIT_UNAVAILABLE) from None
    except VitscopeError as exc:
        raise _fail(str(exc)) from None


@app.command(cls=_Command, hidden=True)
def retry(
    batch: Annotated[str, typer.Argument(help="Batch id or name.")],
    local: Annotated[bool, _flag("--local", help="Run the jobs in this process.")] = False,
    wait: Annotated[bool, _flag("--wait", help="Follow a distributed batch.")] = False,
) -> None:
    """The former name of ``resume``, kept so that scripts go on working."""
    resume(batch, local=local, wait=wait)


def _take_back(settings: Settings, db: Database, batch_id: str, *, here: bool) -> int:
    """Failed jobs and the running jobs of gone processes back to ``queued``; say what was done and
    return how many jobs are queued now.

    ``here``: the jobs will run in this process, which may judge this host's processes dead (that
    needs the worker package; a distributed resume leaves it to the workers' reapers, and takes back
    only jobs whose lease expired).
    """
    is_dead, host = None, None
    if here:
        from worker.leases import current_identity, is_dead_local_process

        is_dead, host = is_dead_local_process, current_identity().hostname
    with db.session() as session:
        taken, gave_up = reap_expired(
            session, max_attempts=settings.max_attempts, host=host, is_dead=is_dead, batch_id=batch_id
        )
        failed = retry_failed(session, batch_id)
        counts = batch_status(session, get_batch(session, batch_id)).counts
    if taken or gave_up:
        err.print(
            f"{len(taken) + len(gave_up)} job(s) were running in a process that is gone: taken back"
            + (f" ({len(gave_up)} had used their attempts and were queued afresh)" if gave_up else "")
        )
    err.print(f"{len(failed)} failed job(s) of batch {batch_id} queued again")
    if counts[JobState.RUNNING]:
        err.print(f"{counts[JobState.RUNNING]} job(s) are running in a live process: left to it")
    if not counts[JobState.QUEUED]:
        err.print(f"nothing to resume: {counts[JobState.SUCCEEDED]} job(s) succeeded, none queued")
    return counts[JobState.QUEUED]


def _resume_distributed(settings: Settings, db: Database, batch_id: str, *, wait: bool) -> None:
    if not settings.broker_url:
        raise VitscopeError(
            f"batch {batch_id} is distributed: set VITSCOPE_BROKER_URL to publish its jobs, or run them "
            f"here with `producer resume {batch_id} --local`"
        )
    from common.celery_app import make_celery
    from common.publish import check_broker

    celery = make_celery(settings)
    check_broker(celery)  # before anything changes
    _take_back(settings, db, batch_id, here=False)
    start = time.perf_counter()
    try:
        messages = enqueue(celery, db, batch_id, chunk_size=settings.chunk_size)
    except TransientError as exc:
        raise TransientError(f"{exc}; run `producer resume {batch_id}` once the broker is back") from exc
    with db.session() as session:
        queued = batch_status(session, get_batch(session, batch_id)).counts[JobState.QUEUED]
    err.print(
        f"published {queued} queued job(s) in {messages} message(s) in {time.perf_counter() - start:.1f} s "
        "(a job whose message is still on the queue runs once: claims are compare-and-set)"
    )
    code = _follow(db, batch_id) if wait else 0
    out.print(batch_id)
    raise typer.Exit(code)


def _resume_local(settings: Settings, db: Database, batch_id: str, specs: dict[str, ModelSpec]) -> None:
    _become_a_worker()
    from worker.local import load_models
    from worker.pipeline import Runtime

    if not _take_back(settings, db, batch_id, here=True):
        out.print(batch_id)
        raise typer.Exit(0)
    runtime = Runtime.from_settings(settings, db=db)
    try:
        err.print(f"loading {len(specs)} model(s) on {runtime.device} …")
        # The batch's recorded weights, as submitted: falling back to random weights now would mix
        # trained and untrained maps in one batch, so unreachable weights stop the resume instead.
        warming = time.perf_counter()
        load_models(runtime, specs, random_fallback=False)
        runtime.warm_up()
        warmup = time.perf_counter() - warming
        random = sorted(name for name, spec in specs.items() if spec.is_random)
        if random:
            err.print(
                f"[bold yellow]WARNING: {literal(', '.join(random))} run(s) with RANDOM weights, as the batch was "
                "submitted. Their maps show an untrained network, not what a trained model attends to; "
                "jobs record weights_source = RANDOM.[/bold yellow]"
            )
        _run_local(settings, runtime, batch_id, warmup=warmup)
    finally:
        runtime.close()


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


@app.command(cls=_Command)
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
    out.print(literal(written.index))


def _report_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
    )


@app.command(cls=_Command)
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
        out.print(literal(path))


@app.command(cls=_Command)
def artifacts(
    batch: Annotated[str, typer.Argument(help="Batch id or name.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the files into (created).")],
    job: Annotated[str | None, typer.Option(help="Only these jobs (ids, comma-separated).")] = None,
    models: Annotated[str | None, typer.Option(help="Only these models (comma-separated).")] = None,
) -> None:
    """One file per artifact, DIR/<job id>/<name>, from either layout: shards are extracted, objects copied."""
    from producer.artifacts import materialize_artifacts

    try:
        db = open_database(get_settings(), create=False)
        with db.session() as session:
            found = get_batch(session, batch)
            written = materialize_artifacts(
                session, found.id, out_dir, job_ids=_names(job), models=_names(models)
            )
    except (VitscopeError, ValueError) as exc:
        raise _fail(str(exc)) from None
    err.print(f"{written.files} file(s), {written.bytes:,} bytes in {written.requests} read(s)")
    out.print(str(out_dir))


@shards_app.command("orphans", cls=_Command)
def shards_orphans(
    older_than: Annotated[
        float, typer.Option(help="Only shards written more than this many hours ago (their commit is over).")
    ] = 24.0,
    delete: Annotated[bool, _flag("--delete", help="Delete them (default: only list them).")] = False,
) -> None:
    """List (or delete) the shards under the storage URL that no artifact row points into."""
    from datetime import timedelta

    from common.storage import open_store
    from producer.artifacts import delete_orphan_shards, orphan_shards

    if older_than < 0:
        raise _fail("--older-than must be zero or more hours")
    try:
        settings = get_settings()
        store = open_store(settings.resolved_storage_url(), retry_seconds=settings.storage_retry_seconds)
        db = open_database(settings, create=False)
        with db.session() as session:
            keys = orphan_shards(session, store, older_than=timedelta(hours=older_than))
        for key in keys:
            sys.stdout.write(store.uri(key) + "\n")  # not rich: a long URI must stay on one line
        if delete:
            err.print(f"deleted {delete_orphan_shards(store, keys)} orphan shard(s)")
        else:
            err.print(f"{len(keys)} orphan shard(s); --delete removes them")
    except (VitscopeError, ValueError) as exc:
        raise _fail(str(exc)) from None


@db_app.command("upgrade", cls=_Command)
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    url = get_settings().resolved_database_url()
    upgrade(url, revision)
    err.print(f"database at {literal(revision)}")


@db_app.command("downgrade", cls=_Command)
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision, e.g. base or -1.")]) -> None:
    """Revert migrations down to REVISION."""
    downgrade(get_settings().resolved_database_url(), revision)
    err.print(f"database at {literal(revision)}")


@db_app.command("current", cls=_Command)
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
