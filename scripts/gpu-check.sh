#!/usr/bin/env bash
# make gpu-check: the GPU tests and the GPU benchmark in one command (bench/gpu_check.py), with the system Python of
# a GPU machine that cannot download anything. Wheels carried in GPU_WHEELS (make gpu-wheels fills it) are
# installed into a temporary target put first on PYTHONPATH (its bin/, where py-spy lands, first on PATH), but only
# where that Python lacks `datasets`: a machine with the project's own environment uses it as it is. The model's
# tokenizer and the corpus come from GPU_ASSETS (make gpu-assets fills it); without them they are built there.
#
#   GPU_CHECK_DIR=.gpu-check scripts/gpu-check.sh [bench/gpu_check.py options]
#   PYTHON=python3 (default), GPU_WHEELS=.gpu-wheels, GPU_ASSETS=.gpu-assets (defaults), GPU_CHECK_DRY=1 forces
#   dry mode on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${GPU_CHECK_DIR:-.gpu-check}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
ASSETS=${GPU_ASSETS:-.gpu-assets}

if ! "$PYTHON" -c 'import datasets' 2>/dev/null; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "gpu-check: $PYTHON has no 'datasets' and $WHEELS/ holds no wheels; run 'make gpu-wheels' where PyPI" \
            "is reachable and carry $WHEELS/ along" >&2
        exit 2
    fi
    site=$(mktemp -d -t gpu-check-site-XXXXXX)
    trap 'rm -rf "$site"' EXIT
    if ! "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
            "$WHEELS"/*.whl; then
        echo "gpu-check: the wheels in $WHEELS/ do not install into $("$PYTHON" -V 2>&1); rebuild them for it:" \
            "make gpu-wheels GPU_WHEEL_PYTHON=X.Y" >&2
        exit 2
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" GPU_CHECK_SITE="$site" PATH="$site/bin:$PATH"
    echo "gpu-check: installed $(ls "$WHEELS"/*.whl | wc -l) carried wheels from $WHEELS/ into $site" >&2
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" -m bench.gpu_check --out "$OUT" --assets "$ASSETS" "$@"
