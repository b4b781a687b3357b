#!/usr/bin/env bash
# Download, into .whl/, the wheels that a GPU image with its own torch, timm, numpy, Pillow and
# matplotlib lacks to run bench/gpu_check.sh offline (CPython 3.12, x86-64 Linux). Run it where the
# package index is reachable; .whl/ is git-ignored and travels with the repository copy.
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
# Versions as installed here, so the GPU machine runs what the tests ran.
names="alembic mako annotated-types pydantic pydantic-core pydantic-settings python-dotenv
typing-inspection sqlalchemy boto3 botocore s3transfer jmespath celery kombu billiard vine amqp
click-didyoumean click-plugins click-repl prompt-toolkit wcwidth tzlocal redis imagecodecs"
pins=$(.venv/bin/python -m pip freeze 2>/dev/null | tr 'A-Z_' 'a-z-')
mkdir -p .whl
for name in $names; do
    pin=$(printf '%s\n' "$pins" | grep -E "^$name==" || echo "$name")
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$pin"
done
du -sh .whl
