"""Weights: build the timm model a ``ModelSpec`` describes, with the weights it names.

Where they come from (``spec.weights``, see ``ModelSpec``):

- ``"pretrained"``: ``<arch>.safetensors`` / ``<arch>.pth`` in the weights directory wins (with and
  without the ``.tag`` part of the name); otherwise timm's own source (the Hugging Face hub, whose
  local cache is honoured). An ``hf-hub:org/repo`` architecture always comes from the hub.
- ``"random"``: timm's initialization from a seed derived from the spec (the same in every
  process). Only for smoke runs, and ``weights_source`` says so loudly.
- a local path or ``file://`` URL: ``.safetensors``, or ``.pth`` / ``.pt`` / ``.bin`` read with
  ``weights_only=True`` (tensors only, never arbitrary pickled objects).
- ``s3://bucket/key``: downloaded once into the cache directory, then loaded as a file. A prefix
  (ending in ``/``) means the single checkpoint under it.
- ``hf-hub:org/repo``: that hub repository's weights in the spec's architecture.

Checkpoints are loaded strictly: a missing, unexpected or differently shaped tensor is an error that
names them, never a silently half-initialized model. Every failure to obtain weights is a
``WeightsUnavailableError`` (permanent: the job fails with a message that says what to do), except
object storage being down, which stays a transient ``StorageUnavailableError``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import socket
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import huggingface_hub
import huggingface_hub.constants
import safetensors.torch
import timm
import torch
from safetensors import SafetensorError
from timm.models import get_pretrained_cfg, is_model, split_model_name_tag

from common.errors import NotFoundError, UnknownModelError, WeightsUnavailableError
from common.modelspec import PRETRAINED, ModelSpec, is_transformers_model
from common.settings import STORAGE_RETRY_SECONDS

__all__ = ["build_model", "check_arch", "check_pretrained_available"]

_HF_HUB_PREFIX = "hf-hub:"
_DEFAULT_CACHE_DIR = Path("~/.cache/vitscope/weights")

# A reachable hub answers a TCP connect in well under a second; a closed network either refuses at
# once or drops packets, and this bounds the second case. Without the probe, huggingface_hub's
# retries with backoff take about 45 s per model before reporting that it is offline.
_CONNECT_TIMEOUT_SECONDS = 5.0
_HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

_SAFETENSORS_SUFFIX = ".safetensors"
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_PARALLEL_PREFIX = "module."
_LISTED = 5  # how many key names an error message shows
# How torch.load(weights_only=True) names a class it refuses to unpickle.
_FORBIDDEN_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def check_arch(arch: str) -> None:
    """Unknown names fail here with a plain message instead of deep inside timm."""
    if arch.startswith(_HF_HUB_PREFIX):
        return
    name, tag = split_model_name_tag(arch)
    if not is_model(name):
        raise UnknownModelError(
            f"unknown model architecture {arch!r}: timm {timm.__version__} has no {name!r}"
        )
    if tag:
        try:
            get_pretrained_cfg(arch)
        except RuntimeError:
            tags = [full.split(".", 1)[1] for full in timm.list_pretrained(f"{name}.*")]
            raise UnknownModelError(
                f"unknown model {arch!r}: timm has no pretrained tag {tag!r} for {name}; known tags: {tags}"
            ) from None


def build_model(
    spec: ModelSpec,
    *,
    weights_dir: Path | None,
    cache_dir: Path | None,
    storage_retry_seconds: float = STORAGE_RETRY_SECONDS,
) -> tuple[torch.nn.Module, str]:
    """The model with its weights, and where they came from in words. ``storage_retry_seconds``:
    how long a download from object storage rides out an unavailable endpoint."""
    if spec.is_random:
        return _create_random(spec), "RANDOM (untrained weights: for smoke runs only)"
    if spec.weights == PRETRAINED:
        if spec.arch.startswith(_HF_HUB_PREFIX):
            repo = spec.arch.removeprefix(_HF_HUB_PREFIX)
            return _from_hub(spec, repo, pretrained_cfg_overlay=None), f"hf-hub: {repo}"
        local = _find_in_weights_dir(spec.arch, weights_dir)
        if local is not None:
            return _from_file(spec, local), f"file: {local} (weights dir)"
        return _from_timm_pretrained(spec)
    if spec.weights.startswith(_HF_HUB_PREFIX):
        repo = spec.weights.removeprefix(_HF_HUB_PREFIX)
        return _from_hub(spec, repo, pretrained_cfg_overlay={"hf_hub_id": repo}), f"hf-hub: {repo}"
    if spec.weights.startswith("s3://"):
        object_uri, path = _fetch_from_storage(
            spec.weights, cache_dir or weights_dir or _DEFAULT_CACHE_DIR, storage_retry_seconds
        )
        return _from_file(spec, path), f"{object_uri} (cached at {path})"
    path = _local_path(spec.weights)
    return _from_file(spec, path), f"file: {path}"


def check_pretrained_available(spec: ModelSpec, *, weights_dir: Path | None) -> None:
    """Raise ``WeightsUnavailableError`` now if ``build_model`` could not get timm's pretrained weights
    for ``spec`` (not in ``weights_dir``, not cached, download host unreachable), without building it.

    Seconds per model at most, so a local run can name every model it cannot load before it spends a
    minute loading the others. Other weight sources (files, s3://, hub ids, ``hf:`` transformers
    models, whose loader gives its own offline error) are checked when loaded.
    """
    if spec.weights != PRETRAINED or spec.arch.startswith(_HF_HUB_PREFIX) or is_transformers_model(spec.arch):
        return
    if _find_in_weights_dir(spec.arch, weights_dir) is not None:
        return
    _check_timm_pretrained(spec)


def _create(spec: ModelSpec, *, pretrained: bool, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model`` with the spec's head size, input size and ``model_args`` when it sets them."""
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if spec.img_size is not None:
        kwargs["img_size"] = spec.img_size
    kwargs = {**dict(spec.extra.get("model_args") or {}), **kwargs}
    return timm.create_model(spec.arch, pretrained=pretrained, **kwargs)


def _create_random(spec: ModelSpec) -> torch.nn.Module:
    """Random weights drawn from a seed derived from the spec, without touching the global RNG.

    Every worker then builds the *same* random model for the same spec, so a smoke-run batch spread
    over many processes is one consistent model, and reusing its artifacts by configuration is sound.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(spec.fingerprint()[:8], 16))
        return _create(spec, pretrained=False)


# --- weights from timm's own sources -------------------------------------------------------------


def _from_timm_pretrained(spec: ModelSpec) -> tuple[torch.nn.Module, str]:
    """timm's pretrained weights for ``spec.arch`` (hub, or timm's download URL for old configs).

    timm quietly keeps the random initialization when an architecture has no pretrained weights;
    that would produce confident-looking nonsense, so it is an error here.
    """
    cfg = _check_timm_pretrained(spec)
    name = spec.arch if "." in spec.arch else f"{spec.arch}.{cfg.tag}"
    model = _create_downloading(spec)
    source = f"timm hub: {name}"
    if spec.num_classes is not None and spec.num_classes != cfg.num_classes:
        source += f" (classifier head RANDOM: num_classes {spec.num_classes} != pretrained {cfg.num_classes})"
    return model, source


def _check_timm_pretrained(spec: ModelSpec) -> Any:
    """timm's pretrained config for ``spec.arch``, once its weights are known to be cached or reachable."""
    cfg = get_pretrained_cfg(spec.arch)
    if cfg is not None and cfg.hf_hub_id:
        filenames = _hub_filenames(cfg.hf_hub_filename)
        _require_reachable_or_cached(
            spec.arch, huggingface_hub.constants.ENDPOINT, _hub_cached(cfg.hf_hub_id, filenames)
        )
    elif cfg is not None and cfg.url:
        url = cast(str, cfg.url)  # timm also allows (url, filename); none of its configs uses that
        _require_reachable_or_cached(spec.arch, url, _torch_hub_cached(url))
    else:
        raise WeightsUnavailableError(
            f"timm has no pretrained weights for {spec.arch}. {_options(spec.arch)}"
        )
    return cfg


def _from_hub(
    spec: ModelSpec, repo: str, *, pretrained_cfg_overlay: dict[str, str] | None
) -> torch.nn.Module:
    """Weights (and, for an ``hf-hub:`` architecture, its config) from a Hugging Face repository."""
    filenames = ("config.json", *_HUB_WEIGHT_FILES) if pretrained_cfg_overlay is None else _HUB_WEIGHT_FILES
    _require_reachable_or_cached(spec.arch, huggingface_hub.constants.ENDPOINT, _hub_cached(repo, filenames))
    overlay = {} if pretrained_cfg_overlay is None else {"pretrained_cfg_overlay": pretrained_cfg_overlay}
    return _create_downloading(spec, **overlay)


def _create_downloading(spec: ModelSpec, **kwargs: Any) -> torch.nn.Module:
    """``_create`` with pretrained weights; network and hub failures become ``WeightsUnavailableError``."""
    try:
        return _create(spec, pretrained=True, **kwargs)
    except OSError as exc:  # huggingface_hub's HTTP and cache errors, urllib's URLError, disk errors
        raise WeightsUnavailableError(
            f"could not download pretrained weights for {spec.arch}: {exc}. {_options(spec.arch)}"
        ) from exc


def _hub_filenames(override: str | None) -> tuple[str, ...]:
    """The files timm may fetch from a hub repo: an override (and its safetensors twin) or the defaults."""
    if not override:
        return _HUB_WEIGHT_FILES
    if override.endswith(".bin"):
        return (override.removesuffix(".bin") + _SAFETENSORS_SUFFIX, override)
    return (override,)


def _hub_cached(repo: str, filenames: Iterable[str]) -> bool:
    """True when the hub cache already holds what timm needs: every ``config.json`` asked for and one
    weights file. ``repo`` may carry a revision as ``org/name@rev``."""
    repo_id, _, revision = repo.partition("@")

    def cached(filename: str) -> bool:
        found = huggingface_hub.try_to_load_from_cache(repo_id, filename, revision=revision or None)
        return isinstance(found, str)

    names = list(filenames)
    configs = [name for name in names if name == "config.json"]
    weights = [name for name in names if name != "config.json"]
    return all(cached(name) for name in configs) and any(cached(name) for name in weights)


def _torch_hub_cached(url: str) -> bool:
    """timm's URL downloads go through ``torch.hub``, which keeps them under its checkpoints folder."""
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    return (Path(torch.hub.get_dir()) / "checkpoints" / filename).is_file()


def _require_reachable_or_cached(arch: str, url: str, cached: bool) -> None:
    """Fail in seconds when nothing is cached and the download host cannot be reached at all."""
    if cached:
        return
    offline_mode = bool(huggingface_hub.constants.HF_HUB_OFFLINE) and url.startswith(
        huggingface_hub.constants.ENDPOINT
    )
    if offline_mode or not _reachable(url):
        host = urllib.parse.urlparse(url).netloc
        raise WeightsUnavailableError(
            f"cannot get pretrained weights for {arch}: {host} is not reachable (this machine looks "
            f"offline) and they are not in the local cache. {_options(arch)}"
        )


def _reachable(url: str) -> bool:
    """Whether a TCP connection to ``url``'s host (or the proxy configured for it) opens in time."""
    parsed = urllib.parse.urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname, proxy_url.port or 80
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_SECONDS):
            return True
    except OSError:
        return False


def _options(arch: str) -> str:
    """What the user can do instead, for messages about weights that could not be fetched."""
    local = f"put {arch.split('.', 1)[0]}.safetensors (or .pth) in VITSCOPE_WEIGHTS_DIR; "
    return (
        f"Options: {'' if arch.startswith(_HF_HUB_PREFIX) else local}point the model's weights at a file "
        'or s3:// object in the models file; or use weights = "random" for a smoke run (meaningless maps).'
    )


# --- weights from files and object storage -------------------------------------------------------


def _find_in_weights_dir(arch: str, weights_dir: Path | None) -> Path | None:
    """``<arch>.safetensors`` / ``<arch>.pth``, then the same without the ``.tag`` part of the name."""
    if weights_dir is None:
        return None
    stems = dict.fromkeys((arch, arch.split(".", 1)[0]))
    for stem in stems:
        for suffix in (_SAFETENSORS_SUFFIX, ".pth"):
            candidate = Path(weights_dir) / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _local_path(weights: str) -> Path:
    """A plain path or ``file://`` URL as a path (``file:///x/y`` -> ``/x/y``)."""
    if weights.startswith("file://"):
        from common.storage.uri import file_uri_path

        try:
            return file_uri_path(weights)
        except ValueError as exc:
            raise WeightsUnavailableError(f"weights {weights!r}: {exc}") from None
    if "://" in weights:
        raise WeightsUnavailableError(
            f"weights {weights!r}: unsupported location (use a path, file://, s3:// or hf-hub:)"
        )
    return Path(weights).expanduser()


def _fetch_from_storage(uri: str, cache_dir: Path, retry_seconds: float) -> tuple[str, Path]:
    """Download an object (or the one checkpoint under a prefix) into ``cache_dir`` unless already there.

    Cached files are keyed by the object's URI, so each worker downloads a checkpoint once; they are
    written to a temporary file and renamed, so a crash or a concurrent worker never leaves a half
    file under the final name. Delete the cached file to pick up a changed object.
    """
    from common.storage import read_uri

    object_uri = _pick_checkpoint(uri, retry_seconds) if uri.endswith("/") else uri
    digest = hashlib.sha256(object_uri.encode()).hexdigest()[:16]
    target = Path(cache_dir).expanduser() / f"{digest}-{object_uri.rsplit('/', 1)[-1]}"
    if target.is_file():
        return object_uri, target
    try:
        data = read_uri(object_uri, retry_seconds=retry_seconds)
    except NotFoundError:
        raise WeightsUnavailableError(f"weights object {object_uri} does not exist") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(target, data)
    return object_uri, target


def _pick_checkpoint(prefix: str, retry_seconds: float) -> str:
    """The checkpoint under a prefix: ``model.safetensors``, else ``pytorch_model.bin``, else the only
    ``.safetensors`` / ``.pth`` object (the layouts of the hub and of ``torch.save`` users)."""
    from common.storage import list_uri

    objects = list_uri(prefix, retry_seconds=retry_seconds)
    relative = {uri.removeprefix(prefix): uri for uri in objects}
    for preferred in _HUB_WEIGHT_FILES:
        if preferred in relative:
            return relative[preferred]
    candidates = [uri for uri in objects if uri.endswith((_SAFETENSORS_SUFFIX, ".pth"))]
    if len(candidates) == 1:
        return candidates[0]
    found = f"found {_first_few(candidates)}" if candidates else "found none"
    raise WeightsUnavailableError(
        f"weights prefix {prefix}: expected model.safetensors, pytorch_model.bin or exactly one "
        f".safetensors/.pth object; {found}"
    )


def _write_atomically(target: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _from_file(spec: ModelSpec, path: Path) -> torch.nn.Module:
    state = _read_state_dict(path)  # first: a bad file fails before a model is built
    model = _create(spec, pretrained=False)
    _load_strict(model, state, spec=spec, source=str(path))
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file as ``{name: tensor}``.

    Accepts a raw state dict or one wrapped under ``state_dict`` / ``model`` / ``model_state_dict``
    (training scripts' habits), and strips the ``module.`` prefix that ``DataParallel`` adds.
    """
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == _SAFETENSORS_SUFFIX:
            raw: Any = safetensors.torch.load_file(str(path), device="cpu")
        elif suffix in _TORCH_SUFFIXES:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise WeightsUnavailableError(
                f"weights file {path}: unsupported type {suffix!r} (use .safetensors, .pth, .pt or .bin)"
            )
    except pickle.UnpicklingError as exc:
        forbidden = _FORBIDDEN_GLOBAL.search(str(exc))
        if forbidden is None:
            raise WeightsUnavailableError(
                f"weights file {path} cannot be read: not a PyTorch checkpoint"
            ) from None
        raise WeightsUnavailableError(
            f"weights file {path} holds pickled Python objects besides tensors ({forbidden.group(1)}); "
            "refusing to unpickle it (only weights_only loading is allowed). Save just the state dict, "
            "or convert it to .safetensors."
        ) from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise WeightsUnavailableError(f"weights file {path} cannot be read: {exc}") from exc

    if isinstance(raw, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping):
        raise WeightsUnavailableError(f"weights file {path} is not a state dict (got {type(raw).__name__})")
    not_tensors = [str(key) for key, value in raw.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise WeightsUnavailableError(
            f"weights file {path} is not a state dict: non-tensor entries {_first_few(not_tensors)}"
        )
    return {str(key).removeprefix(_PARALLEL_PREFIX): value for key, value in raw.items()}


def _load_strict(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, spec: ModelSpec, source: str
) -> None:
    """Load every tensor or none: a mismatch names the missing, unexpected and misshapen keys."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshapen = [
        f"{key} {tuple(state[key].shape)} vs model {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]
    problems = [
        f"{label}: {_first_few(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
        if keys
    ]
    if problems:
        raise WeightsUnavailableError(
            f"checkpoint {source} does not fit {spec.arch} (num_classes={spec.num_classes}, "
            f"img_size={spec.img_size}): {'; '.join(problems)}. Does the models file's arch, "
            "num_classes and img_size match the checkpoint?"
        )
    model.load_state_dict(state, strict=True)


def _first_few(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return f"{shown}, … ({len(items)} in all)" if len(items) > _LISTED else shown
