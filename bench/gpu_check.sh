#!/usr/bin/env bash
# GPU check, ready to run on a CUDA machine from a copy of the repository (no internet needed):
# the paper's four models at batch 1…128 under bfloat16 autocast, the pipeline's CPU ceiling on
# 1, 2, 4, 8 cores, and CUDA artifacts against CPU ones (every map correlates >= 0.999, else exit 1).
# Random weights: nothing is downloaded. Budget: under 8 minutes on an H200 with 16 cores.
#
#   bash bench/gpu_check.sh                 # prints a table; writes $OUT/gpu_check.json when OUT is set
#   bash bench/gpu_check.sh --device cpu --quick --no-ceiling   # the same code, briefly, on a CPU
#
# Which Python: this repository's .venv when it has everything; else a system python3 that already
# has torch and timm (a GPU image), completed from wheels in .whl/ (made beforehand, where the
# network is, by `bash bench/gpu_wheels.sh`); else `scripts/setup` makes the .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

needs='import torch, timm, imagecodecs, sqlalchemy, pydantic_settings, alembic'
if [ -x .venv/bin/python ] && .venv/bin/python -c "$needs" 2>/dev/null; then
    python=.venv/bin/python
elif python3 -c 'import torch, timm' 2>/dev/null && [ -d .whl ]; then
    site=${TMPDIR:-/tmp}/vitscope-gpu-site
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    python=python3
    "$python" -c "$needs"
else
    bash scripts/setup
    python=.venv/bin/python
fi
uptime
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
exec "$python" bench/gpu_check.py ${OUT:+--out "$OUT"} "$@"
