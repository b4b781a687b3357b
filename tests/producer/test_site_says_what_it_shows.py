"""The report and the figures say what their pictures are: random weights, settings in words, each
job's faithfulness scores, and which class a gradient map explains when it is not the prediction.

Two real batches of one image each, computed by ``producer submit --local``: one with RANDOM
weights, a CSV target (``espresso``) that the untrained model does not predict and ``--metrics``;
one with the same network's weights loaded from a file, no target and no metrics.
"""

from __future__ import annotations

import html
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from common.db import open_database
from common.db.models import JobState
from common.settings import Settings
from producer import figures
from producer.site.selection import ImageEntry, Selection, iter_images
from tests.producer.conftest import ReportBatch, _write_image

MODEL = "deit_tiny_patch16_224"
ESPRESSO = 967


@dataclass(frozen=True)
class Batches:
    runner: ReportBatch
    random_id: str  # RANDOM weights, target espresso, --metrics deletion
    file_id: str  # weights from a file, top-1 explained, no metrics


@pytest.fixture(scope="module")
def batches(tmp_path_factory: pytest.TempPathFactory) -> Batches:
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("says-what-it-shows")
    _write_image(root / "images" / "cup.png", seed=7)
    (root / "asked.csv").write_text("id,image_uri,target\ncup,images/cup.png,espresso\n")
    (root / "plain.csv").write_text("id,image_uri\ncup,images/cup.png\n")
    weights = root / "deit.safetensors"
    save_file(timm.create_model(MODEL).state_dict(), weights)
    env = {
        "VITSCOPE_DATABASE_URL": f"sqlite:///{root / 'vitscope.db'}",
        "VITSCOPE_STORAGE_URL": (root / "results").as_uri(),
        "COLUMNS": "200",
    }
    runner = ReportBatch(root, env, "", "")
    ids = []
    for csv, options in (
        ("asked.csv", ["--weights", "random", "--metrics", "deletion"]),
        ("plain.csv", ["--weights", str(weights)]),
    ):
        result = runner.invoke("submit", str(root / csv), "--local", "--models", MODEL, *options)
        assert result.exit_code == 0, result.output
        ids.append(result.stdout.strip().splitlines()[-1])
    return Batches(runner, *ids)


def _report(batches: Batches, batch_id: str, out: Path) -> str:
    result = batches.runner.invoke("report", batch_id, "--out", str(out))
    assert result.exit_code == 0, result.output
    return (out / "index.html").read_text()


def _entry(batches: Batches, batch_id: str) -> ImageEntry:
    db = open_database(Settings(database_url=batches.runner.env["VITSCOPE_DATABASE_URL"]))
    try:
        with db.session() as session:
            (entry,) = iter_images(session, Selection(batch_id, states=(JobState.SUCCEEDED,)))
    finally:
        db.dispose()
    return entry


def test_random_weights_get_a_banner_over_the_whole_report(batches: Batches, tmp_path: Path) -> None:
    page = _report(batches, batches.random_id, tmp_path / "random")
    (banner,) = re.findall(r'<p class="banner random" role="alert">(.*?)</p>', page, flags=re.S)
    assert "RANDOM weights" in banner
    assert MODEL in banner
    assert page.index("banner random") < page.index('<article class="image"')  # before any card
    assert "banner random" not in _report(batches, batches.file_id, tmp_path / "file")


def test_settings_are_written_as_words_not_a_dict(batches: Batches, tmp_path: Path) -> None:
    page = html.unescape(_report(batches, batches.random_id, tmp_path))
    (settings,) = re.findall(r'<p class="meta settings">settings: (.*?)</p>', page, flags=re.S)
    for words in (
        "discard ratio 0.9",
        "head fusion mean",
        "raw attention no",
        "top-k 5",
        "layer scores query_max",
        "metrics deletion (deletion baseline",
    ):
        assert words in settings, words
    assert not re.search(r"[{}\[\]']|True|False|None", settings), settings


def test_each_card_shows_its_jobs_metric_values(batches: Batches, tmp_path: Path) -> None:
    page = _report(batches, batches.random_id, tmp_path / "random")
    (table,) = re.findall(r'<table class="metrics">(.*?)</table>', page, flags=re.S)
    methods = re.findall(r"<th>([a-z_]+)</th>", table.split("</thead>")[0])[1:]  # after "metric"
    assert methods == ["rollout", "grad_rollout", "relevance", "last_layer_score", "random"]
    shown = {
        metric: re.findall(r"<td>([\d.]*)</td>", cells)
        for metric, cells in re.findall(r'<tr><th title="[^"]*">(\w+)</th>(.*?)</tr>', table, flags=re.S)
    }
    db = open_database(Settings(database_url=batches.runner.env["VITSCOPE_DATABASE_URL"]))
    with db.engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT method, metric, value FROM job_metrics WHERE batch_id = :b"),
            {"b": batches.random_id},
        ).all()
    db.dispose()
    assert {metric for _, metric, _ in stored} == set(shown) == {"deletion_auc", "entropy"}
    for method, metric, value in stored:
        assert shown[metric][methods.index(method)] == f"{value:.3f}", (method, metric)
    assert '<table class="metrics">' not in _report(batches, batches.file_id, tmp_path / "file")


def _titles(figure) -> dict[str, str]:
    """The panel titles of a figure by method (its second line), without the colour bar's axes."""
    panels = [ax for ax in figure.axes if ax.get_label() != "<colorbar>" and ax.get_title()]
    return {ax.get_title().split("\n")[1]: ax.get_title() for ax in panels}


def test_gradient_panels_name_the_class_they_explain_when_it_is_not_the_prediction(batches: Batches) -> None:
    plot = figures._plotting()
    entry = _entry(batches, batches.random_id)
    (job,) = entry.jobs
    top1 = job["predictions"][0]
    assert job["target_index"] == ESPRESSO != top1["index"]
    titles = _titles(figures._panels_figure(plot, entry, entry.jobs))
    predicted = f"predicted: {top1['label'].split(',')[0]}"
    for method in ("gradient rollout", "relevance"):
        assert "explains: espresso (the target)" in titles[method]
        assert predicted in titles[method]
    for method in ("input", "rollout"):
        assert "explains" not in titles[method]
        assert predicted in titles[method]
    plain = _entry(batches, batches.file_id)
    assert not any(
        "explains" in title for title in _titles(figures._panels_figure(plot, plain, plain.jobs)).values()
    )


def test_random_weights_are_marked_and_every_figure_has_a_colour_bar(batches: Batches) -> None:
    plot = figures._plotting()
    for batch_id, random in ((batches.random_id, True), (batches.file_id, False)):
        entry = _entry(batches, batch_id)
        (job,) = entry.jobs
        for figure in (
            figures._panels_figure(plot, entry, entry.jobs),
            figures._layer_grid_figure(plot, entry, job),
        ):
            bars = [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]
            assert len(bars) == 1
            assert bars[0].get_ylim() == (0.0, 1.0)
            assert ("RANDOM weights (untrained)" in figure.get_suptitle()) is random
        panels = _titles(figures._panels_figure(plot, entry, entry.jobs))
        assert all((f"{MODEL} · RANDOM weights" in title) is random for title in panels.values())


def test_the_figures_command_draws_them(batches: Batches, tmp_path: Path) -> None:
    result = batches.runner.invoke("figures", batches.random_id, "--out", str(tmp_path), "--no-pdf")
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        f"fig4_1-row2-cup-{MODEL}.png",
        "fig4_2-row2-cup.png",
    ]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAYOUT = """
() => {
    const box = (selector) => document.querySelector(selector).getBoundingClientRect();
    const pictures = box("section.job .pictures"), facts = box("section.job .facts");
    const grid = box("section.job figure.grid");
    return {picturesBottom: pictures.bottom, factsTop: facts.top, gridTop: grid.top, gridBottom: grid.bottom,
            gridLeft: grid.left, picturesRight: pictures.right};
}
"""


@pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium: the layout is measured in a browser")
def test_the_facts_sit_under_the_pictures_beside_the_layer_grid(batches: Batches, tmp_path: Path) -> None:
    """No blank band under the pictures while the taller layer grid ends: the facts fill it."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (the test extra)"
    )
    _report(batches, batches.random_id, tmp_path)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto((tmp_path / "index.html").as_uri())
            page.evaluate("() => Promise.all([...document.images].map((i) => i.decode().catch(() => null)))")
            layout = page.evaluate(LAYOUT)
        finally:
            browser.close()
    assert layout["gridLeft"] >= layout["picturesRight"]  # the grid beside the pictures
    assert layout["gridTop"] < layout["picturesBottom"]
    assert layout["factsTop"] - layout["picturesBottom"] < 40  # the facts right under the pictures
    assert layout["factsTop"] < layout["gridBottom"]  # ... beside the grid, not below it
