"""GPU check: the paper's models on a CUDA device, the pipeline's CPU ceiling beside them, and CUDA
artifacts against CPU ones. Run by ``bench/gpu_check.sh``; exits 1 when a map disagrees.

1. **Compute**: each model (random weights: nothing is downloaded) explains batches of 1, 2, 4 … 128
   under the worker's autocast (bfloat16): images/s, peak device memory, and the largest batch that
   fit (a batch that runs out of memory ends that model's sweep).
2. **Ceiling**: ``bench_pipeline.py --modes null`` on this device with 1, 2, 4, 8 cores (``taskset``):
   what the CPU side can feed the GPU, to set beside the compute rates.
3. **Agreement**: a few images explained on the CPU in float32 and on the device, in float32 and
   under the worker's autocast; every map (each block's and head's, and the three grid maps) must
   correlate at >= 0.999 with the CPU's. Overlay pixels are compared too (reported only).

Prints a table; with ``--out DIR`` (``$OUT`` in the shell script) writes ``gpu_check.json`` there.
``--device cpu --quick`` runs every part briefly on the CPU, for the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from common.artifacts import OVERLAYS, PICTURE_SOURCES  # noqa: E402
from common.methods import MethodSettings  # noqa: E402
from worker.attention import Explanation, explain  # noqa: E402
from worker.device import autocast_dtype  # noqa: E402
from worker.render import heatmap_overlays  # noqa: E402

PAPER_MODELS = (
    "vit_base_patch16_224",
    "vit_base_patch32_224",
    "vit_large_patch16_224",
    "deit_tiny_patch16_224",
)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
MIN_CORRELATION = 0.999


@dataclass
class ComputeRow:
    model: str
    batch_size: int
    images_per_second: float | None
    peak_memory_mib: float | None
    out_of_memory: bool = False


def random_model(arch: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False).eval().to(device)


def sweep(
    arch: str, device: torch.device, batches: tuple[int, ...], repeats: int, budget: float
) -> list[ComputeRow]:
    """Images/s and peak memory of ``explain`` per batch size, until out of memory or out of time."""
    model = random_model(arch, device)
    dtype = autocast_dtype("auto", device)
    rows = []
    started = time.perf_counter()
    for batch_size in batches:
        if time.perf_counter() - started > budget:
            break
        images = torch.randn(batch_size, 3, 224, 224, device=device)
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            explain(model, images, MethodSettings(), autocast_dtype=dtype)  # warm-up
            _sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                explain(model, images, MethodSettings(), autocast_dtype=dtype)
            _sync(device)
            seconds = (time.perf_counter() - start) / repeats
        except torch.OutOfMemoryError:
            rows.append(ComputeRow(arch, batch_size, None, None, out_of_memory=True))
            break
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        rows.append(ComputeRow(arch, batch_size, round(batch_size / seconds, 1), peak and round(peak, 1)))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def map_correlations(reference: Explanation, other: Explanation) -> dict[str, float]:
    """The lowest correlation of each artifact's maps: one per block and head of ``cls_attention``,
    one per block of ``layer_scores``, one each for the grid maps. A map that is flat on the CPU
    (no spread to correlate) counts as 1 when the other is equally flat, else 0."""
    lowest = {}
    for name, array in reference.arrays().items():
        if name == "attention.npy":
            continue
        ours = other.arrays()[name]
        grid = array.shape[-2:]
        maps_a = array.reshape(-1, *grid).reshape(-1, grid[0] * grid[1]).astype(np.float64)
        maps_b = ours.reshape(-1, grid[0] * grid[1]).astype(np.float64)
        lowest[name] = min(_correlation(a, b) for a, b in zip(maps_a, maps_b, strict=True))
    return lowest


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(float(np.abs(a).max()), 1e-30)
    if a.std() <= 1e-6 * scale:
        return 1.0 if b.std() <= 1e-5 * scale else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def agreement(arch: str, device: torch.device, count: int) -> dict[str, Any]:
    """CPU float32 against the device in float32 and under the worker's autocast, on the same inputs."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(count, 3, 224, 224, generator=generator)
    cpu = explain(random_model(arch, torch.device("cpu")), images, MethodSettings())
    model = random_model(arch, device)
    result: dict[str, Any] = {"model": arch}
    for label, dtype in (("float32", None), ("autocast", autocast_dtype("auto", device))):
        ours = explain(model, images.to(device), MethodSettings(), autocast_dtype=dtype)
        per_name: dict[str, float] = {}
        for reference, other in zip(cpu, ours, strict=True):
            for name, value in map_correlations(reference, other).items():
                per_name[name] = min(per_name.get(name, 1.0), value)
        result[label] = {
            "dtype": str(dtype),
            "min_correlation": per_name,
            "identical_overlay_pixels": _overlay_agreement(cpu, ours, device),
        }
    return result


def _overlay_agreement(cpu: list[Explanation], ours: list[Explanation], device: torch.device) -> float:
    """Share of overlay pixels identical when drawn from the device's maps on the device and from the
    CPU's maps on the CPU, over the same random crops."""
    crops = torch.randint(
        0, 256, (len(cpu), 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )

    def maps(explanations: list[Explanation]) -> torch.Tensor:
        return torch.from_numpy(
            np.stack([[e.arrays()[PICTURE_SOURCES[n]] for n in OVERLAYS] for e in explanations])
        )

    reference = heatmap_overlays(crops, maps(cpu))
    drawn = heatmap_overlays(crops.to(device), maps(ours).to(device)).cpu()
    return round(float((reference == drawn).all(dim=-1).float().mean()), 6)


def ceiling(device: torch.device, cores: list[int], images: int, out: Path | None) -> list[dict[str, Any]]:
    """``bench_pipeline.py --modes null`` on this device, one run per core count."""
    available = len(os.sched_getaffinity(0))
    cores = [c for c in cores if c <= available]
    json_path = (out or Path("/tmp")) / "gpu_check_ceiling.json"
    command = [
        sys.executable,
        str(HERE / "bench_pipeline.py"),
        "--modes=null",
        f"--cores={','.join(map(str, cores))}",
        f"--images={images}",
        f"--device={device.type}",
        f"--json={json_path}",
    ]
    subprocess.run(command, check=True, cwd=REPO)
    return json.loads(json_path.read_text())["rows"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="one small model, small batches, few images")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the pipeline ceiling")
    parser.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for gpu_check.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    models = ("deit_tiny_patch16_224",) if args.quick else PAPER_MODELS
    batches = (1, 2) if args.quick else BATCHES
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    }

    # Agreement first: it decides the exit status, so it must run whatever the time.
    report["agreement"] = [agreement(arch, device, count=2 if args.quick else 4) for arch in models]
    failures = [
        f"{row['model']} {label} {name}: {value:.5f}"
        for row in report["agreement"]
        for label in ("float32", "autocast")
        for name, value in row[label]["min_correlation"].items()
        if not value >= MIN_CORRELATION
    ]
    report["agreement_seconds"] = round(time.perf_counter() - started, 1)

    compute: list[ComputeRow] = []
    for arch in models:
        compute += sweep(arch, device, batches, repeats=2 if args.quick else 3, budget=45.0)
    report["compute"] = [row.__dict__ for row in compute]
    report["largest_batch"] = {
        arch: max((r.batch_size for r in compute if r.model == arch and not r.out_of_memory), default=None)
        for arch in models
    }
    if not args.no_ceiling:
        report["ceiling"] = ceiling(
            device, [1] if args.quick else [1, 2, 4, 8], 16 if args.quick else 192, out
        )
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["failures"] = failures

    print(f"device: {report['device']}")
    print(f"{'model':<24}{'batch':>6}{'img/s':>10}{'peak MiB':>10}")
    for row in compute:
        rate = "OOM" if row.out_of_memory else f"{row.images_per_second:.1f}"
        print(f"{row.model:<24}{row.batch_size:>6}{rate:>10}{row.peak_memory_mib or '':>10}")
    print("largest batch that fits:", report["largest_batch"])
    for row in report.get("ceiling", []):
        print(
            f"pipeline ceiling (null compute) on {row['cores']} core(s): {row['images_per_second']} img/s, "
            f"ms/img {row['ms_per_image']}"
        )
    for row in report["agreement"]:
        for label in ("float32", "autocast"):
            worst = min(row[label]["min_correlation"].values())
            print(
                f"agreement {row['model']:<24} {label:<9} lowest map correlation {worst:.6f}, "
                f"identical overlay pixels {row[label]['identical_overlay_pixels']:.4%}"
            )
    print(f"total {report['seconds']} s")
    if out:
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    if failures:
        print("FAILED: maps below correlation", MIN_CORRELATION, *failures, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
