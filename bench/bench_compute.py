"""Throughput of the compute core: images per second for every array artifact, and what it costs.

For each model and batch size three things are timed on the same random batch:

- ``forward``: the plain model forward in inference mode (timm's fused attention) — what a
  classifier would pay;
- ``fwd+bwd``: ``capture`` — the unfused forward with attention hooks plus the one backward pass;
- ``explain``: ``explain`` with default ``MethodSettings`` (raw attention off) — the capture plus
  every artifact, copied to numpy on the CPU.

``explain ÷ forward`` is how many times more an explanation costs than a prediction. Weights are
random: throughput does not depend on their values. Run ``.venv/bin/python bench/bench_compute.py``
(``--quick`` for a short run, ``--json`` for machine-readable output).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import timm
import torch
from timm.data import resolve_data_config

from common.methods import MethodSettings
from worker.attention import capture, explain
from worker.device import autocast, autocast_dtype, select_device

DEFAULT_MODELS = ("deit_tiny_patch16_224", "vit_base_patch16_224")
DEFAULT_BATCH_SIZES = (1, 8)


@dataclass
class Row:
    model: str
    batch_size: int
    forward_images_per_second: float
    forward_backward_images_per_second: float
    explain_images_per_second: float

    @property
    def explain_cost_vs_forward(self) -> float:
        return self.forward_images_per_second / self.explain_images_per_second


def seconds_per_call(run: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``run`` after ``warmup`` untimed calls (CUDA work is waited for)."""
    for _ in range(warmup):
        run()
    timings = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def bench_model(
    name: str,
    batch_sizes: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype | None,
    warmup: int,
    repeats: int,
) -> list[Row]:
    model = timm.create_model(name, pretrained=False).to(device).eval()
    config = resolve_data_config({}, model=model)
    settings = MethodSettings()
    rows = []
    for batch_size in batch_sizes:
        images = torch.randn(batch_size, *config["input_size"], device=device)

        def forward(images: torch.Tensor = images) -> object:
            with torch.inference_mode(), autocast(device, dtype):
                return model(images)

        def forward_backward(images: torch.Tensor = images) -> object:
            return capture(model, images, autocast_dtype=dtype)

        def explain_all(images: torch.Tensor = images) -> object:
            return explain(model, images, settings, autocast_dtype=dtype)

        seconds = [
            seconds_per_call(run, device, warmup, repeats) for run in (forward, forward_backward, explain_all)
        ]
        rows.append(Row(name, batch_size, *(batch_size / value for value in seconds)))
    return rows


def _print_table(rows: list[Row], header: str) -> None:
    print(header)
    columns = ("model", "batch", "forward img/s", "fwd+bwd img/s", "explain img/s", "explain ÷ forward")
    print(
        f"{columns[0]:<24} {columns[1]:>5} {columns[2]:>14} {columns[3]:>14} {columns[4]:>14} {columns[5]:>18}"
    )
    for row in rows:
        print(
            f"{row.model:<24} {row.batch_size:>5} {row.forward_images_per_second:>14.2f} "
            f"{row.forward_backward_images_per_second:>14.2f} {row.explain_images_per_second:>14.2f} "
            f"{row.explain_cost_vs_forward:>17.1f}×"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated timm names")
    parser.add_argument(
        "--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)), help="comma-separated batch sizes"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (the median is reported)")
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 2 timed calls: a smoke run")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--autocast", default="auto", help="auto, off, float16, bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warmup, repeats = (1, 2) if args.quick else (args.warmup, args.repeats)
    device = select_device(args.device)
    dtype = autocast_dtype(args.autocast, device)
    batch_sizes = tuple(int(size) for size in args.batch_sizes.split(","))
    torch.manual_seed(0)
    rows = [
        row
        for name in args.models.split(",")
        for row in bench_model(name.strip(), batch_sizes, device, dtype, warmup, repeats)
    ]
    environment = {
        "device": str(device),
        "autocast": str(dtype).removeprefix("torch.") if dtype is not None else "off",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cpu": platform.processor() or platform.machine(),
        "warmup": warmup,
        "repeats": repeats,
    }
    if args.json:
        results = [asdict(row) | {"explain_cost_vs_forward": row.explain_cost_vs_forward} for row in rows]
        print(json.dumps({"environment": environment, "results": results}, indent=2))
    else:
        _print_table(rows, " ".join(f"{key}={value}" for key, value in environment.items()))


if __name__ == "__main__":
    main()
