"""Micro-batches that shrink until they fit the device's memory.

The explanations (``worker.attention.explain_in_batches``) and the perturbation metrics
(``worker.metrics.perturbation``) both run a model over more images than one pass may hold, at a
size chosen for a typical GPU; a smaller GPU, a larger input size or a busy device must cost time,
not the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["in_fitting_batches"]

T = TypeVar("T")


def in_fitting_batches(
    total: int,
    run: Callable[[int, int], T],
    *,
    batch_size: int,
    device: torch.device,
    on_done: Callable[[int], None] | None = None,
) -> list[T]:
    """``run(start, stop)`` over ``0 … total`` in consecutive slices of at most ``batch_size`` items;
    the results in order. ``on_done(stop)`` follows each slice that finished.

    On ``torch.OutOfMemoryError`` the slice is halved and run again, with the CUDA cache emptied
    first, and the smaller size is kept for the rest: the next slice would not fit either. At one
    item the error is raised: that item cannot run on this device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[T] = []
    start, size = 0, batch_size
    while start < total:
        stop = min(start + size, total)
        result = _unless_out_of_memory(run, start, stop)
        if result is None:
            size = (stop - start) // 2
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        results.append(result[0])
        start = stop
        if on_done is not None:
            on_done(stop)
    return results


def _unless_out_of_memory(run: Callable[[int, int], T], start: int, stop: int) -> tuple[T] | None:
    """``(run(start, stop),)``, or ``None`` when it ran out of memory and the slice can still be split.

    Returning (rather than handling the error in the caller's loop) lets the traceback, and with it
    the failed attempt's tensors, go before the cache is emptied.
    """
    try:
        return (run(start, stop),)
    except torch.OutOfMemoryError:
        if stop - start == 1:
            raise
        return None
