"""Micro-batches that shrink until they fit: every item run once, in order, at the size that fits."""

from __future__ import annotations

import pytest
import torch

from worker.memory import in_fitting_batches

CPU = torch.device("cpu")


def _fits(limit: int, calls: list[tuple[int, int]]):
    def run(start: int, stop: int) -> list[int]:
        calls.append((start, stop))
        if stop - start > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return list(range(start, stop))

    return run


def test_a_slice_that_does_not_fit_is_halved_and_the_smaller_size_kept() -> None:
    calls: list[tuple[int, int]] = []
    done: list[int] = []
    results = in_fitting_batches(11, _fits(2, calls), batch_size=8, device=CPU, on_done=done.append)
    assert [item for chunk in results for item in chunk] == list(range(11))  # each item once, in order
    assert calls == [(0, 8), (0, 4), (0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 11)]
    assert done == [2, 4, 6, 8, 10, 11]  # only slices that finished


def test_a_single_item_that_does_not_fit_raises() -> None:
    calls: list[tuple[int, int]] = []
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        in_fitting_batches(5, _fits(0, calls), batch_size=4, device=CPU)
    assert calls == [(0, 4), (0, 2), (0, 1)]


def test_other_errors_are_not_retried_and_sizes_are_checked() -> None:
    calls: list[tuple[int, int]] = []

    def broken(start: int, stop: int) -> None:
        calls.append((start, stop))
        raise RuntimeError("not a memory problem")

    with pytest.raises(RuntimeError, match="not a memory problem"):
        in_fitting_batches(6, broken, batch_size=4, device=CPU)
    assert calls == [(0, 4)]
    with pytest.raises(ValueError, match="batch_size"):
        in_fitting_batches(6, broken, batch_size=0, device=CPU)
    assert in_fitting_batches(0, broken, batch_size=4, device=CPU) == []
