"""``producer figures``: the paper's Figs. 4.1-4.3 from a real batch, and a clear error without matplotlib."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.db import open_database
from common.settings import Settings
from common.storage import read_uri
from producer.site.selection import Selection, iter_images
from tests.producer.conftest import MODELS, NON_ASCII, ReportBatch

DEIT, VIT = MODELS


def _written(result) -> list[Path]:
    return [Path(line) for line in result.stdout.strip().splitlines()]


def test_named_images_get_a_layer_grid_per_model_and_a_panel_figure(
    report_batch: ReportBatch, tmp_path: Path
) -> None:
    result = report_batch.invoke("figures", report_batch.batch_id, "--out", str(tmp_path), "--images", "été")
    assert result.exit_code == 0, result.output
    names = sorted(path.name for path in _written(result))
    assert names == sorted(
        [
            f"fig4_1-row3-chat_ete-{DEIT}.png",
            f"fig4_1-row3-chat_ete-{DEIT}.pdf",
            f"fig4_1-row3-chat_ete-{VIT}.png",
            f"fig4_1-row3-chat_ete-{VIT}.pdf",
            "fig4_2-row3-chat_ete.png",
            "fig4_2-row3-chat_ete.pdf",
        ]
    )
    for path in _written(result):
        assert path.stat().st_size > 1000
        if path.suffix == ".pdf":
            assert path.read_bytes().startswith(b"%PDF")
    with Image.open(tmp_path / "fig4_2-row3-chat_ete.png") as panels:
        wide, tall = panels.size
    assert wide > 1.5 * tall  # four methods across, two models down


def test_the_panel_figure_shows_the_stored_pictures(report_batch: ReportBatch, tmp_path: Path) -> None:
    """The jet overlay pixels of the stored PNG appear in the figure: nothing is recomputed or lost."""
    result = report_batch.invoke(
        "figures", report_batch.batch_id, "--out", str(tmp_path), "--first", "1", "--models", DEIT, "--no-pdf"
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in _written(result)) == [f"fig4_1-row2-cat-{DEIT}.png", "fig4_2-row2-cat.png"]
    db = open_database(Settings(database_url=report_batch.env["VITSCOPE_DATABASE_URL"]))
    with db.session() as session:
        first = next(iter_images(session, Selection(report_batch.batch_id, models=(DEIT,))))
    db.dispose()
    stored = np.asarray(
        Image.open(io.BytesIO(read_uri(first.jobs[0]["artifacts"]["relevance.png"]))).convert("RGB")
    )
    figure = np.asarray(Image.open(tmp_path / "fig4_2-row2-cat.png").convert("RGB"))
    stored_colours = {tuple(c) for c in stored.reshape(-1, 3)[::97]}
    figure_colours = {tuple(c) for c in figure.reshape(-1, 3)}
    assert len(stored_colours & figure_colours) > 0.9 * len(stored_colours)


def test_unknown_images_and_empty_choices_are_refused(report_batch: ReportBatch, tmp_path: Path) -> None:
    result = report_batch.invoke(
        "figures", report_batch.batch_id, "--out", str(tmp_path), "--images", "été,nope"
    )
    assert result.exit_code == 2
    assert "no succeeded job for image(s) nope" in result.output
    broken = report_batch.invoke(
        "figures", report_batch.batch_id, "--out", str(tmp_path), "--images", "broken"
    )
    assert broken.exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_without_matplotlib_figures_says_how_to_install_it(report_batch: ReportBatch, tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "sys.modules['matplotlib'] = None  # as if not installed: importing it raises ImportError\n"
        "from producer.cli import app\n"
        "app(sys.argv[1:])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "figures", report_batch.batch_id, "--out", str(tmp_path)],
        env={**os.environ, **report_batch.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "pip install 'vitscope[report]'" in result.stderr
    assert "matplotlib" in result.stderr


@pytest.mark.parametrize("image", [NON_ASCII, "été"])
def test_images_are_found_by_file_name_or_csv_id(
    report_batch: ReportBatch, tmp_path: Path, image: str
) -> None:
    result = report_batch.invoke(
        "figures",
        report_batch.batch_id,
        "--out",
        str(tmp_path),
        "--images",
        image,
        "--models",
        VIT,
        "--no-pdf",
    )
    assert result.exit_code == 0, result.output
    assert len(_written(result)) == 2
