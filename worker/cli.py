"""``worker start``: one Celery worker per GPU (or one CPU worker), on the queues you choose.

Each GPU gets its own Celery worker process with ``CUDA_VISIBLE_DEVICES`` set to that GPU, a prefork
pool of one child, and that child alone initialises CUDA and loads models (the parent never touches
CUDA, so forking is safe). Why prefork-of-one rather than solo: when the child is killed (OOM
killer, segfault, SIGKILL) the parent sees it at once and, with ``reject_on_worker_lost``, hands the
message back to Redis immediately; the new child re-claims the dead child's jobs without waiting for
their leases. A solo worker that dies takes its message with it until Redis's visibility timeout
expires (``bench/bench_crash_recovery.py`` measures both).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
from typing import Annotated

import typer

from common.celery_app import DEFAULT_QUEUE, QUEUE_PREFIX, TRANSFORMERS_QUEUE, known_queues
from common.settings import Settings, get_settings
from worker.cores import available_cores, cpu_workers_per_gpu, decode_threads, wait_passively_in_openmp

__all__ = ["app", "main", "resolve_gpus", "resolve_queues", "worker_commands"]

app = typer.Typer(help="Run vitscope's GPU/CPU Celery workers.", no_args_is_help=True)


@app.callback()
def _root() -> None:
    """vitscope worker."""


def resolve_queues(option: str | None) -> list[str]:
    """``None``/``all`` → every family queue; ``deit_tiny,vit_base`` → ``vitscope.deit_tiny,…``.

    ``all`` leaves out the ``transformers`` queue where ``transformers`` is not installed (the ``hf``
    extra), so its jobs wait for a worker that can load them instead of failing here.
    """
    if option is None or option.strip() in ("", "all"):
        if importlib.util.find_spec("transformers") is None:
            return [queue for queue in known_queues() if queue != TRANSFORMERS_QUEUE]
        return known_queues()
    queues = []
    for name in option.split(","):
        name = name.strip()
        if name == "default":
            name = DEFAULT_QUEUE
        elif not name.startswith(QUEUE_PREFIX):
            name = QUEUE_PREFIX + name
        if name not in queues:
            queues.append(name)
    return queues


def _visible_gpus() -> list[str]:
    """GPU indices from nvidia-smi, without initialising CUDA in this (forking) process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def resolve_gpus(option: str) -> list[str]:
    """``all`` → every visible GPU (none → CPU); ``none``/``cpu`` → CPU; ``0,1`` → those."""
    option = option.strip().lower()
    if option in ("none", "cpu"):
        return []
    if option == "all":
        return _visible_gpus()
    gpus = [g.strip() for g in option.split(",") if g.strip()]
    if not all(g.isdigit() for g in gpus):
        raise typer.BadParameter(f"--gpus takes all, none or indices like 0,1; got {option!r}")
    return gpus


def worker_commands(
    *,
    gpus: list[str],
    queues: list[str],
    concurrency: int,
    pool: str,
    loglevel: str,
    hostname: str | None,
    cpu_workers: int | None = None,
    decode_slots: int | None = None,
) -> list[tuple[list[str], dict[str, str]]]:
    """(argv, extra environment) for each Celery worker process to start.

    ``cpu_workers`` and ``decode_slots`` are the settings' ``cpu_workers`` and ``decode_threads``:
    given, every worker inherits them; unset, each GPU worker gets its share of the host.

    Each GPU worker's CPU pool (drawing, PNG encoding, writing) gets ``cpu_workers`` processes, by default
    one per two cores of its GPU's share of the host's cores, none on a single core
    (``worker.cores.cpu_workers_per_gpu``); a CPU worker keeps the setting's own default (no pool:
    the model uses the cores).
    """
    base = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.tasks",
        "worker",
        "--queues",
        ",".join(queues),
        "--pool",
        pool,
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]
    env_queues = {"VITSCOPE_WORKER_QUEUES": ",".join(q.removeprefix(QUEUE_PREFIX) for q in queues)}
    host = socket.gethostname()
    if not gpus:
        name = hostname or "cpu@%h"
        concurrency_args = [] if pool == "solo" else ["--concurrency", str(concurrency)]
        env = {**env_queues, "VITSCOPE_DEVICE": "cpu", "VITSCOPE_WORKER_NODE": name.replace("%h", host)}
        return [([*base, *concurrency_args, "--hostname", name], env)]
    commands = []
    pool_size = cpu_workers if cpu_workers is not None else cpu_workers_per_gpu(len(gpus))
    for gpu in gpus:
        name = (hostname or "gpu{gpu}@%h").replace("{gpu}", gpu)
        concurrency_args = [] if pool == "solo" else ["--concurrency", "1"]
        env = {
            **env_queues,
            "CUDA_VISIBLE_DEVICES": gpu,
            "VITSCOPE_DEVICE": "cuda:0",
            "VITSCOPE_WORKER_NODE": name.replace("%h", host),
            "VITSCOPE_CPU_WORKERS": str(pool_size),
        }
        if decode_slots is None:  # the GPU's share of the cores, less its pool
            env["VITSCOPE_DECODE_THREADS"] = str(decode_threads(pool_size, available_cores() // len(gpus)))
        commands.append(([*base, *concurrency_args, "--hostname", name], env))
    return commands


@app.command()
def start(
    gpus: Annotated[
        str, typer.Option(help="all (one worker per visible GPU; CPU if none), none, or 0,1")
    ] = "all",
    concurrency: Annotated[
        int, typer.Option(help="Processes for a CPU worker (a GPU worker always has 1).")
    ] = 1,
    queues: Annotated[
        str | None,
        typer.Option(help="Model-family queues to consume, e.g. deit_tiny,vit_base (default: all)."),
    ] = None,
    pool: Annotated[str, typer.Option(help="prefork (recommended, see module doc) or solo.")] = "prefork",
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "info",
    hostname: Annotated[
        str | None, typer.Option(help="Celery node name; {gpu} is replaced by the GPU index.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the worker commands and exit.")] = False,
) -> None:
    """Start workers and wait; SIGTERM/SIGINT are passed on (Celery then finishes the current chunk)."""
    if pool not in ("prefork", "solo"):
        raise typer.BadParameter("--pool must be prefork or solo")
    settings = get_settings()
    if not settings.broker_url:
        typer.echo("error: set VITSCOPE_BROKER_URL (e.g. redis://host:6379/0) to run workers", err=True)
        raise typer.Exit(2)
    commands = worker_commands(
        gpus=resolve_gpus(gpus),
        queues=resolve_queues(queues),
        concurrency=concurrency,
        pool=pool,
        loglevel=loglevel,
        hostname=hostname,
        cpu_workers=settings.cpu_workers,
        decode_slots=settings.decode_threads,
    )
    _warn_about_eviction(settings)
    if dry_run:
        for argv, env in commands:
            typer.echo(" ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(argv))
        return
    if len(commands) == 1:
        argv, env = commands[0]
        os.environ.update(env)
        os.execv(argv[0], argv)  # signals go straight to Celery
    children = [subprocess.Popen(argv, env={**os.environ, **env}) for argv, env in commands]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    codes = [child.wait() for child in children]
    raise typer.Exit(max(codes, key=abs) if any(codes) else 0)


def _warn_about_eviction(settings: Settings) -> None:
    """Say so when the broker's Redis may evict queue keys under memory pressure (docs/reliability.md)."""
    from common.celery_app import make_celery
    from common.publish import eviction_warning

    warning = eviction_warning(make_celery(settings))
    if warning:
        typer.secho(f"WARNING: {warning}", err=True, fg=typer.colors.YELLOW)


def main() -> None:
    wait_passively_in_openmp()  # inherited by the Celery workers this process execs or spawns
    app()
