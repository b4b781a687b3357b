"""The README and the docs are part of the product: their queries, settings, options, links and
Python example must be true."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from common.db.batches import add_jobs, create_batch
from common.db.jobs import claim_jobs, record_failure, record_successes
from common.db.records import ArtifactRecord, JobOutcome, NewJob, PredictionRecord, WorkerIdentity
from common.db.session import Database, upgrade
from common.settings import Settings
from producer.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
SETTINGS = (DOCS / "settings.md").read_text()
RESULTS = (DOCS / "results.md").read_text()


def _sql_statements() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", RESULTS, flags=re.S)
    statements = [s.strip() for block in blocks for s in block.split(";")]
    return [s for s in statements if s and not all(line.startswith("--") for line in s.splitlines())]


def _populate(db: Database) -> None:
    """Two images under DeiT and ViT-B/16: they agree on the cat and disagree on the coffee."""
    worker = WorkerIdentity("h", "h:1")
    labels = {281: "tabby, tabby cat", 967: "espresso", 968: "cup"}
    plan = [  # (row, image, model, top-1 or None for a failure)
        (2, "file:///x/chelsea.jpg", "deit_tiny_patch16_224", 281),
        (2, "file:///x/chelsea.jpg", "vit_base_patch16_224", 281),
        (3, "file:///x/coffee.jpg", "deit_tiny_patch16_224", 967),
        (3, "file:///x/coffee.jpg", "vit_base_patch16_224", 968),
        (4, "file:///x/broken.jpg", "deit_tiny_patch16_224", None),
    ]
    with db.session() as s:
        create_batch(s, batch_id="b1", name="readme", source="x.csv", mode="local", settings={}, models={})
        jobs = [NewJob(row, uri, model, "q", "cfg") for row, uri, model, _ in plan]
        ids = [f"job{i}" for i in range(len(plan))]
        add_jobs(s, "b1", jobs, ids=ids)
        claim_jobs(s, ids, worker=worker, lease_seconds=60, max_attempts=3)
        for job_id, (_, uri, _, top) in zip(ids, plan, strict=True):
            if top is None:
                record_failure(
                    s,
                    job_id,
                    worker_id=worker.worker_id,
                    error_class="ImageError",
                    message="not an image",
                    retryable=False,
                    max_attempts=3,
                )
                continue
            outcome = JobOutcome(
                image_sha256=uri[-12:],
                target_index=top,
                device="cpu",
                weights_source="timm",
                artifacts=[ArtifactRecord("grad_rollout.png", f"{uri}.png", "image/png", 1, "0" * 64)],
                predictions=[
                    PredictionRecord(1, top, 0.8, labels[top]),
                    PredictionRecord(2, 1, 0.1, "goldfish"),
                ],
                fetch_seconds=0.1,
                compute_seconds=0.2,
                store_seconds=0.3,
            )
            record_successes(s, [(job_id, outcome)], worker_id=worker.worker_id)


def test_readme_queries_run_and_answer(database_url: str) -> None:
    upgrade(database_url)
    db = Database(database_url)
    _populate(db)
    statements = _sql_statements()
    assert len(statements) == 5
    with db.engine.connect() as conn:
        answers = [conn.execute(sa.text(sql)).all() for sql in statements]
    db.dispose()
    disagreements, failures, tabbies, timing, top5 = answers
    assert [tuple(r) for r in disagreements] == [("file:///x/coffee.jpg", "espresso", "cup")]
    assert [(r.image_uri, r.error_class) for r in failures] == [("file:///x/broken.jpg", "ImageError")]
    assert {r.model for r in tabbies} == {"deit_tiny_patch16_224", "vit_base_patch16_224"}
    assert all(r.grad_rollout_png_uri.endswith(".png") for r in tabbies)
    assert {r.model: r.jobs for r in timing} == {"deit_tiny_patch16_224": 2, "vit_base_patch16_224": 2}
    assert [(r.model, r.rank) for r in top5] == [
        ("deit_tiny_patch16_224", 1),
        ("deit_tiny_patch16_224", 2),
        ("vit_base_patch16_224", 1),
        ("vit_base_patch16_224", 2),
    ]


def test_every_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"`VITSCOPE_{name.upper()}`" in SETTINGS, name


def test_documented_submit_options_exist() -> None:
    section = README.split("`producer submit DATASET` options:")[1].split("###")[0]
    documented = set(re.findall(r"`(--[a-z-]+)", section))
    help_text = CliRunner().invoke(app, ["submit", "--help"], env={"COLUMNS": "200"}).output
    assert documented
    for option in documented:
        assert option in help_text, option


def _options(text: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z-]*[a-z]", text)) - {"--help"}


def test_report_and_figures_options_are_documented_both_ways() -> None:
    """Every option in `--help` is in the docs' table, and every documented one exists."""
    report = RESULTS.split("`producer report BATCH --out DIR` writes")[1]
    figures = RESULTS.split("`producer figures BATCH --out DIR` draws")[1]
    sections = {"report": report.split("## Figures")[0], "figures": figures}
    for command, section in sections.items():
        help_text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert _options(help_text) == _options(section), command


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page: each heading's slug, and explicit ``<a id="…">`` targets."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.M)
    slugs = {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}
    return slugs | set(re.findall(r'<a id="([^"]+)"', markdown))


def test_links_between_the_readme_and_the_docs_resolve() -> None:
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    checked = 0
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path_part, _, anchor = target.partition("#")
            path = (page.parent / path_part).resolve() if path_part else page
            assert path.exists(), f"{page.name}: {target} does not exist"
            if anchor:
                assert anchor in _anchors(path.read_text()), f"{page.name}: no anchor {target}"
            checked += 1
    assert checked > 20


def test_the_readme_python_example_runs(tmp_path: Path) -> None:
    """The README's Python block, run as written, in a folder holding the example image; the
    "pretrained" weights it asks for are found in the weights folder (random ones, saved there)."""
    import timm
    from safetensors.torch import save_file

    (block,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    weights = tmp_path / "weights"
    weights.mkdir()
    save_file(
        timm.create_model("deit_tiny_patch16_224").state_dict(), weights / "deit_tiny_patch16_224.safetensors"
    )
    images = tmp_path / "examples" / "images"
    images.mkdir(parents=True)
    (images / "coffee.jpg").write_bytes((ROOT / "examples" / "images" / "coffee.jpg").read_bytes())
    env = {**os.environ, "VITSCOPE_WEIGHTS_DIR": str(weights), "VITSCOPE_DEVICE": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    top1, explained = result.stdout.splitlines()
    assert top1.startswith("Prediction(index=")
    assert explained == "espresso (14, 14)"
    for name in ("coffee_grad_rollout.png", "coffee_layers.png"):
        assert (tmp_path / name).stat().st_size > 1000, name


SECURITY = (Path(__file__).resolve().parents[1] / "docs" / "security.md").read_text()
SECURITY_SETTINGS = (
    "file_roots",
    "allow_hard_links",
    "s3_sources",
    "allow_private_networks",
    "max_image_bytes",
    "max_image_pixels",
    "fetch_timeout_seconds",
)


@pytest.mark.parametrize("name", SECURITY_SETTINGS)
def test_every_security_setting_has_its_default_in_docs_security(name: str) -> None:
    """docs/security.md's table gives each setting that widens what a dataset reaches, with its default."""
    assert name in Settings.model_fields
    rows = [line for line in SECURITY.splitlines() if line.startswith(f"| `VITSCOPE_{name.upper()}` |")]
    assert len(rows) == 1, name
    default = rows[0].split("|")[2].strip()
    assert default, name
