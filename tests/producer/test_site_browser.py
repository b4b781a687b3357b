"""The report in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

Playwright drives the system browser (``executable_path``), so nothing is downloaded. The checks are
what a reader would notice: errors in the console, pictures that do not load, requests leaving the
folder, filters that do nothing, a page that needs JavaScript to be read. A screenshot of the
first page is kept under ``.test-artifacts/`` (or ``$VITSCOPE_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.producer.conftest import MODELS, NON_ASCII, ReportBatch

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no system Chromium: install Debian's `chromium` (scripts/setup does as root) to run the browser tests",
)
ARTIFACTS = Path(os.environ.get("VITSCOPE_TEST_ARTIFACTS", Path(__file__).parents[2] / ".test-artifacts"))

LOAD_EVERY_IMAGE = """
() => Promise.all([...document.images].map(async (img) => {
    img.loading = "eager";  // lazy pictures below the fold would otherwise never load
    try { await img.decode(); } catch (e) {}
    return [img.getAttribute("src"), img.naturalWidth];
}))
"""
VISIBLE = """
() => [...document.querySelectorAll("article.image")].filter((a) => a.offsetParent !== null).map((a) => ({
    name: a.dataset.name,
    jobs: [...a.querySelectorAll("section.job")].filter((s) => s.offsetParent !== null)
        .map((s) => [s.dataset.model, s.dataset.state, s.dataset.class]),
}))
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        # No sandbox: the tests run as root in containers, where Chromium's sandbox cannot start.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def site(report_batch: ReportBatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("browser-site")
    result = report_batch.invoke("report", report_batch.batch_id, "--out", str(out), "--per-page", "2")
    assert result.exit_code == 0, result.output
    return out


def _open(browser, path: Path, *, javascript: bool = True):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, java_script_enabled=javascript)
    page = context.new_page()
    problems: list[str] = []
    page.on(
        "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url}"))
    page.on(
        "request", lambda r: None if r.url.startswith("file://") else problems.append(f"network: {r.url}")
    )
    page.goto(path.as_uri())
    return context, page, problems


def test_every_page_loads_without_errors_and_every_picture_shows(browser, site: Path) -> None:
    for name in ("index.html", "page-2.html"):
        context, page, problems = _open(browser, site / name)
        try:
            loaded = page.evaluate(LOAD_EVERY_IMAGE)
            assert len(loaded) == (20 if name == "index.html" else 0)  # page 2: the broken image only
            assert [src for src, width in loaded if width == 0] == []
            assert page.evaluate("() => window.__pwned") is None  # the CSV id's <script> stayed text
            assert problems == []
            if name == "index.html":
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=ARTIFACTS / "report.png", full_page=True)
        finally:
            context.close()
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_filters_change_what_is_shown(browser, site: Path) -> None:
    context, page, problems = _open(browser, site / "index.html")
    try:
        everything = page.evaluate(VISIBLE)
        assert [image["name"] for image in everything] == ["cat.png", NON_ASCII]
        assert page.locator("#shown").inner_text() == "2 of 2 images on this page"

        page.select_option("select[name=model]", MODELS[1])
        shown = page.evaluate(VISIBLE)
        assert [model for image in shown for model, _, _ in image["jobs"]] == [MODELS[1], MODELS[1]]

        page.select_option("select[name=model]", "")
        page.fill("input[name=q]", "été")
        assert [image["name"] for image in page.evaluate(VISIBLE)] == [NON_ASCII]
        page.fill("input[name=q]", "")

        top1 = everything[0]["jobs"][0][2]
        page.select_option("select[name=class]", top1)
        classes = {cls for image in page.evaluate(VISIBLE) for _, _, cls in image["jobs"]}
        assert classes == {top1}
        page.select_option("select[name=class]", "")

        page.fill("input[name=q]", "broken")  # on page 2: listed as a link there
        assert page.evaluate(VISIBLE) == []
        assert page.locator("#elsewhere a").all_inner_texts() == ["broken.png (broken)"]
        page.fill("input[name=q]", "")
        assert not page.locator("#elsewhere").is_visible()

        page.select_option("select[name=state]", "failed")
        assert page.evaluate(VISIBLE) == []
        assert page.locator("#shown").inner_text() == "0 of 2 images on this page"
        assert problems == []
    finally:
        context.close()

    context, page, problems = _open(browser, site / "index.html")
    try:
        page.fill("input[name=q]", "broken")
        page.click("#elsewhere a")  # follows the search to the other page, onto the card
        page.wait_for_url("**/page-2.html#row-4")
        page.select_option("select[name=state]", "failed")
        (broken,) = page.evaluate(VISIBLE)
        assert broken["name"] == "broken.png"
        assert {state for _, state, _ in broken["jobs"]} == {"failed"}
        assert "ImageError" in page.locator("article.image").inner_text()
    finally:
        context.close()


def test_the_report_reads_without_javascript(browser, site: Path) -> None:
    context, page, problems = _open(browser, site / "index.html", javascript=False)
    try:
        assert [image["name"] for image in page.evaluate(VISIBLE)] == ["cat.png", NON_ASCII]
        assert not page.locator("#filters").is_visible()  # inert without the script: hidden
        assert "Filters need JavaScript" in page.locator("body").inner_text()
        assert problems == []
    finally:
        context.close()
