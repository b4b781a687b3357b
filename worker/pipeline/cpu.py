"""The CPU-bound work of a job, as pure functions: bytes in, pixels out; pixels in, bytes out.

``decode_and_crop`` runs in the fetch threads: Pillow releases the GIL while it decodes and
resizes. Drawing, encoding and writing an image's pictures also run mostly without the GIL (compiled
loops, libdeflate), but the Python around them, for ten files per image, does not: ``CpuPool`` runs
``draw_pictures`` (and ``artifacts.write_artifacts``, which also writes the files where the store
can be opened in another process) in a few spawned processes (``VITSCOPE_CPU_WORKERS``; ``worker
start`` sizes it from the cores per GPU), or in the calling thread when the pool size is 0 — the
default on a CPU device, where the model itself uses every core. Nothing here touches a database, a
store or the network."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import numpy as np
import torch

from common.artifacts import ARRAY_ARTIFACTS, INPUT_PICTURE, LAYER_GRID, OVERLAYS, PICTURE_SOURCES
from common.errors import CpuProcessLostError
from worker.cores import cpu_workers_per_gpu
from worker.preprocess import Preprocessor, decode_image
from worker.render import DEFAULT_PNG_LEVEL, heatmap_overlays, layer_grid_pixels, png_bytes
from worker.resample import FILTERS, resize_crop

__all__ = [
    "CpuPool",
    "Decoded",
    "Pictures",
    "auto_cpu_workers",
    "compile_kernels",
    "decode_and_crop",
    "draw_pictures",
]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Decoded:
    """An image's crop (``uint8 [H, W, 3]``, exactly the pixels the model sees) and what it cost."""

    crop: np.ndarray
    seconds: dict[str, float]


def decode_and_crop(data: bytes, preprocessor: Preprocessor, max_pixels: int) -> Decoded:
    """Decode (at reduced scale when the crop needs far fewer pixels) and resize/centre-crop one image."""
    start = time.thread_time()
    image = decode_image(data, max_pixels=max_pixels, min_size=preprocessor.draft_size)
    decoded = time.thread_time()
    crop = preprocessor.crop_pixels(image)
    return Decoded(crop, {"fetch+decode": decoded - start, "preprocess": time.thread_time() - decoded})


@dataclass(frozen=True)
class Pictures:
    """An image's PNGs by artifact name, their pixel shapes ``(H, W, 3)``, and the CPU seconds of
    rendering and encoding them."""

    files: dict[str, bytes]
    shapes: dict[str, tuple[int, ...]]
    seconds: dict[str, float]


def draw_pictures(
    crop: np.ndarray,
    maps: Mapping[str, np.ndarray],
    *,
    overlays: Mapping[str, np.ndarray] | None = None,
    title: str | None = None,
    png_level: int = DEFAULT_PNG_LEVEL,
) -> Pictures:
    """Every picture of one image: the input crop, the layer grid and an overlay per map present.

    The pipeline's one rendering path; it stores these files beside the arrays' ``.npy`` bytes
    (``artifacts.put_artifacts``, ``artifacts.encode_artifacts``). ``crop``, the model's input crop
    ``uint8 [H, W, 3]``, is stored as ``input.png`` whatever the maps, so a report can show what the
    model saw beside what it attended to. ``maps`` holds arrays by artifact name (``ARRAY_ARTIFACTS``;
    an unknown name is refused); each other picture is drawn when its source array
    (``PICTURE_SOURCES``) is there, the layer grid with ``title`` along its top. ``overlays`` are
    overlay pixels already rendered for a whole micro-batch on the device; those missing are rendered
    here. ``png_level`` is the PNG files' level (``VITSCOPE_PNG_LEVEL``, see ``worker.png``).
    """
    unknown = sorted(set(maps) - set(ARRAY_ARTIFACTS))
    if unknown:
        raise ValueError(f"unknown array artifact name(s) {unknown}; expected names from {ARRAY_ARTIFACTS}")
    start = time.thread_time()
    pixels: dict[str, np.ndarray] = dict(overlays or {})
    missing = [name for name in OVERLAYS if name not in pixels and PICTURE_SOURCES[name] in maps]
    if missing:
        stacked = np.stack([maps[PICTURE_SOURCES[name]] for name in missing])[None]
        drawn = heatmap_overlays(
            torch.from_numpy(np.ascontiguousarray(crop))[None], torch.from_numpy(stacked)
        )
        pixels.update(zip(missing, drawn[0].numpy(), strict=True))
    pixels[INPUT_PICTURE] = crop
    layer_scores = maps.get(PICTURE_SOURCES[LAYER_GRID])
    if layer_scores is not None:
        pixels[LAYER_GRID] = layer_grid_pixels(layer_scores, title=title)
    rendered = time.thread_time()
    # The layer grid is flat colour, the opposite of a photo: ``flat`` deflates it with LZ77 matches
    # (29× smaller than raw, 4× smaller than Huffman coding alone) whatever the level.
    files = {
        name: png_bytes(picture, level=png_level, flat=name == LAYER_GRID) for name, picture in pixels.items()
    }
    shapes = {name: picture.shape for name, picture in pixels.items()}
    return Pictures(files, shapes, {"render": rendered - start, "encode": time.thread_time() - rendered})


# Big enough for every kernel's general path, small enough to cost nothing once compiled.
_WARM_SIDE = 32
_WARM_GRID = 4


def compile_kernels(png_level: int = DEFAULT_PNG_LEVEL) -> float:
    """Run every compiled image kernel once, on a tiny picture with the types the pipeline passes;
    the seconds it took. Called before the first job, so that one-off work is not charged to a job.

    numba compiles the kernels (resampling in the fetch stage, overlays and PNG coding in the store
    stage) on their first call after an install and loads them from its on-disk cache in every later
    process. Without this, that first call lands inside a job: the first batch after an install
    recorded ``store_seconds`` of 17.9 s per job, the next ``fetch_seconds`` of 17.6 s, later ones
    0.02-0.06 s. Microseconds in a process that has already run them.
    """
    start = time.perf_counter()
    ramp = np.arange(_WARM_SIDE * _WARM_SIDE * 3, dtype=np.uint32).reshape(_WARM_SIDE, _WARM_SIDE, 3)
    pixels = (ramp % 251).astype(np.uint8)
    half = _WARM_SIDE // 2
    readonly = pixels.copy()
    readonly.flags.writeable = False  # numba compiles apart for read-only arrays: a decoded image is one
    for source in (pixels, readonly):
        for interpolation in FILTERS:
            for vertical_first in (False, True):
                resize_crop(source, (half, half), (0, 0, half, half), interpolation, vertical_first)
    grid_map = np.linspace(0, 1, _WARM_GRID * _WARM_GRID, dtype=np.float32).reshape(_WARM_GRID, _WARM_GRID)
    maps = {source: grid_map for source in PICTURE_SOURCES.values()}
    maps[PICTURE_SOURCES[LAYER_GRID]] = np.stack([grid_map, grid_map])
    draw_pictures(pixels, maps, title="warm-up", png_level=png_level)
    png_bytes(pixels)  # the default level's coder, whatever level is configured
    return time.perf_counter() - start


def _start_process(aws: Mapping[str, str] | None) -> None:
    """A pool process's entry point: one core, the image kernels warm, and the ``AWS_*`` variables
    of the runtime that owns the pool in place of those it was spawned with (``CpuPool``)."""
    if aws is not None:
        for name in [name for name in os.environ if name.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(aws)
    torch.set_num_threads(1)  # one core per pool process; the pool's size is the parallelism
    compile_kernels()  # from numba's cache: the process's first job is not charged for it


def _ready() -> None:
    """A no-op that a pool process runs once its initializer (the warm-up) is done."""


def auto_cpu_workers(device: torch.device) -> int:
    """The pool size when none is set: 0 on a CPU device (the model uses every core), else half
    this process's cores, none on a single core (``worker start`` sets the share of each GPU explicitly)."""
    return 0 if device.type == "cpu" else cpu_workers_per_gpu(1)


class CpuPool:
    """Runs the functions above in spawned processes, or inline when ``workers`` is 0.

    Spawned, not forked: the driving process may hold a CUDA context and torch's thread pools, which
    a forked child must not inherit. Processes start on first use and live as long as the runtime.

    A process that dies (the OOM killer, a signal, a crashing codec) breaks a ``ProcessPoolExecutor``
    for good: every later call would fail at once, and with it every job the worker takes. So the
    calls it broke raise ``CpuProcessLostError`` (their jobs go back to the queue) and the next call
    gets a fresh pool.

    ``aws_environment``: the ``AWS_*`` variables (boto3's endpoint and credentials) the processes
    write the store with. A process spawned later (the pool starts on first use, and is replaced
    when one dies) would otherwise take the environment of that moment, which an embedder or a test
    may have changed since the runtime opened its store.
    """

    def __init__(self, workers: int, *, aws_environment: Mapping[str, str] | None = None) -> None:
        self.workers = workers
        self._aws = None if aws_environment is None else dict(aws_environment)
        self._executor: ProcessPoolExecutor | None = self._new_executor() if workers > 0 else None
        self._lock = threading.Lock()
        self._closed = False
        self.restarts = 0  # pools replaced after a process died

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_process,
            initargs=(self._aws,),
        )

    def start(self) -> float:
        """Start every pool process and wait until each has warmed up (``compile_kernels``), so the
        first jobs are not charged for it; the seconds that took (0 without a pool)."""
        if self._executor is None:
            return 0.0
        begin = time.perf_counter()
        # All submitted at once: the executor spawns a process per call while none is idle.
        for future in [self._executor.submit(_ready) for _ in range(self.workers)]:
            future.result()
        return time.perf_counter() - begin

    def run(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``function(*args, **kwargs)``, in a pool process when there is a pool; blocks the caller."""
        if self._executor is None:
            return function(*args, **kwargs)
        executor, future = self._submit(function, *args, **kwargs)
        try:
            return future.result()
        except BrokenProcessPool as exc:
            self._replace(executor)
            name = getattr(function, "__name__", repr(function))
            raise CpuProcessLostError(
                f"a CPU-pool process died while running {name} (killed, out of memory or crashed)"
            ) from exc

    def _submit(
        self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs
    ) -> tuple[ProcessPoolExecutor, Future[R]]:
        """Submit to the current pool; one that broke before this call started is replaced first."""
        for _ in range(3):
            with self._lock:
                if self._closed:
                    raise RuntimeError("the CPU pool is closed")
                executor = self._executor
            assert executor is not None
            try:
                return executor, executor.submit(function, *args, **kwargs)
            except BrokenProcessPool:
                self._replace(executor)
            except RuntimeError:
                with self._lock:
                    if self._executor is executor:
                        raise  # shut down, not replaced
                # replaced by another thread since we looked: submit to the new pool
        raise CpuProcessLostError("the CPU pool broke three times in a row while starting a call")

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """A fresh pool instead of ``broken``, once however many calls saw it break."""
        with self._lock:
            if self._closed or self._executor is not broken:
                return
            self._executor = self._new_executor()
            self.restarts += 1
        broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            executor = self._executor
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
