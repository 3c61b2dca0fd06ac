#!/usr/bin/env bash
# The GPU benchmark in one command, from a plain checkout on a machine with one NVIDIA GPU.
#
#   bash benchmarks/gpu.sh fetch-wheels   # on a machine with PyPI: jsonschema and its needs as wheels in .whl/
#   bash benchmarks/gpu.sh [gpu.py options]   # on the GPU machine (no network needed)
#
# The GPU machine needs torch (with CUDA), torchvision, numpy, Pillow, PyYAML, pluggy, click and tqdm;
# jsonschema (facecore validates every config with it) is often missing there. fetch-wheels downloads
# it and its dependencies for CPython $PY_VERSION on manylinux x86_64 (the versions this checkout's
# .venv has, when it has them) into .whl/ (in .gitignore); carry that folder with the checkout.
# The run then installs them into a scratch folder (--no-index: nothing is fetched), makes the
# checkout importable without installing it (benchmarks/checkout.py), runs the CUDA-only tests of
# tests/test_gpu_path.py, and runs benchmarks/gpu.py, which prints one table and writes JSON.
#
# Environment: PYTHON (default python3), WHEELS (default .whl), PY_VERSION (fetch-wheels, default 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
NEEDED="jsonschema jsonschema-specifications referencing rpds-py"

if [[ ${1:-} == fetch-wheels ]]; then
    PIP=${PIP:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo "$PYTHON" )}
    specs=()
    for name in $NEEDED; do
        version=$($PIP -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
        specs+=("$name${version:+==$version}")
    done
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$p")
    done
    $PIP -m pip download --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
        "${platforms[@]}" -d "$WHEELS" "${specs[@]}"
    echo "wheels in $WHEELS/: carry that folder with the checkout, then run: bash benchmarks/gpu.sh"
    exit 0
fi

if ! $PYTHON -c "import jsonschema" 2>/dev/null; then
    if ! compgen -G "$WHEELS/*.whl" > /dev/null; then
        echo "jsonschema is not importable and $WHEELS/ holds no wheels: run 'bash benchmarks/gpu.sh fetch-wheels'" \
             "where PyPI is reachable and bring $WHEELS/ along (benchmarks/README.md, GPU)" >&2
        exit 2
    fi
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/facecore-wheels.XXXXXX")
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
CHECKOUT=$($PYTHON benchmarks/checkout.py)  # empty when facecore is installed
export PYTHONPATH="${CHECKOUT:+$CHECKOUT:}${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1

echo "== CUDA-only tests (tests/test_gpu_path.py)"
$PYTHON -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu_path.py -k cuda -rs \
    || echo "!! the CUDA tests failed (above); the benchmark runs anyway"
echo "== benchmark"
exec $PYTHON benchmarks/gpu.py "$@"
