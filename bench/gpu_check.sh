#!/usr/bin/env bash
# GPU check, ready to run on a CUDA machine from a copy of the repository (no internet needed):
# the paper's four models at batch 1…128 under bfloat16 autocast, the pipeline's CPU ceiling on
# 1, 2, 4, 8 cores, and CUDA artifacts against CPU ones (every map correlates >= 0.999, else exit 1).
# Random weights: nothing is downloaded. Budget: under 8 minutes on an H200 with 16 cores.
#
#   bash bench/gpu_check.sh                 # prints a table; writes $OUT/gpu_check.json when OUT is set
#   bash bench/gpu_check.sh --device cpu --quick --no-ceiling   # the same code, briefly, on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."

# Reuse a carried .venv as it is (reinstalling would need the network); make one only if missing.
if ! .venv/bin/python -c 'import torch, timm, imagecodecs, sqlalchemy' 2>/dev/null; then
    bash scripts/setup
fi
uptime
.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
exec .venv/bin/python bench/gpu_check.py ${OUT:+--out "$OUT"} "$@"
