"""Write a batch's report: static HTML pages of image cards, a summary, and the assets they need.

The folder is self-contained (no server, no CDN, no network): ``index.html`` holds the summary and
the first page of images, ``page-2.html`` … the rest, ``assets/`` the stylesheet and the filter
script, and ``img/`` the copied pictures (unless they are linked; see ``links.py``). Images are read
from the database as a stream and written a page at a time, so memory stays bounded by ``per_page``
however large the batch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import sqlalchemy as sa
from sqlalchemy.orm import Session

from common.db import Database
from common.db.batches import get_batch
from common.db.models import Batch, Job, JobState
from common.modelspec import RANDOM
from common.storage.uri import uri_scheme
from producer.site.links import MAX_PRESIGN_SECONDS, LinkMode, make_links
from producer.site.present import (
    RANDOM_SOURCE,
    STATE_FILTERS,
    ImageCard,
    hide_local_paths,
    image_card,
    settings_text,
)
from producer.site.sections import Section, summary_sections
from producer.site.selection import Selection, count_images, image_name, iter_images
from producer.terminal_text import show_controls

__all__ = ["ReportOptions", "ReportSummary", "page_file", "write_report"]

ASSETS = ("report.css", "report.js")
# Every image's name, id and page, so the search box finds images on other pages too. A script, not
# JSON: pages opened from disk (file://) may load scripts but not fetch files.
SEARCH_INDEX = "search-index.js"
# Page links shown around the current one in the navigation; the first and last are always shown.
_NAV_WINDOW = 3


@dataclass(frozen=True)
class ReportOptions:
    """What goes in (``selection`` fields) and how it is written."""

    models: tuple[str, ...] | None = None
    states: tuple[JobState, ...] | None = None
    limit: int | None = None
    per_page: int = 50
    links: LinkMode = LinkMode.COPY
    expires_seconds: int = MAX_PRESIGN_SECONDS

    def __post_init__(self) -> None:
        if self.per_page < 1:
            raise ValueError(f"--per-page must be at least 1, got {self.per_page}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")


@dataclass(frozen=True)
class ReportSummary:
    """What was written: counts, and where to open it."""

    index: Path
    pages: int
    images: int
    jobs: int


def page_file(number: int) -> str:
    """Page 1 is ``index.html`` (it opens first); page n is ``page-n.html``."""
    return "index.html" if number == 1 else f"page-{number}.html"


def _environment() -> jinja2.Environment:
    # Autoescaping everywhere: image names, labels and error messages come from users' data. The
    # template also isolates each such text from the page's direction (<bdi>) and shows its control
    # and bidi-override characters (the ``visible`` filter): "\u202egnp.exe" must not read "exe.png",
    # nor a batch name with U+202E reverse the header line around it.
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("producer.site", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["visible"] = lambda text: (
        "" if text is None else show_controls(str(text), newlines=True)
    )
    return environment


def _copy_assets(out: Path) -> None:
    folder = out / "assets"
    folder.mkdir(parents=True, exist_ok=True)
    source = resources.files("producer.site") / "assets"
    for name in ASSETS:
        (folder / name).write_bytes((source / name).read_bytes())


class _SearchIndex:
    """``window.vitscopeIndex = [[name, id, page, line], …]``, appended to as the pages are written."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _SearchIndex:
        self._file = self.path.open("w", encoding="utf-8")
        self._file.write('"use strict";\nwindow.vitscopeIndex = [\n')
        return self

    def add(self, card: ImageCard, page: str) -> None:
        # "<" escaped: the names are users' text, and stay inert even if this is ever inlined in a page.
        names = [show_controls(card.name), show_controls(card.row_id)]  # shown as link text
        entry = json.dumps([*names, page, card.row]).replace("<", "\\u003c")
        self._file.write(entry + ",\n")

    def __exit__(self, *exc: object) -> None:
        self._file.write("];\n")
        self._file.close()


def _nav(number: int, pages: int) -> list[dict[str, Any]]:
    """Links to the first, last and nearby pages, with ``None`` standing for a gap."""
    shown = sorted({1, pages, *range(max(1, number - _NAV_WINDOW), min(pages, number + _NAV_WINDOW) + 1)})
    items: list[dict[str, Any]] = []
    for previous, page in zip([0, *shown], shown, strict=False):
        if page - previous > 1:
            items.append({"gap": True})
        items.append({"gap": False, "number": page, "file": page_file(page), "current": page == number})
    return items


@dataclass(frozen=True)
class _Context:
    """What every page shares: the batch, the selection, the summary and the filter choices."""

    batch: dict[str, str]
    random_models: list[str]  # models of the batch that ran with RANDOM weights: a banner says so
    models: list[str]
    sections: list[Section]
    pages: int
    images: int
    generated: str


def _random_models(session: Session, batch: Batch) -> list[str]:
    """The batch's models whose weights were RANDOM: asked for (``--weights random``, a models file,
    the offline fallback, all recorded in the batch's specs) or recorded so by a job that ran."""
    specs = (batch.models or {}).get("specs") or {}
    asked = {name for name, spec in specs.items() if spec.get("weights") == RANDOM}
    ran = session.scalars(
        sa.select(Job.model)
        .where(Job.batch_id == batch.id, Job.weights_source.like(f"{RANDOM_SOURCE}%"))
        .distinct()
    )
    return sorted(asked | set(ran))


def _batch_info(db: Database, batch_ref: str) -> tuple[str, list[str], dict[str, str]]:
    with db.session() as session:
        batch = get_batch(session, batch_ref)
        return (
            batch.id,
            _random_models(session, batch),
            {
                "id": batch.id,
                "name": batch.name or "",
                "created": batch.created_at.strftime("%Y-%m-%d %H:%M UTC"),
                "mode": batch.mode,
                # The dataset's own path: its file name only, whatever its folders (spaces included).
                "source": _file_name(batch.source),
                "settings": settings_text(batch.settings),
            },
        )


def _file_name(source: str | None) -> str:
    """The file name of a dataset path or URI (``…/alice home/secret project/sp.csv`` -> ``…/sp.csv``)."""
    if not source:
        return ""
    scheme = uri_scheme(source)
    if scheme == "":
        return "…/" + Path(source).name
    if scheme == "file":
        return "…/" + image_name(source)
    return hide_local_paths(source)


def write_report(
    db: Database,
    batch_ref: str,
    out: Path,
    options: ReportOptions,
    *,
    on_start: Callable[[int], None] | None = None,
    on_image: Callable[[], None] | None = None,
) -> ReportSummary:
    """Write the report of batch ``batch_ref`` (id or name) into ``out``; ``on_*`` drive a progress bar.

    ``on_start`` gets the number of images before any page is written; ``on_image`` is called once
    each image's pictures are in place (its page is written when full).
    """
    batch_id, random_models, batch = _batch_info(db, batch_ref)
    selection = Selection(batch_id, options.models, options.states, options.limit)
    links = make_links(options.links, out, expires_seconds=options.expires_seconds)
    with db.session() as session:
        selection = selection.resolve(session)
        images = count_images(session, selection)
        sections = summary_sections(session, selection)
        jobs = session.scalar(sa.select(sa.func.count()).where(*selection.where())) or 0
        models = list(
            session.scalars(sa.select(Job.model).where(*selection.where()).distinct().order_by(Job.model))
        )
    pages = max(1, math.ceil(images / options.per_page))
    context = _Context(
        batch=batch,
        random_models=random_models,
        models=models,
        sections=sections,
        pages=pages,
        images=images,
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    out.mkdir(parents=True, exist_ok=True)
    _copy_assets(out)
    template = _environment().get_template("page.html")
    if on_start is not None:
        on_start(images)

    def write_page(number: int, cards: list[ImageCard], first: int) -> None:
        html = template.render(
            ctx=context,
            number=number,
            cards=cards,
            first=first,
            nav=_nav(number, pages),
            prev_file=page_file(number - 1) if number > 1 else None,
            next_file=page_file(number + 1) if number < pages else None,
            classes=sorted({job.top1 for card in cards for job in card.jobs if job.top1}),
            states=STATE_FILTERS,
        )
        (out / page_file(number)).write_text(html, encoding="utf-8")

    number, cards, first = 1, [], 1
    with db.session() as session, _SearchIndex(out / "assets" / SEARCH_INDEX) as index:
        for entry in iter_images(session, selection):
            card = image_card(entry, links)
            cards.append(card)
            index.add(card, page_file(number))
            if on_image is not None:
                on_image()
            if len(cards) == options.per_page:
                write_page(number, cards, first)
                number, cards, first = number + 1, [], first + options.per_page
    if cards or number == 1:
        write_page(number, cards, first)
    else:
        number -= 1
    _remove_stale_pages(out, number)
    return ReportSummary(index=out / "index.html", pages=number, images=images, jobs=jobs)


def _remove_stale_pages(out: Path, pages: int) -> None:
    """Delete pages past the last one written, left by an earlier, longer report into the same folder."""
    for path in out.glob("page-*.html"):
        number = path.stem.removeprefix("page-")
        if number.isdigit() and int(number) > pages:
            path.unlink()
