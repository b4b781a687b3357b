"""``producer submit --metrics`` then ``producer compare``, end to end, on SQLite and PostgreSQL.

The model is the coloured-square ViT the test suite trains (``tests/trained_vit.py``), loaded by the
worker from a models file like any user checkpoint; its images are PNG files with the square's box
in a ``bbox`` column. On this model the evidence is known, so the numbers must say so: gradient
rollout deletes the evidence faster and localizes it better than the random map.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from scipy import stats
from typer.testing import CliRunner

from common.settings import get_settings
from common.stats import paired_proportions_interval
from producer.cli import app
from tests.trained_vit import models_file_entry, write_task_images

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
IMAGES = 12


def _invoke(*args: str, database_url: str):
    get_settings.cache_clear()
    env = {"COLUMNS": "200", "VITSCOPE_DATABASE_URL": database_url}
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def square_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """A CSV of task images with their boxes, and a models file naming the trained model."""
    rows = ["id,image_uri,bbox"]
    for path, _label, box in write_task_images(tmp_path / "images", IMAGES, seed=77):
        rows.append(f'{path.stem},images/{path.name},"{",".join(str(v) for v in box)}"')
    dataset = tmp_path / "squares.csv"
    dataset.write_text("\n".join(rows) + "\n")
    models = tmp_path / "models.toml"
    # Insertion onto the mean image: blurring keeps the square's colour (see docs/metrics.md).
    models.write_text(models_file_entry("squares") + '\n[metrics]\ninsertion_baseline = "mean"\n')
    return dataset, models


def _stored_values(database_url: str) -> dict[tuple[str, str], dict[str, float]]:
    """The batch ``squares``' values from the ``job_metrics`` view: method × metric -> job -> value."""
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT method, metric, job_id, value FROM job_metrics WHERE batch_name = 'squares'")
        ).all()
    engine.dispose()
    stored: dict[tuple[str, str], dict[str, float]] = {}
    for method, metric, job_id, value in rows:
        stored.setdefault((method, metric), {})[job_id] = value
    return stored


def _check_against_scipy(row: dict, stored: dict[tuple[str, str], dict[str, float]], against: str) -> None:
    """A JSON row of ``compare``: its interval and paired fields recomputed by scipy from the stored values."""
    values = np.array(list(stored[row["method"], row["metric"]].values()))
    if row["interval"] == "wilson":
        wilson = stats.binomtest(int(values.sum()), len(values)).proportion_ci(method="wilson")
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((wilson.low, wilson.high), abs=1e-12)
    else:
        t = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(t, rel=1e-9, abs=1e-12)
    if row[f"vs_{against}_mean"] is None:
        return
    mine, theirs = stored[row["method"], row["metric"]], stored[against, row["metric"]]
    d = np.array([mine[job] - theirs[job] for job in sorted(set(mine) & set(theirs))])
    assert row[f"vs_{against}_n"] == len(d)
    assert row[f"vs_{against}_mean"] == pytest.approx(d.mean(), rel=1e-9, abs=1e-12)
    if row["metric"] == "pointing_game":  # 0/1 scores: Newcombe's interval of the paired table
        pairs = [(mine[job], theirs[job]) for job in sorted(set(mine) & set(theirs))]
        table = [pairs.count(cell) for cell in ((1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0))]
        newcombe = paired_proportions_interval(*table)
        assert row[f"vs_{against}_interval"] == "newcombe"
        assert (row[f"vs_{against}_ci_low"], row[f"vs_{against}_ci_high"]) == pytest.approx(
            (newcombe.low, newcombe.high), rel=1e-12
        )
        assert -1.0 <= row[f"vs_{against}_ci_low"] <= row[f"vs_{against}_ci_high"] <= 1.0
    elif d.std() > 0:
        assert row[f"vs_{against}_interval"] == "t"
        t = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
        assert (row[f"vs_{against}_ci_low"], row[f"vs_{against}_ci_high"]) == pytest.approx(
            t, rel=1e-9, abs=1e-12
        )
    if not d.any():
        assert row[f"vs_{against}_p"] is None
        return
    nonzero = d[d != 0]
    exact = len(nonzero) == len(d) and len(np.unique(np.abs(d))) == len(d) and len(d) <= 50
    expected = stats.wilcoxon(d, method="exact" if exact else "asymptotic").pvalue
    assert row[f"vs_{against}_p"] == pytest.approx(expected, rel=1e-9), (row["method"], row["metric"])


def test_submit_with_metrics_then_compare_in_every_format(
    square_dataset: tuple[Path, Path], database_url: str
) -> None:
    dataset, models = square_dataset
    if database_url.startswith("postgresql"):
        assert _invoke("db", "upgrade", database_url=database_url).exit_code == 0
    submit = ("submit", str(dataset), "--local", "--models", "squares", "--models-file", str(models))
    result = _invoke(*submit, "--metrics", "all", "--name", "squares", database_url=database_url)
    assert result.exit_code == 0, result.output

    rows = json.loads(_invoke("compare", "squares", "--format", "json", database_url=database_url).stdout)
    paired = {f"vs_random_{key}" for key in ("n", "mean", "ci_low", "ci_high", "p", "interval")}
    columns = {"model", "method", "metric", "n", "mean", "ci_low", "ci_high", "interval", *paired}
    assert all(set(row) == columns for row in rows)
    table = {(row["method"], row["metric"]): row for row in rows}
    methods = {"rollout", "grad_rollout", "relevance", "last_layer_score", "random"}
    for metric in ("deletion_auc", "insertion_auc", "entropy", "pointing_game", "mass_inside"):
        assert {m for m, k in table if k == metric} == methods, metric
        assert all(table[m, metric]["n"] == IMAGES for m in methods)
    assert {m for m, k in table if k == "sanity_spearman"} == methods - {"random"}
    assert {row["model"] for row in rows} == {"squares"}
    for row in rows:
        assert row["ci_low"] <= row["mean"] <= row["ci_high"]
        assert row["interval"] == ("wilson" if row["metric"] == "pointing_game" else "t")
        if row["metric"] == "pointing_game":
            assert 0.0 <= row["ci_low"] <= row["ci_high"] <= 1.0
        with_random = row["method"] != "random" and row["metric"] != "sanity_spearman"
        assert (row["vs_random_mean"] is not None) == with_random, (row["method"], row["metric"])
    stored = _stored_values(database_url)
    for row in rows:
        _check_against_scipy(row, stored, "random")
    assert table["grad_rollout", "deletion_auc"]["vs_random_ci_high"] < 0
    assert table["grad_rollout", "deletion_auc"]["vs_random_p"] < 0.01
    assert table["grad_rollout", "mass_inside"]["vs_random_ci_low"] > 0
    assert table["grad_rollout", "deletion_auc"]["mean"] < table["random", "deletion_auc"]["ci_low"]
    assert table["grad_rollout", "insertion_auc"]["mean"] > table["random", "insertion_auc"]["ci_high"]
    assert table["grad_rollout", "mass_inside"]["mean"] > table["random", "mass_inside"]["ci_high"]

    as_csv = list(
        csv.DictReader(
            io.StringIO(_invoke("compare", "squares", "--format", "csv", database_url=database_url).stdout)
        )
    )
    assert [(r["method"], r["metric"]) for r in as_csv] == [(r["method"], r["metric"]) for r in rows]
    assert float(as_csv[0]["mean"]) == pytest.approx(rows[0]["mean"])

    # Against any method: the same pairing, the fields named for it.
    against = json.loads(
        _invoke(
            "compare", "squares", "--format", "json", "--against", "rollout", database_url=database_url
        ).stdout
    )
    for row in against:
        assert (row["vs_rollout_mean"] is None) == (row["method"] == "rollout"), row
        _check_against_scipy(row, stored, "rollout")

    shown = _invoke("compare", "squares", database_url=database_url).stdout
    assert "random (baseline)" in shown
    assert "random (noise entropy)" in shown
    assert "Δ vs random" in shown
    assert "wilson interval" in shown
    assert "deletion_auc" in shown
    assert "lower is better" in shown

    # The HTML report carries the same table, the random baseline as its own row.
    site = dataset.parent / f"report-{database_url.split(':')[0]}"
    reported = _invoke("report", "squares", "--out", str(site), database_url=database_url)
    assert reported.exit_code == 0, reported.output
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "Faithfulness of the maps" in index
    assert "random (baseline)" in index
    assert f"{table['grad_rollout', 'deletion_auc']['mean']:.4f}" in index
    assert "Δ vs random" in index
    assert f"{table['grad_rollout', 'deletion_auc']['vs_random_mean']:+.4f}" in index

    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        count, batch_name = conn.execute(
            sa.text(
                "SELECT count(*), min(batch_name) FROM job_metrics "
                "WHERE method = 'grad_rollout' AND metric = 'deletion_auc'"
            )
        ).one()
        (documented,) = re.findall(r"```sql\n(.*?)```", DOCS.read_text(), flags=re.S)
        worse = conn.execute(sa.text(documented.strip().rstrip(";"))).all()
    engine.dispose()
    assert (count, batch_name) == (IMAGES, "squares")
    assert all(row.grad_rollout > row.random for row in worse)  # the docs' query runs and means what it says
    assert len(worse) < IMAGES / 2

    # The same images and settings again: every job reuses the first batch's maps and metric values.
    again = _invoke(*submit, "--metrics", "all", "--name", "again", database_url=database_url)
    assert again.exit_code == 0, again.output
    assert f"{IMAGES} reused" in again.output
    reused = json.loads(_invoke("compare", "again", "--format", "json", database_url=database_url).stdout)
    assert [(r["method"], r["metric"], r["n"]) for r in reused] == [
        (r["method"], r["metric"], r["n"]) for r in rows
    ]
    for copied, original in zip(reused, rows, strict=True):  # sums may differ in the last bit by row order
        for key in ("mean", "ci_low", "ci_high", "vs_random_mean", "vs_random_p"):
            expected = original[key]
            assert copied[key] == (None if expected is None else pytest.approx(expected, rel=1e-9, abs=1e-12))

    # Different metric settings cannot reuse those values: the jobs are computed afresh.
    fewer = _invoke(*submit, "--metrics", "deletion", "--name", "fewer", database_url=database_url)
    assert "0 reused" in fewer.output
    deletion_only = json.loads(
        _invoke("compare", "fewer", "--format", "json", database_url=database_url).stdout
    )
    assert {row["metric"] for row in deletion_only} == {"deletion_auc", "entropy"}


def test_compare_refuses_unknown_formats_and_says_when_there_are_no_metrics(
    square_dataset: tuple[Path, Path], sqlite_url: str
) -> None:
    dataset, models = square_dataset
    plain = _invoke(
        "submit",
        str(dataset),
        "--local",
        "--models",
        "squares",
        "--models-file",
        str(models),
        "--name",
        "plain",
        database_url=sqlite_url,
    )
    assert plain.exit_code == 0, plain.output
    assert "no metrics in this batch" in _invoke("compare", "plain", database_url=sqlite_url).stdout
    assert json.loads(_invoke("compare", "plain", "--format", "json", database_url=sqlite_url).stdout) == []
    refused = _invoke("compare", "plain", "--format", "xml", database_url=sqlite_url)
    assert refused.exit_code == 2
    said = " ".join(refused.output.translate(str.maketrans("│╭╮╰╯─", "      ")).split())  # typer's box
    assert "Invalid value for '--format'" in said
    assert "'xml' is not one of 'table', 'csv', 'json'" in said
    nobody = _invoke("compare", "plain", "--against", "saliency", database_url=sqlite_url)
    assert nobody.exit_code == 2
    assert "unknown --against method 'saliency'" in nobody.output
    bad = _invoke("submit", str(dataset), "--local", "--metrics", "speed", database_url=sqlite_url)
    assert bad.exit_code == 2
    assert "unknown --metrics value 'speed'" in bad.output


def test_a_mask_scores_like_the_box_it_draws(tmp_path: Path, sqlite_url: str) -> None:
    """Boxes on the 8-pixel grid and masks of the same boxes cover the same patches: same numbers."""
    from PIL import Image, ImageDraw

    written = write_task_images(tmp_path / "images", 4, seed=5)
    rows = ["id,image_uri,bbox,mask_uri"]
    for path, _label, box in written:
        mask = Image.new("L", Image.open(path).size, 0)
        ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
        mask.save(path.with_suffix(".mask.png"))
        rows.append(f'{path.stem},images/{path.name},"{",".join(map(str, box))}",')
        rows.append(f"{path.stem}-mask,images/{path.name},,images/{path.stem}.mask.png")
    small = tmp_path / "images" / "small.mask.png"
    Image.new("L", (10, 10), 255).save(small)
    rows.append(f"wrong-size,images/{written[0][0].name},,images/small.mask.png")
    (tmp_path / "regions.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "models.toml").write_text(models_file_entry("squares"))
    result = _invoke(
        "submit", str(tmp_path / "regions.csv"), "--local", "--models", "squares",
        "--models-file", str(tmp_path / "models.toml"), "--metrics", "localization", database_url=sqlite_url,
    )  # fmt: skip
    assert result.exit_code == 1, result.output  # the wrong-size mask fails its own job
    batch_id = result.stdout.strip().splitlines()[-1]
    jobs = json.loads(_invoke("results", batch_id, "--format", "json", database_url=sqlite_url).stdout)
    failed = [job for job in jobs if job["state"] == "failed"]
    assert [job["row_id"] for job in failed] == ["wrong-size"]
    assert "mask" in failed[0]["error_message"]
    assert "10×10" in failed[0]["error_message"]
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        values = conn.execute(
            sa.text("SELECT row_id, method, metric, value FROM job_metrics WHERE metric <> 'entropy'")
        ).all()
    engine.dispose()
    by_row = {(row_id, method, metric): value for row_id, method, metric, value in values}
    assert {metric for _, _, metric in by_row} == {"pointing_game", "mass_inside"}
    for (row_id, method, metric), value in by_row.items():
        if not row_id.endswith("-mask"):
            assert by_row[f"{row_id}-mask", method, metric] == pytest.approx(value, abs=1e-6)


def test_the_sanity_layers_setting_reaches_the_worker(
    square_dataset: tuple[Path, Path], sqlite_url: str
) -> None:
    """``sanity_layers`` in the models file changes which copy the worker builds, and the digest: the
    second batch reuses nothing and its gradient maps correlate differently with their counterparts."""
    dataset, models = square_dataset
    blocks = models.with_name("blocks.toml")
    blocks.write_text(models.read_text() + 'sanity_layers = "blocks"\n')
    means = {}
    for name, path in (("cascade", models), ("blocks", blocks)):
        result = _invoke(
            "submit", str(dataset), "--local", "--models", "squares", "--models-file", str(path),
            "--metrics", "sanity", "--name", name, database_url=sqlite_url,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "0 reused" in result.output
        rows = json.loads(_invoke("compare", name, "--format", "json", database_url=sqlite_url).stdout)
        means[name] = {r["method"]: r["mean"] for r in rows if r["metric"] == "sanity_spearman"}
    assert means["cascade"].keys() == means["blocks"].keys() == {
        "rollout", "grad_rollout", "relevance", "last_layer_score"
    }  # fmt: skip
    # The head's re-initialization changes every gradient the class-specific maps are made of.
    assert means["cascade"]["grad_rollout"] != pytest.approx(means["blocks"]["grad_rollout"], abs=1e-6)


def _submit_masks(tmp_path: Path, database_url: str, masks: dict[str, str]):
    """``submit --local`` of one task image per row id, each with its ``mask_uri`` (may be empty)."""
    written = write_task_images(tmp_path / "data" / "images", len(masks), seed=6)
    rows = ["id,image_uri,mask_uri"]
    rows += [
        f"{row_id},images/{image.name},{mask}"
        for (row_id, mask), (image, _, _) in zip(masks.items(), written, strict=True)
    ]
    (tmp_path / "data" / "regions.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "models.toml").write_text(models_file_entry("squares"))
    return _invoke(
        "submit", str(tmp_path / "data" / "regions.csv"), "--local", "--models", "squares",
        "--models-file", str(tmp_path / "models.toml"), "--metrics", "localization", database_url=database_url,
    )  # fmt: skip


def test_a_local_mask_outside_the_roots_is_refused_at_submit_naming_its_line_and_column(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A local run knows its own file roots: the row is refused before any model loads (exit 2)."""
    from PIL import Image

    outside = tmp_path / "outside" / "mask.png"
    outside.parent.mkdir()
    Image.new("L", (64, 64), 255).save(outside)  # never opened: refused by where it lies
    result = _submit_masks(tmp_path, sqlite_url, {"inside": "", "local": "../outside/mask.png"})
    assert result.exit_code == 2, result.output
    assert f"line 3: mask_uri: {outside.as_uri()} leads outside" in result.output
    assert "VITSCOPE_FILE_ROOTS" in result.output
    assert "nothing was submitted" in result.output
    assert result.output.count(outside.as_uri()) == 1


def test_a_refused_mask_fails_like_a_refused_image_without_repeating_its_uri(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A mask in a bucket no S3 source allows: the worker fails that job with ImageFetchRefusedError."""
    result = _submit_masks(tmp_path, sqlite_url, {"plain": "", "bucket": "s3://elsewhere/mask.png"})
    assert result.exit_code == 1, result.output
    batch_id = result.stdout.strip().splitlines()[-1]
    jobs = json.loads(_invoke("results", batch_id, "--format", "json", database_url=sqlite_url).stdout)
    states = {job["row_id"]: job["state"] for job in jobs}
    assert states == {"plain": "succeeded", "bucket": "failed"}
    (refused,) = (job for job in jobs if job["row_id"] == "bucket")
    error = f"{refused['error_class']}: {refused['error_message']}"
    assert error.startswith("ImageFetchRefusedError: mask_uri: "), error
    assert error.count("s3://elsewhere/mask.png") == 1, error
    assert "VITSCOPE_S3_SOURCES" in error


def test_a_local_run_with_metrics_shows_scoring_as_it_goes(
    square_dataset: tuple[Path, Path], sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bar's line names what is being scored and how far it is, between the jobs' ticks, then
    goes back to "explaining": scoring a micro-batch takes minutes on a large model."""
    import producer.cli

    dataset, models = square_dataset
    descriptions: list[str] = []
    make_progress = producer.cli._progress

    def recording_progress():
        progress = make_progress()
        update = progress.update

        def recorded(task, **fields):
            if "description" in fields:
                descriptions.append(fields["description"])
            return update(task, **fields)

        progress.update = recorded  # type: ignore[method-assign]
        return progress

    monkeypatch.setattr(producer.cli, "_progress", recording_progress)
    result = _invoke(
        "submit", str(dataset), "--local", "--models", "squares", "--models-file", str(models),
        "--metrics", "deletion,sanity", database_url=sqlite_url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    curves = [d for d in descriptions if d.startswith("explaining · scoring (deletion) ")]
    sanity = [d for d in descriptions if d.startswith("explaining · scoring (sanity) ")]
    assert curves, descriptions
    assert sanity, descriptions
    counts = [tuple(int(n) for n in d.rsplit(" ", 1)[1].split("/")) for d in curves]
    assert all(0 < done < total for done, total in counts)  # a finished step shows "explaining" again
    assert descriptions[-1] == "explaining"
