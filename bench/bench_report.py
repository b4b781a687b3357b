"""How long `producer report` takes on a large batch, how much it writes, and how much memory it needs.

Synthesizes a finished batch straight into SQLite and a local storage folder (computing 10,000 real
explanations would take hours on a CPU): every job gets a row, top-5 predictions, and its five
pictures (input crop, three overlays, layer grid) at their real storage keys. The pictures are real
PNGs of the usual sizes, hard-linked from a few templates so synthesizing costs no disk; the report
then copies them for real. One job in a hundred failed, with a reason.

    .venv/bin/python bench/bench_report.py --jobs 10000              # copy mode (the default)
    .venv/bin/python bench/bench_report.py --jobs 10000 --links relative
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from PIL import Image

from common.artifacts import IMAGE_ARTIFACTS
from common.db import open_database
from common.db.models import Artifact, Batch, Job, JobState, Prediction
from common.keys import artifact_key
from common.settings import Settings
from producer.site import LinkMode

MODELS = ("deit_tiny_patch16_224", "vit_base_patch16_224")
LABELS = (
    "tabby",
    "tiger cat",
    "Egyptian cat",
    "golden retriever",
    "Labrador retriever",
    "goldfish",
    "ambulance",
)
TEMPLATES = 8
# `producer report …`, then the process's own peak resident memory. VmHWM belongs to the process's
# address space, which exec replaces: unlike getrusage's maxrss it does not count the forked copy of
# this (torch-importing) parent.
_MEASURED_CLI = """
import sys
from producer.cli import app
try:
    app(sys.argv[1:])
finally:
    sys.stderr.write(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def _templates(folder: Path) -> list[dict[str, Path]]:
    """A few sets of the five pictures, drawn by the worker's own renderer from a photo-like crop."""
    from worker.pipeline.cpu import draw_pictures  # the bench may use torch; the producer never does

    rng = np.random.default_rng(0)
    sets = []
    for t in range(TEMPLATES):
        coarse = rng.uniform(0, 255, (15, 15, 3)).astype(np.uint8)
        crop = np.asarray(Image.fromarray(coarse).resize((224, 224), Image.BICUBIC))
        crop = np.clip(crop + rng.normal(0, 4, crop.shape), 0, 255).astype(np.uint8)
        arrays = {
            "layer_scores.npy": rng.random((12, 14, 14)).astype(np.float32),
            "rollout.npy": rng.random((14, 14)).astype(np.float32),
            "grad_rollout.npy": rng.random((14, 14)).astype(np.float32),
            "relevance.npy": rng.random((14, 14)).astype(np.float32),
        }
        drawn = draw_pictures(crop, arrays, title="model: layer scores")
        pictures = {}
        for name in IMAGE_ARTIFACTS:
            pictures[name] = folder / f"t{t}-{name}"
            pictures[name].write_bytes(drawn.files[name])
        sets.append(pictures)
    return sets


def synthesize(db_url: str, storage: Path, jobs: int, workdir: Path) -> str:
    """A finished batch of ``jobs`` jobs over ``jobs / len(MODELS)`` images; returns its id."""
    db = open_database(Settings(database_url=db_url))
    templates = _templates(workdir)
    batch_id = f"bench-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    images = jobs // len(MODELS)
    rng = np.random.default_rng(1)
    job_rows, prediction_rows, artifact_rows = [], [], []
    for image in range(images):
        sha = hashlib.sha256(f"image-{image}".encode()).hexdigest()
        for m, model in enumerate(MODELS):
            job_id = uuid.uuid4().hex
            failed = (image * len(MODELS) + m) % 100 == 99
            job_rows.append(
                {
                    "id": job_id,
                    "batch_id": batch_id,
                    "row_number": image + 2,
                    "row_id": f"img{image:06d}",
                    "image_uri": f"s3://photos/set/{image:06d}.jpg",
                    "model": model,
                    "queue": "vitscope.default",
                    "config_fingerprint": "0123456789abcdef",
                    "row_metadata": {},
                    "state": JobState.FAILED if failed else JobState.SUCCEEDED,
                    "attempts": 1,
                    "created_at": now,
                    "started_at": now,
                    "finished_at": now + timedelta(seconds=1),
                    "fetch_seconds": 0.05,
                    "compute_seconds": 0.4,
                    "store_seconds": 0.1,
                    "image_sha256": sha,
                    "target_index": None if failed else 281,
                    "weights_source": "pretrained (timm)",
                    "error_class": "ImageError" if failed else None,
                    "error_message": "not an image (no known image format)" if failed else None,
                }
            )
            if failed:
                continue
            probs = np.sort(rng.dirichlet(np.ones(1000)))[::-1][:5]
            for rank, prob in enumerate(probs, 1):
                prediction_rows.append(
                    {
                        "job_id": job_id,
                        "rank": rank,
                        "class_index": 281 + rank,
                        "label": LABELS[(image + rank) % len(LABELS)],
                        "prob": float(prob),
                    }
                )
            template = templates[(image + m) % TEMPLATES]
            for name in IMAGE_ARTIFACTS:
                key = artifact_key(sha, model, "0123456789abcdef", name)
                path = storage / key
                path.parent.mkdir(parents=True, exist_ok=True)
                os.link(template[name], path)
                artifact_rows.append(
                    {
                        "job_id": job_id,
                        "name": name,
                        "uri": path.as_uri(),
                        "content_type": "image/png",
                        "shape": None,
                        "dtype": None,
                        "bytes": template[name].stat().st_size,
                        "checksum": "0" * 64,
                    }
                )
    with db.session() as session:
        session.add(
            Batch(
                id=batch_id,
                source="bench.csv",
                mode="local",
                settings={},
                models={"names": list(MODELS)},
                total_jobs=len(job_rows),
            )
        )
        session.flush()
        session.execute(sa.insert(Job), job_rows)
        session.execute(sa.insert(Prediction), prediction_rows)
        session.execute(sa.insert(Artifact), artifact_rows)
    db.dispose()
    return batch_id


def _size(folder: Path) -> tuple[int, int, int]:
    """Bytes of the HTML pages, of everything, and the number of files under ``folder``."""
    html = total = files = 0
    for path in folder.rglob("*"):
        if path.is_file():
            size = path.stat().st_size
            total += size
            files += 1
            html += size if path.suffix == ".html" else 0
    return html, total, files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--per-page", type=int, default=50)
    parser.add_argument(
        "--links", choices=[m.value for m in LinkMode if m is not LinkMode.PRESIGNED], default="copy"
    )
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        db_url = f"sqlite:///{root / 'bench.db'}"
        t0 = time.perf_counter()
        batch_id = synthesize(db_url, root / "results", args.jobs, root)
        synthesized = time.perf_counter() - t0

        # The real CLI in its own process: start-up included, and its peak memory is its own.
        out = root / "report"
        env = {
            **os.environ,
            "VITSCOPE_DATABASE_URL": db_url,
            "VITSCOPE_STORAGE_URL": (root / "results").as_uri(),
        }
        command = [sys.executable, "-c", _MEASURED_CLI, "report", batch_id, "--out", str(out)]
        command += ["--per-page", str(args.per_page), "--links", args.links]
        start = time.perf_counter()
        run = subprocess.run(
            command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        seconds = time.perf_counter() - start
        peak_kib = int(run.stderr.rsplit("VmHWM:", 1)[1].split()[0])
        pages = len(list(out.glob("*.html")))
        html, total, files = _size(out)
        numbers = {
            "jobs": args.jobs,
            "images": args.jobs // len(MODELS),
            "pages": pages,
            "links": args.links,
            "synthesize_seconds": round(synthesized, 1),
            "report_seconds": round(seconds, 1),
            "jobs_per_second": round(args.jobs / seconds),
            "html_mib": round(html / 2**20, 1),
            "total_mib": round(total / 2**20, 1),
            "files": files,
            "largest_page_kib": round(max(p.stat().st_size for p in out.glob("*.html")) / 1024, 1),
            "report_peak_rss_mib": round(peak_kib / 1024),
        }
    if args.json:
        print(json.dumps(numbers))
        return
    print(
        f"{numbers['jobs']} jobs ({numbers['images']} images × {len(MODELS)} models) on {numbers['pages']} pages, "
        f"--links {args.links}: written in {numbers['report_seconds']} s ({numbers['jobs_per_second']} jobs/s); "
        f"{numbers['total_mib']} MiB on disk in {numbers['files']} files, of which HTML {numbers['html_mib']} MiB "
        f"(largest page {numbers['largest_page_kib']} KiB); peak RSS of the report process {numbers['report_peak_rss_mib']} MiB"
    )


if __name__ == "__main__":
    main()
