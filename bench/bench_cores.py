"""What k cores of this machine give a perfectly parallel load: the ceiling for any pipeline's scaling.

``bench_pipeline.py`` asks whether the worker's CPU side grows with cores. On a virtual machine the
answer also depends on the host: two vCPUs may share a physical core, and one busy core may run at a
higher clock than two. This runs the pipeline's own per-image kernels — a JPEG decoded and resized,
three overlays drawn, five PNGs encoded, as in ``worker.pipeline.cpu`` — in ``k`` independent
processes, one pinned to each of the first ``k`` cores, with no shared state, no GIL and no I/O between
them, and reports images/s per core count. Their ratio is what the hardware allows; the pipeline's
own ``k cores ÷ 1 core`` can only approach it.

Core counts are interleaved ``--repeat`` times (a slow spell of the machine falls on all of them);
the table shows the median and range.

    .venv/bin/python bench/bench_cores.py --cores 1,2 --repeat 5
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def kernel_loop(seconds: float) -> int:
    """Images processed in ``seconds`` by this process alone (it runs pinned to one core)."""
    import numpy as np
    import torch
    from PIL import Image

    from worker.preprocess import decode_image
    from worker.render import heatmap_overlays, png_bytes

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    photo = np.stack([x % 251, y % 241, (x + y) % 239], axis=-1) + rng.integers(0, 8, (375, 500, 3))
    buffer = io.BytesIO()
    Image.fromarray(photo.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    maps = torch.from_numpy(rng.random((1, 3, 14, 14)).astype(np.float32))
    done, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        image = decode_image(jpeg, max_pixels=10**8, min_size=256)
        crop = np.asarray(image.resize((298, 224), Image.BICUBIC).crop((37, 0, 261, 224)))
        overlays = heatmap_overlays(torch.from_numpy(crop.copy())[None], maps)[0].numpy()
        for picture in (crop, *overlays, crop):
            png_bytes(np.ascontiguousarray(picture))
        done += 1
    return done


def run(cores: int, seconds: float) -> float:
    """Images/s of ``cores`` pinned processes together."""
    available = sorted(os.sched_getaffinity(0))
    if cores > len(available):
        raise SystemExit(f"--cores {cores}: only {len(available)} core(s) available")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            ["taskset", "-c", str(core), sys.executable, __file__, "--child", f"--seconds={seconds}"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for core in available[:cores]
    ]
    counts = [int(p.communicate()[0].strip().splitlines()[-1]) for p in processes]
    if any(p.returncode for p in processes):
        raise SystemExit("a kernel process failed")
    return sum(counts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", default="1,2", help="core counts, e.g. 1,2,4")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        from worker.cores import wait_passively_in_openmp

        wait_passively_in_openmp()  # as in the pipeline

        print(kernel_loop(args.seconds))
        return
    cores = [int(c) for c in args.cores.split(",")]
    rates: dict[int, list[float]] = {k: [] for k in cores}
    for repeat in range(args.repeat):
        for k in cores:
            rates[k].append(run(k, args.seconds))
            print(f"  [{repeat + 1}/{args.repeat}] {k} core(s): {rates[k][-1]:.1f} img/s", file=sys.stderr)
    print(f"independent per-image kernels (decode, resize, 3 overlays, 5 PNGs), {args.seconds:g} s runs")
    print(f"{'cores':>5}{'img/s':>9}{'range':>15}{'÷ 1 core':>10}")
    base = statistics.median(rates[cores[0]]) if cores[0] == 1 else None
    for k in cores:
        median = statistics.median(rates[k])
        ratio = f"{median / base:.2f}x" if base else "-"
        print(f"{k:>5}{median:>9.1f}{f'{min(rates[k]):.1f}-{max(rates[k]):.1f}':>15}{ratio:>10}")


if __name__ == "__main__":
    main()
