"""``producer report`` on real batches: what the pages show, what they link to, and what goes in."""

from __future__ import annotations

import io
import re
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
import sqlalchemy as sa
from PIL import Image

from common.db import open_database
from common.db.models import Base
from common.db.session import upgrade
from common.settings import Settings
from producer.site.present import hide_local_paths
from producer.site.selection import Selection, iter_images
from tests.producer.conftest import HOSTILE_ID, MODELS, NON_ASCII, ReportBatch

DEIT, VIT = MODELS


@dataclass
class Job:
    model: str
    state: str
    images: list[str] = field(default_factory=list)
    text: str = ""


@dataclass
class Card:
    name: str
    row_id: str
    jobs: list[Job] = field(default_factory=list)


class _Page(HTMLParser):
    """The cards of a report page as the browser would build them: articles, job sections, images."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[Card] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._job: Job | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "article":
            self.cards.append(Card(a["data-name"] or "", a["data-id"] or ""))
        elif tag == "section" and "data-model" in a:
            self._job = Job(a["data-model"] or "", a["data-state"] or "")
            self.cards[-1].jobs.append(self._job)
        elif tag == "img":
            self.images.append(a["src"] or "")
            if self._job is not None:
                self._job.images.append(a["src"] or "")
        elif tag == "a":
            self.links.append(a["href"] or "")
        elif tag == "table" and "section" in (a.get("class") or ""):
            self.tables.append([])
        elif tag == "tr" and self.tables and self._job is None:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._job = None
        elif tag in ("td", "th") and self._cell is not None:
            if self._job is None and self.tables:
                self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._job is not None:
            self._job.text += data
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def write(batch: ReportBatch, out: Path, *args: str, batch_id: str | None = None):
    return batch.invoke("report", batch_id or batch.batch_id, "--out", str(out), *args)


def test_the_report_shows_every_image_and_model_with_maps_predictions_target_and_state(
    report_batch: ReportBatch, tmp_path: Path
) -> None:
    out = tmp_path / "site"
    result = write(report_batch, out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out / "index.html")
    page = parse(out / "index.html")

    assert [(c.name, c.row_id) for c in page.cards] == [
        ("cat.png", HOSTILE_ID),
        (NON_ASCII, "été"),
        ("broken.png", "broken"),
    ]
    for card in page.cards:
        assert [job.model for job in card.jobs] == list(MODELS)
    cat, ete, broken = page.cards
    for job in (*cat.jobs, *ete.jobs):
        assert job.state == "succeeded"
        assert len(job.images) == 5  # input, rollout, gradient rollout, relevance, layer grid
        assert "target explained" in job.text
        assert "the top-1" in job.text
        assert len(re.findall(r"\d+\.\d %", job.text)) == 5  # the top-5 with probabilities
    for job in broken.jobs:
        assert job.state == "failed"
        assert job.images == []
        assert "reason: ImageError: not an image" in job.text

    assert len(page.images) == 20
    for src in page.images:
        assert not re.match(r"^[a-z]+:|^/", src), src  # relative: the folder can be moved
        with Image.open(out / src) as picture:
            assert picture.width > 0
    inputs = [out / job.images[0] for job in cat.jobs]
    with Image.open(inputs[0]) as picture:
        assert picture.size == (224, 224)


def test_the_summary_counts_jobs_per_model_and_top1_agreement(
    report_batch: ReportBatch, tmp_path: Path
) -> None:
    assert write(report_batch, tmp_path / "a").exit_code == 0
    models, agreement = parse(tmp_path / "a" / "index.html").tables
    header, *rows = models
    assert header[:6] == ["model", "jobs", "succeeded", "reused", "failed", "pending"]
    assert [row[:6] for row in rows] == [[m, "3", "2", "0", "1", "0"] for m in MODELS]
    assert all(float(cell) > 0 for row in rows for cell in row[6:9])  # mean seconds per stage
    (_, (a, b, images, agree, rate)) = agreement
    assert (a, b, images) == (DEIT, VIT, "2")
    assert rate == f"{100 * int(agree) / 2:.1f} %"

    assert write(report_batch, tmp_path / "b", batch_id=report_batch.reused_batch_id).exit_code == 0
    page = parse(tmp_path / "b" / "index.html")
    (_, row), *_ = page.tables
    assert row[:6] == [DEIT, "3", "0", "2", "1", "0"]
    assert [job.state for card in page.cards for job in card.jobs] == ["reused", "reused", "failed"]


def test_user_text_is_escaped_and_no_local_path_is_written(report_batch: ReportBatch, tmp_path: Path) -> None:
    out = tmp_path / "site"
    assert write(report_batch, out, "--per-page", "2").exit_code == 0
    written = [p for p in out.rglob("*") if p.suffix in (".html", ".js", ".css")]
    assert {p.name for p in written} >= {"index.html", "page-2.html", "search-index.js", "report.js"}
    for text_file in written:
        html = text_file.read_text(encoding="utf-8")
        assert str(report_batch.root) not in html
        assert str(tmp_path) not in html
        assert "file:" not in html
        assert "<script>window.__pwned" not in html
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "cat&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in index
    assert NON_ASCII in index


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("ImageError: no such image: file:///home/u/data/a%20b.png", "ImageError: no such image: …/a b.png"),
        ("no such file: /srv/x/photos/cat.jpg", "no such file: …/cat.jpg"),
        ("cannot read '/tmp/pytest-1/images/cat.png'", "cannot read '…/cat.png'"),
        ("no such key s3://bucket/a/b.png", "no such key s3://bucket/a/b.png"),
        ("HTTP 404 for https://example.org/a/b.png", "HTTP 404 for https://example.org/a/b.png"),
        ("ratio 1/2 and/or 3/4", "ratio 1/2 and/or 3/4"),
    ],
)
def test_local_paths_are_cut_to_file_names(text: str, shown: str) -> None:
    assert hide_local_paths(text) == shown


def test_pages_hold_per_page_images_and_link_each_other(report_batch: ReportBatch, tmp_path: Path) -> None:
    out = tmp_path / "site"
    assert write(report_batch, out, "--per-page", "1").exit_code == 0
    assert sorted(p.name for p in out.glob("*.html")) == ["index.html", "page-2.html", "page-3.html"]
    pages = [parse(out / name) for name in ("index.html", "page-2.html", "page-3.html")]
    assert [[c.row_id for c in p.cards] for p in pages] == [[HOSTILE_ID], ["été"], ["broken"]]
    assert len(pages[0].tables) == 2  # the summary is on the first page only
    assert pages[1].tables == []
    files = ["index.html", "page-2.html", "page-3.html"]
    for current, page in zip(files, pages, strict=True):
        assert set(page.links) == set(files) - {current}  # the current page is not a link

    assert write(report_batch, out, "--per-page", "2").exit_code == 0  # the same folder, fewer pages
    assert sorted(p.name for p in out.glob("*.html")) == ["index.html", "page-2.html"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--limit", "2"], {"cat.png": list(MODELS), NON_ASCII: list(MODELS)}),
        (["--state", "failed"], {"broken.png": list(MODELS)}),
        (["--models", VIT, "--state", "succeeded"], {"cat.png": [VIT], NON_ASCII: [VIT]}),
        (["--models", DEIT, "--limit", "1"], {"cat.png": [DEIT]}),
    ],
)
def test_models_state_and_limit_select_what_goes_in(
    report_batch: ReportBatch, tmp_path: Path, args: list[str], expected: dict[str, list[str]]
) -> None:
    assert write(report_batch, tmp_path, *args).exit_code == 0
    page = parse(tmp_path / "index.html")
    assert {card.name: [job.model for job in card.jobs] for card in page.cards} == expected
    (_, *rows), *_ = page.tables
    assert sum(int(row[1]) for row in rows) == sum(len(models) for models in expected.values())


def test_bad_selections_are_refused(report_batch: ReportBatch, tmp_path: Path) -> None:
    for args, message in [
        (["--state", "done"], "unknown --state done"),
        (["--per-page", "0"], "--per-page must be at least 1"),
        (["--links", "presigned"], "--links presigned needs s3:// storage"),
    ]:
        result = write(report_batch, tmp_path / "x", *args)
        assert result.exit_code == 2
        assert message in result.output
    assert report_batch.invoke("report", "nope", "--out", str(tmp_path)).exit_code == 2


def test_relative_links_point_at_local_storage_without_copying(
    report_batch: ReportBatch, tmp_path: Path
) -> None:
    out = tmp_path / "deep" / "site"
    assert write(report_batch, out, "--links", "relative").exit_code == 0
    page = parse(out / "index.html")
    assert len(page.images) == 20
    assert not (out / "img").exists()
    for src in page.images:
        assert src.startswith("../")
        assert (out / urllib.request.url2pathname(src)).resolve().is_file()


def test_images_stream_in_csv_order_whatever_the_page_size(report_batch: ReportBatch) -> None:
    db = open_database(Settings(database_url=report_batch.env["VITSCOPE_DATABASE_URL"]))
    with db.session() as session:
        selection = Selection(report_batch.batch_id)
        one = [(e.row, [j["model"] for j in e.jobs]) for e in iter_images(session, selection, page_size=1)]
        many = [(e.row, [j["model"] for j in e.jobs]) for e in iter_images(session, selection, page_size=500)]
    db.dispose()
    assert one == many == [(2, list(MODELS)), (3, list(MODELS)), (4, list(MODELS))]


def _strip_time(html: str) -> str:
    return re.sub(r"written \d{4}-\d\d-\d\d \d\d:\d\d UTC", "", html)


def test_postgresql_gives_the_same_report(
    report_batch: ReportBatch, postgres_url: str, tmp_path: Path
) -> None:
    """The report's SQL (grouping, keyset paging, the agreement self-join) read from PostgreSQL."""
    upgrade(postgres_url)
    source = sa.create_engine(report_batch.env["VITSCOPE_DATABASE_URL"])
    target = sa.create_engine(postgres_url)
    with source.connect() as read, target.begin() as write_to:
        for table in Base.metadata.sorted_tables:
            rows = [dict(row._mapping) for row in read.execute(table.select())]
            if rows:
                write_to.execute(table.insert(), rows)
    source.dispose()
    target.dispose()

    assert write(report_batch, tmp_path / "sqlite").exit_code == 0
    on_postgres = ReportBatch(
        report_batch.root,
        {**report_batch.env, "VITSCOPE_DATABASE_URL": postgres_url},
        report_batch.batch_id,
        report_batch.reused_batch_id,
    )
    assert write(on_postgres, tmp_path / "pg").exit_code == 0
    for name in ("index.html",):
        assert _strip_time((tmp_path / "pg" / name).read_text()) == _strip_time(
            (tmp_path / "sqlite" / name).read_text()
        )


def test_presigned_links_against_an_s3_endpoint(s3_bucket: str, tmp_path: Path, write_image) -> None:
    write_image(tmp_path / "one.png", seed=1)
    (tmp_path / "data.csv").write_text("image_uri\none.png\n")
    env = {
        "VITSCOPE_DATABASE_URL": f"sqlite:///{tmp_path / 's3.db'}",
        "VITSCOPE_STORAGE_URL": f"s3://{s3_bucket}/runs",
        # Presigned links need an object per picture: a member of a shard (S3's default layout) is
        # refused with the reason (tests/worker/test_shards.py).
        "VITSCOPE_ARTIFACT_LAYOUT": "objects",
    }
    batch = ReportBatch(tmp_path, env, "", "")
    submitted = batch.invoke("submit", str(tmp_path / "data.csv"), "--weights", "random")
    assert submitted.exit_code == 0, submitted.output
    batch_id = submitted.stdout.strip().splitlines()[-1]

    out = tmp_path / "presigned"
    result = write(batch, out, "--links", "presigned", "--expires", "600", batch_id=batch_id)
    assert result.exit_code == 0, result.output
    page = parse(out / "index.html")
    assert len(page.images) == 5
    assert not (out / "img").exists()
    for src in page.images:
        assert src.startswith("http://127.0.0.1:")
        assert "X-Amz-Expires=600" in src
        with urllib.request.urlopen(src, timeout=10) as response:
            picture = Image.open(io.BytesIO(response.read()))
            assert picture.width > 0

    copied = tmp_path / "copied"
    assert write(batch, copied, batch_id=batch_id).exit_code == 0
    assert all((copied / src).is_file() for src in parse(copied / "index.html").images)
    assert write(batch, tmp_path / "r", "--links", "relative", batch_id=batch_id).exit_code == 2


def test_expiry_is_bounded_by_what_s3_allows(report_batch: ReportBatch, tmp_path: Path) -> None:
    result = write(report_batch, tmp_path, "--links", "presigned", "--expires", str(8 * 24 * 3600))
    assert result.exit_code == 2
    assert "--expires must be between 1 and 604800 seconds" in result.output


def test_pages_are_written_while_the_images_stream(report_batch: ReportBatch, tmp_path: Path) -> None:
    """A page is on disk before later images are read: memory holds one page, not the batch."""
    from producer.site import ReportOptions, write_report

    db = open_database(Settings(database_url=report_batch.env["VITSCOPE_DATABASE_URL"]))
    seen: list[list[str]] = []

    def on_disk() -> None:
        seen.append(sorted(p.name for p in tmp_path.glob("*.html")))

    written = write_report(db, report_batch.batch_id, tmp_path, ReportOptions(per_page=1), on_image=on_disk)
    db.dispose()
    assert seen == [[], ["index.html"], ["index.html", "page-2.html"]]
    assert (written.pages, written.images, written.jobs) == (3, 3, 6)
