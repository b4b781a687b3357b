"""Model names and models files: what they resolve to, and how mistakes are reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.celery_app import TRANSFORMERS_QUEUE, known_queues, queue_for
from common.errors import InvalidModelSpecError, InvalidTargetError, UnknownModelError
from common.methods import Preprocess
from common.modelspec import (
    PAPER_MODELS,
    ModelSpec,
    check_explainable,
    check_target,
    head_labels,
    is_timm_model,
    is_transformers_model,
    load_models_file,
    resolve_model,
    resolve_models_option,
    timm_family,
    timm_model_names,
)


def test_shipped_name_list_matches_the_installed_timm() -> None:
    """The producer validates names without timm; regenerate with scripts/gen_timm_model_list.py."""
    import importlib.util
    import sys

    script = Path(__file__).resolve().parents[2] / "scripts" / "gen_timm_model_list.py"
    spec = importlib.util.spec_from_file_location("gen_timm_model_list", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    assert set(module.model_names()) == set(timm_model_names())


@pytest.mark.parametrize(
    ("name", "known"),
    [
        ("deit_tiny_patch16_224", True),
        ("deit_tiny_distilled_patch16_224", True),
        ("vit_base_patch16_224.augreg2_in21k_ft_in1k", True),
        ("vit_large_patch16_224", True),
        ("hf-hub:timm/vit_base_patch16_224.augreg_in21k", True),
        ("beit_base_patch16_224", True),
        ("eva02_base_patch14_448.mim_in22k_ft_in22k_in1k", True),
        ("vit_small_patch14_reg4_dinov2", True),
        ("vit_base_patch16_siglip_224", True),  # named here; refused by the worker from its structure
        ("resnet50", True),  # likewise: any timm architecture passes the producer's check
        ("resnet5000", False),
        ("vit_base_patch16_224x", False),
        ("hf-hub:", False),
    ],
)
def test_is_timm_model(name: str, known: bool) -> None:
    assert is_timm_model(name) is known


def test_models_option_expands_paper_and_keeps_order() -> None:
    assert resolve_models_option("paper") == list(PAPER_MODELS)
    assert resolve_models_option("deit_tiny_patch16_224, paper") == list(PAPER_MODELS[3:]) + list(
        PAPER_MODELS[:3]
    )
    assert resolve_models_option(None) == []


def test_timm_name_resolves_to_pretrained_spec_with_overrides() -> None:
    spec = resolve_model("vit_base_patch32_224")
    assert (spec.arch, spec.weights, spec.preprocess) == (
        "vit_base_patch32_224",
        "pretrained",
        Preprocess.TIMM,
    )
    random_paper = resolve_model("vit_base_patch32_224", preprocess=Preprocess.PAPER, weights="random")
    assert (random_paper.weights, random_paper.preprocess) == ("random", Preprocess.PAPER)
    assert random_paper.fingerprint() != spec.fingerprint()
    with pytest.raises(UnknownModelError, match="resnet5000"):
        resolve_model("resnet5000")


def test_spec_round_trips_through_json_and_fingerprints_ignore_the_display_name() -> None:
    spec = ModelSpec(
        name="a", arch="deit_tiny_patch16_224", weights="/w.safetensors", labels=("x", "y"), num_classes=2
    )
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    renamed = ModelSpec.from_dict({**spec.to_dict(), "name": "b"})
    assert renamed.fingerprint() == spec.fingerprint()


def test_models_file(tmp_path: Path) -> None:
    (tmp_path / "models.toml").write_text(
        """
[models.my-deit]
arch = "deit_tiny_patch16_224"
weights = "checkpoints/my-deit.safetensors"
labels = ["healthy", "lesion"]
preprocess = "paper"

[models.remote]
arch = "vit_base_patch16_224"
weights = "s3://bucket/weights/"
num_classes = 10
"""
    )
    models = load_models_file(tmp_path / "models.toml")
    mine = models["my-deit"]
    assert mine.weights == str(tmp_path / "checkpoints" / "my-deit.safetensors")
    assert (mine.num_classes, mine.labels, mine.preprocess) == (2, ("healthy", "lesion"), Preprocess.PAPER)
    assert models["remote"].weights == "s3://bucket/weights/"
    assert resolve_model("my-deit", models) is mine
    with pytest.raises(UnknownModelError, match="models file entries: my-deit, remote"):
        resolve_model("nope", models)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[models.x]\nweights = 'random'\n", "needs arch"),
        ("[models.x]\narch = 'resnet5000'\n", "not a timm architecture"),
        ("[models.x]\narch = 'deit_tiny_patch16_224'\ncolour = 'red'\n", "unknown key"),
        (
            "[models.x]\narch = 'deit_tiny_patch16_224'\nlabels = ['a']\nnum_classes = 3\n",
            "1 labels given for num_classes = 3",
        ),
        ("[models.x]\narch = 'deit_tiny_patch16_224'\npreprocess = 'fancy'\n", "preprocess must be one of"),
        (
            "[models.x]\narch = 'deit_tiny_patch16_224'\nnum_classes = 'ten'\n",
            "num_classes must be an integer",
        ),
        ("[other]\n", "no \\[models.<name>\\] tables"),
        ("[models.x\n", "invalid TOML"),
        # transformers models (hf:): the folder or hub id holds the weights and the preprocessing
        ("[models.x]\narch = 'vit_tiny_patch16_224'\ntransformers = 'a/b'\n", "both arch and transformers"),
        ("[models.x]\ntransformers = ''\n", "transformers must be a hub id or folder"),
        ("[models.x]\ntransformers = 'a/b'\nweights = 's3://bucket/w.safetensors'\n", "holds the weights"),
        ("[models.x]\ntransformers = 'a/b'\nimg_size = 384\n", "config.json and image-processor"),
        ("[models.x]\ntransformers = 'a/b'\nmodel_args = { depth = 2 }\n", "config.json and image-processor"),
    ],
)
def test_models_file_errors(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(toml)
    with pytest.raises(InvalidModelSpecError, match=message):
        load_models_file(path)


# --- transformers models (hf:) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "arch"),
    [
        ("hf:facebook/dinov2-small", "hf:facebook/dinov2-small"),
        ("hf:google/vit-base-patch16-224", "hf:google/vit-base-patch16-224"),
        ("hf:openai/clip-vit-base-patch32", "hf:openai/clip-vit-base-patch32"),
    ],
)
def test_hf_hub_ids_resolve_to_transformers_specs(name: str, arch: str) -> None:
    spec = resolve_model(name)
    assert (spec.name, spec.arch, spec.weights) == (name, arch, "pretrained")
    assert is_transformers_model(spec.arch)
    assert not is_timm_model(spec.arch)


def test_hf_folders_become_absolute_from_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "my-vit").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("hf:my-vit").arch == f"hf:{tmp_path / 'my-vit'}"
    assert resolve_model("hf:./my-vit").arch == f"hf:{tmp_path / 'my-vit'}"
    # Written as a path, it stays one even where it does not exist (the worker then says so).
    assert resolve_model("hf:./missing").arch == f"hf:{tmp_path / 'missing'}"


@pytest.mark.parametrize("name", ["hf:", "hf:not a hub id", "hf:a/b/c"])
def test_hf_names_that_are_neither_a_folder_nor_a_hub_id_are_refused(name: str) -> None:
    with pytest.raises(UnknownModelError, match="hf:"):
        resolve_model(name)


def test_models_file_transformers_entries(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "fine-tuned").mkdir(parents=True)
    (tmp_path / "models.toml").write_text(
        """
[models.dino]
transformers = "facebook/dinov2-small"

[models.mine]
transformers = "checkpoints/fine-tuned"
labels = ["healthy", "lesion"]

[models.clip]
arch = "hf:openai/clip-vit-base-patch32"
weights = "random"
"""
    )
    models = load_models_file(tmp_path / "models.toml")
    assert models["dino"].arch == "hf:facebook/dinov2-small"
    assert models["mine"].arch == f"hf:{tmp_path / 'checkpoints' / 'fine-tuned'}"
    assert (models["mine"].labels, models["mine"].num_classes) == (("healthy", "lesion"), 2)
    assert (models["clip"].arch, models["clip"].weights) == ("hf:openai/clip-vit-base-patch32", "random")


def test_a_weights_override_that_a_transformers_model_cannot_use_is_refused() -> None:
    assert resolve_model("hf:facebook/dinov2-small", weights="random").is_random
    with pytest.raises(InvalidModelSpecError, match="holds the weights"):
        resolve_model("hf:facebook/dinov2-small", weights="/tmp/w.safetensors")


def test_transformers_models_go_to_their_own_queue() -> None:
    assert queue_for(resolve_model("hf:facebook/dinov2-small")) == TRANSFORMERS_QUEUE
    assert queue_for(resolve_model("deit_tiny_patch16_224")) == "vitscope.deit_tiny"
    assert TRANSFORMERS_QUEUE in known_queues()


def test_a_model_saved_again_into_the_same_folder_is_a_different_model(tmp_path: Path, monkeypatch) -> None:
    """The folder's contents enter the fingerprint, so its artifacts are not reused for the new model."""
    folder = tmp_path / "my-vit"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "vit"}')
    (folder / "model.safetensors").write_bytes(b"first")
    monkeypatch.chdir(tmp_path)
    first = resolve_model("hf:my-vit")
    assert resolve_model("hf:my-vit").fingerprint() == first.fingerprint()
    (folder / "model.safetensors").write_bytes(b"second, longer")
    assert resolve_model("hf:my-vit").fingerprint() != first.fingerprint()
    (folder / "model.safetensors").write_bytes(b"first")
    (folder / "config.json").write_text('{"model_type": "vit", "num_labels": 3}')
    assert resolve_model("hf:my-vit").fingerprint() != first.fingerprint()
    # A hub id has no folder to read: its fingerprint is its name's.
    assert resolve_model("hf:facebook/dinov2-small").extra == {}


def _script(name: str):
    import importlib.util
    import sys

    script = Path(__file__).resolve().parents[2] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_shipped_heads_and_imagenet_labels_match_the_installed_timm() -> None:
    """The producer's early checks read timm's families and heads from files; regenerate them with
    scripts/gen_timm_heads.py."""
    module = _script("gen_timm_heads")
    assert module.HEADS.read_text() == module.render_heads()
    assert module.LABELS.read_text() == module.render_labels()


def test_no_explainable_family_is_refused_up_front() -> None:
    """The early refusal only names families with no global attention: every ViT, DeiT, BEiT and EVA
    name passes, to be judged by the worker from its structure."""
    for name in timm_model_names():
        if timm_family(name) in {"vision_transformer", "deit", "beit", "eva"}:
            check_explainable(name, name)


@pytest.mark.parametrize(
    ("spec", "labels"),
    [
        (ModelSpec(name="d", arch="deit_tiny_patch16_224"), 1000),
        (ModelSpec(name="d", arch="deit_tiny_patch16_224", weights="random"), 1000),
        (
            ModelSpec(name="v", arch="vit_base_patch16_224.augreg_in21k"),
            None,
        ),  # 21,843 classes: not known here
        (ModelSpec(name="d", arch="deit_tiny_patch16_224", num_classes=10), None),
        (ModelSpec(name="p", arch="deit_tiny_patch16_224", labels=("cat", "dog")), 2),
        (ModelSpec(name="h", arch="hf-hub:timm/vit_base_patch16_224.augreg_in21k"), None),
    ],
)
def test_head_labels_are_known_without_weights_where_timm_says(spec: ModelSpec, labels: int | None) -> None:
    found = head_labels(spec)
    assert (len(found) if found is not None else None) == labels


@pytest.mark.parametrize(
    ("spec", "target", "message"),
    [
        (ModelSpec(name="d", arch="deit_tiny_patch16_224"), "espresso", None),
        (ModelSpec(name="d", arch="deit_tiny_patch16_224"), "Tabby Cat", None),  # a synonym, any case
        (ModelSpec(name="d", arch="deit_tiny_patch16_224"), "967", None),
        (ModelSpec(name="d", arch="deit_tiny_patch16_224"), "espreso", "did you mean 'espresso'"),
        (ModelSpec(name="d", arch="deit_tiny_patch16_224"), "crane", r"ambiguous.*\[134, 517\]"),
        (ModelSpec(name="d", arch="deit_tiny_patch16_224"), "-1", "out of range"),
        (
            ModelSpec(name="d", arch="deit_tiny_patch16_224", num_classes=10),
            "unicorn",
            None,
        ),  # labels unknown
        (ModelSpec(name="d", arch="deit_tiny_patch16_224", num_classes=10), "10", r"10 classes \(0..9\)"),
        (ModelSpec(name="h", arch="vit_small_patch14_dinov2"), "1", "no classification head"),
    ],
)
def test_targets_are_checked_as_the_worker_resolves_them(
    spec: ModelSpec, target: str, message: str | None
) -> None:
    if message is None:
        check_target(spec, target)
    else:
        with pytest.raises(InvalidTargetError, match=message):
            check_target(spec, target)
