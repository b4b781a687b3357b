"""Hugging Face ``transformers`` vision models (``hf:<hub id or folder>``), explained like timm's.

``load_transformers`` reads the model's ``config.json``, decides from its ``model_type`` whether the
family has one ``N × N`` self-attention map per block over the class/prefix tokens and the patch grid,
loads it with ``AutoModelForImageClassification`` (a classification head in ``architectures``) or
``AutoModel`` (a headless backbone; ``CLIPVisionModel`` for a CLIP checkpoint) in **eager** attention,
so each attention module returns its post-softmax weights, and wraps it in ``TransformersModel``: the
surface the rest of the worker reads from a timm model (``blocks``, ``patch_embed.grid_size``,
``num_classes``, ``forward(images) -> logits``) plus ``attention_layout()``, which tells the compute
core where the maps are (``worker.attention.support``).

Supported families (``model_type``: prefix tokens; readout, from the model's own pooling; see
``docs/methods.md`` "transformers models"):

- ``vit``: class token; the class token.
- ``deit``: class and distillation tokens; the class token (as for timm's distilled DeiT).
- ``beit``, ``data2vec-vision`` (relative position bias): class token; the mean of the patch tokens
  with ``use_mean_pooling`` (their default), else the class token.
- ``dinov2``; ``dinov2_with_registers`` (class token, then the registers): the class token.
- ``clip_vision_model`` / ``clip`` (``CLIPVisionModel``): the class token;
  ``CLIPForImageClassification``: the mean of the patch tokens.

Refused with the reason: windowed or pooled attention (Swin, PVT, SegFormer, …), SigLIP's
attention-pooling head, DINOv2's classification head (it reads the class token *and* the patch mean
side by side, which is no single readout row), and any family not listed.

Preprocessing follows the model's image-processor configuration as transformers' PIL backend applies
it (``AutoImageProcessor.from_pretrained(..., backend="pil")``): resize (shortest edge, or to a fixed
height × width), centre crop (offset floored, as transformers does), ``1/255``, mean and std; the
recipe is written into each job's ``weights_source``.
"""

from __future__ import annotations

import inspect
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import huggingface_hub
import huggingface_hub.constants
import torch
import transformers
from torch import nn

from common.errors import InvalidModelSpecError, UnsupportedModelError, WeightsUnavailableError
from common.methods import Preprocess
from common.modelspec import HF_PREFIX, ModelSpec
from worker.attention.readout import Readout
from worker.attention.support import ModelLayout
from worker.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessor
from worker.weights import _reachable  # the same bounded TCP probe as for timm's hub weights

__all__ = ["REFUSED_TYPES", "SUPPORTED_TYPES", "LoadedTransformers", "TransformersModel", "load_transformers"]

# What a classification head's class is called in ``config.architectures``.
_HEAD_SUFFIXES = ("ForImageClassification", "ForImageClassificationWithTeacher")
_DEFAULT_LABEL = re.compile(r"LABEL_\d+")
# Pillow's resampling filters by number, as image-processor configurations store them.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# The paper's recipe (``worker.preprocess``): shorter side 256, centre crop 224, scaled with the input.
_PAPER_RESIZE, _PAPER_CROP = 256, 224
_HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# ``preprocess = "timm"`` means "the model's own recipe": for these models, their image processor's.
_PIPELINE_NAMES = {Preprocess.TIMM: "image processor", Preprocess.PAPER: "paper"}


@dataclass(frozen=True)
class _Family:
    """How one ``model_type`` lays out its tokens and pools them."""

    prefix_tokens: Callable[[Any], int]
    readout: Callable[[Any, str], Readout]  # (config, loaded class name) -> readout
    # Not yet ported to transformers' attention interface (Data2Vec-Vision in 5.x): its eager
    # self-attention applies an ``nn.Dropout`` module to the post-softmax map, hooked as timm's is.
    dropout_hook: bool = False


def _class_token(config: Any, loaded: str) -> Readout:
    return Readout.TOKEN


def _beit_pooling(config: Any, loaded: str) -> Readout:
    """BEiT / Data2Vec-Vision pool with ``BeitPooler``: mean of the patch tokens with
    ``use_mean_pooling`` (their classifiers' default), else the class token."""
    return Readout.AVG if getattr(config, "use_mean_pooling", False) else Readout.TOKEN


def _clip_pooling(config: Any, loaded: str) -> Readout:
    """``CLIPVisionModel`` pools the class token; ``CLIPForImageClassification`` averages the patches."""
    return Readout.AVG if loaded == "CLIPForImageClassification" else Readout.TOKEN


SUPPORTED_TYPES: dict[str, _Family] = {
    "vit": _Family(lambda config: 1, _class_token),
    "deit": _Family(lambda config: 2, _class_token),
    "beit": _Family(lambda config: 1, _beit_pooling),
    "data2vec-vision": _Family(lambda config: 1, _beit_pooling, dropout_hook=True),
    "dinov2": _Family(lambda config: 1, _class_token),
    "dinov2_with_registers": _Family(lambda config: 1 + int(config.num_register_tokens), _class_token),
    "clip_vision_model": _Family(lambda config: 1, _clip_pooling),
    "clip": _Family(lambda config: 1, _clip_pooling),
}

_WINDOWED = (
    "it attends within shifted local windows, stage by stage, so no block has one attention map over "
    "all tokens (and there is no class token to read out)"
)
_POOLED = (
    "its attention is pooled: keys and values are spatially reduced before the softmax, so a block's "
    "map is not token-to-token N × N"
)
_SIGLIP = (
    "its vision tower pools with an attention head (SiglipMultiheadAttentionPoolingHead: a learned "
    "probe attending over the patch tokens) and has no class token, so the row its output reads is "
    "computed inside that head, not in the blocks"
)
REFUSED_TYPES: dict[str, str] = {
    **dict.fromkeys(
        ("swin", "swinv2", "donut-swin", "maskformer-swin", "swin2sr", "dinat", "nat"), _WINDOWED
    ),
    **dict.fromkeys(("pvt", "pvt_v2", "segformer", "glpn", "hiera", "mvit"), _POOLED),
    **dict.fromkeys(("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model"), _SIGLIP),
}


@dataclass(frozen=True)
class PatchGrid:
    """What the worker reads as a timm model's ``patch_embed``: the input size and its patch grid."""

    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]


class TransformersModel(nn.Module):
    """A ``transformers`` vision model behind the interface the worker uses for timm models.

    ``forward(images [B, 3, H, W])`` returns the logits ``[B, C]`` (a classification head) or the
    pooled features ``[B, D]`` (a headless backbone, ``num_classes = 0``). ``blocks`` are the model's
    own encoder layers (the sanity metric re-initializes the last ones of a copy). The wrapped model
    is ``self.hf``.
    """

    def __init__(
        self,
        hf: nn.Module,
        *,
        family: _Family,
        patch_embed: PatchGrid,
        num_classes: int,
        interpolate: bool,
    ) -> None:
        super().__init__()
        self.hf = hf
        self.patch_embed = patch_embed
        self.num_classes = num_classes
        self.num_prefix_tokens = family.prefix_tokens(hf.config)
        self.readout = family.readout(hf.config, type(hf).__name__)
        self._interpolate = interpolate
        self._dropout_hook = family.dropout_hook
        # The modules transformers itself records ``hidden_states`` and ``attentions`` from.
        recorded = getattr(hf, "_can_record_outputs", None) or {}
        self._layer_class = _recorded_class(recorded.get("hidden_states"))
        self._attention_class = _recorded_class(recorded.get("attentions"))
        if not self._dropout_hook and (self._attention_class is None or self._layer_class is None):
            raise UnsupportedModelError(
                f"{type(hf).__name__} does not declare its attention modules (_can_record_outputs)"
            )

    @property
    def blocks(self) -> tuple[nn.Module, ...]:
        """The encoder layers in order (computed, so a deep copy has its own)."""
        if self._dropout_hook:
            return tuple(cast(Any, self.hf).base_model.encoder.layer)
        assert self._layer_class is not None  # __init__ refuses a model without one
        return tuple(module for module in self.hf.modules() if isinstance(module, self._layer_class))

    def attention_layout(self) -> ModelLayout:
        """Where the core finds block ``l``'s map: the ``l``-th attention module's ``output[1]``, or
        (``dropout_hook``) the output of its self-attention's dropout."""
        if self._dropout_hook:
            modules = tuple(cast(Any, block).attention.attention.dropout for block in self.blocks)
        else:
            assert self._attention_class is not None  # __init__ refuses a model without one
            modules = tuple(
                module for module in self.hf.modules() if isinstance(module, self._attention_class)
            )
        return ModelLayout(
            attn_drops=modules,
            num_prefix_tokens=self.num_prefix_tokens,
            grid_size=self.patch_embed.grid_size,
            readout=self.readout,
            has_class_token=True,
            has_head=self.num_classes > 0,
            output_index=None if self._dropout_hook else 1,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        output = self.hf(pixel_values=images, **kwargs)
        if self.num_classes > 0:
            return output.logits
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None:
            return pooled
        tokens = output.last_hidden_state
        if self.readout is Readout.AVG:
            return tokens[:, self.num_prefix_tokens :].mean(dim=1)
        return tokens[:, 0]


def _recorded_class(entry: Any) -> type | None:
    """The module class transformers records an output from (a class, or an ``OutputRecorder``)."""
    if isinstance(entry, type):
        return entry
    target = getattr(entry, "target_class", None)
    return target if isinstance(target, type) else None


@dataclass
class LoadedTransformers:
    """What ``load_transformers`` hands ``worker.models.load_model``."""

    model: TransformersModel
    labels: tuple[str, ...] | None
    preprocessor: Preprocessor
    weights_source: str


def load_transformers(spec: ModelSpec) -> LoadedTransformers:
    """Build ``spec``'s ``transformers`` model (``spec.arch`` = ``hf:<hub id or absolute folder>``).

    Refusals are ``UnsupportedModelError`` naming what the family lacks; a hub id that is neither
    cached nor reachable is a ``WeightsUnavailableError`` saying what to do (as for timm weights).
    """
    transformers.utils.logging.disable_progress_bar()
    source = spec.arch.removeprefix(HF_PREFIX)
    local_only = _check_available(spec, source)
    config = _load_config(source, local_only)
    model_type = str(getattr(config, "model_type", ""))
    family = _family(spec, model_type, config)
    hf, has_head = _build(spec, source, config, model_type, local_only)
    hf.eval()
    num_classes = int(cast(Any, hf.config).num_labels) if has_head else 0
    if spec.num_classes is not None and spec.num_classes != num_classes:
        raise InvalidModelSpecError(
            f"model {spec.name!r}: num_classes = {spec.num_classes}, but {source} has "
            f"{'a head of ' + str(num_classes) + ' classes' if num_classes else 'no classification head'}"
        )
    processor = _image_processor(source, local_only, spec.preprocess)
    preprocessor = _preprocessor(spec, processor, hf.config)
    grid, interpolate = _patch_grid(spec, hf, preprocessor.input_size)
    wrapped = TransformersModel(
        hf, family=family, patch_embed=grid, num_classes=num_classes, interpolate=interpolate
    )
    weights = "RANDOM (untrained weights from its config: for smoke runs only)" if spec.is_random else source
    return LoadedTransformers(
        model=wrapped,
        labels=_labels(spec, hf.config, num_classes),
        preprocessor=preprocessor,
        weights_source=(
            f"transformers {transformers.__version__} {type(hf).__name__}: {weights}; "
            f"preprocessing: {describe(preprocessor)}"
        ),
    )


def _is_folder(source: str) -> bool:
    return source.startswith("/")


def _check_available(spec: ModelSpec, source: str) -> bool:
    """Whether to read only local files: always for a folder (which must exist), and for a hub id
    whose files are cached while the hub cannot be reached; neither is a ``WeightsUnavailableError``."""
    if _is_folder(source):
        folder = Path(source)
        if not (folder / "config.json").is_file():
            raise WeightsUnavailableError(
                f"model {spec.name!r}: {folder} is not a saved transformers model (no config.json there; "
                "write one with model.save_pretrained(folder))"
            )
        return True
    endpoint = huggingface_hub.constants.ENDPOINT
    offline = bool(huggingface_hub.constants.HF_HUB_OFFLINE) or not _reachable(endpoint)
    if not offline:
        return False
    if _hub_cached(source, with_weights=not spec.is_random):
        return True
    host = urllib.parse.urlparse(endpoint).netloc
    raise WeightsUnavailableError(
        f"cannot get the transformers model {source}: {host} is not reachable (this machine looks offline) "
        f"and its files are not in the local Hugging Face cache. Options: save it where the hub is reachable "
        "(model.save_pretrained(folder) and its image processor's) and name the folder as hf:<folder>; "
        "or, with --local, --random-if-offline for a smoke run with RANDOM weights (meaningless maps; "
        "needs its config.json in the cache)."
    )


def _hub_cached(repo: str, *, with_weights: bool) -> bool:
    """The hub cache holds ``config.json`` (and, ``with_weights``, one weights file) of ``repo``."""

    def cached(filename: str) -> bool:
        return isinstance(huggingface_hub.try_to_load_from_cache(repo, filename), str)

    if not cached("config.json"):
        return False
    return not with_weights or any(cached(name) for name in _HUB_WEIGHT_FILES)


def _load_config(source: str, local_only: bool) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise WeightsUnavailableError(f"cannot read the transformers config of {source}: {exc}") from exc


def _family(spec: ModelSpec, model_type: str, config: Any) -> _Family:
    """The family's layout, or a refusal naming what the architecture lacks."""
    reason = REFUSED_TYPES.get(model_type)
    if reason is not None:
        raise UnsupportedModelError(f"model {spec.name!r} ({model_type}) is not supported: {reason}")
    family = SUPPORTED_TYPES.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"model {spec.name!r} is not supported: transformers model_type {model_type!r} is not one of "
            f"the families with one N × N attention map per block ({', '.join(sorted(SUPPORTED_TYPES))})"
        )
    architectures = tuple(getattr(config, "architectures", None) or ())
    if model_type.startswith("dinov2") and any(name.endswith(_HEAD_SUFFIXES) for name in architectures):
        raise UnsupportedModelError(
            f"model {spec.name!r} ({architectures[0]}) is not supported: DINOv2's classifier reads the class "
            "token and the mean of the patch tokens side by side (concatenated), which is no single "
            "readout row of the attention; explain its headless backbone (Dinov2Model) instead"
        )
    return family


def _build(
    spec: ModelSpec, source: str, config: Any, model_type: str, local_only: bool
) -> tuple[nn.Module, bool]:
    """The model in eager attention (its attention modules then return their weights), and whether it
    has a classification head. Random weights come from the config, seeded by the spec."""
    architectures = tuple(getattr(config, "architectures", None) or ())
    has_head = any(name.endswith(_HEAD_SUFFIXES) for name in architectures)
    if has_head:
        auto: Any = transformers.AutoModelForImageClassification
    elif model_type == "clip":
        auto = transformers.CLIPVisionModel  # the vision tower of a full CLIP checkpoint
        config = config.vision_config
    else:
        auto = transformers.AutoModel
    if spec.is_random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(spec.fingerprint()[:8], 16))
            return auto.from_config(config, attn_implementation="eager"), has_head
    try:
        return auto.from_pretrained(
            source, attn_implementation="eager", local_files_only=local_only
        ), has_head
    except OSError as exc:
        raise WeightsUnavailableError(f"cannot load the transformers model {source}: {exc}") from exc


def _image_processor(source: str, local_only: bool, pipeline: Preprocess) -> Any | None:
    """The model's image processor (PIL backend), ``None`` where it has none and ``paper`` is asked."""
    try:
        return transformers.AutoImageProcessor.from_pretrained(
            source, backend="pil", local_files_only=local_only
        )
    except (OSError, ValueError) as exc:
        if pipeline is Preprocess.PAPER:
            return None
        raise UnsupportedModelError(
            f"{source} has no usable image-processor configuration (preprocessor_config.json: {exc}); save "
            "the model's image processor beside it (processor.save_pretrained(folder)) or use --preprocess paper"
        ) from None


def _preprocessor(spec: ModelSpec, processor: Any | None, config: Any) -> Preprocessor:
    """The ``Preprocessor`` that reproduces ``processor``'s PIL pipeline (``timm`` = the model's own),
    or the paper's recipe at the model's input size."""
    if spec.preprocess is Preprocess.PAPER:
        side = _processor_crop(processor)[0] if processor is not None else _config_side(config)
        return Preprocessor(
            pipeline=Preprocess.PAPER,
            input_size=(side, side),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            resize_size=round(side * _PAPER_RESIZE / _PAPER_CROP),
        )
    assert processor is not None
    label = f"model {spec.name!r}: image processor {type(processor).__name__}"
    if not processor.do_resize:
        raise UnsupportedModelError(f"{label} does not resize, so its inputs have no fixed size")
    if getattr(processor, "do_pad", False):
        raise UnsupportedModelError(f"{label} pads its images, which is not reproduced here")
    size = processor.size
    if size.shortest_edge and not size.longest_edge:
        if not processor.do_center_crop:
            raise UnsupportedModelError(f"{label} keeps the aspect ratio without a crop: no fixed input size")
        crop_mode, resize = "center", int(size.shortest_edge)
    elif size.height and size.width and size.height == size.width:
        crop_mode, resize = "squash", int(size.height)
    else:
        raise UnsupportedModelError(f"{label}: resize to {size} is not a shortest edge or a square")
    input_size = _processor_crop(processor)
    if input_size[0] != input_size[1] or input_size[0] > resize:
        raise UnsupportedModelError(f"{label}: crop {input_size} of a resize to {resize} is not supported")
    if processor.do_rescale and abs(float(processor.rescale_factor) - 1 / 255) > 1e-12:
        raise UnsupportedModelError(f"{label} rescales by {processor.rescale_factor}, not 1/255")
    if not processor.do_rescale:
        raise UnsupportedModelError(f"{label} feeds 0..255 pixel values, which is not reproduced here")
    resample = int(processor.resample if processor.resample is not None else 2)
    if resample not in _RESAMPLE:
        raise UnsupportedModelError(f"{label}: unknown resample filter {processor.resample!r}")
    normalize = bool(processor.do_normalize)
    return Preprocessor(
        pipeline=Preprocess.TIMM,
        input_size=input_size,
        mean=_triple(processor.image_mean) if normalize else (0.0, 0.0, 0.0),
        std=_triple(processor.image_std) if normalize else (1.0, 1.0, 1.0),
        resize_size=resize,
        interpolation=_RESAMPLE[resample],
        crop_mode=crop_mode,
        crop_offsets="transformers",
    )


def _processor_crop(processor: Any) -> tuple[int, int]:
    """The processor's output size: its crop, else its fixed resize."""
    if processor.do_center_crop and processor.crop_size is not None:
        return int(processor.crop_size.height), int(processor.crop_size.width)
    size = processor.size
    if size.height and size.width:
        return int(size.height), int(size.width)
    side = int(size.shortest_edge)
    return side, side


def _config_side(config: Any) -> int:
    size = config.image_size
    return int(size if isinstance(size, int) else size[0])


def _triple(values: Any) -> tuple[float, float, float]:
    numbers = [float(v) for v in (values if isinstance(values, list | tuple) else [values] * 3)]
    red, green, blue = numbers
    return red, green, blue


def _patch_grid(spec: ModelSpec, hf: nn.Module, input_size: tuple[int, int]) -> tuple[PatchGrid, bool]:
    """The patch grid at the preprocessor's input size, and whether the model must be told to
    interpolate its position embeddings for it (DINOv2 always does; the others at another size)."""
    patch = cast(Any, hf.config).patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
    height, width = input_size
    if height % ph or width % pw:
        raise UnsupportedModelError(
            f"model {spec.name!r}: input {height}×{width} is not a multiple of its {ph}×{pw} patches"
        )
    different = input_size != (_config_side(hf.config), _config_side(hf.config))
    accepts = "interpolate_pos_encoding" in inspect.signature(hf.forward).parameters
    return PatchGrid((height, width), (ph, pw), (height // ph, width // pw)), different and accepts


def _labels(spec: ModelSpec, config: Any, num_classes: int) -> tuple[str, ...] | None:
    """The spec's labels, else the config's ``id2label`` unless it is transformers' ``LABEL_i`` default."""
    if spec.labels is not None:
        if len(spec.labels) != num_classes:
            raise InvalidModelSpecError(
                f"model {spec.name!r}: {len(spec.labels)} labels for a head with {num_classes} classes"
            )
        return spec.labels
    if num_classes == 0:
        return None
    id2label = {int(index): str(label) for index, label in (config.id2label or {}).items()}
    names = tuple(id2label.get(index, "") for index in range(num_classes))
    if all(_DEFAULT_LABEL.fullmatch(name) for name in names) or not all(names):
        return None
    return names


def describe(preprocessor: Preprocessor) -> str:
    """The recipe in words, for the job record: ``resize shortest edge 256 bicubic, crop 224×224, …``."""
    resize = (
        f"shortest edge {preprocessor.resize_size}"
        if preprocessor.crop_mode == "center"
        else f"{preprocessor.resize_size}×{preprocessor.resize_size}"
    )
    height, width = preprocessor.input_size
    return (
        f"{_PIPELINE_NAMES[preprocessor.pipeline]}: resize {resize} {preprocessor.interpolation}, "
        f"crop {height}×{width}, "
        f"mean {preprocessor.mean}, std {preprocessor.std}"
    )
