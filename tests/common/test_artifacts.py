"""The registry of what a job stores: every name once, and the derived names consistent with it."""

from __future__ import annotations

from common.artifacts import (
    ARRAY_ARTIFACTS,
    IMAGE_ARTIFACTS,
    INPUT_PICTURE,
    LAYER_GRID,
    OVERLAYS,
    PANELS,
    PICTURE_SOURCES,
    PICTURES,
    PictureKind,
)


def test_every_file_name_is_registered_once() -> None:
    names = [*ARRAY_ARTIFACTS, *IMAGE_ARTIFACTS]
    assert len(set(names)) == len(names)
    assert all(name.endswith(".npy") for name in ARRAY_ARTIFACTS)
    assert all(name.endswith(".png") for name in IMAGE_ARTIFACTS)


def test_every_picture_but_the_input_crop_has_a_source_array() -> None:
    assert set(PICTURE_SOURCES) | {INPUT_PICTURE} == set(IMAGE_ARTIFACTS)
    assert set(PICTURE_SOURCES.values()) <= set(ARRAY_ARTIFACTS)
    assert [p.source is None for p in PICTURES] == [p.kind is PictureKind.INPUT for p in PICTURES]


def test_a_report_shows_the_input_crop_then_the_overlays_beside_the_layer_grid() -> None:
    assert [panel.name for panel in PANELS] == [INPUT_PICTURE, *OVERLAYS]
    assert {LAYER_GRID, *OVERLAYS, INPUT_PICTURE} == set(IMAGE_ARTIFACTS)
    assert [panel.title for panel in PANELS] == ["input", "rollout", "gradient rollout", "relevance"]
