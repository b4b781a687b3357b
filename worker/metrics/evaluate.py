"""Every metric of a batch of explained images, in a few batched passes: the front door of ``worker.metrics``.

Pure tensor code like the attention core: tensors and arrays in, numbers out, no I/O. The pipeline
calls ``evaluate`` right after ``explain`` with the same input tensors, on the same device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from common.methods import MethodSettings
from common.metric_settings import RANDOM_METHOD, Metric, MetricFamily, MetricSettings
from worker.attention import Explanation, explain
from worker.metrics.concentration import normalized_entropy
from worker.metrics.localization import mass_inside, pointing_game
from worker.metrics.perturbation import canvas, perturbation_curves
from worker.metrics.sanity import spearman

__all__ = ["ImageInputs", "MetricValue", "evaluate", "explanation_maps", "random_map", "seeded_draws"]


@dataclass(frozen=True)
class MetricValue:
    method: str
    metric: Metric
    value: float


@dataclass(frozen=True)
class ImageInputs:
    """What the metrics need of one image besides its pixels.

    ``maps``: method name -> ``[gh, gw]`` map (methods the model could not produce are left out; the
    random baseline is added by ``evaluate``). ``target``: the class the maps explain (``None`` for a
    model without a classifier: no deletion, insertion or sanity scores). ``seed``: this image's seed
    for the random map and tie-breaking, the same whatever batch the image lands in. ``coverage``:
    ``[gh, gw]`` share of each patch inside the annotated region, or ``None``.
    """

    maps: Mapping[str, np.ndarray]
    target: int | None
    seed: int
    coverage: np.ndarray | None = None


def explanation_maps(explanation: Explanation) -> dict[str, np.ndarray]:
    """The maps of an explanation that metrics score, by method name (absent ones left out)."""
    maps = {
        "rollout": explanation.rollout,
        "grad_rollout": getattr(explanation, "grad_rollout", None),
        "relevance": getattr(explanation, "relevance", None),
        "last_layer_score": explanation.layer_scores[-1] if explanation.layer_scores is not None else None,
    }
    return {name: value for name, value in maps.items() if value is not None}


def seeded_draws(seed: int, grid_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """This image's random map ``[gh, gw]`` (uniform in [0, 1)) and tie-break permutation ``[P]``.

    Drawn on the CPU from a generator seeded by ``seed`` in a fixed order, so they do not depend on
    the device, the batch or any other image.
    """
    gh, gw = grid_size
    generator = torch.Generator().manual_seed(seed)
    random = torch.rand(gh, gw, generator=generator)
    return random, torch.randperm(gh * gw, generator=generator)


def random_map(seed: int, grid_size: tuple[int, int]) -> np.ndarray:
    return seeded_draws(seed, grid_size)[0].numpy()


def _values(method_names: Sequence[str], metric: Metric, scores: torch.Tensor) -> list[list[MetricValue]]:
    """``[B, M]`` scores -> per image, one value per method; NaN (undefined) values are dropped."""
    rows = scores.detach().cpu().double().tolist()
    return [
        [MetricValue(m, metric, v) for m, v in zip(method_names, row, strict=True) if not math.isnan(v)]
        for row in rows
    ]


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    inputs: Sequence[ImageInputs],
    settings: MetricSettings,
    *,
    method_settings: MethodSettings | None = None,
    randomized: nn.Module | None = None,
    autocast_dtype: torch.dtype | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> list[list[MetricValue]]:
    """The metric values of each image of ``images`` ``[B, 3, H, W]`` (the model's inputs), in order.

    ``on_progress(what, done, total)`` is told how far the slow parts are: the perturbation curves'
    forward passes, then the sanity check's second explanation.

    Images whose available maps differ (rare: a model either has gradient maps or not) are evaluated
    in groups of equal method sets. ``randomized`` is the sanity check's re-initialized copy of
    ``model`` (``worker.metrics.sanity.randomized_copy``), needed when ``settings`` asks for it;
    ``method_settings`` are the settings the maps were made with, to make their counterparts alike.
    """
    results: list[list[MetricValue]] = [[] for _ in inputs]
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, item in enumerate(inputs):
        groups.setdefault(tuple(m for m in item.maps), []).append(index)
    for names, indices in groups.items():
        values = _evaluate_group(
            model,
            images[indices],
            [inputs[i] for i in indices],
            list(names),
            settings,
            method_settings or MethodSettings(),
            randomized,
            autocast_dtype,
            on_progress or _ignore,
        )
        for index, image_values in zip(indices, values, strict=True):
            results[index] = image_values
    return results


def _evaluate_group(
    model: nn.Module,
    images: torch.Tensor,
    inputs: Sequence[ImageInputs],
    names: list[str],
    settings: MetricSettings,
    method_settings: MethodSettings,
    randomized: nn.Module | None,
    autocast_dtype: torch.dtype | None,
    on_progress: Callable[[str, int, int], None],
) -> list[list[MetricValue]]:
    """The values of images that share their methods: what the maps alone give (entropy, the
    localization scores), then what needs the model (the perturbation curves, the sanity check)."""
    grid = _grid_of(model)
    draws = [seeded_draws(item.seed, grid) for item in inputs]
    group = _Group.of(inputs, names, [random for random, _ in draws], images.device)
    group.add(Metric.ENTROPY, normalized_entropy(group.maps))
    if settings.wants(MetricFamily.LOCALIZATION):
        _localization(group, inputs)
    classified = [b for b, item in enumerate(inputs) if item.target is not None]
    if classified and (settings.wants(MetricFamily.DELETION) or settings.wants(MetricFamily.INSERTION)):
        tie_breaks = torch.stack([draws[b][1] for b in classified])
        _perturbation(
            group, model, images, inputs, classified, tie_breaks, settings, autocast_dtype, on_progress
        )
    if classified and names and settings.wants(MetricFamily.SANITY):
        if randomized is None:
            raise ValueError("the sanity check needs the randomized copy of the model")
        _sanity(group, randomized, images, inputs, classified, method_settings, autocast_dtype, on_progress)
    return group.out


@dataclass
class _Group:
    """Images evaluated together: their methods' maps stacked with the random one as ``[B, M, gh,
    gw]``, the methods in that order, and each image's values so far."""

    names: list[str]
    maps: torch.Tensor
    out: list[list[MetricValue]]

    @classmethod
    def of(
        cls,
        inputs: Sequence[ImageInputs],
        names: list[str],
        randoms: Sequence[torch.Tensor],
        device: torch.device,
    ) -> _Group:
        maps = torch.stack(
            [
                torch.stack(
                    [*(torch.as_tensor(np.asarray(item.maps[n]), dtype=torch.float32) for n in names), random]
                )
                for item, random in zip(inputs, randoms, strict=True)
            ]
        ).to(device)
        return cls(names, maps, [[] for _ in inputs])

    @property
    def methods(self) -> list[str]:
        return [*self.names, RANDOM_METHOD]

    def add(
        self,
        metric: Metric,
        scores: torch.Tensor,
        rows: Sequence[int] | None = None,
        scored: Sequence[str] | None = None,
    ) -> None:
        """``[len(rows), len(scored)]`` scores of the images ``rows`` (default: all) for the methods
        ``scored`` (default: all, the random map included)."""
        rows = range(len(self.out)) if rows is None else rows
        methods = self.methods if scored is None else scored
        for row, values in zip(rows, _values(methods, metric, scores), strict=True):
            self.out[row].extend(values)


def _localization(group: _Group, inputs: Sequence[ImageInputs]) -> None:
    """The pointing game and the mass inside, for the images with an annotated region."""
    located = [b for b, item in enumerate(inputs) if item.coverage is not None and item.coverage.sum() > 0]
    if not located:
        return
    coverage = torch.stack([torch.as_tensor(inputs[b].coverage, dtype=torch.float32) for b in located])
    coverage = coverage.to(group.maps.device)[:, None]
    group.add(Metric.POINTING_GAME, pointing_game(group.maps[located], coverage), located)
    group.add(Metric.MASS_INSIDE, mass_inside(group.maps[located], coverage), located)


def _perturbation(
    group: _Group,
    model: nn.Module,
    images: torch.Tensor,
    inputs: Sequence[ImageInputs],
    classified: list[int],
    tie_breaks: torch.Tensor,
    settings: MetricSettings,
    autocast_dtype: torch.dtype | None,
    on_progress: Callable[[str, int, int], None],
) -> None:
    """The deletion and insertion areas of the images that have a class to follow."""
    deletion, insertion = settings.wants(MetricFamily.DELETION), settings.wants(MetricFamily.INSERTION)
    chosen = images[classified]
    curves = perturbation_curves(
        model,
        chosen,
        [int(cast(int, inputs[b].target)) for b in classified],
        group.maps[classified],
        tie_breaks,
        steps=settings.steps or _grid_of(model)[0],
        deletion_canvas=canvas(chosen, settings.deletion_baseline, settings.blur_sigma),
        insertion_canvas=canvas(chosen, settings.insertion_baseline, settings.blur_sigma),
        deletion=deletion,
        insertion=insertion,
        max_batch=settings.max_batch,
        autocast_dtype=autocast_dtype,
        on_progress=lambda done, total: on_progress(_curves_label(deletion, insertion), done, total),
    )
    if curves.deletion_auc is not None:
        group.add(Metric.DELETION_AUC, curves.deletion_auc, classified)
    if curves.insertion_auc is not None:
        group.add(Metric.INSERTION_AUC, curves.insertion_auc, classified)


def _sanity(
    group: _Group,
    randomized: nn.Module,
    images: torch.Tensor,
    inputs: Sequence[ImageInputs],
    classified: list[int],
    method_settings: MethodSettings,
    autocast_dtype: torch.dtype | None,
    on_progress: Callable[[str, int, int], None],
) -> None:
    """Each method's map against the same method's map of the randomized model (Spearman); the
    random map has no counterpart: it is the same draw for any model."""
    on_progress("sanity", 0, 1)
    again = explain(
        randomized,
        images[classified],
        MethodSettings.from_dict({**method_settings.to_dict(), "raw_attention": False, "top_k": 1}),
        [inputs[b].target for b in classified],
        autocast_dtype=autocast_dtype,
    )
    on_progress("sanity", 1, 1)
    remade = [explanation_maps(e) for e in again]
    compared = [i for i, n in enumerate(group.names) if n in remade[0]]  # maps the explanation makes
    if not compared:
        return
    counterparts = torch.stack(
        [
            torch.stack([torch.as_tensor(r[group.names[i]], dtype=torch.float32) for i in compared])
            for r in remade
        ]
    ).to(group.maps.device)
    scores = spearman(group.maps[classified][:, compared], counterparts)
    group.add(Metric.SANITY_SPEARMAN, scores, classified, [group.names[i] for i in compared])


def _ignore(_what: str, _done: int, _total: int) -> None:
    return None


def _curves_label(deletion: bool, insertion: bool) -> str:
    return "deletion, insertion" if deletion and insertion else "deletion" if deletion else "insertion"


def _grid_of(model: nn.Module) -> tuple[int, int]:
    grid = cast(Any, model.patch_embed).grid_size
    return int(grid[0]), int(grid[1])
