"""A real batch to report on, computed once per session by ``producer submit --local`` (random weights).

Two small models over three images: a plain one whose CSV id carries HTML (the report must escape
it), one with a non-ASCII file name, and a broken file that fails its jobs. A second batch over the
same CSV with one model is answered entirely from the first (reused jobs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from common.settings import get_settings
from producer.cli import app

MODELS = ("deit_tiny_patch16_224", "vit_tiny_patch16_224")
HOSTILE_ID = "cat<script>window.__pwned = 1</script>"
NON_ASCII = "chat_été.png"


@dataclass(frozen=True)
class ReportBatch:
    """Where the batches live: the folder, the env that points vitscope there, and the batch ids."""

    root: Path
    env: dict[str, str]
    batch_id: str  # two models × three images, one image broken
    reused_batch_id: str  # the first model again: every readable image reused

    def invoke(self, *args: str):
        return invoke_in(self.env, *args)


def invoke_in(env: dict[str, str], *args: str):
    """``producer ARGS`` with ``env``, settings read afresh before and forgotten after."""
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    finally:
        get_settings.cache_clear()


@pytest.fixture(scope="session")
def report_batch(tmp_path_factory: pytest.TempPathFactory) -> ReportBatch:
    root = tmp_path_factory.mktemp("report-batch")
    _write_image(root / "images" / "cat.png", seed=3)
    _write_image(root / "images" / NON_ASCII, size=(64, 90), seed=5)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    dataset = root / "data.csv"
    dataset.write_text(
        f"id,image_uri\n{HOSTILE_ID},images/cat.png\nété,images/{NON_ASCII}\nbroken,images/broken.png\n",
        encoding="utf-8",
    )
    env = {
        "VITSCOPE_DATABASE_URL": f"sqlite:///{root / 'vitscope.db'}",
        "VITSCOPE_STORAGE_URL": (root / "results").as_uri(),
        "COLUMNS": "200",
    }
    batch = ReportBatch(root, env, "", "")
    first = batch.invoke(
        "submit", str(dataset), "--local", "--weights", "random", "--models", ",".join(MODELS)
    )
    assert first.exit_code == 1, first.output  # the broken image fails; the rest succeeds
    again = batch.invoke("submit", str(dataset), "--local", "--weights", "random", "--models", MODELS[0])
    assert again.exit_code == 1, again.output
    return ReportBatch(
        root, env, first.stdout.strip().splitlines()[-1], again.stdout.strip().splitlines()[-1]
    )


def _write_image(path: Path, *, size: tuple[int, int] = (96, 80), seed: int = 0) -> None:
    """A small photo-like image (gradients plus noise); the root ``write_image`` is per test only."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
