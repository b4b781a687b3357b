"""Faithfulness metrics of the attention maps: deletion/insertion AUC, concentration, localization
and the model-randomization sanity check (definitions in ``docs/metrics.md``).

Pure tensor code, like ``worker.attention``: no I/O, no storage, no database. ``evaluate`` scores a
batch of explained images in batched no-grad passes; the modules hold the pieces.
"""

from worker.metrics.concentration import normalized_entropy
from worker.metrics.evaluate import (
    ImageInputs,
    MetricValue,
    evaluate,
    explanation_maps,
    random_map,
    seeded_draws,
)
from worker.metrics.localization import box_coverage, mask_coverage, mass_inside, pointing_game
from worker.metrics.perturbation import (
    PerturbationCurves,
    canvas,
    patch_ranks,
    perturbation_curves,
    rise_kernel,
    step_counts,
)
from worker.metrics.sanity import cascade_layers, randomized_copy, spearman

__all__ = [
    "ImageInputs",
    "MetricValue",
    "PerturbationCurves",
    "box_coverage",
    "canvas",
    "cascade_layers",
    "evaluate",
    "explanation_maps",
    "mask_coverage",
    "mass_inside",
    "normalized_entropy",
    "patch_ranks",
    "perturbation_curves",
    "pointing_game",
    "random_map",
    "randomized_copy",
    "rise_kernel",
    "seeded_draws",
    "spearman",
    "step_counts",
]
