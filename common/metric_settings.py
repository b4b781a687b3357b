"""Faithfulness metrics: their names, their settings, and how a submit asks for them.

Shared by the producer (which parses ``--metrics`` and the models file's ``[metrics]`` section and
records the settings with the batch) and the worker (which computes the numbers, see
``worker/metrics``). Free of torch. The definitions are in ``docs/metrics.md``.

Metric settings never change a map, so they are *not* part of the configuration digest that names
and reuses artifacts (``common.keys.config_fingerprint``). They have their own digest
(``MetricSettings.digest``), stored with every metric value: an earlier job's maps are reused only
when its metrics were computed with the same settings and the same box or mask, otherwise the job is
computed afresh (its maps land on the same keys, so nothing is orphaned).
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import InvalidModelSpecError
from common.modelspec import read_models_toml

__all__ = [
    "BINARY_METRICS",
    "METHODS",
    "RANDOM_METHOD",
    "Baseline",
    "Metric",
    "MetricFamily",
    "MetricSettings",
    "SanityLayers",
    "load_metrics_section",
    "parse_metrics_option",
]

# The maps every job's metrics are computed for, in display order; "random" is the baseline, a
# seeded uniform map that knows nothing about the image.
RANDOM_METHOD = "random"
METHODS: tuple[str, ...] = ("rollout", "grad_rollout", "relevance", "last_layer_score", RANDOM_METHOD)


class Metric(enum.StrEnum):
    """One number per job × method. ``docs/metrics.md`` defines each; which way is better is noted."""

    DELETION_AUC = "deletion_auc"  # lower is better
    INSERTION_AUC = "insertion_auc"  # higher is better
    ENTROPY = "entropy"  # normalized to [0, 1]; lower = more concentrated
    POINTING_GAME = "pointing_game"  # 1 = the map's maximum touches the box/mask
    MASS_INSIDE = "mass_inside"  # share of the map's mass inside the box/mask
    SANITY_SPEARMAN = (
        "sanity_spearman"  # rank correlation with a partly re-initialized model; lower = more faithful
    )


# Scores that are 0 or 1 per job: their mean is a hit rate, whose interval is Wilson's, not t's.
BINARY_METRICS: frozenset[str] = frozenset({Metric.POINTING_GAME})


class MetricFamily(enum.StrEnum):
    """What ``--metrics`` turns on. Concentration (entropy) comes with any of them: it costs nothing."""

    DELETION = "deletion"
    INSERTION = "insertion"
    LOCALIZATION = "localization"  # only for rows with a bbox or mask_uri
    SANITY = "sanity"  # the model-randomization test: a second explanation pass on a modified copy


# ``--metrics all``: every family. ``standard``: all but the sanity check, which doubles the cost
# of explaining and is therefore asked for by name.
_GROUPS: dict[str, frozenset[MetricFamily]] = {
    "all": frozenset(MetricFamily),
    "standard": frozenset(MetricFamily) - {MetricFamily.SANITY},
}


class Baseline(enum.StrEnum):
    """What a removed patch is replaced with (deletion) or what revealed patches are pasted onto (insertion).

    ``mean``: zeros after normalization, i.e. the dataset mean colour. ``blur``: the normalized image
    under a Gaussian blur of ``blur_sigma`` cut at 3σ (a 31-px kernel for σ = 5), reflect padding.
    ``rise_blur``: the canvas of RISE's released code (Petsiuk et al., 2018), whatever the input size:
    an 11 × 11 kernel (``scipy.ndimage.gaussian_filter`` of a unit impulse with σ = 5, so the Gaussian
    folded back at the kernel's edges), zero padding; ``blur_sigma`` does not apply to it.
    """

    MEAN = "mean"
    BLUR = "blur"
    RISE_BLUR = "rise_blur"


class SanityLayers(enum.StrEnum):
    """Which layers the sanity check's copy re-initializes, besides its last ``sanity_blocks`` blocks.

    ``output`` (the default): the classifier head(s) and the final norm(s) too: the cascade of
    Adebayo et al. (2018) and Quantus' MPRT, which start at the output layer, so the numbers mean what
    they mean in the literature. ``blocks``: the blocks only, the trained head and final norm kept
    (vitscope's check before the cascade; with the class read-out still trained, the target's
    gradient enters the network through trained weights and the gradient maps change less).
    """

    OUTPUT = "output"
    BLOCKS = "blocks"


def parse_metrics_option(value: str | None) -> frozenset[MetricFamily]:
    """``--metrics all`` / ``standard`` / ``sanity`` / ``deletion,insertion`` → the families asked for.

    An empty value means none. Raises ``ValueError`` naming the choices for anything else.
    """
    families: set[MetricFamily] = set()
    for part in (value or "").split(","):
        name = part.strip().lower()
        if not name:
            continue
        if name in _GROUPS:
            families |= _GROUPS[name]
            continue
        try:
            families.add(MetricFamily(name))
        except ValueError:
            choices = ", ".join([*_GROUPS, *(f.value for f in MetricFamily)])
            raise ValueError(
                f"unknown --metrics value {name!r}: use a comma-separated list of {choices}"
            ) from None
    return frozenset(families)


@dataclass(frozen=True)
class MetricSettings:
    """How the metrics of a batch are computed. ``families`` empty means no metrics at all.

    ``steps``: points of the deletion/insertion curves besides the start (``None`` = the patch grid's
    height, 14 for a 14×14 grid, so each step removes about one row's worth of patches).
    ``blur_sigma``: the Gaussian's standard deviation in pixels for the ``blur`` baseline (``None`` =
    5 px scaled by the input side / 224, RISE's σ at 224). ``sanity_layers``: whether the sanity
    check's copy re-initializes the head and final norm as well (``SanityLayers``); ``sanity_blocks``:
    how many of the last blocks it re-initializes (``None`` = half of them, rounded up; 0, with
    ``sanity_layers = "output"``, re-initializes the head and final norm alone). ``seed`` seeds
    the random map, the tie-breaking order of equal map values and the re-initialization.
    ``max_batch``: most perturbed images per forward pass (halved on CUDA out-of-memory).
    """

    families: frozenset[MetricFamily] = field(default_factory=frozenset)
    steps: int | None = None
    deletion_baseline: Baseline = Baseline.MEAN
    insertion_baseline: Baseline = Baseline.BLUR
    blur_sigma: float | None = None
    sanity_blocks: int | None = None
    sanity_layers: SanityLayers = SanityLayers.OUTPUT
    seed: int = 0
    max_batch: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", frozenset(MetricFamily(f) for f in self.families))
        object.__setattr__(self, "deletion_baseline", Baseline(self.deletion_baseline))
        object.__setattr__(self, "insertion_baseline", Baseline(self.insertion_baseline))
        object.__setattr__(self, "sanity_layers", SanityLayers(self.sanity_layers))
        for name in ("steps", "sanity_blocks", "max_batch", "seed"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _integer(name, value))
        if self.blur_sigma is not None:
            object.__setattr__(self, "blur_sigma", float(self.blur_sigma))
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"metrics steps must be >= 1, got {self.steps}")
        if self.blur_sigma is not None and self.blur_sigma <= 0:
            raise ValueError(f"metrics blur_sigma must be positive, got {self.blur_sigma}")
        if self.sanity_blocks is not None and self.sanity_blocks < 0:
            raise ValueError(f"metrics sanity_blocks must be >= 0, got {self.sanity_blocks}")
        if self.sanity_blocks == 0 and self.sanity_layers is SanityLayers.BLOCKS:
            raise ValueError(
                'metrics sanity_blocks = 0 with sanity_layers = "blocks" would re-initialize nothing'
            )
        if self.max_batch < 1:
            raise ValueError(f"metrics max_batch must be >= 1, got {self.max_batch}")

    @property
    def enabled(self) -> bool:
        return bool(self.families)

    def wants(self, family: MetricFamily) -> bool:
        return family in self.families

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, stored with the batch (``batches.settings["metrics"]``)."""
        return {
            "families": sorted(f.value for f in self.families),
            "steps": self.steps,
            "deletion_baseline": self.deletion_baseline.value,
            "insertion_baseline": self.insertion_baseline.value,
            "blur_sigma": self.blur_sigma,
            "sanity_blocks": self.sanity_blocks,
            "sanity_layers": self.sanity_layers.value,
            "seed": self.seed,
            "max_batch": self.max_batch,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> MetricSettings:
        known = {k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__}
        if "families" in known:
            known["families"] = frozenset(MetricFamily(f) for f in known["families"])
        return cls(**known)

    def with_families(self, families: Iterable[MetricFamily]) -> MetricSettings:
        return MetricSettings.from_dict({**self.to_dict(), "families": [f.value for f in families]})

    def digest(self, region: str | None = None) -> str:
        """Digest of everything that determines one job's metric values besides its maps.

        ``region`` is the job's box or mask URI (localization depends on it). ``max_batch`` only
        changes how the work is split, so it is left out, and so is ``sanity_layers`` when the sanity
        check is off: values computed before that setting existed stay reusable.
        """
        data = self.to_dict()
        data.pop("max_batch")
        if not self.wants(MetricFamily.SANITY):
            data.pop("sanity_layers")
        data["region"] = region or ""
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"metrics {name} must be an integer, got {value!r}")
    return value


_SECTION_KEYS = {
    "compute",
    "steps",
    "deletion_baseline",
    "insertion_baseline",
    "blur_sigma",
    "sanity_blocks",
    "sanity_layers",
    "seed",
    "max_batch",
}


def load_metrics_section(path: str | Path) -> MetricSettings:
    """The ``[metrics]`` table of a TOML models file; defaults where it (or the table) is absent.

    ``compute = ["standard"]`` (the same names as ``--metrics``) turns metrics on for every submit
    that uses the file; the command line's ``--metrics`` wins over it.
    """
    path = Path(path)
    section = read_models_toml(path).get("metrics", {})
    if not isinstance(section, dict):
        raise InvalidModelSpecError(f"models file {path}: [metrics] must be a table")
    unknown = set(section) - _SECTION_KEYS
    if unknown:
        raise InvalidModelSpecError(
            f"models file {path}: [metrics] has unknown key(s) {sorted(unknown)}; allowed: {sorted(_SECTION_KEYS)}"
        )
    values = dict(section)
    compute = values.pop("compute", [])
    if isinstance(compute, str):
        compute = [compute]
    try:
        families = parse_metrics_option(",".join(str(c) for c in compute))
        return MetricSettings(families=families, **values)
    except (TypeError, ValueError) as exc:
        raise InvalidModelSpecError(f"models file {path}: [metrics]: {exc}") from None
