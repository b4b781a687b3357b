"""`producer submit` refuses what it can before any model loads and before the batch exists.

Each refusal is checked for what it says, its exit status, and that it came early: no "loading"
line (the local runner prints it before building the first model) and no batch in the database.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from common.db.models import Batch
from common.settings import get_settings
from producer.cli import app

runner = CliRunner()


def _submit(*args: str, env: dict[str, str] | None = None):
    get_settings.cache_clear()
    result = runner.invoke(
        app, ["submit", *args], env={"COLUMNS": "200", **(env or {})}, catch_exceptions=False
    )
    return result, " ".join(result.output.split())


def _batches(tmp_path: Path) -> int:
    path = tmp_path / "vitscope.db"
    if not path.exists():
        return 0
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(Batch)).scalar()
    finally:
        engine.dispose()


@pytest.fixture
def dataset(tmp_path: Path, write_image) -> Path:
    write_image(tmp_path / "images" / "cat.png")
    path = tmp_path / "data.csv"
    path.write_text("image_uri\nimages/cat.png\n")
    return path


def _refused_early(result, tmp_path: Path, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    assert "loading" not in result.output
    assert _batches(tmp_path) == 0


def test_an_unknown_model_gets_the_close_names(dataset: Path, tmp_path: Path) -> None:
    result, text = _submit(str(dataset), "--models", "deit_tiny_patch16")
    _refused_early(result, tmp_path)
    assert "unknown model 'deit_tiny_patch16'" in text
    assert "did you mean deit_tiny_patch16_224" in text
    assert not (tmp_path / "vitscope.db").exists()  # refused before the embedded database is created

    result, text = _submit(str(dataset), "--models", "vit_bse_patch16_224")
    _refused_early(result, tmp_path)
    assert "did you mean vit_base_patch16_224" in text


@pytest.mark.parametrize(
    ("model", "what"),
    [
        ("resnet50", "is a convolutional network (CNN) from timm's resnet family"),
        ("efficientnet_b0", "is a convolutional network (CNN) from timm's efficientnet family"),
        ("mixer_b16_224", "is an MLP-Mixer"),
        ("swin_tiny_patch4_window7_224", "is a hierarchical transformer (timm's swin_transformer family)"),
    ],
)
def test_a_model_without_global_attention_is_told_what_it_is(
    dataset: Path, tmp_path: Path, model: str, what: str
) -> None:
    result, text = _submit(str(dataset), "--models", model, "--weights", "random")
    _refused_early(result, tmp_path)
    assert f"model '{model}' {what}" in text
    if "CNN" in what:
        assert "Swin" not in text


def test_a_model_cell_naming_a_cnn_is_refused_with_its_line(tmp_path: Path, write_image) -> None:
    write_image(tmp_path / "cat.png")
    (tmp_path / "data.csv").write_text("image_uri,model\ncat.png,deit_tiny_patch16_224\ncat.png,resnet50\n")
    result, text = _submit(str(tmp_path / "data.csv"), "--weights", "random")
    _refused_early(result, tmp_path)
    assert "line 3: model 'resnet50' is a convolutional network" in text


def test_a_duplicate_name_is_refused_before_any_model_loads(dataset: Path, tmp_path: Path) -> None:
    from common.db import open_database
    from producer.submit import SubmitOptions, commit_plan, plan_submission

    options = SubmitOptions(name="cats", weights="random")
    db = open_database(get_settings())
    commit_plan(db, plan_submission(dataset, options), options, mode="local")
    db.dispose()
    result, text = _submit(str(dataset), "--name", "cats", "--weights", "random")
    assert result.exit_code == 2
    assert "loading" not in result.output
    assert "a batch named 'cats' already exists" in text
    assert _batches(tmp_path) == 1


def test_a_local_path_outside_the_file_roots_is_refused_with_its_line(tmp_path: Path, write_image) -> None:
    data = tmp_path / "data"
    write_image(data / "cat.png")
    write_image(tmp_path / "elsewhere" / "dog.png")
    (data / "data.csv").write_text("image_uri\ncat.png\n../elsewhere/dog.png\n/etc/passwd\n")
    result, text = _submit(str(data / "data.csv"), "--weights", "random")
    _refused_early(result, tmp_path)
    assert "2 invalid row(s)" in text
    assert f"line 3: {(tmp_path / 'elsewhere' / 'dog.png').as_uri()} leads outside the folders" in text
    assert "line 4: file:///etc/passwd leads outside the folders" in text
    assert "VITSCOPE_FILE_ROOTS" in text


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("espreso", "line 2: target 'espreso' is not a class of model 'deit_tiny_patch16_224'"),
        ("espreso", "did you mean 'espresso'"),
        ("1000", "line 2: target class 1000 is out of range for model 'deit_tiny_patch16_224'"),
        ("crane", "line 2: target 'crane' is ambiguous"),
    ],
)
def test_a_target_the_model_lacks_is_refused_with_close_names(
    tmp_path: Path, write_image, target: str, message: str
) -> None:
    write_image(tmp_path / "cat.png")
    (tmp_path / "data.csv").write_text(f"image_uri,target\ncat.png,{target}\ncat.png,espresso\n")
    result, text = _submit(str(tmp_path / "data.csv"), "--weights", "random")
    _refused_early(result, tmp_path)
    assert "1 invalid row(s)" in text
    assert message in text


def test_a_target_missing_from_a_models_file_label_set_is_refused(tmp_path: Path, write_image) -> None:
    write_image(tmp_path / "cat.png")
    (tmp_path / "models.toml").write_text(
        '[models.pets]\narch = "deit_tiny_patch16_224"\nweights = "random"\nlabels = ["cat", "dog"]\n'
    )
    (tmp_path / "data.csv").write_text("image_uri,target\ncat.png,dgo\ncat.png,dog\n")
    result, text = _submit(
        str(tmp_path / "data.csv"), "--models-file", str(tmp_path / "models.toml"), "--models", "pets"
    )
    _refused_early(result, tmp_path)
    assert (
        "line 2: target 'dgo' is not a class of model 'pets' (none of its 2 class names); did you mean 'dog'?"
        in text
    )


def test_offline_names_every_model_and_both_ways_on(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # closed: offline
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    models = "deit_tiny_patch16_224,vit_tiny_patch16_224"
    result, text = _submit(str(dataset), "--models", models)
    _refused_early(result, tmp_path)
    assert (
        "cannot get pretrained weights for 2 model(s) (deit_tiny_patch16_224, vit_tiny_patch16_224)" in text
    )
    assert "--random-if-offline" in text
    assert "--weights random" in text

    fallback, text = _submit(str(dataset), "--models", models, "--random-if-offline")
    assert fallback.exit_code == 0, fallback.output
    assert fallback.output.count("WARNING") == 1  # one notice for both models
    assert (
        "RANDOM weights for deit_tiny_patch16_224, vit_tiny_patch16_224 (pretrained weights unreachable"
        in text
    )


def test_explicit_random_weights_get_one_notice(dataset: Path) -> None:
    result, text = _submit(
        str(dataset), "--models", "deit_tiny_patch16_224,vit_tiny_patch16_224", "--weights", "random"
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("WARNING") == 1
    assert "RANDOM weights for deit_tiny_patch16_224, vit_tiny_patch16_224 (asked for)" in text


@pytest.mark.parametrize(
    ("setting", "url", "message"),
    [
        (
            "VITSCOPE_DATABASE_URL",
            "postgresql+psycopg://vitscope@127.0.0.1:1/none",
            "cannot connect to the database",
        ),
        ("VITSCOPE_BROKER_URL", "redis://127.0.0.1:1/0", "redis://127.0.0.1:1/0"),
    ],
)
def test_an_unreachable_service_exits_3_before_the_file_is_read(
    tmp_path: Path, setting: str, url: str, message: str
) -> None:
    """The file is invalid too: the old order read it first and answered 2 after scanning it all."""
    (tmp_path / "data.csv").write_text("image_uri\n" + "s3://bucket/a.png\n" * 50_000 + "bad://x\n")
    start = time.monotonic()
    result, text = _submit(str(tmp_path / "data.csv"), "--weights", "random", env={setting: url})
    assert time.monotonic() - start < 15
    _refused_early(result, tmp_path, code=3)
    assert message in text
    assert "invalid row" not in text
