"""``producer figures``: the paper's Figures 4.1-4.3 drawn from a finished batch, as PNG (and PDF).

    Fig. 4.1      the per-layer score grid: one panel per block, from ``layer_scores.npy``
    Figs. 4.2-4.3 one row per model, one panel per method: the input crop, rollout, gradient rollout
                  and relevance overlays (the stored PNGs), titled with model, method and prediction;
                  the gradient panels also name the class they explain when it is not the prediction

Both carry a colour bar of the jet scale, and say so in their titles when a model ran with RANDOM
(untrained) weights: such a figure must not pass for a trained model's attention.

Nothing is recomputed: the figures show exactly what the workers stored. Every title is drawn with
``parse_math=False``: image names, ids, labels and model names are users' text, and matplotlib
would otherwise read ``$…$`` in them as mathtext (``cost$\\foo$.png`` aborted the command).
matplotlib, numpy and Pillow come with the ``report`` extra (``pip install 'vitscope[report]'``),
not with the producer's base install, so they are imported when a figure is drawn and their
absence is a clear error. Only matplotlib's object API is used (``Figure``, no pyplot): no global
state, no display needed.
"""

from __future__ import annotations

import io
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from common.artifacts import PANELS, PictureArtifact
from common.db import Database
from common.db.batches import get_batch
from common.db.models import JobState
from common.errors import MissingDependencyError, NotFoundError
from common.storage import read_uri
from producer.site.present import is_random
from producer.site.selection import ImageEntry, Selection, iter_images

__all__ = ["FigureOptions", "write_figures"]

_DPI = 120
_RANDOM_NOTE = "RANDOM weights (untrained): not what a trained model sees"


@dataclass(frozen=True)
class FigureOptions:
    """Which images (CSV ids or file names; else the first ``first``), which models, and PDF too or not."""

    images: tuple[str, ...] | None = None
    first: int = 4
    models: tuple[str, ...] | None = None
    pdf: bool = True

    def __post_init__(self) -> None:
        if self.first < 1:
            raise ValueError(f"--first must be at least 1, got {self.first}")


@dataclass(frozen=True)
class _Plotting:
    figure: Any  # matplotlib.figure.Figure
    np: ModuleType
    image: ModuleType  # PIL.Image
    jet: Any  # a matplotlib ScalarMappable of jet over [0, 1], for the colour bars


def _plotting() -> _Plotting:
    """matplotlib, numpy and Pillow, or ``MissingDependencyError`` saying how to install them."""
    try:
        import numpy
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
        from PIL import Image
    except ImportError as exc:
        missing = (exc.name or str(exc)).split(".")[0]
        raise MissingDependencyError(
            f"producer figures needs matplotlib, numpy and pillow ({missing} is missing): "
            "install them with pip install 'vitscope[report]'"
        ) from None
    return _Plotting(Figure, numpy, Image, ScalarMappable(Normalize(0.0, 1.0), "jet"))


def _slug(text: str) -> str:
    """A file-name-safe ASCII form of an image name or model ("chat_été.png" -> "chat_ete").

    Accents are dropped (NFKD, then ASCII); whatever else is not a letter, digit, "_" or "-" becomes
    "_". The CSV line number in front keeps two images that slug alike apart.
    """
    stem = text.rsplit(".", 1)[0] if "." in text else text
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_stem).strip("_")[:60] or "image"


def _choose(db: Database, batch_id: str, options: FigureOptions) -> list[ImageEntry]:
    """The images to draw, with their succeeded jobs: the named ones (all must exist) or the first N."""
    selection = Selection(batch_id, options.models, (JobState.SUCCEEDED,))
    wanted = set(options.images or ())
    chosen: list[ImageEntry] = []
    with db.session() as session:
        for entry in iter_images(session, selection):
            if wanted:
                names = {entry.name, entry.row_id} & wanted
                if names:
                    chosen.append(entry)
                    wanted -= names
                    if not wanted:
                        break
            else:
                chosen.append(entry)
                if len(chosen) == options.first:
                    break
    if wanted:
        raise NotFoundError(
            f"no succeeded job for image(s) {', '.join(sorted(wanted))} in batch {batch_id} "
            "(give CSV ids or file names)"
        )
    if not chosen:
        raise NotFoundError(f"batch {batch_id} has no succeeded jobs to draw")
    return chosen


def _prediction(job: dict[str, Any], width: int = 60) -> str:
    """The top-1 class and its probability, the label cut to ``width`` characters to fit a title."""
    if not job["predictions"]:
        return "no prediction"
    top = job["predictions"][0]
    label = (top["label"] or "").split(",")[0].strip() or f"class {top['index']}"
    if len(label) > width:
        label = label[: width - 1] + "…"
    return f"{label} ({100 * top['prob']:.1f} %)"


def _explained(job: dict[str, Any]) -> str | None:
    """The class the gradient maps explain when it is not the top-1 prediction (a CSV target), named
    as the predictions name it, else as the CSV gave it, else by index; ``None`` when they explain
    the prediction itself."""
    index = job["target_index"]
    predictions = job["predictions"]
    if index is None or (predictions and predictions[0]["index"] == index):
        return None
    named = next((p for p in predictions if p["index"] == index and p["label"]), None)
    asked = (job["target"] or "").strip()
    if named is not None:
        label = named["label"].split(",")[0].strip()
    elif asked and not asked.lstrip("+-").isdigit():
        label = asked
    else:
        label = f"class {index}"
    return f"{label} (the target)"


def _panel_title(job: dict[str, Any], panel: PictureArtifact) -> str:
    """Model, method, and what the panel shows: the prediction, and for a gradient map of another
    class than the predicted one, that class first."""
    model = f"{job['model']} · RANDOM weights" if is_random(job) else job["model"]
    explained = _explained(job) if panel.explains_target else None
    shows = f"explains: {explained}\n" if explained else ""
    return f"{model}\n{panel.title}\n{shows}predicted: {_prediction(job, 30)}"


def _save(figure: Any, path: Path, pdf: bool) -> list[Path]:
    figure.savefig(path, dpi=_DPI, bbox_inches="tight")
    written = [path]
    if pdf:
        figure.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
        written.append(path.with_suffix(".pdf"))
    return written


def _layer_grid(plot: _Plotting, entry: ImageEntry, job: dict[str, Any], path: Path, pdf: bool) -> list[Path]:
    return _save(_layer_grid_figure(plot, entry, job), path, pdf)


def _layer_grid_figure(plot: _Plotting, entry: ImageEntry, job: dict[str, Any]) -> Any:
    """Fig. 4.1: one jet panel per block, each min-max scaled on its own (as the worker's PNG)."""
    np = plot.np
    scores = np.load(io.BytesIO(read_uri(job["artifacts"]["layer_scores.npy"])), allow_pickle=False)
    L = scores.shape[0]
    rows = math.isqrt(L)
    cols = math.ceil(L / rows)
    figure = plot.figure(figsize=(2.0 * cols, 2.1 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    for block, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if block >= L:
            continue
        panel = scores[block].astype(np.float64)
        spread = panel.max() - panel.min()
        normalized = (panel - panel.min()) / spread if spread > 0 else np.zeros_like(panel)
        ax.imshow(normalized, cmap="jet", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"block {block}", fontsize=9, parse_math=False)
    figure.colorbar(plot.jet, ax=axes, shrink=0.6, label="score (each block scaled to its own range)")
    random = f"\n{_RANDOM_NOTE}" if is_random(job) else ""
    figure.suptitle(
        f"Per-layer scores · {job['model']} · {entry.name}\npredicted: {_prediction(job)}{random}",
        fontsize=11,
        parse_math=False,
    )
    return figure


def _panels(
    plot: _Plotting, entry: ImageEntry, jobs: list[dict[str, Any]], path: Path, pdf: bool
) -> list[Path]:
    return _save(_panels_figure(plot, entry, jobs), path, pdf)


def _panels_figure(plot: _Plotting, entry: ImageEntry, jobs: list[dict[str, Any]]) -> Any:
    """Figs. 4.2-4.3: a row per model; input, rollout, gradient rollout and relevance side by side."""
    figure = plot.figure(figsize=(3.0 * len(PANELS) + 0.8, 3.5 * len(jobs) + 0.5), layout="constrained")
    axes = figure.subplots(len(jobs), len(PANELS), squeeze=False)
    for row, job in zip(axes, jobs, strict=True):
        for ax, panel in zip(row, PANELS, strict=True):
            ax.set_axis_off()
            ax.set_title(_panel_title(job, panel), fontsize=8, parse_math=False)
            uri = job["artifacts"].get(panel.name)
            if uri is None:  # batches from before input.png was stored
                ax.text(
                    0.5,
                    0.5,
                    f"{panel.title}\nnot stored",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    parse_math=False,
                )
                continue
            picture = plot.np.asarray(plot.image.open(io.BytesIO(read_uri(uri))).convert("RGB"))
            # Nearest: every figure pixel is a stored pixel, no smoothing of the maps.
            ax.imshow(picture, interpolation="nearest")
    # The input column has no scale; the bar spans the three map columns.
    figure.colorbar(plot.jet, ax=axes[:, 1:], shrink=0.8, label="map value (0 = least, 1 = most)")
    title = f"{entry.name}" + (f" (id {entry.row_id})" if entry.row_id else "")
    random = sorted(job["model"] for job in jobs if is_random(job))
    if random:
        title += f"\n{_RANDOM_NOTE}: {', '.join(random)}"
    figure.suptitle(title, fontsize=11, parse_math=False)
    return figure


def write_figures(db: Database, batch_ref: str, out: Path, options: FigureOptions) -> list[Path]:
    """Draw the figures of the chosen images of batch ``batch_ref`` into ``out``; the files written."""
    plot = _plotting()
    with db.session() as session:
        batch_id = get_batch(session, batch_ref).id
    entries = _choose(db, batch_id, options)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for entry in entries:
        stem = f"row{entry.row}-{_slug(entry.name)}"
        for job in entry.jobs:
            if "layer_scores.npy" in job["artifacts"]:
                grid = out / f"fig4_1-{stem}-{_slug(job['model'])}.png"
                written += _layer_grid(plot, entry, job, grid, options.pdf)
        written += _panels(plot, entry, entry.jobs, out / f"fig4_2-{stem}.png", options.pdf)
    return written
