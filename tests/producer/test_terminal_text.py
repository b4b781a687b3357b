"""Hostile text in a real batch: ids, names, URIs and errors shown literally everywhere they appear.

One batch is computed per module by ``producer submit --local`` (random weights) from a dataset an
attacker wrote, in a folder whose path has spaces: ids with rich markup (``[/x]``, a ``[link=…]``),
terminal escape sequences, a right-to-left override, an image named ``cost$\\foo$.png`` (mathtext),
a row whose URI carries markup and an ESC into an error message, and a batch name with all of them.
Then every command that prints them: ``results``, ``status``, ``figures``, ``report`` — and the
table functions on a console that believes it is a terminal, where links and colours would be live.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from common.db.metric_summaries import MetricSummary
from producer.compare import compare_table, write_compare_csv
from producer.output import results_table
from producer.terminal_text import show_controls, terminal_literal
from tests.producer.conftest import _write_image, invoke_in

CLOSING = "[/x]"
LINK = "[link=https://example.invalid/]click me[/link]"
ESCAPES = "\x1b]0;pwned\x07\x1b[2Jwiped"  # set the window title, clear the screen
REVERSED = "\u202egnp.exe"  # displays as "exe.png"
MATH = "cost$\\foo$.png"
BAD_URI = "s3://nowhere/[/x]\x1b[31m.png"  # refused (no S3 source): its error quotes it
NAME = "run [/x] \u202e\x1b[5m"
FORMULA = '=HYPERLINK("http://example.invalid")'
EMOJI = ":warning: :thumbs_up:"  # rich would draw emoji

# What a terminal would obey: OSC 8 hyperlinks, OSC 0 titles, screen clears, the override.
LIVE = ("\x1b]8;", "\x1b]0;", "\x1b[2J", "\x1b[5m", "\x07", "\u202e")


@dataclass(frozen=True)
class HostileBatch:
    root: Path
    env: dict[str, str]
    batch_id: str

    def invoke(self, *args: str):
        return invoke_in(self.env, *args)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> HostileBatch:
    root = tmp_path_factory.mktemp("hostile") / "alice home" / "secret project"
    _write_image(root / "images" / "cat.png", seed=3)
    _write_image(root / "images" / MATH, seed=4)
    dataset = root / "sp.csv"
    with dataset.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image_uri"])
        for row_id in (CLOSING, LINK, ESCAPES, REVERSED, EMOJI):
            writer.writerow([row_id, "images/cat.png"])
        writer.writerow(["math", f"images/{MATH}"])
        writer.writerow(["refused", BAD_URI])
    env = {
        "VITSCOPE_DATABASE_URL": f"sqlite:///{root / 'vitscope.db'}",
        "VITSCOPE_STORAGE_URL": (root / "results").as_uri(),
        "COLUMNS": "400",
    }
    batch = HostileBatch(root, env, "")
    result = batch.invoke(
        "submit",
        str(dataset),
        "--local",
        "--weights",
        "random",
        "--models",
        "deit_tiny_patch16_224",
        "--name",
        NAME,
    )
    assert result.exit_code == 1, result.output  # the refused row fails; the rest succeeds
    return HostileBatch(root, env, result.stdout.strip().splitlines()[-1])


def _no_live_sequences(text: str) -> None:
    for sequence in LIVE:
        assert sequence not in text, repr(sequence)


# ---- the function ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain été 猫", "plain été 猫"),
        ("a\x1b[31mb", "a\\x1b[31mb"),
        ("\x00\x07\x08\t\r\x7f", "\\x00\\x07\\x08\\x09\\x0d\\x7f"),
        ("\x85\x9b", "\\x85\\x9b"),  # C1: NEL and the one-byte CSI
        (REVERSED, "\\u202egnp.exe"),
        ("\u2066a\u2069\u200f\u061c\u2028", "\\u2066a\\u2069\\u200f\\u061c\\u2028"),
        ("line\nbreak", "line\\x0abreak"),
    ],
)
def test_controls_and_bidi_overrides_are_shown_as_escapes(text: str, shown: str) -> None:
    assert show_controls(text) == shown


def test_newlines_are_kept_only_when_asked() -> None:
    assert show_controls("a\nb\x1b", newlines=True) == "a\nb\\x1b"


@pytest.mark.parametrize("text", [CLOSING, LINK, "[bold]x[/bold]", "\\[not markup]", "a\\b", NAME])
def test_markup_prints_as_written(text: str) -> None:
    console = Console(
        file=io.StringIO(), width=200, color_system="truecolor", force_terminal=True, highlight=False
    )
    console.print(terminal_literal(text), end="")
    assert console.file.getvalue() == show_controls(text)


def test_a_trailing_backslash_cannot_escape_markup_after_it() -> None:
    """rich's escape doubles a final backslash, so ``literal(x) + "[/b]"`` still closes the tag."""
    console = Console(file=io.StringIO(), width=200, color_system=None, highlight=False)
    console.print(f"[b]{terminal_literal('dir' + chr(92))}[/b] after", end="")
    assert console.file.getvalue().endswith(" after")
    assert "[/b]" not in console.file.getvalue()


def test_none_prints_as_nothing_and_other_values_as_text() -> None:
    assert terminal_literal(None) == ""
    assert terminal_literal(Path("/x/[b]y")) == "/x/\\[b]y"


# ---- the tables, on a console that is a terminal -----------------------------------------------------


def _terminal() -> Console:
    return Console(
        file=io.StringIO(), width=400, color_system="truecolor", force_terminal=True, highlight=False
    )


def _jobs(hostile: HostileBatch) -> list[dict]:
    return json.loads(hostile.invoke("results", hostile.batch_id, "--format", "json").stdout)


def test_the_results_table_shows_every_cell_literally_on_a_terminal(hostile: HostileBatch) -> None:
    console = _terminal()
    results_table(iter(_jobs(hostile)), console, limit=50)
    shown = console.file.getvalue()
    _no_live_sequences(shown)
    for text in (CLOSING, LINK, ESCAPES, REVERSED, BAD_URI):
        assert show_controls(text) in shown, text


def test_the_status_view_shows_the_name_and_failures_literally_on_a_terminal(hostile: HostileBatch) -> None:
    from common.db import open_database
    from common.db.batches import get_batch
    from common.db.reports import batch_status
    from common.settings import Settings
    from producer.output import status_view

    db = open_database(Settings(database_url=hostile.env["VITSCOPE_DATABASE_URL"]))
    with db.session() as session:
        status = batch_status(session, get_batch(session, hostile.batch_id))
    db.dispose()
    console = _terminal()
    console.print(status_view(status, workers=None, width=console.width))  # as `status` does
    shown = console.file.getvalue()
    _no_live_sequences(shown)
    assert show_controls(NAME) in shown
    assert show_controls(BAD_URI) in shown  # the failure's message and example image


def test_compare_shows_model_names_literally_and_writes_them_as_text_in_csv() -> None:
    summaries = [
        MetricSummary(FORMULA, "rollout", "entropy", 3, 1.5, 1.0, 2.0),
        MetricSummary(f"{CLOSING}{ESCAPES}", "-rollout", "entropy", 3, -0.25, -0.5, 0.0),
    ]
    console = _terminal()
    compare_table(summaries, console)
    shown = console.file.getvalue()
    _no_live_sequences(shown)
    assert FORMULA in shown
    assert show_controls(f"{CLOSING}{ESCAPES}") in shown
    written = io.StringIO()
    assert write_compare_csv(summaries, written) == 2
    rows = list(csv.DictReader(io.StringIO(written.getvalue())))
    assert [row["model"] for row in rows] == ["'" + FORMULA, f"{CLOSING}{ESCAPES}"]
    assert [row["method"] for row in rows] == ["rollout", "'-rollout"]
    assert [row["mean"] for row in rows] == ["1.5", "-0.25"]  # numbers stay numbers


# ---- the commands ------------------------------------------------------------------------------------


def test_results_and_status_print_hostile_text_literally_and_exit_0(hostile: HostileBatch) -> None:
    results = hostile.invoke("results", hostile.batch_id)
    assert results.exit_code == 0, results.output
    for text in (CLOSING, LINK, ESCAPES, REVERSED, EMOJI, BAD_URI):
        assert show_controls(text) in results.stdout, text
    status = hostile.invoke("status", hostile.batch_id)
    assert status.exit_code == 0, status.output
    assert show_controls(NAME) in status.stdout
    by_name = hostile.invoke("results", NAME, "--format", "csv")
    assert by_name.exit_code == 0, by_name.output
    for output in (results.stdout, status.stdout):
        _no_live_sequences(output)


def test_an_error_quoting_hostile_input_prints_literally(hostile: HostileBatch) -> None:
    missing = hostile.invoke("status", f"nope{CLOSING}{ESCAPES}")
    assert missing.exit_code == 2
    assert show_controls(f"nope{CLOSING}{ESCAPES}") in missing.output
    _no_live_sequences(missing.output)


def test_figures_draw_a_name_with_dollar_signs_as_text(hostile: HostileBatch, tmp_path: Path) -> None:
    out = tmp_path / "figures"
    result = hostile.invoke("figures", hostile.batch_id, "--out", str(out), "--images", MATH, "--no-pdf")
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in out.iterdir()) == [
        "fig4_1-row7-cost_foo-deit_tiny_patch16_224.png",
        "fig4_2-row7-cost_foo.png",
    ]


def test_the_report_isolates_user_text_and_shows_overrides(hostile: HostileBatch, tmp_path: Path) -> None:
    result = hostile.invoke("report", hostile.batch_id, "--out", str(tmp_path / "site"))
    assert result.exit_code == 0, result.output
    page = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    visible = re.sub(r"<[^>]*>", "", page)  # the text a reader sees, attributes left out
    assert "\\u202e" in visible
    assert "\u202e" not in visible
    assert "\x1b" not in visible
    assert "<bdi>\\u202egnp.exe</bdi>" in page
    assert f"<h1>vitscope report: <bdi>{show_controls(NAME)}</bdi></h1>" in page
    # The dataset's path is cut to its file name, folders with spaces included.
    assert "…/sp.csv" in page
    assert "alice home" not in page
    assert "secret project" not in page
    index = (tmp_path / "site" / "assets" / "search-index.js").read_text(encoding="utf-8")
    assert "\\\\u202egnp.exe" in index  # the escape, shown as text by the search links
    assert "\u202e" not in index
