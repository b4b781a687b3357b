"""Metric settings: ``--metrics`` values, the models file's ``[metrics]`` section, and their digest."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import InvalidModelSpecError
from common.keys import config_fingerprint
from common.methods import MethodSettings
from common.metric_settings import (
    Baseline,
    MetricFamily,
    MetricSettings,
    SanityLayers,
    load_metrics_section,
    parse_metrics_option,
)
from common.modelspec import ModelSpec, load_models_file

DEL, INS, LOC, SAN = (
    MetricFamily.DELETION,
    MetricFamily.INSERTION,
    MetricFamily.LOCALIZATION,
    MetricFamily.SANITY,
)


@pytest.mark.parametrize(
    ("option", "families"),
    [
        ("all", {DEL, INS, LOC, SAN}),
        ("standard", {DEL, INS, LOC}),
        ("sanity", {SAN}),
        ("deletion, Insertion", {DEL, INS}),
        ("standard,sanity", {DEL, INS, LOC, SAN}),
        ("", set()),
        (None, set()),
    ],
)
def test_metrics_option(option: str | None, families: set[MetricFamily]) -> None:
    assert parse_metrics_option(option) == families


def test_unknown_metrics_are_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown --metrics value 'speed'.*all, standard, deletion"):
        parse_metrics_option("deletion,speed")


def test_models_file_section(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.a]\narch = "deit_tiny_patch16_224"\n\n'
        '[metrics]\ncompute = ["standard"]\nsteps = 7\ninsertion_baseline = "mean"\nsanity_blocks = 2\n'
    )
    settings = load_metrics_section(path)
    assert settings.families == {DEL, INS, LOC}
    assert (settings.steps, settings.insertion_baseline, settings.sanity_blocks) == (7, Baseline.MEAN, 2)
    assert settings.deletion_baseline is Baseline.MEAN  # the default
    assert load_models_file(path)["a"].arch == "deit_tiny_patch16_224"  # the models are read as before
    assert MetricSettings.from_dict(settings.to_dict()) == settings


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("speed = 3", "unknown key"),
        ("steps = 0", "steps must be >= 1"),
        ('steps = "8"', "steps must be an integer"),
        ('insertion_baseline = "noise"', "'noise' is not a valid Baseline"),
        ('compute = ["fast"]', "unknown --metrics value 'fast'"),
    ],
)
def test_bad_sections_are_refused(tmp_path: Path, section: str, message: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(f"[metrics]\n{section}\n")
    with pytest.raises(InvalidModelSpecError, match=message):
        load_metrics_section(path)


def test_metric_settings_do_not_change_the_artifacts_digest_but_have_their_own() -> None:
    spec = ModelSpec(name="m", arch="deit_tiny_patch16_224")
    one = MetricSettings(families=frozenset({DEL}))
    other = MetricSettings(families=frozenset({DEL}), steps=4)
    assert one.digest() != other.digest()
    assert one.digest("1,2,3,4") != one.digest("1,2,3,5")  # localization depends on the box
    assert one.digest() == MetricSettings(families=frozenset({DEL}), max_batch=8).digest()  # only splits work
    # Maps do not depend on metrics: the artifacts' configuration digest has no metric settings in it.
    assert config_fingerprint(spec, MethodSettings(), None) == config_fingerprint(
        spec, MethodSettings(), None
    )


def test_model_args_reach_the_spec_and_its_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.small]\narch = "test_vit"\n[models.small.model_args]\ndepth = 4\nembed_dim = 64\n'
    )
    spec = load_models_file(path)["small"]
    assert spec.extra == {"model_args": {"depth": 4, "embed_dim": 64}}
    assert spec.fingerprint() != ModelSpec(name="small", arch="test_vit").fingerprint()
    path.write_text('[models.small]\narch = "test_vit"\n[models.small.model_args]\nnum_classes = 4\n')
    with pytest.raises(InvalidModelSpecError, match="model_args must be a table"):
        load_models_file(path)


def test_the_sanity_layers_setting(tmp_path: Path) -> None:
    assert MetricSettings().sanity_layers is SanityLayers.OUTPUT  # Adebayo et al.'s cascade by default
    path = tmp_path / "models.toml"
    path.write_text('[metrics]\ncompute = ["sanity"]\nsanity_layers = "blocks"\nsanity_blocks = 3\n')
    settings = load_metrics_section(path)
    assert (settings.sanity_layers, settings.sanity_blocks) == (SanityLayers.BLOCKS, 3)
    assert MetricSettings.from_dict(settings.to_dict()) == settings
    assert MetricSettings(sanity_blocks=0).sanity_blocks == 0  # the head and final norm alone
    for section, message in (
        ('sanity_layers = "top"', "'top' is not a valid SanityLayers"),
        ('sanity_layers = "blocks"\nsanity_blocks = 0', "would re-initialize nothing"),
        ("sanity_blocks = -1", "sanity_blocks must be >= 0"),
    ):
        path.write_text(f"[metrics]\n{section}\n")
        with pytest.raises(InvalidModelSpecError, match=message):
            load_metrics_section(path)


def test_sanity_layers_change_the_digest_only_where_the_sanity_check_runs() -> None:
    standard = frozenset({DEL, INS, LOC})
    # The digest these settings had before ``sanity_layers`` existed: earlier values stay reusable.
    assert MetricSettings(families=standard).digest("1,2,3,4") == "1de7b5c41d6ef056"
    assert (
        MetricSettings(families=standard, sanity_layers=SanityLayers.BLOCKS).digest()
        == MetricSettings(families=standard).digest()
    )
    with_sanity = standard | {SAN}
    assert (
        MetricSettings(families=with_sanity, sanity_layers=SanityLayers.BLOCKS).digest()
        != MetricSettings(families=with_sanity).digest()
    )


def test_the_rise_canvas_is_a_baseline() -> None:
    settings = MetricSettings(insertion_baseline="rise_blur")
    assert settings.insertion_baseline is Baseline.RISE_BLUR
    assert settings.digest() != MetricSettings().digest()
