"""Hugging Face ``transformers`` models (``hf:<folder>``), end to end through ``producer submit --local``.

Each family is a tiny random configuration built with ``from_config`` (attention sharpened, layer
scale at 1 and the head at unit gain, as ``tests/worker/attention/test_families.py`` does for timm),
saved with ``save_pretrained`` beside its image processor, and submitted by path. The stored maps
must correlate ≥ 0.999 with an independent reference: the model loaded by transformers itself, the
image through its own image processor, ``output_attentions=True``, the gradients of those attention
tensors by ``torch.autograd.grad``, and the formulas of ``tests/worker/attention/reference.py`` with
the family's own pooling (written down here, not read from vitscope).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub
import huggingface_hub.constants
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from common.errors import WeightsUnavailableError
from common.methods import MethodSettings
from common.modelspec import ModelSpec, resolve_model
from common.settings import get_settings
from producer.cli import app
from tests.worker.attention.conftest import ATTENTION_SHARPENING
from tests.worker.attention.reference import (
    ref_attention_rollout,
    ref_cls_attention,
    ref_gradient_rollout,
    ref_layer_scores,
    ref_relevance,
)
from worker.attention import explain
from worker.models import load_model
from worker.preprocess import decode_image

MIN_CORRELATION = 0.999
CPU = torch.device("cpu")
LABELS = {0: "cat", 1: "dog", 2: "bird", 3: "fish"}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
IMAGE_SIZES = [(61, 47), (40, 58), (50, 50)]
# Targets of the three images for models with a head: top-1, a class by name (id2label), an index.
TARGETS = ["", "dog", "2"]
TARGET_INDICES = [None, 1, 2]


@dataclass(frozen=True)
class Family:
    """A tiny transformers model, its image processor, and what its structure must be read as."""

    name: str
    model_class: str
    config: Any
    processor: Any
    prefix: int  # class token (+ distillation token or registers)
    readout: str  # "token" or "avg": the model's own pooling
    has_head: bool
    extra: dict[str, Any] = field(default_factory=dict)


def _families() -> list[Family]:
    t = transformers
    head = {"num_labels": 4, "id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}
    squash_32 = {"size": {"height": 32, "width": 32}, "do_center_crop": False}
    return [
        Family(
            "vit",
            "ViTForImageClassification",
            t.ViTConfig(**TINY, image_size=32, patch_size=8, **head),
            t.ViTImageProcessor(**squash_32, resample=2),
            prefix=1,
            readout="token",
            has_head=True,
        ),
        Family(
            "deit-distilled",
            "DeiTForImageClassification",
            t.DeiTConfig(**TINY, image_size=32, patch_size=8, **head),
            t.DeiTImageProcessor(
                size={"height": 39, "width": 39}, crop_size={"height": 32, "width": 32}, do_center_crop=True
            ),
            prefix=2,
            readout="token",
            has_head=True,
        ),
        Family(
            "deit-with-teacher",
            "DeiTForImageClassificationWithTeacher",
            t.DeiTConfig(**TINY, image_size=32, patch_size=8, **head),
            t.DeiTImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False),
            prefix=2,
            readout="token",  # its logits average the class and distillation heads; as timm's, row 0
            has_head=True,
        ),
        Family(
            "beit",
            "BeitForImageClassification",
            t.BeitConfig(
                **TINY,
                image_size=32,
                patch_size=8,
                use_relative_position_bias=True,
                use_mean_pooling=True,
                layer_scale_init_value=1.0,
                **head,
            ),
            t.BeitImageProcessor(
                size={"height": 37, "width": 37}, crop_size={"height": 32, "width": 32}, do_center_crop=True
            ),
            prefix=1,
            readout="avg",
            has_head=True,
        ),
        Family(
            "data2vec-vision",
            "Data2VecVisionForImageClassification",
            t.Data2VecVisionConfig(
                **TINY,
                image_size=32,
                patch_size=8,
                use_relative_position_bias=True,
                use_mean_pooling=True,
                layer_scale_init_value=1.0,
                **head,
            ),
            t.BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False),
            prefix=1,
            readout="avg",
            has_head=True,
        ),
        Family(
            "vit-headless",
            "ViTModel",
            t.ViTConfig(**TINY, image_size=32, patch_size=8),
            t.ViTImageProcessor(**squash_32),
            prefix=1,
            readout="token",  # ViTPooler: the class token
            has_head=False,
        ),
        Family(
            "dinov2-headless",
            "Dinov2Model",
            t.Dinov2Config(**TINY, image_size=56, patch_size=4, layerscale_value=1.0),
            t.BitImageProcessor(
                size={"shortest_edge": 33},
                crop_size={"height": 28, "width": 28},
                do_center_crop=True,
                image_mean=[0.485, 0.456, 0.406],
                image_std=[0.229, 0.224, 0.225],
            ),
            prefix=1,
            readout="token",
            has_head=False,
        ),
        Family(
            "dinov2-registers-headless",
            "Dinov2WithRegistersModel",
            t.Dinov2WithRegistersConfig(
                **TINY, image_size=56, patch_size=4, layerscale_value=1.0, num_register_tokens=4
            ),
            t.BitImageProcessor(
                size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_center_crop=True
            ),
            prefix=5,
            readout="token",
            has_head=False,
        ),
        Family(
            "clip-vision-headless",
            "CLIPVisionModel",
            t.CLIPVisionConfig(**TINY, image_size=32, patch_size=8),
            t.CLIPImageProcessor(
                size={"shortest_edge": 35}, crop_size={"height": 32, "width": 32}, do_center_crop=True
            ),
            prefix=1,
            readout="token",
            has_head=False,
        ),
    ]


FAMILIES = _families()
HEADED = [f for f in FAMILIES if f.has_head]
HEADLESS = [f for f in FAMILIES if not f.has_head]


def _like_trained(model: nn.Module) -> nn.Module:
    """Peaked attention, a non-zero relative position bias and a unit-gain head, as for the timm
    families: random initialisation leaves attention ≈ 1/N and gradients ≈ 0, where every map agrees."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in (
                "query",
                "key",
                "q_proj",
                "k_proj",
            ):
                module.weight.mul_(ATTENTION_SHARPENING)
            if isinstance(module, nn.Linear) and name.endswith("classifier"):
                module.weight.normal_(std=module.in_features**-0.5)
        for name, parameter in model.named_parameters():
            if "relative_position_bias_table" in name:
                parameter.normal_(std=1.0)
            if name.endswith(("cls_token", "distillation_token", "register_tokens", "class_embedding")):
                parameter.normal_(std=0.3)
    return model.eval()


def _save(family: Family, folder: Path) -> Path:
    torch.manual_seed(0)
    model = getattr(transformers, family.model_class)(family.config)
    _like_trained(model).save_pretrained(folder)
    family.processor.save_pretrained(folder)
    return folder


def _photo(path: Path, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx * yy) / (w * h)], axis=-1) * 220
    pixels = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@dataclass
class Batch:
    folders: dict[str, Path]
    images: list[Path]
    jobs: dict[tuple[str, str], dict[str, Any]]  # (family, image name) -> the job's results row


def _invoke(env: dict[str, str], *args: str):
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    finally:
        get_settings.cache_clear()


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Batch:
    root = tmp_path_factory.mktemp("hf-batch")
    folders = {family.name: _save(family, root / family.name) for family in FAMILIES}
    images = [_photo(root / f"img{i}.png", size, seed=i) for i, size in enumerate(IMAGE_SIZES)]
    env = {
        "VITSCOPE_DATABASE_URL": f"sqlite:///{root / 'vitscope.db'}",
        "VITSCOPE_STORAGE_URL": (root / "results").as_uri(),
        "VITSCOPE_BATCH_SIZE": "2",  # two micro-batches of the three images: batched and alone
        "COLUMNS": "200",
    }
    jobs: dict[tuple[str, str], dict[str, Any]] = {}
    for families, targets in ((HEADED, TARGETS), (HEADLESS, ["", "", ""])):
        csv = root / f"{families[0].name}.csv"
        rows = "".join(f"{path.name},{target}\n" for path, target in zip(images, targets, strict=True))
        csv.write_text("image_uri,target\n" + rows)
        models = ",".join(f"hf:{folders[f.name]}" for f in families)
        submitted = _invoke(env, "submit", str(csv), "--local", "--models", models)
        assert submitted.exit_code == 0, submitted.output
        batch_id = submitted.stdout.strip().splitlines()[-1]
        results = _invoke(env, "results", batch_id, "--format", "json")
        assert results.exit_code == 0, results.output
        by_folder = {f"hf:{folders[f.name]}": f.name for f in families}
        for job in json.loads(results.stdout):
            jobs[by_folder[job["model"]], job["image_uri"].rsplit("/", 1)[-1]] = job
    return Batch(folders, images, jobs)


def _reference(family: Family, folder: Path, image: Path, target: int | None) -> dict[str, Any]:
    """The maps from transformers' own pass: its image processor, ``output_attentions=True`` and the
    gradients of those attention tensors, with the family's pooling as the readout."""
    model = (
        getattr(transformers, family.model_class).from_pretrained(folder, attn_implementation="eager").eval()
    )
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    with Image.open(image) as opened:
        pixels = processor(opened.convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.enable_grad():
        output = model(pixel_values=pixels, output_attentions=True)
        attentions = output.attentions
        top1 = chosen = None
        grads = None
        if family.has_head:
            top1 = int(output.logits[0].argmax())
            chosen = top1 if target is None else target
            grads = torch.autograd.grad(output.logits[0, chosen], attentions)
    attn = torch.stack([a.detach() for a in attentions]).numpy()  # [L, 1, H, N, N]
    side = pixels.shape[-1] // (model.config.patch_size)
    p, grid = family.prefix, (side, side)
    maps = {
        "cls_attention": ref_cls_attention(attn, p, grid)[0],
        "layer_scores": ref_layer_scores(attn, p, grid, "query_max")[0],
        "rollout": ref_attention_rollout(attn, p, grid, "mean", 0.9, family.readout)[0],
    }
    if grads is not None:
        grad = torch.stack(grads).numpy()
        maps["grad_rollout"] = ref_gradient_rollout(attn, grad, p, grid, 0.9, family.readout)[0]
        maps["relevance"] = ref_relevance(attn, grad, p, grid, family.readout)[0]
    return {"maps": maps, "top1": top1, "target": chosen}


def _correlation(actual: np.ndarray, expected: np.ndarray) -> float:
    actual, expected = actual.ravel().astype(np.float64), expected.ravel().astype(np.float64)
    if np.ptp(expected) == 0 or np.ptp(actual) == 0:
        return 1.0 if np.allclose(actual, expected, rtol=0, atol=1e-3) else 0.0
    return float(np.corrcoef(actual, expected)[0, 1])


def _stored(uri: str) -> np.ndarray:
    return np.load(urllib.parse.unquote(urllib.parse.urlparse(uri).path))


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_every_stored_map_matches_transformers_own_attention_and_gradients(
    batch: Batch, family: Family
) -> None:
    for index, image in enumerate(batch.images):
        job = batch.jobs[family.name, image.name]
        assert job["state"] == "succeeded", job
        target = TARGET_INDICES[index] if family.has_head else None
        reference = _reference(family, batch.folders[family.name], image, target)
        stored = {
            name.removesuffix(".npy"): _stored(uri)
            for name, uri in job["artifacts"].items()
            if name.endswith(".npy") and uri
        }
        assert set(stored) == set(reference["maps"]), family.name
        for name, expected in reference["maps"].items():
            actual = stored[name]
            assert actual.shape == expected.shape, name
            correlation = _correlation(actual, expected)
            assert correlation >= MIN_CORRELATION, f"{family.name} {image.name} {name}: {correlation:.6f}"
        if family.has_head:
            assert job["predictions"][0]["index"] == reference["top1"]
            assert job["predictions"][0]["label"] == LABELS[reference["top1"]]
            assert job["target_index"] == reference["target"]
        else:
            assert not job["predictions"]


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_each_job_records_the_image_processors_recipe(batch: Batch, family: Family) -> None:
    source = batch.jobs[family.name, batch.images[0].name]["weights_source"]
    processor = family.processor
    crop = processor.crop_size if processor.do_center_crop else processor.size
    assert f"{family.model_class}: {batch.folders[family.name]}" in source
    assert "; preprocessing: image processor: resize " in source
    assert f"crop {crop['height']}×{crop['width']}" in source
    assert f"mean {tuple(float(m) for m in processor.image_mean)}" in source


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_the_layout_follows_the_family(batch: Batch, family: Family) -> None:
    loaded = load_model(resolve_model(f"hf:{batch.folders[family.name]}"), device=CPU)
    assert loaded.layout.num_prefix_tokens == family.prefix
    assert loaded.layout.readout.value == family.readout
    assert loaded.layout.has_head is family.has_head
    assert loaded.layout.num_layers == TINY["num_hidden_layers"]
    assert loaded.labels == (tuple(LABELS.values()) if family.has_head else None)


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_a_batch_equals_single_image_runs(batch: Batch, family: Family) -> None:
    loaded = load_model(resolve_model(f"hf:{batch.folders[family.name]}"), device=CPU)
    inputs = []
    for image in batch.images:
        picture = decode_image(image.read_bytes(), max_pixels=10**7)
        inputs.append(loaded.preprocessor(picture))
    images = torch.stack(inputs)
    targets = TARGET_INDICES if family.has_head else None
    batched = explain(loaded.model, images, MethodSettings(), targets)
    for b, explanation in enumerate(batched):
        (single,) = explain(
            loaded.model, images[b : b + 1], MethodSettings(), [targets[b]] if targets else None
        )
        assert single.arrays().keys() == explanation.arrays().keys()
        for name, array in single.arrays().items():
            np.testing.assert_allclose(array, explanation.arrays()[name], rtol=0, atol=1e-5, err_msg=name)


def test_metrics_report_and_figures_work_as_for_timm(batch: Batch, tmp_path: Path) -> None:
    """The faithfulness metrics (the sanity check re-initializes the model's own encoder layers), the
    HTML report and the paper's figures, on a classifier and a headless backbone."""
    import sqlalchemy as sa

    root = tmp_path
    for image in batch.images[:2]:
        (root / image.name).write_bytes(image.read_bytes())
    (root / "data.csv").write_text("image_uri\n" + "".join(f"{image.name}\n" for image in batch.images[:2]))
    env = {
        "VITSCOPE_DATABASE_URL": f"sqlite:///{root / 'v.db'}",
        "VITSCOPE_STORAGE_URL": (root / "results").as_uri(),
        "COLUMNS": "200",
    }
    models = f"hf:{batch.folders['vit']},hf:{batch.folders['dinov2-headless']}"
    submitted = _invoke(
        env, "submit", str(root / "data.csv"), "--local", "--models", models, "--metrics", "all"
    )
    assert submitted.exit_code == 0, submitted.output
    batch_id = submitted.stdout.strip().splitlines()[-1]
    engine = sa.create_engine(env["VITSCOPE_DATABASE_URL"])
    with engine.connect() as connection:
        rows = connection.execute(sa.text("select model, metric from job_metrics")).all()
    engine.dispose()
    metrics = {(model.rsplit("/", 1)[-1], metric) for model, metric in rows}
    for metric in ("deletion_auc", "insertion_auc", "entropy", "sanity_spearman"):
        assert ("vit", metric) in metrics
    assert ("dinov2-headless", "entropy") in metrics  # class-agnostic: no class to delete evidence of
    report = _invoke(env, "report", batch_id, "--out", str(root / "site"))
    assert report.exit_code == 0, report.output
    assert (root / "site" / "index.html").is_file()
    figures = _invoke(env, "figures", batch_id, "--out", str(root / "figures"), "--no-pdf")
    assert figures.exit_code == 0, figures.output
    assert len(list((root / "figures").glob("fig4_1-*.png"))) == 4  # one per image and model


def test_a_frozen_model_gets_the_same_gradients(batch: Batch) -> None:
    """transformers' attention hooks fire after the block used the map, so a frozen model's maps are
    put on the graph through the input instead; the gradients must not change."""
    from worker.attention import capture

    loaded = load_model(resolve_model(f"hf:{batch.folders['beit']}"), device=CPU)
    images = torch.stack(
        [loaded.preprocessor(decode_image(image.read_bytes(), max_pixels=10**7)) for image in batch.images]
    )
    trainable = capture(loaded.model, images, [None, 1, 2])
    loaded.model.requires_grad_(False)
    frozen = capture(loaded.model, images, [None, 1, 2])
    assert frozen.gradients is not None
    assert trainable.gradients is not None
    assert frozen.gradients.abs().sum() > 0
    torch.testing.assert_close(frozen.gradients, trainable.gradients, rtol=0, atol=1e-7)


def test_paper_preprocessing_is_the_papers_recipe_at_the_processors_crop(batch: Batch) -> None:
    loaded = load_model(
        ModelSpec(name="d", arch=f"hf:{batch.folders['dinov2-headless']}", preprocess="paper"), device=CPU
    )
    preprocessor = loaded.preprocessor
    assert (preprocessor.input_size, preprocessor.resize_size, preprocessor.crop_mode) == (
        (28, 28),
        32,
        "center",
    )
    assert preprocessor.mean == pytest.approx((0.485, 0.456, 0.406))
    assert "paper: resize shortest edge 32 bicubic, crop 28×28" in loaded.weights_source


# --- preprocessing --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
@pytest.mark.parametrize("size", [(301, 203), (203, 301), (500, 500), (77, 50)])
def test_preprocessing_equals_the_image_processors_own_output(
    batch: Batch, family: Family, size: tuple[int, int], tmp_path: Path
) -> None:
    """The crop's pixels exactly, and the model input to float32 rounding, against transformers' PIL
    backend; odd crop margins check that the crop starts where transformers floors it."""
    folder = batch.folders[family.name]
    loaded = load_model(resolve_model(f"hf:{folder}"), device=CPU)
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    picture = Image.open(_photo(tmp_path / "p.png", size, seed=7)).convert("RGB")

    expected = processor(picture, return_tensors="pt")["pixel_values"][0]
    tensor = loaded.preprocessor(picture)
    assert tensor.shape == expected.shape
    torch.testing.assert_close(tensor, expected, rtol=0, atol=2e-6)

    raw = processor(picture, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
    np.testing.assert_array_equal(
        loaded.preprocessor.crop_pixels(picture), raw.transpose(1, 2, 0).astype(np.uint8)
    )


# --- refusals -------------------------------------------------------------------------------------


def _refused_cases() -> list[Any]:
    t = transformers
    return [
        pytest.param(
            "SwinForImageClassification",
            t.SwinConfig(
                image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4
            ),
            "shifted local windows",
            id="swin",
        ),
        pytest.param(
            "PvtV2Model",
            t.PvtV2Config(
                image_size=32,
                hidden_sizes=[8, 16],
                depths=[1, 1],
                num_attention_heads=[1, 2],
                num_encoder_blocks=2,
                sr_ratios=[2, 1],
                patch_sizes=[7, 3],
                strides=[4, 2],
                mlp_ratios=[2, 2],
            ),
            "spatially reduced",
            id="pvt-pooled",
        ),
        pytest.param(
            "SiglipVisionModel",
            t.SiglipVisionConfig(**TINY, image_size=32, patch_size=8, vision_use_head=True),
            "SiglipMultiheadAttentionPoolingHead",
            id="siglip-attention-pooling",
        ),
        pytest.param(
            "Dinov2ForImageClassification",
            t.Dinov2Config(**TINY, image_size=28, patch_size=4, num_labels=3),
            "side by side",
            id="dinov2-concatenating-head",
        ),
        pytest.param(
            "ConvNextModel",
            t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
            "not one of the families",
            id="convnext-not-a-vit",
        ),
    ]


@pytest.mark.parametrize(("model_class", "config", "reason"), _refused_cases())
def test_families_without_one_attention_map_per_block_are_refused_with_the_reason(
    model_class: str, config: Any, reason: str, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    getattr(transformers, model_class)(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    _photo(tmp_path / "a.png", (40, 40), seed=1)
    (tmp_path / "data.csv").write_text("image_uri\na.png\n")
    env = {
        "VITSCOPE_DATABASE_URL": f"sqlite:///{tmp_path / 'v.db'}",
        "VITSCOPE_STORAGE_URL": (tmp_path / "r").as_uri(),
    }
    result = _invoke(env, "submit", str(tmp_path / "data.csv"), "--local", "--models", f"hf:{folder}")
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "is not supported" in message
    assert reason in message


# --- offline --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("unreachable_hub")
def test_an_offline_hub_id_fails_fast_naming_random_if_offline(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as caught:
        load_model(ModelSpec(name="dino", arch="hf:facebook/dinov2-small"), device=CPU)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    for fragment in ("offline", "facebook/dinov2-small", "hf:<folder>", "--random-if-offline"):
        assert fragment in message


@pytest.mark.usefixtures("unreachable_hub")
def test_the_cli_reports_the_offline_hub_id_and_what_to_do(tmp_path: Path) -> None:
    _photo(tmp_path / "a.png", (40, 40), seed=1)
    (tmp_path / "data.csv").write_text("image_uri\na.png\n")
    env = {
        "VITSCOPE_DATABASE_URL": f"sqlite:///{tmp_path / 'v.db'}",
        "VITSCOPE_STORAGE_URL": (tmp_path / "r").as_uri(),
    }
    result = _invoke(
        env, "submit", str(tmp_path / "data.csv"), "--local", "--models", "hf:facebook/dinov2-small"
    )
    assert result.exit_code == 2, result.output
    assert "--random-if-offline" in " ".join(result.output.split())


def _cache_repo(folder: Path, files: tuple[str, ...]) -> None:
    """``acme/tiny-vit`` in the (monkeypatched, empty) hub cache, in the cache's own layout, by hand."""
    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--acme--tiny-vit"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_bytes((folder / name).read_bytes())


@pytest.mark.usefixtures("unreachable_hub")
def test_an_offline_hub_id_in_the_cache_loads_from_it(batch: Batch) -> None:
    _cache_repo(batch.folders["vit"], ("config.json", "preprocessor_config.json", "model.safetensors"))
    loaded = load_model(ModelSpec(name="hf:acme/tiny-vit", arch="hf:acme/tiny-vit"), device=CPU)
    assert "ViTForImageClassification: acme/tiny-vit;" in loaded.weights_source
    assert loaded.labels == tuple(LABELS.values())


@pytest.mark.usefixtures("unreachable_hub")
def test_random_if_offline_builds_the_cached_config_with_random_weights(batch: Batch, tmp_path: Path) -> None:
    _cache_repo(batch.folders["vit"], ("config.json", "preprocessor_config.json"))
    _photo(tmp_path / "a.png", (40, 40), seed=1)
    (tmp_path / "data.csv").write_text("image_uri\na.png\n")
    env = {
        "VITSCOPE_DATABASE_URL": f"sqlite:///{tmp_path / 'v.db'}",
        "VITSCOPE_STORAGE_URL": (tmp_path / "r").as_uri(),
    }
    data = str(tmp_path / "data.csv")
    refused = _invoke(env, "submit", data, "--local", "--models", "hf:acme/tiny-vit")
    assert refused.exit_code == 2, refused.output
    submitted = _invoke(env, "submit", data, "--local", "--models", "hf:acme/tiny-vit", "--random-if-offline")
    assert submitted.exit_code == 0, submitted.output
    assert "RANDOM" in " ".join(submitted.output.split())
    results = _invoke(env, "results", submitted.stdout.strip().splitlines()[-1], "--format", "json")
    (job,) = json.loads(results.stdout)
    assert "ViTForImageClassification: RANDOM" in job["weights_source"]


def test_a_folder_without_a_saved_model_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsUnavailableError, match=r"no config\.json"):
        load_model(resolve_model(f"hf:{tmp_path / 'empty'}"), device=CPU)


# --- queues ---------------------------------------------------------------------------------------


def test_a_worker_serves_the_transformers_queue_only_where_transformers_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from common.celery_app import TRANSFORMERS_QUEUE
    from worker.cli import resolve_queues

    assert TRANSFORMERS_QUEUE in resolve_queues("all")
    assert resolve_queues("transformers") == [TRANSFORMERS_QUEUE]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(  # an install without the hf extra, which this environment cannot be
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "transformers" else real_find_spec(name, *a),
    )
    assert TRANSFORMERS_QUEUE not in resolve_queues("all")
    assert resolve_queues("transformers") == [TRANSFORMERS_QUEUE]  # asked for by name: the user decides
