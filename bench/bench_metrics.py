"""What ``--metrics`` costs: images per second with and without the faithfulness metrics.

Two measurements, both with random weights (the cost does not depend on their values):

- ``core``: the compute core on one batch already on the device — ``explain`` alone, then
  ``explain`` followed by ``worker.metrics.evaluate`` with the standard metrics (deletion, insertion,
  concentration, localization for a box), then with the sanity check as well.
- ``end-to-end`` (``--end-to-end N``): ``producer submit --local`` of N generated images with and
  without ``--metrics standard``, each on a fresh SQLite database and results folder (no reuse),
  timed from the CLI's own "done in … s (… images/s)" line.

Run ``.venv/bin/python bench/bench_metrics.py`` (``--quick`` for a smoke run; ``--device cuda``).
Per image, the standard metrics run ``2 · M · (S − 1) + 3`` no-grad forwards (``M = 5`` maps,
``S = 14`` steps for a 14×14 grid: 133), batched ``--max-batch`` at a time: that, not the maps, is
the price.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
from bench_compute import seconds_per_call  # this folder: the scripts run as files
from timm.data import resolve_data_config

from common.methods import MethodSettings
from common.metric_settings import MetricFamily, MetricSettings
from worker.attention import explain
from worker.device import autocast_dtype, select_device
from worker.metrics import ImageInputs, box_coverage, evaluate, explanation_maps, randomized_copy

BIN = Path(sys.executable).parent
STANDARD = frozenset(MetricFamily) - {MetricFamily.SANITY}


def bench_core(
    name: str,
    batch: int,
    device: torch.device,
    dtype: torch.dtype | None,
    max_batch: int,
    warmup: int,
    repeats: int,
) -> dict[str, float]:
    model = timm.create_model(name, pretrained=False).to(device).eval()
    size = resolve_data_config({}, model=model)["input_size"]
    images = torch.randn(batch, *size, device=device)
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    coverage = box_coverage((40, 40, 140, 160), (size[1], size[2]), grid)
    randomized = randomized_copy(model, blocks=len(model.blocks) // 2, seed=0)
    method_settings = MethodSettings()

    def explained() -> list:
        return explain(model, images, method_settings, autocast_dtype=dtype)

    def scored(families: frozenset[MetricFamily]) -> Callable[[], object]:
        settings = MetricSettings(families=families, max_batch=max_batch)

        def run() -> object:
            explanations = explained()
            inputs = [
                ImageInputs(maps=explanation_maps(e), target=e.target, seed=i, coverage=coverage)
                for i, e in enumerate(explanations)
            ]
            return evaluate(
                model,
                images,
                inputs,
                settings,
                method_settings=method_settings,
                randomized=randomized,
                autocast_dtype=dtype,
            )

        return run

    rates = {}
    for label, run in (
        ("explain", explained),
        ("explain + standard metrics", scored(STANDARD)),
        ("explain + all metrics (with sanity)", scored(frozenset(MetricFamily))),
    ):
        rates[label] = batch / seconds_per_call(run, device, warmup, repeats)
    return rates


def _write_images(directory: Path, count: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["image_uri,bbox"]
    for index in range(count):
        pixels = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"{index}.png")
        lines.append(f'{index}.png,"50,60,250,260"')
    csv = directory / "data.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def bench_end_to_end(model: str, count: int, device: str) -> dict[str, float]:
    rates = {}
    with tempfile.TemporaryDirectory() as scratch:
        csv = _write_images(Path(scratch) / "images", count)
        for label, extra in (
            ("without --metrics", []),
            ("with --metrics standard", ["--metrics", "standard"]),
        ):
            work = Path(scratch) / label.replace(" ", "_")
            work.mkdir()
            env = {key: value for key, value in os.environ.items() if not key.startswith("VITSCOPE_")} | {
                "VITSCOPE_DEVICE": device
            }
            result = subprocess.run(
                [
                    str(BIN / "producer"),
                    "submit",
                    str(csv),
                    "--local",
                    "--models",
                    model,
                    "--weights",
                    "random",
                    *extra,
                ],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            match = re.search(r"\(([\d.]+) images/s\)", result.stderr)
            if match is None:
                raise RuntimeError(f"no rate in the output of producer submit:\n{result.stderr}")
            rates[label] = float(match.group(1))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="deit_tiny_patch16_224,vit_base_patch16_224")
    parser.add_argument(
        "--batch", type=int, default=8, help="images explained together (VITSCOPE_BATCH_SIZE)"
    )
    parser.add_argument("--max-batch", type=int, default=256, help="perturbed images per forward")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--autocast", default="auto")
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 1 timed call")
    parser.add_argument(
        "--end-to-end", type=int, default=0, metavar="N", help="also time producer submit --local on N images"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    dtype = autocast_dtype(args.autocast, device)
    warmup, repeats = (1, 1) if args.quick else (1, 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device={device} ({name}) autocast={dtype} batch={args.batch} max_batch={args.max_batch} torch={torch.__version__}"
    )
    for model in args.models.split(","):
        rates = bench_core(model.strip(), args.batch, device, dtype, args.max_batch, warmup, repeats)
        base = rates["explain"]
        for label, rate in rates.items():
            print(f"core        {model:<24} {label:<38} {rate:10.2f} img/s   cost ×{base / rate:6.1f}")
    if args.end_to_end:
        model = args.models.split(",")[0].strip()
        rates = bench_end_to_end(model, args.end_to_end, str(device))
        base = rates["without --metrics"]
        for label, rate in rates.items():
            print(f"end-to-end  {model:<24} {label:<38} {rate:10.2f} img/s   cost ×{base / rate:6.1f}")


if __name__ == "__main__":
    main()
