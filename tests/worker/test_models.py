"""Specification of ``worker.models``: every weights source, strict loading, labels, targets, the cache.

Models are deit_tiny (5.7 M parameters), or timm's test_vit where only the plumbing matters, with
checkpoints the tests write themselves. The hub tests point the hub at a closed local port (and an
empty hub cache), so they behave the same on a machine that is online.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import boto3
import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from common.errors import (
    InvalidModelSpecError,
    UnknownModelError,
    UnsupportedModelError,
    WeightsUnavailableError,
)
from common.methods import Preprocess
from common.modelspec import ModelSpec
from worker.attention import Readout
from worker.models import LoadedModel, ModelCache, load_model
from worker.preprocess import IMAGENET_MEAN

ARCH = "deit_tiny_patch16_224"
LABELS = ("cat", "dog", "bird")
CPU = torch.device("cpu")

StateDict = dict[str, torch.Tensor]


def tiny_state(num_classes: int | None = 3, seed: int = 0) -> StateDict:
    torch.manual_seed(seed)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return {k: v.clone() for k, v in timm.create_model(ARCH, **kwargs).state_dict().items()}


def custom_spec(weights: str, **overrides: object) -> ModelSpec:
    fields: dict[str, object] = {
        "name": "tiny3",
        "arch": ARCH,
        "weights": weights,
        "num_classes": 3,
        "labels": LABELS,
    }
    fields.update(overrides)
    return ModelSpec(**fields)  # type: ignore[arg-type]


def assert_weights_equal(model: torch.nn.Module, expected: Mapping[str, torch.Tensor]) -> None:
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


@pytest.fixture(scope="module")
def state() -> StateDict:
    """A 3-class deit_tiny state dict, the custom checkpoint most tests load."""
    return tiny_state()


@pytest.fixture(scope="module")
def imagenet_state() -> StateDict:
    """A deit_tiny state dict with timm's own 1000-class head, standing in for downloaded weights."""
    return tiny_state(num_classes=None, seed=1)


# --- random weights ---------------------------------------------------------------------------------


def test_random_weights_load_and_say_so_loudly() -> None:
    loaded = load_model(ModelSpec(name="smoke", arch=ARCH, weights="random"), device=CPU)
    assert isinstance(loaded, LoadedModel)
    assert "RANDOM" in loaded.weights_source
    assert not loaded.model.training
    assert loaded.device == CPU
    assert all(p.device == CPU and p.requires_grad for p in loaded.model.parameters())
    assert loaded.preprocessor.mean == IMAGENET_MEAN  # deit's own timm config
    assert loaded.labels is not None
    assert len(loaded.labels) == 1000
    assert loaded.labels[281] == "tabby, tabby cat"


@pytest.mark.parametrize(
    ("pipeline", "mean"), [(Preprocess.TIMM, (0.5, 0.5, 0.5)), (Preprocess.PAPER, IMAGENET_MEAN)]
)
def test_preprocessor_follows_the_specs_pipeline(pipeline: Preprocess, mean: tuple[float, ...]) -> None:
    spec = ModelSpec(name="t", arch="test_vit", weights="random", preprocess=pipeline)  # timm config: 0.5
    assert load_model(spec, device=CPU).preprocessor.mean == pytest.approx(mean)


def test_img_size_builds_the_model_and_its_input_at_that_size() -> None:
    loaded = load_model(ModelSpec(name="big", arch=ARCH, weights="random", img_size=384), device=CPU)
    assert loaded.model.patch_embed.grid_size == (24, 24)
    assert loaded.preprocessor.input_size == (384, 384)
    logits = loaded.model(loaded.preprocessor(Image.new("RGB", (500, 400)))[None])
    assert logits.shape == (1, 1000)


def test_custom_head_without_labels_has_no_labels() -> None:
    loaded = load_model(ModelSpec(name="x", arch=ARCH, weights="random", num_classes=3), device=CPU)
    assert loaded.model.num_classes == 3
    assert loaded.labels is None


def test_labels_must_fit_the_head() -> None:
    spec = ModelSpec(name="x", arch=ARCH, weights="random", labels=("a", "b"))  # head has 1000 classes
    with pytest.raises(InvalidModelSpecError, match="2 labels"):
        load_model(spec, device=CPU)


@pytest.mark.parametrize(
    ("arch", "message"),
    [("vit_nonexistent_patch16", "vit_nonexistent_patch16"), (f"{ARCH}.no_such_tag", "no_such_tag")],
)
def test_unknown_architectures_and_tags_are_named(arch: str, message: str) -> None:
    with pytest.raises(UnknownModelError, match=message):
        load_model(ModelSpec(name="x", arch=arch, weights="random"), device=CPU)


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("test_vit3", "pools with attention"),  # SigLIP-style `map` head
        ("test_efficientnet", "block 0 has no `attn` self-attention module"),  # a CNN
    ],
)
def test_models_the_core_cannot_explain_fail_at_load_naming_what_is_missing(arch: str, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=f"model 'mine' is not supported: .*{message}"):
        load_model(ModelSpec(name="mine", arch=arch, weights="random"), device=CPU)


@pytest.mark.parametrize(
    ("arch", "readout", "has_class_token", "has_head"),
    [
        (ARCH, Readout.TOKEN, True, True),
        ("test_vit2", Readout.AVG, False, True),  # registers, no class token, average pooling
        ("eva02_tiny_patch14_224", Readout.AVG, True, False),  # a backbone without a head (MIM weights)
    ],
)
def test_the_loaded_layout_is_read_from_the_model(
    arch: str, readout: Readout, has_class_token: bool, has_head: bool
) -> None:
    loaded = load_model(ModelSpec(name="x", arch=arch, weights="random"), device=CPU)
    assert (loaded.layout.readout, loaded.layout.has_class_token, loaded.layout.has_head) == (
        readout,
        has_class_token,
        has_head,
    )


def test_a_models_file_head_makes_a_backbone_a_classifier() -> None:
    spec = ModelSpec(name="x", arch="eva02_tiny_patch14_224", weights="random", num_classes=3)
    assert load_model(spec, device=CPU).layout.has_head


# --- checkpoint files -------------------------------------------------------------------------------

# (file name, how the state dict is written)
FORMATS: list[tuple[str, Callable[[StateDict, Path], None]]] = [
    ("w.safetensors", lambda sd, path: safetensors.torch.save_file(sd, str(path))),
    ("w.pth", lambda sd, path: torch.save(sd, path)),
    ("w.pt", lambda sd, path: torch.save({"state_dict": sd}, path)),
    ("w.bin", lambda sd, path: torch.save({"model": sd, "epoch": 90, "lr": 0.001}, path)),
    ("w2.pth", lambda sd, path: torch.save({"model_state_dict": sd}, path)),
    ("w3.pth", lambda sd, path: torch.save({f"module.{k}": v for k, v in sd.items()}, path)),
]


@pytest.mark.parametrize(
    ("filename", "write"),
    FORMATS,
    ids=[
        "safetensors",
        "pth",
        "state_dict-wrapper",
        "model-wrapper",
        "model_state_dict-wrapper",
        "DataParallel",
    ],
)
def test_checkpoint_files_load_exactly(
    filename: str, write: Callable[[StateDict, Path], None], state: StateDict, tmp_path: Path
) -> None:
    path = tmp_path / filename
    write(state, path)
    loaded = load_model(custom_spec(str(path)), device=CPU)
    assert_weights_equal(loaded.model, state)
    assert loaded.labels == LABELS
    assert loaded.weights_source == f"file: {path}"
    assert not loaded.model.training


def test_a_file_url_is_a_path(state: StateDict, tmp_path: Path) -> None:
    path = tmp_path / "dir with space" / "w.safetensors"
    path.parent.mkdir()
    safetensors.torch.save_file(state, str(path))
    loaded = load_model(custom_spec(path.as_uri()), device=CPU)
    assert_weights_equal(loaded.model, state)


def test_pickled_objects_in_a_checkpoint_are_refused(state: StateDict, tmp_path: Path) -> None:
    path = tmp_path / "with-args.pth"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(WeightsUnavailableError, match=r"argparse\.Namespace.*refusing to unpickle"):
        load_model(custom_spec(str(path)), device=CPU)


def _drop_head_bias(sd: StateDict) -> StateDict:
    return {k: v for k, v in sd.items() if k != "head.bias"}


@pytest.mark.parametrize(
    ("mutate", "spec_overrides", "fragments"),
    [
        (_drop_head_bias, {}, ["missing: head.bias"]),
        (lambda sd: {**sd, "extra.weight": torch.zeros(2)}, {}, ["unexpected: extra.weight"]),
        (
            lambda sd: sd,
            {"num_classes": 5, "labels": None},
            ["wrong shape", "head.weight (3, 192) vs model (5, 192)"],
        ),
        (lambda sd: sd, {"img_size": 384}, ["pos_embed (1, 197, 192) vs model (1, 577, 192)"]),
    ],
    ids=["missing", "unexpected", "num_classes", "img_size"],
)
def test_mismatched_checkpoints_name_the_keys(
    mutate: Callable[[StateDict], StateDict],
    spec_overrides: dict[str, object],
    fragments: list[str],
    state: StateDict,
    tmp_path: Path,
) -> None:
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(mutate(dict(state)), str(path))
    with pytest.raises(WeightsUnavailableError) as caught:
        load_model(custom_spec(str(path), **spec_overrides), device=CPU)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("absent.safetensors", None, "does not exist"),
        ("w.safetensors", b"not a safetensors file", "cannot be read"),
        ("w.pth", b"garbage", "cannot be read: not a PyTorch checkpoint"),
        ("w.pth", "list", "not a state dict"),
        ("w.npz", b"PK", "unsupported type"),
    ],
)
def test_unusable_weight_files_are_weights_errors(
    filename: str, content: bytes | str | None, message: str, tmp_path: Path
) -> None:
    path = tmp_path / filename
    if content == "list":
        torch.save([torch.zeros(1)], path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(WeightsUnavailableError, match=message):
        load_model(custom_spec(str(path)), device=CPU)


def test_unsupported_weight_locations_are_refused() -> None:
    with pytest.raises(WeightsUnavailableError, match="unsupported location"):
        load_model(custom_spec("https://example.com/w.safetensors"), device=CPU)


# --- object storage ---------------------------------------------------------------------------------


def _upload(bucket: str, key: str, data: bytes) -> None:
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)


def _safetensors_bytes(sd: StateDict, tmp_path: Path) -> bytes:
    path = tmp_path / "upload.safetensors"
    safetensors.torch.save_file(sd, str(path))
    return path.read_bytes()


def test_s3_object_is_downloaded_once_into_the_cache(
    state: StateDict, s3_bucket: str, tmp_path: Path
) -> None:
    _upload(s3_bucket, "models/tiny3.safetensors", _safetensors_bytes(state, tmp_path))
    uri = f"s3://{s3_bucket}/models/tiny3.safetensors"
    cache = tmp_path / "cache"

    first = load_model(custom_spec(uri), device=CPU, cache_dir=cache)
    assert_weights_equal(first.model, state)
    assert first.labels == LABELS
    assert first.weights_source.startswith(uri)
    cached = list(cache.iterdir())
    assert len(cached) == 1
    assert cached[0].name.endswith("-tiny3.safetensors")

    boto3.client("s3").delete_object(Bucket=s3_bucket, Key="models/tiny3.safetensors")
    again = load_model(custom_spec(uri), device=CPU, cache_dir=cache)
    assert_weights_equal(again.model, state)


def test_s3_cache_defaults_to_the_weights_dir(state: StateDict, s3_bucket: str, tmp_path: Path) -> None:
    _upload(s3_bucket, "w.pth.safetensors", _safetensors_bytes(state, tmp_path))
    weights_dir = tmp_path / "weights"
    load_model(custom_spec(f"s3://{s3_bucket}/w.pth.safetensors"), device=CPU, weights_dir=weights_dir)
    assert [p.name.endswith("-w.pth.safetensors") for p in weights_dir.iterdir()] == [True]


@pytest.mark.parametrize(
    ("objects", "chosen"),
    [
        (["model.safetensors", "other.pth", "README.md"], "model.safetensors"),
        (["pytorch_model.bin", "x.safetensors"], "pytorch_model.bin"),
        (["checkpoints/last.pth", "notes.txt"], "checkpoints/last.pth"),
    ],
)
def test_s3_prefix_picks_the_checkpoint(
    objects: list[str], chosen: str, state: StateDict, s3_bucket: str, tmp_path: Path
) -> None:
    good = _safetensors_bytes(state, tmp_path) if chosen.endswith(".safetensors") else None
    if good is None:
        path = tmp_path / "good.pth"
        torch.save(state, path)
        good = path.read_bytes()
    for name in objects:
        _upload(s3_bucket, f"run7/{name}", good if name == chosen else b"not weights")
    loaded = load_model(custom_spec(f"s3://{s3_bucket}/run7/"), device=CPU, cache_dir=tmp_path / "cache")
    assert_weights_equal(loaded.model, state)
    assert loaded.weights_source.startswith(f"s3://{s3_bucket}/run7/{chosen}")


@pytest.mark.parametrize(
    ("objects", "message"),
    [([], "found none"), (["a.safetensors", "b.safetensors"], "found s3://")],
)
def test_s3_prefix_without_one_checkpoint_is_refused(
    objects: list[str], message: str, s3_bucket: str, tmp_path: Path
) -> None:
    for name in objects:
        _upload(s3_bucket, f"run8/{name}", b"x")
    with pytest.raises(WeightsUnavailableError, match=message):
        load_model(custom_spec(f"s3://{s3_bucket}/run8/"), device=CPU, cache_dir=tmp_path)


def test_missing_s3_object_is_a_weights_error(s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_model(custom_spec(f"s3://{s3_bucket}/nope.safetensors"), device=CPU, cache_dir=tmp_path)


# --- "pretrained": the weights directory and the hub ------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "filename"),
    [
        (ARCH, f"{ARCH}.safetensors"),
        (ARCH, f"{ARCH}.pth"),
        (f"{ARCH}.fb_in1k", f"{ARCH}.fb_in1k.safetensors"),
        (f"{ARCH}.fb_in1k", f"{ARCH}.safetensors"),  # the tag-less name is found too
    ],
)
def test_pretrained_comes_from_the_weights_dir_first(
    arch: str, filename: str, imagenet_state: StateDict, tmp_path: Path, unreachable_hub: Path
) -> None:
    path = tmp_path / filename
    if filename.endswith(".pth"):
        torch.save(imagenet_state, path)
    else:
        safetensors.torch.save_file(imagenet_state, str(path))
    loaded = load_model(ModelSpec(name="t", arch=arch), device=CPU, weights_dir=tmp_path)
    assert_weights_equal(loaded.model, imagenet_state)
    assert loaded.weights_source == f"file: {path} (weights dir)"
    assert loaded.labels is not None
    assert loaded.labels[281] == "tabby, tabby cat"


def test_weights_dir_prefers_the_tagged_file(
    imagenet_state: StateDict, tmp_path: Path, unreachable_hub: Path
) -> None:
    safetensors.torch.save_file(imagenet_state, str(tmp_path / f"{ARCH}.fb_in1k.safetensors"))
    (tmp_path / f"{ARCH}.safetensors").write_bytes(b"would fail to load")
    loaded = load_model(ModelSpec(name="t", arch=f"{ARCH}.fb_in1k"), device=CPU, weights_dir=tmp_path)
    assert_weights_equal(loaded.model, imagenet_state)


@pytest.mark.parametrize("condition", ["closed-port", "HF_HUB_OFFLINE"])
def test_offline_pretrained_fails_fast_with_the_options(
    condition: str, unreachable_hub: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if condition == "HF_HUB_OFFLINE":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as caught:
        load_model(ModelSpec(name="t", arch=ARCH), device=CPU, weights_dir=tmp_path)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    for fragment in ("offline", f"{ARCH}.safetensors", "VITSCOPE_WEIGHTS_DIR", "s3://", '"random"'):
        assert fragment in message


def test_offline_hf_hub_architecture_fails_fast(unreachable_hub: Path) -> None:
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="offline"):
        load_model(ModelSpec(name="t", arch=f"hf-hub:timm/{ARCH}.fb_in1k"), device=CPU)
    assert time.monotonic() - started < 10


def test_offline_hub_uses_the_local_hub_cache(
    imagenet_state: StateDict, unreachable_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model downloaded once keeps working without network (the hub cache layout, written by hand)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = unreachable_hub / f"models--timm--{ARCH}.fb_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    safetensors.torch.save_file(imagenet_state, str(repo / "snapshots" / commit / "model.safetensors"))

    loaded = load_model(ModelSpec(name="t", arch=ARCH), device=CPU)
    assert_weights_equal(loaded.model, imagenet_state)
    assert loaded.weights_source == f"timm hub: {ARCH}.fb_in1k"


def test_architecture_without_pretrained_weights_is_an_error_not_random() -> None:
    with pytest.raises(WeightsUnavailableError, match="no pretrained weights for test_vit4"):
        load_model(ModelSpec(name="t", arch="test_vit4"), device=CPU)


# --- ModelCache -------------------------------------------------------------------------------------


def random_spec(num_classes: int, name: str | None = None) -> ModelSpec:
    """timm's own test ViT (0.4 M parameters): the cache does not care what it holds."""
    return ModelSpec(
        name=name or f"t{num_classes}", arch="test_vit", weights="random", num_classes=num_classes
    )


def test_model_cache_keeps_the_most_recently_used() -> None:
    cache = ModelCache(device=CPU, max_models=2)
    a, b, c = random_spec(3), random_spec(4), random_spec(5)

    first_a = cache.get(a)
    assert cache.get(a) is first_a  # hit
    first_b = cache.get(b)
    assert len(cache) == 2
    assert cache.get(a) is first_a  # a is now the most recently used
    cache.get(c)  # evicts b, the least recently used
    assert a in cache
    assert c in cache
    assert b not in cache
    assert len(cache) == 2
    second_b = cache.get(b)  # evicts a
    assert second_b is not first_b
    assert a not in cache
    assert cache.get(a) is not first_a


def test_model_cache_shares_a_model_between_names_of_the_same_spec() -> None:
    cache = ModelCache(device=CPU, max_models=1)
    original = cache.get(random_spec(3, name="first"))
    renamed = cache.get(random_spec(3, name="second"))
    assert renamed.model is original.model
    assert renamed.spec.name == "second"
    assert len(cache) == 1


def test_model_cache_needs_room_for_one_model() -> None:
    with pytest.raises(ValueError, match="max_models"):
        ModelCache(device=CPU, max_models=0)


def test_random_weights_are_the_same_in_every_process_and_leave_the_global_rng_alone() -> None:
    spec = ModelSpec(name="r", arch="deit_tiny_patch16_224", weights="random")
    other = ModelSpec(name="r", arch="deit_tiny_patch16_224", weights="random", num_classes=10)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = load_model(spec, device=torch.device("cpu")).model.state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    second = load_model(spec, device=torch.device("cpu")).model.state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
    third = load_model(other, device=torch.device("cpu")).model.state_dict()
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], third["blocks.0.attn.qkv.weight"])
