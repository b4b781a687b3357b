"""Compute: one forward + backward pass for a micro-batch, and its overlays drawn on the same device.

The crops go to the device as 8-bit pixels and become the model's input there; when the device is a
GPU the micro-batch's overlays are rendered there too (``heatmap_overlays``) and come back as one
``uint8`` copy. A batch that fails is split, so one bad image does not fail its neighbours.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from common.artifacts import OVERLAYS, PICTURE_SOURCES
from common.db.records import MetricRecord
from worker.attention import Explanation
from worker.models import LoadedModel
from worker.pipeline.clock import StageClock
from worker.pipeline.prepare import Prepared
from worker.pipeline.record import Recorder
from worker.pipeline.score import ScoreProgress, score
from worker.render import heatmap_overlays

__all__ = ["Computed", "Computing", "Explainer", "compute"]

log = logging.getLogger(__name__)

# ``explain_in_batches``'s signature: the compute stage calls whatever the runtime holds, so a
# benchmark can stand in an infinitely fast device (``bench/bench_pipeline.py --modes null``).
Explainer = Callable[..., list]


@dataclass(frozen=True)
class Computing:
    """What computing uses: the device and its precision, the explainer, the stage clock, and whoever
    follows the metrics' progress."""

    device: torch.device
    autocast: torch.dtype | None
    explainer: Explainer
    clock: StageClock
    on_score_progress: ScoreProgress | None = None


@dataclass
class Computed:
    """One image's explanation, its overlay pixels when the device drew them, and its share of the time."""

    prepared: Prepared
    explanation: Explanation
    overlays: dict[str, np.ndarray] | None
    seconds: float
    metrics: list[MetricRecord]


def compute(
    computing: Computing, recorder: Recorder, loaded: LoadedModel, batch: list[Prepared]
) -> list[Computed]:
    """Explain the micro-batch; an image that cannot be explained is recorded as failed and left out."""
    start = time.perf_counter()
    try:
        with computing.clock.measure("compute"):
            crops = torch.from_numpy(np.stack([p.crop for p in batch])).to(
                computing.device, non_blocking=True
            )
            images = loaded.preprocessor.normalize_batch(crops)
            explanations = computing.explainer(
                loaded.model,
                images,
                batch[0].ticket.settings,
                [p.target_index for p in batch],
                batch_size=len(batch),
                autocast_dtype=computing.autocast,
            )
            metrics = score(
                loaded,
                images,
                [p.ticket for p in batch],
                [p.sha256 for p in batch],
                [p.coverage for p in batch],
                explanations,
                autocast_dtype=computing.autocast,
                on_progress=computing.on_score_progress,
            )
        overlays = _device_overlays(computing.clock, crops, explanations)
    except Exception as exc:
        if len(batch) == 1:
            recorder.fail(batch[0].ticket, exc)
            return []
        # Find the image that breaks the batch instead of failing its neighbours.
        log.warning("micro-batch of %d failed (%s); retrying its images one by one", len(batch), exc)
        return [result for prepared in batch for result in compute(computing, recorder, loaded, [prepared])]
    per_image = (time.perf_counter() - start) / len(batch)
    return [
        Computed(p, e, o, per_image, m)
        for p, e, o, m in zip(batch, explanations, overlays, metrics, strict=True)
    ]


def _device_overlays(
    clock: StageClock, crops: torch.Tensor, explanations: list[Explanation]
) -> list[dict[str, np.ndarray] | None]:
    """Every overlay of the micro-batch drawn on a GPU and copied back once; ``None`` each on a CPU
    device, where the CPU pool draws them beside the encoding instead of serially in this thread."""
    if crops.device.type == "cpu":
        return [None] * len(explanations)
    with clock.measure("render"):
        present = explanations[0].arrays()
        names = [name for name in OVERLAYS if PICTURE_SOURCES[name] in present]
        if not names:
            return [{} for _ in explanations]
        maps = np.stack([[e.arrays()[PICTURE_SOURCES[n]] for n in names] for e in explanations])
        pixels = heatmap_overlays(crops, torch.from_numpy(maps).to(crops.device)).cpu().numpy()
    return [dict(zip(names, per_image, strict=True)) for per_image in pixels]
