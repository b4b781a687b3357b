"""The worker's CPU-side ceiling: images/s of the real pipeline, with and without the model's compute.

A real batch goes through ``run_batch`` (the code ``producer submit --local`` and a Celery worker
run): fetch from files, decode, preprocess, compute, render, encode, store in a local folder, record
in SQLite or PostgreSQL. Two modes:

- ``compute``: deit_tiny (random weights) on this CPU, as it is;
- ``null``: the compute replaced by ready-made arrays of the real shapes (real explanations of a few
  images, handed out in turn) — an infinitely fast device. Its images/s is the ceiling the CPU side
  puts on any GPU, and its stage times are what each image costs the host.

Each configuration runs in a fresh process pinned to the first ``k`` cores with ``taskset`` (torch,
the worker's pools and its process pool sized to ``k``), on a fresh database and results folder,
after a warm-up batch. Stage times are busy seconds summed over threads and processes, per image:
they add up to more than the wall time when stages overlap. Inputs are distinct photo-like JPEGs of
500×375 with every ``--large-every``-th one 4000×3000, made once into ``--images-dir``.

``--before-ref REF`` also runs the same images through the pipeline as it was at git ``REF`` (an
export of that commit), so one run gives before and after under the same load. The load average is
recorded beside the numbers: on a shared machine, compare ratios within one run. ``--repeat N``
runs every configuration N times, interleaved, and shows the median run with the range: the store
stage includes the disk's writeback (``syncfs``), which alone can swing a run by a third.

    .venv/bin/python bench/bench_pipeline.py                               # after only, 1 and 2 cores
    .venv/bin/python bench/bench_pipeline.py --before-ref 3b91896 --database sqlite,postgresql
    .venv/bin/python bench/bench_pipeline.py --rss 500,5000 --modes null   # peak RSS over long batches

``--store s3`` also writes the artifacts to an S3-compatible server (moto's, started here as a
process of its own and pinned to the cores the pipeline does not get) in both layouts: one object
per artifact and shards (``docs/storage.md``). Each row then says the pipeline's CPU per image (the
driving process and its pool), the S3 server's CPU separately, and the PUT requests and bytes
stored per image, counted from the bucket's listing (every object below the multipart threshold is
one PUT). ``--store local,s3`` puts the local folder's row beside them in the same run:

    .venv/bin/python bench/bench_pipeline.py --modes null --cores 1 --store local,s3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL = "deit_tiny_patch16_224"
STAGES = ("fetch+decode", "preprocess", "compute", "render", "encode", "store", "record")
SMALL, LARGE = (500, 375), (4000, 3000)


# ----------------------------------------------------------------------------------------- inputs
def photo_like(seed: int, size: tuple[int, int]) -> bytes:
    """A distinct JPEG with a photo's statistics: smooth shapes, edges, and sensor-like noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(4):  # a few hard-edged discs, like objects against a background
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * height
        pixels[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    pixels += rng.normal(0.0, 6.0, pixels.shape).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_images(folder: Path, count: int, large_every: int, seed: int) -> list[Path]:
    """``count`` distinct images in ``folder``, made once (a file that exists is kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        large = large_every > 0 and i % large_every == large_every - 1
        path = folder / f"{seed}-{i}{'-large' if large else ''}.jpg"
        if not path.exists():
            path.write_bytes(photo_like(seed * 1_000_003 + i, LARGE if large else SMALL))
        paths.append(path)
    return paths


def write_csv(path: Path, images: list[Path]) -> Path:
    path.write_text("image_uri\n" + "".join(f"{image.as_uri()}\n" for image in images))
    return path


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# ------------------------------------------------------------------------------- child: one run
class StageTimer:
    """CPU seconds per stage, for a pipeline that does not report its own (the code before).

    ``time.thread_time``: what the calling thread itself spent, so threads that wait for the GIL or
    for a core are not counted busy; ``minus`` takes out a stage nested inside (encode in render).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._nested = threading.local()

    def wrap(
        self, stage: str, function: Callable[..., Any], *, minus: str | None = None
    ) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            nested = vars(self._nested)
            inner_before = nested.get(minus, 0.0) if minus else 0.0
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent = time.thread_time() - start
                nested[stage] = nested.get(stage, 0.0) + spent
                inner = (nested.get(minus, 0.0) - inner_before) if minus else 0.0
                self.seconds[stage] += spent - inner

        return timed


def instrument_before(runtime: Any, timer: StageTimer) -> None:
    """Time the single-module pipeline's stages by wrapping the functions it calls."""
    import worker.pipeline as pipeline
    import worker.render as render
    from worker.preprocess import Preprocessor

    runtime.fetcher.fetch = timer.wrap("fetch+decode", runtime.fetcher.fetch)
    pipeline.decode_image = timer.wrap("fetch+decode", pipeline.decode_image)
    Preprocessor.crop = timer.wrap("preprocess", Preprocessor.crop)
    Preprocessor.normalize = timer.wrap("preprocess", Preprocessor.normalize)
    pipeline.explain_in_batches = timer.wrap("compute", pipeline.explain_in_batches)
    render._png = timer.wrap("encode", render._png)
    pipeline.render_artifacts = timer.wrap("render", pipeline.render_artifacts, minus="encode")
    runtime.store.put_many = timer.wrap("store", runtime.store.put_many)
    pipeline.record_success = timer.wrap("record", pipeline.record_success)
    pipeline.find_reusable = timer.wrap("record", pipeline.find_reusable)


class RssSampler:
    """The driving process's peak resident memory during the timed batch, sampled every 0.1 s.

    Not ``ru_maxrss``: that counts the whole process's life, and making the 4000×3000 inputs (when
    they are not in ``--images-dir`` yet) peaks higher than any batch. Pool processes are left
    out: they hold nothing between images. Where ``/proc`` is missing, ``ru_maxrss`` it is.
    """

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _current_kib() -> int:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))

    def _sample(self) -> None:
        while True:
            self.peak_kib = max(self.peak_kib, self._current_kib())
            if self._stop.wait(0.1):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, self._current_kib())


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU seconds of one process, from ``/proc/<pid>/stat`` (``OSError`` if it is gone)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def process_cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and, together, of its live child processes (the
    CPU pool, which lives as long as the runtime): read before and after the timed batch, they show
    where a core's time goes and whether the cores were busy at all. Zeros where ``/proc`` is missing."""

    def children_of(task: Path) -> list[str]:
        try:
            return (task / "children").read_text().split()
        except OSError:  # a thread that ended while we looked
            return []

    try:
        tasks = list(Path("/proc/self/task").iterdir())
        own = cpu_seconds("self")
    except OSError:
        return 0.0, 0.0
    pool = 0.0
    for pid in {pid for task in tasks for pid in children_of(task)}:
        try:
            pool += cpu_seconds(pid)
        except OSError:  # exited since
            continue
    return own, pool


def server_processes() -> list[int]:
    """The PostgreSQL server's processes on this machine (``postgres``), by ``/proc``; none elsewhere."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if (entry / "comm").read_text().strip() == "postgres":
                pids.append(int(entry.name))
        except OSError:  # exited since
            continue
    return pids


def server_cpu_seconds() -> float:
    """CPU seconds of the live PostgreSQL server processes: the database's share of a run's work,
    which runs outside the cores ``taskset`` gives the worker unless ``--pin-database`` pins it."""
    total = 0.0
    for pid in server_processes():
        with contextlib.suppress(OSError):  # exited since
            total += cpu_seconds(pid)
    return total


@contextmanager
def database_pinned(cores: list[int] | None) -> Iterator[None]:
    """The PostgreSQL server's processes pinned to ``cores`` for a run (new backends inherit the
    postmaster's affinity), then given every core back. Needs the right to change another user's
    affinity (root); ``None`` pins nothing."""
    if cores is None:
        yield
        return
    everything = sorted(os.sched_getaffinity(0))
    try:
        for pid in server_processes():
            try:
                os.sched_setaffinity(pid, cores)
            except ProcessLookupError:
                continue
            except PermissionError as exc:
                raise SystemExit(
                    f"--pin-database: cannot pin the PostgreSQL server ({exc}); run as root"
                ) from exc
        yield
    finally:
        for pid in server_processes():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, everything)


def null_explainer(runtime: Any, images: list[Path]) -> Callable[..., Any]:
    """An ``explain_in_batches`` stand-in returning real explanations of a few images, in turn."""
    import dataclasses

    from common.methods import MethodSettings
    from common.modelspec import ModelSpec
    from worker.attention import explain
    from worker.preprocess import decode_image

    loaded = runtime.models.get(ModelSpec(name=MODEL, arch=MODEL, weights="random"))
    batch = [loaded.preprocessor(decode_image(p.read_bytes(), max_pixels=10**8)) for p in images[:4]]
    import torch

    templates = explain(loaded.model, torch.stack(batch).to(runtime.device), MethodSettings())
    turn = iter(range(10**12))

    def explain_in_batches(model: Any, images: Any, settings: Any, targets: Any = None, **_: Any) -> list:
        out = []
        for b in range(len(images)):
            template = templates[next(turn) % len(templates)]
            target = targets[b] if targets is not None and targets[b] is not None else template.target
            out.append(dataclasses.replace(template, target=None if target is None else int(target)))
        return out

    return explain_in_batches


@contextmanager
def database(kind: str, folder: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'bench.db'}"
        return
    sys.path.insert(0, str(HERE))
    from _services import postgres_database

    with postgres_database() as url:
        yield url


def bucket_objects(bucket: str, prefix: str) -> tuple[int, int, int]:
    """(objects, bytes, largest object's bytes) under ``prefix`` in ``bucket``, from its listing."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    sizes = [item["Size"] for page in pages for item in page.get("Contents", ())]
    return len(sizes), sum(sizes), max(sizes, default=0)


@contextmanager
def s3_server(cores: list[int]) -> Iterator[tuple[str, int]]:
    """moto's S3 server as a process of its own, pinned to ``cores``; yields (endpoint, pid), with the
    ``AWS_*`` variables that point boto3 (here and in the runs) at it."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Path(sys.executable).parent / "moto_server"
    command = ["taskset", "-c", ",".join(map(str, cores)), str(server), "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        import boto3

        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket="vitscope-bench")
                break
            except Exception:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit(f"the S3 server did not start: {' '.join(command)}") from None
                time.sleep(0.2)
        yield endpoint, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this (pinned) process; returns its row."""
    try:
        from worker.cores import wait_passively_in_openmp
    except ImportError:  # the code of --before-ref, whose package import set the policy itself
        import worker  # noqa: F401
    else:
        wait_passively_in_openmp()  # before torch loads, as the worker's entry points do

    # isort: split
    import torch

    from common.db import open_database
    from common.settings import Settings
    from producer.submit import SubmitOptions, commit_plan, plan_submission
    from worker.local import run_batch
    from worker.pipeline import Runtime

    torch.set_num_threads(args.cores)
    images = make_images(Path(args.images_dir), args.images, args.large_every, seed=1)
    warmup = make_images(Path(args.images_dir), args.batch_size, 0, seed=2)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp, database(args.database, Path(tmp)) as url:
        work = Path(tmp)
        # The images live outside the CSV's folder: name theirs as a root where the code has the
        # local-files policy (the code of --before-ref may predate it).
        roots = {"file_roots": [Path(args.images_dir)]} if "file_roots" in Settings.model_fields else {}
        if "artifact_layout" in Settings.model_fields:
            roots["artifact_layout"] = args.layout
        prefix = f"run-{os.getpid()}-{time.time_ns()}"
        storage = f"s3://vitscope-bench/{prefix}" if args.store == "s3" else (work / "results").as_uri()
        settings = Settings(
            database_url=url,
            storage_url=storage,
            batch_size=args.batch_size,
            device=args.device,
            **roots,
        )
        db = open_database(settings, migrate=True)
        runtime = Runtime.from_settings(settings, db=db)
        timer = StageTimer()
        reported = getattr(runtime, "stage_seconds", None)
        if reported is None:
            instrument_before(runtime, timer)
        if args.mode == "null":
            fake = null_explainer(runtime, warmup)
            if hasattr(runtime, "explainer"):
                runtime.explainer = fake
            else:
                import worker.pipeline as pipeline

                pipeline.explain_in_batches = timer.wrap("compute", fake)
        options = SubmitOptions(models=[MODEL], weights="random")

        def run(csv: Path) -> float:
            submission = commit_plan(db, plan_submission(csv, options), options, mode="local")
            start = time.perf_counter()
            result = run_batch(runtime, submission.batch_id)
            assert result.succeeded == submission.jobs, result
            return time.perf_counter() - start

        try:
            run(write_csv(work / "warmup.csv", warmup))
            busy = reported if reported is not None else timer.seconds
            busy.clear()
            s3_pid = args.s3_server_pid
            stored_before = bucket_objects("vitscope-bench", prefix) if args.store == "s3" else (0, 0, 0)
            cpu_before, server_before = process_cpu_seconds(), server_cpu_seconds()
            s3_before = cpu_seconds(s3_pid) if s3_pid else 0.0
            with RssSampler() as rss:
                seconds = run(write_csv(work / "batch.csv", images))
            cpu_after, server_after = process_cpu_seconds(), server_cpu_seconds()
            s3_after = cpu_seconds(s3_pid) if s3_pid else 0.0
            stored_after = bucket_objects("vitscope-bench", prefix) if args.store == "s3" else (0, 0, 0)
            stages = {s: round(1000 * busy.get(s, 0.0) / len(images), 2) for s in STAGES}
        finally:
            runtime.close()
    return {
        "images": len(images),
        "seconds": round(seconds, 2),
        "images_per_second": round(len(images) / seconds, 2),
        "ms_per_image": stages,
        # CPU of the driving process and of the pool processes per image, and cores kept busy
        "cpu_ms_per_image": {
            part: round(1000 * (cpu_after[i] - cpu_before[i]) / len(images), 2)
            for i, part in enumerate(("main", "pool"))
        },
        "busy_cores": round((sum(cpu_after) - sum(cpu_before)) / seconds, 2),
        # The PostgreSQL server's CPU per image (0 on SQLite): not in the columns above
        "server_cpu_ms_per_image": round(1000 * (server_after - server_before) / len(images), 2)
        if args.database == "postgresql"
        else 0.0,
        "peak_rss_mib": round(rss.peak_kib / 1024, 1),
        # S3 only: the server's CPU, and what the batch stored (every object one PUT: none is near the
        # multipart threshold, which the largest object's size shows)
        "s3_server_cpu_ms_per_image": round(1000 * (s3_after - s3_before) / len(images), 2),
        "puts_per_image": round((stored_after[0] - stored_before[0]) / len(images), 4),
        "kib_per_image": round((stored_after[1] - stored_before[1]) / 1024 / len(images), 1),
        "largest_object_mib": round(stored_after[2] / 2**20, 2),
    }


# --------------------------------------------------------------------------------- parent: a table
def export_ref(ref: str, folder: Path) -> Path:
    """The repository as it was at ``ref``, exported into ``folder`` (no worktree is touched)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def pool_size(setting: str, cores: int) -> int:
    """``VITSCOPE_CPU_WORKERS`` for a run on ``cores`` cores: a number, ``cores``, or ``auto`` — what
    ``worker start`` gives one GPU's worker on a host of that many cores."""
    if setting == "cores":
        return cores
    if setting == "auto":
        sys.path.insert(0, str(REPO))
        from worker.cores import cpu_workers_per_gpu

        return cpu_workers_per_gpu(1, cores)
    return int(setting)


def run_child(
    code: Path,
    cores: int,
    pool: int,
    mode: str,
    db: str,
    images: int,
    args: argparse.Namespace,
    *,
    png_level: int,
    store: str = "local",
    layout: str = "objects",
    s3_pid: int | None = None,
) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        f"--cores={cores}",
        f"--mode={mode}",
        f"--database={db}",
        f"--images={images}",
        f"--large-every={args.large_every}",
        f"--batch-size={args.batch_size}",
        f"--images-dir={args.images_dir}",
        f"--device={args.device}",
        f"--store={store}",
        f"--layout={layout}",
        *([f"--s3-server-pid={s3_pid}"] if s3_pid else []),
        *([f"--work-dir={args.work_dir}"] if args.work_dir else []),
    ]
    available = sorted(os.sched_getaffinity(0))
    if cores > len(available):
        raise SystemExit(f"--cores {cores}: only {len(available)} core(s) available")
    pinned = ["taskset", "-c", ",".join(str(c) for c in available[:cores])]
    env = {
        **os.environ,
        "PYTHONPATH": str(code),
        "VITSCOPE_CPU_WORKERS": str(pool),
        "VITSCOPE_PNG_LEVEL": str(png_level),
        "OMP_NUM_THREADS": str(cores),
    }
    server_cores = available[:cores] if args.pin_database and db == "postgresql" else None
    with database_pinned(server_cores):
        out = subprocess.run([*pinned, *command], env=env, cwd=code, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"run failed ({code}, {cores} cores, {mode}, {db}, {store}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_row(found: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median images/s (the lower middle of an even count), with every run's rate:
    one whole run's stages, not medians of columns from different runs that would not add up."""
    ordered = sorted(found, key=lambda r: r["images_per_second"])
    rates = [r["images_per_second"] for r in ordered]
    return {**ordered[(len(ordered) - 1) // 2], "runs_images_per_second": rates}


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'code':<7}{'db':<11}{'store':<16}{'mode':<8}{'cores':>5}{'pool':>5}{'png':>4}{'img/s':>8}{'range':>13}"
        + "".join(f"{s:>13}" for s in STAGES)
        + f"{'cpu main':>9}{'cpu pool':>9}{'cpu all':>8}{'busy':>6}{'cpu db':>8}{'cpu s3':>8}{'PUT/img':>9}"
        + f"{'KiB/img':>9}"
    )
    lines = [
        head + "   (stage and cpu columns: ms per image; cpu all: main + pool; busy: cores in use; cpu db: "
        "PostgreSQL's server; cpu s3: the S3 server's)"
    ]
    for r in rows:
        stages = "".join(f"{r['ms_per_image'][s]:>13.2f}" for s in STAGES)
        cpu = r.get("cpu_ms_per_image", {})
        stages += f"{cpu.get('main', 0.0):>9.1f}{cpu.get('pool', 0.0):>9.1f}{r.get('busy_cores', 0.0):>6.2f}"
        stages = stages.replace(
            f"{r.get('busy_cores', 0.0):>6.2f}",
            f"{cpu.get('main', 0.0) + cpu.get('pool', 0.0):>8.1f}{r.get('busy_cores', 0.0):>6.2f}",
        )
        stages += (
            f"{r.get('server_cpu_ms_per_image', 0.0):>8.1f}{r.get('s3_server_cpu_ms_per_image', 0.0):>8.1f}"
        )
        stages += f"{r.get('puts_per_image', 0.0):>9.3f}{r.get('kib_per_image', 0.0):>9.1f}"
        rates = r["runs_images_per_second"]
        spread = f"{rates[0]:.1f}-{rates[-1]:.1f}" if len(rates) > 1 else "-"
        lines.append(
            f"{r['code']:<7}{r['database']:<11}{r.get('store', 'local:objects'):<16}{r['mode']:<8}{r['cores']:>5}{r['pool']:>5}"
            f"{'-' if r['png_level'] is None else r['png_level']:>4}"
            f"{r['images_per_second']:>8.1f}{spread:>13}{stages}"
        )
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """after ÷ before on the same configuration (each PNG level of after against before's own), and
    k cores ÷ 1 core for each code and level; where several pool sizes ran, the fastest of each (a
    worker would be given that size)."""
    by: dict[tuple[str, str, str, int], float] = {}
    for r in rows:
        code = r["code"] if r.get("png_level") is None else f"{r['code']} (png {r['png_level']})"
        if r.get("store", "local:objects") != "local:objects":
            code += f" {r['store']}"
        key = (code, r["database"], r["mode"], r["cores"])
        by[key] = max(by.get(key, 0.0), r["images_per_second"])
    lines = []
    for (code, db, mode, cores), rate in sorted(by.items()):
        if code.startswith("after") and ("before", db, mode, cores) in by:
            lines.append(
                f"{code}/before  {db:<10} {mode:<7} {cores} core(s): "
                f"{rate / by['before', db, mode, cores]:.2f}x"
            )
        if cores > 1 and (code, db, mode, 1) in by:
            lines.append(
                f"{cores} cores/1 core {code} {db:<10} {mode:<7}: {rate / by[code, db, mode, 1]:.2f}x"
            )
    return lines


def store_costs(rows: list[dict[str, Any]]) -> list[str]:
    """What each store and layout costs over a local folder with one file per artifact, in the same
    run and configuration: pipeline CPU (main + pool) per image, and PUTs and bytes per image."""
    local: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        if r.get("store") == "local:objects":
            local[r["code"], r["database"], r["mode"], r["cores"], r["pool"], r["png_level"]] = r
    lines = []
    for r in rows:
        base = local.get((r["code"], r["database"], r["mode"], r["cores"], r["pool"], r["png_level"]))
        if base is None or r is base:
            continue
        extra = sum(r["cpu_ms_per_image"].values()) - sum(base["cpu_ms_per_image"].values())
        lines.append(
            f"{r['store']} vs local:objects ({r['code']} {r['database']} {r['mode']} {r['cores']} core(s), "
            f"pool {r['pool']}): {extra:+.1f} core-ms per image in the pipeline, S3 server "
            f"{r.get('s3_server_cpu_ms_per_image', 0.0):.1f} core-ms, {r.get('puts_per_image', 0.0):.3f} PUT "
            f"and {r.get('kib_per_image', 0.0):.0f} KiB per image (largest object "
            f"{r.get('largest_object_mib', 0.0)} MiB), {r['images_per_second'] / base['images_per_second']:.2f}x "
            "the local folder's images/s"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="images per timed batch")
    parser.add_argument("--large-every", type=int, default=16, help="every n-th image is 4000×3000 (0: none)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cores", default="1,2", help="core counts, e.g. 1,2,4,8")
    parser.add_argument("--modes", default="null,compute", help="null and/or compute")
    parser.add_argument(
        "--cpu-workers",
        default="auto",
        help="CPU pool sizes to run, e.g. auto,0,cores: auto is worker start's sizing for one GPU "
        "(one per two cores, none on one core), cores is one per core, a number is that many (the code of "
        "--before-ref may have no pool)",
    )
    parser.add_argument("--database", default="sqlite", help="sqlite and/or postgresql")
    parser.add_argument("--before-ref", help="also run the pipeline of this git commit, for before/after")
    parser.add_argument("--rss", help="image counts for a peak-RSS run instead, e.g. 500,5000")
    parser.add_argument("--images-dir", default=str(Path(tempfile.gettempdir()) / "vitscope-bench-images"))
    parser.add_argument("--device", default="cpu", help="the pipeline's device (cuda: overlays drawn there)")
    parser.add_argument(
        "--work-dir",
        help="where each run's results folder and SQLite file go (default: the system's temporary "
        "folder); /dev/shm takes the disk out of the store stage",
    )
    parser.add_argument(
        "--png-levels",
        default="1",
        help="VITSCOPE_PNG_LEVEL values to run, e.g. 1,0 (the code of --before-ref runs its own)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each configuration, interleaved; the table shows the median run (by images/s) "
        "and the range",
    )
    parser.add_argument(
        "--pin-database",
        action="store_true",
        help="pin the PostgreSQL server to the same cores as each run (root only): otherwise a 1-core "
        "run gets the server's work done on another core for free",
    )
    parser.add_argument(
        "--store",
        default="local",
        help="where artifacts go, comma-separated: local (a folder, one file per artifact), s3 (an "
        "S3-compatible server in its own process, pinned apart: both layouts), or store:layout pairs "
        "such as local:shards,s3:objects",
    )
    parser.add_argument("--json", help="also write the rows and ratios to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="null", help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="objects", help=argparse.SUPPRESS)
    parser.add_argument("--s3-server-pid", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        args.cores = int(args.cores)
        print(json.dumps(child(args)))
        return
    targets = store_targets(args.store)
    if any(store == "s3" for store, _ in targets):
        available = sorted(os.sched_getaffinity(0))
        apart = available[max(int(c) for c in args.cores.split(",")) :]
        if not apart:
            raise SystemExit("--store s3: no core is left for the S3 server; run with fewer --cores")
        with s3_server(apart) as (_, pid):
            run_all(args, targets, pid)
    else:
        run_all(args, targets, None)


def store_targets(option: str) -> list[tuple[str, str]]:
    """(store, layout) pairs from ``--store``: local is one file per artifact, s3 both layouts."""
    targets: list[tuple[str, str]] = []
    for part in option.split(","):
        store, _, layout = part.strip().partition(":")
        if store not in ("local", "s3") or layout not in ("", "objects", "shards"):
            raise SystemExit(f"--store {part!r}: use local, s3, or store:layout (layout objects or shards)")
        layouts = [layout] if layout else (["objects", "shards"] if store == "s3" else ["objects"])
        targets += [(store, each) for each in layouts if (store, each) not in targets]
    return targets


def run_all(args: argparse.Namespace, targets: list[tuple[str, str]], s3_pid: int | None) -> None:
    """Every configuration, ``--repeat`` times interleaved; prints the table (and writes ``--json``)."""
    cores = [int(c) for c in args.cores.split(",")]
    modes = args.modes.split(",")
    databases = args.database.split(",")
    load = {"start": load_average()}
    runs: dict[tuple[str, str, str, str, int, int, int, int | None], list[dict[str, Any]]] = defaultdict(list)
    png_levels = [int(level) for level in args.png_levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        codes = {"after": REPO}
        if args.before_ref:
            codes = {"before": export_ref(args.before_ref, Path(tmp)), **codes}
        counts = [int(n) for n in args.rss.split(",")] if args.rss else [args.images]
        # Repeats are the outer loop, so a slow spell of the machine (the disk's writeback, another
        # tenant) falls on every configuration alike instead of on one.
        for repeat in range(args.repeat):
            for db in databases:
                for mode in modes:
                    for n in counts:
                        for k in cores:
                            pools = sorted({pool_size(p, k) for p in args.cpu_workers.split(",")})
                            for name, code in codes.items():
                                # The code before runs once: a pool size or PNG level means nothing to it.
                                after = name == "after"
                                for pool in pools if after else pools[:1]:
                                    for level in png_levels if after else png_levels[:1]:
                                        for store, layout in targets:
                                            row = run_child(
                                                code,
                                                k,
                                                pool,
                                                mode,
                                                db,
                                                n,
                                                args,
                                                png_level=level,
                                                store=store,
                                                layout=layout,
                                                s3_pid=s3_pid,
                                            )
                                            target = f"{store}:{layout}"
                                            key = (
                                                name,
                                                db,
                                                target,
                                                mode,
                                                n,
                                                k,
                                                pool,
                                                level if after else None,
                                            )
                                            runs[key].append(row)
                                            print(
                                                f"  [{repeat + 1}/{args.repeat}] {name} {db} {target} {mode} {n} images "
                                                f"{k} core(s), pool {pool}, PNG level {level}: "
                                                f"{row['images_per_second']} img/s, "
                                                f"peak RSS {row['peak_rss_mib']} MiB",
                                                file=sys.stderr,
                                            )
    rows = [
        {
            "code": name,
            "database": db,
            "store": target,
            "mode": mode,
            "cores": k,
            "pool": pool,
            "png_level": level,
            **median_row(found),
        }
        for (name, db, target, mode, _n, k, pool, level), found in runs.items()
    ]
    load["end"] = load_average()
    print(
        f"{MODEL}, {args.images} images ({SMALL[0]}×{SMALL[1]}, every {args.large_every}th {LARGE[0]}×{LARGE[1]}),"
    )
    print(f"batch {args.batch_size}, load average at start {load['start']}, at end {load['end']}")
    print(table(rows))
    for line in [*ratios(rows), *store_costs(rows)]:
        print(line)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"load_average": load, "rows": rows, "ratios": ratios(rows), "stores": store_costs(rows)},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
