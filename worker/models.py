"""Models ready to explain: a ``ModelSpec`` built with its weights (``worker.weights``), class names
(``worker.labels``) and input recipe (``worker.preprocess``), kept warm per process.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from common.errors import UnsupportedModelError
from common.modelspec import ModelSpec, is_transformers_model
from common.settings import STORAGE_RETRY_SECONDS
from worker.attention import ModelLayout, check_supported
from worker.labels import class_labels
from worker.preprocess import Preprocessor, build_preprocessor
from worker.weights import build_model, check_arch

__all__ = ["LoadedModel", "ModelCache", "load_model"]


@dataclass
class LoadedModel:
    """A model ready for the attention core: eval mode, on its device, with labels and input recipe.

    ``labels`` are the class names (the spec's own, or timm's ImageNet names for an ImageNet-sized
    head), ``None`` when unknown. ``weights_source`` says in words where the weights came from, for
    logs and job records. ``layout`` is what the attention core read from the model's structure
    (readout, class token, head), checked once when the model was loaded.
    """

    spec: ModelSpec
    model: torch.nn.Module
    labels: tuple[str, ...] | None
    preprocessor: Preprocessor
    device: torch.device
    weights_source: str
    layout: ModelLayout


def load_model(
    spec: ModelSpec,
    *,
    device: torch.device,
    weights_dir: Path | None = None,
    cache_dir: Path | None = None,
    storage_retry_seconds: float = STORAGE_RETRY_SECONDS,
) -> LoadedModel:
    """Build ``spec``'s model with its weights, in eval mode on ``device`` (``requires_grad`` untouched).

    ``weights_dir`` is searched for ``"pretrained"`` weights before any download; ``cache_dir``
    receives checkpoints fetched from object storage (default: ``weights_dir``, else
    ``~/.cache/vitscope/weights``), riding out an unavailable endpoint for ``storage_retry_seconds``. A model the attention core cannot explain (Swin's windowed
    attention, SigLIP's attention pooling, …) raises ``UnsupportedModelError`` here, naming what it
    lacks: a permanent failure of its jobs before any image is fetched.
    """
    if is_transformers_model(spec.arch):
        return _load_transformers(spec, device=device)
    check_arch(spec.arch)
    model, weights_source = build_model(
        spec, weights_dir=weights_dir, cache_dir=cache_dir, storage_retry_seconds=storage_retry_seconds
    )
    model.eval()
    model.to(device)
    layout = check_supported(model, spec.name)
    return LoadedModel(
        spec=spec,
        model=model,
        labels=class_labels(spec, model),
        preprocessor=build_preprocessor(model, spec.preprocess),
        device=torch.device(device),
        weights_source=weights_source,
        layout=layout,
    )


def _load_transformers(spec: ModelSpec, *, device: torch.device) -> LoadedModel:
    """An ``hf:`` model (``worker.hf_models``), imported only when one is asked for: ``transformers``
    is the optional ``hf`` extra, and a worker without it fails these jobs saying so."""
    try:
        from worker.hf_models import load_transformers
    except ImportError as exc:
        raise UnsupportedModelError(
            f"model {spec.name!r} is a transformers model, but this worker cannot import transformers "
            f"({exc}); install the hf extra: pip install 'vitscope[worker,hf]'"
        ) from None
    loaded = load_transformers(spec)
    loaded.model.to(device)
    layout = check_supported(loaded.model, spec.name)
    return LoadedModel(
        spec=spec,
        model=loaded.model,
        labels=loaded.labels,
        preprocessor=loaded.preprocessor,
        device=torch.device(device),
        weights_source=loaded.weights_source,
        layout=layout,
    )


class ModelCache:
    """The last few models one worker process used, kept loaded (least recently used goes first).

    Loading a ViT costs seconds and jobs arrive grouped by model, so a worker keeps ``max_models``
    warm. Keyed by ``ModelSpec.fingerprint()``: two names for the same model share one entry. Room
    is made *before* loading the next model, so at most ``max_models`` are resident at any time; on
    CUDA the evicted model's memory is handed back to the driver (``torch.cuda.empty_cache``), as far
    as no caller still holds it. One cache per process; not for concurrent use from several threads.
    """

    def __init__(
        self,
        *,
        device: torch.device,
        weights_dir: Path | None = None,
        cache_dir: Path | None = None,
        max_models: int = 2,
        storage_retry_seconds: float = STORAGE_RETRY_SECONDS,
    ) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models}")
        self._device = torch.device(device)
        self._weights_dir = weights_dir
        self._cache_dir = cache_dir
        self._storage_retry_seconds = storage_retry_seconds
        self._max_models = max_models
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()

    def get(self, spec: ModelSpec) -> LoadedModel:
        """The loaded model for ``spec``, from the cache or freshly loaded (evicting the oldest)."""
        key = spec.fingerprint()
        loaded = self._models.get(key)
        if loaded is not None:
            self._models.move_to_end(key)
            return loaded if loaded.spec == spec else replace(loaded, spec=spec)
        while len(self._models) >= self._max_models:
            self._evict_oldest()
        loaded = load_model(
            spec,
            device=self._device,
            weights_dir=self._weights_dir,
            cache_dir=self._cache_dir,
            storage_retry_seconds=self._storage_retry_seconds,
        )
        self._models[key] = loaded
        return loaded

    def __contains__(self, spec: ModelSpec) -> bool:
        return spec.fingerprint() in self._models

    def __len__(self) -> int:
        return len(self._models)

    def _evict_oldest(self) -> None:
        self._models.popitem(last=False)
        if self._device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
