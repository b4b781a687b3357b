"""Where a worker's CPU time goes: busy seconds per pipeline stage, summed over threads and processes.

``time.thread_time`` is what the measuring thread itself spent, so a thread waiting for the GIL, a
core or a disk is not counted as busy; the CPU pool measures inside its processes and hands the
numbers back with its results. ``bench/bench_pipeline.py`` reads them (``Runtime.stage_seconds``).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

__all__ = ["STAGES", "StageClock"]

STAGES = ("fetch+decode", "preprocess", "compute", "render", "encode", "store", "record")


class StageClock:
    """CPU seconds per stage name; safe to add to from any thread."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def add(self, times: Mapping[str, float]) -> None:
        with self._lock:
            for stage, seconds in times.items():
                self.seconds[stage] += seconds

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        start = time.thread_time()
        try:
            yield
        finally:
            self.add({stage: time.thread_time() - start})
