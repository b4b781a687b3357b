"""``explain_image``: one image and one model in, its maps and predictions out, in a single call.

The batch pipeline (``producer submit``) needs a CSV, a database and a store; a notebook user wants
what pytorch-grad-cam gives (``cam(input_tensor, targets)``). This module is that door to the same
parts the pipeline uses, so a map drawn here is the map a batch stores for the same image and
settings:

- the model: a timm name, resolved and loaded as a worker loads it (``worker.models``: weights,
  class names, the check that the attention can be explained), kept warm between calls; or a model
  object the caller built;
- the pixels: decoded and cropped as the pipeline does (``worker.preprocess``: the model's own data
  config, reduced-scale JPEG decoding, EXIF orientation);
- the numbers: one forward and one backward pass of the compute core (``worker.attention.explain``);
- the pictures: the pipeline's jet overlays (``worker.render``).

Settings come from the same environment variables as everywhere (``VITSCOPE_DEVICE``,
``VITSCOPE_AUTOCAST``, ``VITSCOPE_WEIGHTS_DIR``), read when the function is called; the method's own
options are keyword arguments named as ``MethodSettings``' fields.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch import nn

from common.artifacts import OVERLAYS, PICTURE_SOURCES
from common.errors import InvalidTargetError
from common.methods import HeadFusion, LayerScoreReduction, MethodSettings, Preprocess
from common.modelspec import ModelSpec, resolve_model
from common.settings import Settings
from common.storage.uri import file_uri_path
from worker.attention import Explanation, Readout, check_supported, explain
from worker.device import autocast_dtype, select_device
from worker.labels import class_labels, resolve_target
from worker.models import LoadedModel, ModelCache
from worker.preprocess import Preprocessor, build_preprocessor, decode_image, to_rgb
from worker.render import heatmap_overlay, layer_grid_pixels

__all__ = ["ImageExplanation", "Prediction", "draw_overlay", "explain_image"]

# The maps drawn over the picture (rollout, grad_rollout, relevance), in the order a report shows them.
OVERLAY_MAPS: tuple[str, ...] = tuple(PICTURE_SOURCES[name].removesuffix(".npy") for name in OVERLAYS)

# Option values that are choices, so a typo is answered with the list rather than an enum's repr.
_CHOICES: dict[str, type[HeadFusion] | type[LayerScoreReduction]] = {
    "head_fusion": HeadFusion,
    "layer_score_reduction": LayerScoreReduction,
}

ModelArgument = str | ModelSpec | LoadedModel | nn.Module
ImageArgument = str | Path | bytes | Image.Image | np.ndarray


@dataclass(frozen=True)
class Prediction:
    """One of the model's top-k classes: its index, its name (``None`` when the model has none), its
    softmax probability."""

    index: int
    label: str | None
    prob: float


@dataclass
class ImageExplanation:
    """Everything ``explain_image`` computed for one image (definitions: ``docs/methods.md``).

    ``crop`` is the picture the model saw (``uint8 [H, W, 3]``, after resize and centre crop): the
    grid maps ``[gh, gw]`` tile it, and the overlays are drawn on it. ``rollout`` is class-agnostic;
    ``grad_rollout`` and ``relevance`` explain ``target`` (the given class, else the top-1), and are
    ``None`` for a backbone without a classification head, as are ``target`` and ``predictions``.
    ``layer_scores`` is ``[L, gh, gw]``, ``cls_attention`` ``[L, H, gh, gw]`` (models with a class
    token), ``attention`` ``[L, H, N, N]`` only with ``raw_attention=True``.
    """

    model: str
    weights_source: str
    crop: np.ndarray
    readout: Readout
    predictions: list[Prediction]
    target: int | None
    target_label: str | None
    layer_scores: np.ndarray
    rollout: np.ndarray
    grad_rollout: np.ndarray | None
    relevance: np.ndarray | None
    cls_attention: np.ndarray | None
    attention: np.ndarray | None

    @property
    def maps(self) -> dict[str, np.ndarray]:
        """The grid maps ``[gh, gw]`` that exist for this model, by method name."""
        present = {name: getattr(self, name) for name in OVERLAY_MAPS}
        return {name: grid for name, grid in present.items() if grid is not None}

    def overlay(self, method: str = "grad_rollout") -> Image.Image:
        """``method``'s map as a jet heat map over ``crop``: the picture a batch stores as
        ``<method>.png``."""
        maps = self.maps
        if method not in maps:
            missing = (
                f"{self.model} has no classification head, so it has no {method} map"
                if method in OVERLAY_MAPS
                else f"unknown method {method!r}"
            )
            raise ValueError(f"{missing}; maps of this explanation: {', '.join(maps)}")
        return draw_overlay(self.crop, maps[method])

    def layer_grid(self) -> Image.Image:
        """The per-block score maps, one panel per block (the paper's Fig. 4.1; ``layer_scores.png``)."""
        return Image.fromarray(layer_grid_pixels(self.layer_scores, title=self.model))


def draw_overlay(picture: Image.Image | np.ndarray, grid_map: np.ndarray) -> Image.Image:
    """A grid map ``[gh, gw]`` with values in [0, 1] drawn as a jet heat map over ``picture``.

    ``picture`` is what the model saw (``ImageExplanation.crop``, ``uint8 [H, W, 3]``, or a Pillow
    picture of it); the map is upsampled bilinearly to its size and blended as ``docs/methods.md``
    artifact 8 says, the same pixels a batch stores. Values outside [0, 1] are clipped: the core's
    maps are already scaled into it.
    """
    pixels = np.array(to_rgb(picture)) if isinstance(picture, Image.Image) else np.asarray(picture)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(
            f"picture must be an RGB image or uint8 [H, W, 3], got {pixels.dtype} {list(pixels.shape)}"
        )
    grid = np.asarray(grid_map, dtype=np.float32)
    if grid.ndim != 2:
        raise ValueError(f"grid_map must be [gh, gw], got shape {list(grid.shape)}")
    return Image.fromarray(heatmap_overlay(pixels, grid))


def explain_image(
    model: ModelArgument,
    image: ImageArgument,
    target: int | str | None = None,
    *,
    weights: str | None = None,
    device: str | None = None,
    **method_options: Any,
) -> ImageExplanation:
    """Explain ``image`` under ``model``: its attention maps, gradient maps and top-k predictions.

    ``model``: a timm architecture name (``"deit_tiny_patch16_224"``), a ``ModelSpec``, a model this
    module or ``worker.models`` loaded, or a timm ``nn.Module`` you built (used on its own device,
    switched to eval mode for the call and back). Models named by string are loaded once and kept
    warm for the next call. ``weights`` for a name: ``"pretrained"`` (default: a file in
    ``VITSCOPE_WEIGHTS_DIR``, else timm's download), ``"random"``, a path, ``s3://…``, ``hf-hub:…``.

    ``image``: a local path (or ``file://`` URL), the file's bytes, a Pillow picture, or an RGB
    ``uint8 [H, W, 3]`` array. ``target``: the class the gradient maps explain, as an index or a
    label (``"tabby"``); ``None`` explains the top-1 prediction. ``device``: ``cpu``, ``cuda``, …
    (default ``VITSCOPE_DEVICE``, itself ``auto``).

    ``method_options``: ``head_fusion`` (``"mean"``, ``"max"``, ``"min"``), ``discard_ratio``
    (0.9), ``layer_score_reduction`` (``"query_max"``, ``"key_max"``, ``"head_max"``), ``top_k`` (5),
    ``raw_attention`` (``False``): the options of ``producer submit``, defined in ``docs/methods.md``.

    Not for concurrent calls on one model from several threads: the capture hooks are per model
    instance (``worker.attention.capture``).
    """
    settings = _method_settings(method_options)
    environment = Settings()
    with _mode_kept(model):
        loaded = _loaded(model, weights=weights, device=device, environment=environment)
        crop = _crop(image, loaded.preprocessor, environment.max_image_pixels)
        target_index = _target_index(loaded, target)
        pixels = torch.from_numpy(crop[None]).to(loaded.device)
        inputs = loaded.preprocessor.normalize_batch(pixels)
        autocast = autocast_dtype(environment.autocast, loaded.device)
        (explanation,) = explain(loaded.model, inputs, settings, [target_index], autocast_dtype=autocast)
    return _result(loaded, crop, explanation)


def _method_settings(options: Mapping[str, Any]) -> MethodSettings:
    """The method's settings from keyword arguments, with a message that lists what is accepted."""
    known = [field.name for field in fields(MethodSettings)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(
            f"explain_image() got unknown method option(s) {unknown}; options: {', '.join(known)}"
        )
    for name, choices in _CHOICES.items():
        if name in options and options[name] not in {choice.value for choice in choices}:
            allowed = ", ".join(choice.value for choice in choices)
            raise ValueError(f"{name} must be one of {allowed}; got {options[name]!r}")
    return MethodSettings(**options)


_CACHES: dict[tuple[str, Path | None], ModelCache] = {}
_CACHES_LOCK = threading.Lock()


def _loaded(
    model: ModelArgument, *, weights: str | None, device: str | None, environment: Settings
) -> LoadedModel:
    """``model`` ready to explain. Names and specs go through one warm cache per device and weights
    folder, as in a worker; a loaded model is used as it is; a module is wrapped where it lives."""
    if isinstance(model, LoadedModel | nn.Module):
        if weights is not None or device is not None:
            raise ValueError(
                "weights and device apply to models given by name; a model object is used with its own "
                "weights, on its own device (move it with .to(device))"
            )
        return model if isinstance(model, LoadedModel) else _wrap_module(model)
    if isinstance(model, str):
        spec = resolve_model(model, weights=weights)
    elif isinstance(model, ModelSpec):
        spec = resolve_model(model.name, {model.name: model}, weights=weights)
    else:
        raise TypeError(
            f"model must be a timm name, a ModelSpec, a LoadedModel or an nn.Module, not {type(model).__name__}"
        )
    where = select_device(device or environment.device)
    key = (str(where), environment.weights_dir)
    with _CACHES_LOCK:
        cache = _CACHES.get(key)
        if cache is None:
            cache = _CACHES[key] = ModelCache(device=where, weights_dir=environment.weights_dir)
        return cache.get(spec)


def _wrap_module(module: nn.Module) -> LoadedModel:
    """A caller's own timm model as a ``LoadedModel``: its data config for the pixels, ImageNet class
    names when its head has an ImageNet size, checked for an attention the core can read."""
    config = getattr(module, "pretrained_cfg", None) or {}
    name = str(config.get("architecture") or type(module).__name__)
    spec = ModelSpec(name=name, arch=name)
    parameter = next(module.parameters(), None)
    return LoadedModel(
        spec=spec,
        model=module,
        labels=class_labels(spec, module),
        preprocessor=build_preprocessor(module, Preprocess.TIMM),
        device=parameter.device if parameter is not None else torch.device("cpu"),
        weights_source="the module given to explain_image",
        layout=check_supported(module, name),
    )


@contextlib.contextmanager
def _mode_kept(model: ModelArgument) -> Iterator[None]:
    """A caller's module back in its own mode afterwards: the core explains in eval mode (dropout
    off, or the maps would be random) and leaves the model there, which suits a cached model only."""
    if not isinstance(model, nn.Module):
        yield
        return
    training = model.training
    try:
        yield
    finally:
        model.train(training)


def _crop(image: ImageArgument, preprocessor: Preprocessor, max_pixels: int) -> np.ndarray:
    """The model's input crop ``uint8 [H, W, 3]``, made as the pipeline makes it from a file."""
    if isinstance(image, str | Path):
        image = _read(image)
    if isinstance(image, bytes):
        picture = decode_image(image, max_pixels=max_pixels, min_size=preprocessor.draft_size)
    elif isinstance(image, Image.Image):
        picture = to_rgb(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"an image array must be RGB uint8 [H, W, 3], got {image.dtype} {list(image.shape)}"
            )
        picture = Image.fromarray(image)
    else:
        raise TypeError(
            f"image must be a path, bytes, a PIL image or a uint8 [H, W, 3] array, not {type(image).__name__}"
        )
    return preprocessor.crop_pixels(picture)


def _read(location: str | Path) -> bytes:
    """A local image file's bytes; remote locations are the batch pipeline's business (its fetcher
    applies the network policy, retries and size limits)."""
    text = str(location)
    if text.startswith("file://"):
        return Path(file_uri_path(text)).read_bytes()
    if "://" in text:
        raise ValueError(
            f"explain_image reads local files; download {text!r} first, or list it in a CSV for "
            "`producer submit`, which fetches http(s):// and s3:// images"
        )
    return Path(text).expanduser().read_bytes()


def _target_index(loaded: LoadedModel, target: int | str | None) -> int | None:
    """The class the gradient maps explain (``None``: the top-1), as a batch job resolves it."""
    if not loaded.layout.has_head:
        if target is not None and str(target).strip():
            raise InvalidTargetError(
                f"target {target!r}: {loaded.spec.name} has no classification head (num_classes = 0), "
                "so no class can be explained; leave the target out"
            )
        return None
    return resolve_target(target, loaded.labels, cast(int, loaded.model.num_classes))


def _label(loaded: LoadedModel, index: int) -> str | None:
    return loaded.labels[index] if loaded.labels is not None else None


def _result(loaded: LoadedModel, crop: np.ndarray, explanation: Explanation) -> ImageExplanation:
    predictions = []
    if explanation.top_indices is not None and explanation.top_probs is not None:
        predictions = [
            Prediction(int(index), _label(loaded, int(index)), float(prob))
            for index, prob in zip(explanation.top_indices, explanation.top_probs, strict=True)
        ]
    target = explanation.target
    return ImageExplanation(
        model=loaded.spec.name,
        weights_source=loaded.weights_source,
        crop=crop,
        readout=explanation.readout,
        predictions=predictions,
        target=target,
        target_label=_label(loaded, target) if target is not None else None,
        layer_scores=explanation.layer_scores,
        rollout=explanation.rollout,
        grad_rollout=explanation.grad_rollout,
        relevance=explanation.relevance,
        cls_attention=explanation.cls_attention,
        attention=explanation.attention,
    )
