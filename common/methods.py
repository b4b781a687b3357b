"""The knobs of the attention methods, shared by the producer (which records them) and the worker.

Kept free of torch so the producer can validate and store them. The semantics of every option are
defined in ``docs/methods.md``; the files one job writes are named in ``common.artifacts``.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "HeadFusion",
    "LayerScoreReduction",
    "MethodSettings",
    "Preprocess",
]


class HeadFusion(enum.StrEnum):
    """How attention rollout fuses the heads of one block into one matrix."""

    MEAN = "mean"
    MAX = "max"
    MIN = "min"


class LayerScoreReduction(enum.StrEnum):
    """Which axis the per-layer score matrix reduces with a maximum (``docs/methods.md`` artifact 4).

    ``query_max``: m[h, j] = max_i a[h, i, j], mean over heads (how strongly patch j is attended to).
    ``key_max``:   m[h, i] = max_j a[h, i, j], mean over heads (how peaked patch i's own attention is).
    ``head_max``:  m[i, j] = max_h a[h, i, j], mean over queries i (the strongest head per pair).
    """

    QUERY_MAX = "query_max"
    KEY_MAX = "key_max"
    HEAD_MAX = "head_max"


class Preprocess(enum.StrEnum):
    """Named preprocessing pipelines (``docs/methods.md`` "Preprocessing")."""

    TIMM = "timm"
    PAPER = "paper"


@dataclass(frozen=True)
class MethodSettings:
    """Settings that change the numbers in the artifacts (and therefore their storage keys)."""

    head_fusion: HeadFusion = HeadFusion.MEAN
    discard_ratio: float = 0.9
    layer_score_reduction: LayerScoreReduction = LayerScoreReduction.QUERY_MAX
    raw_attention: bool = False
    top_k: int = 5

    def __post_init__(self) -> None:
        # Coerce plain strings (from JSON, the CLI) so equality and hashing are by value.
        object.__setattr__(self, "head_fusion", HeadFusion(self.head_fusion))
        object.__setattr__(self, "layer_score_reduction", LayerScoreReduction(self.layer_score_reduction))
        if not 0.0 <= float(self.discard_ratio) < 1.0:
            raise ValueError(f"discard_ratio must be in [0, 1), got {self.discard_ratio}")
        object.__setattr__(self, "discard_ratio", float(self.discard_ratio))
        if int(self.top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        object.__setattr__(self, "top_k", int(self.top_k))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, stored with every batch and part of every storage key."""
        data = asdict(self)
        data["head_fusion"] = self.head_fusion.value
        data["layer_score_reduction"] = self.layer_score_reduction.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodSettings:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
