#!/usr/bin/env bash
# GPU check (bench/gpu_check.py), for a machine with a CUDA torch, transformers, safetensors,
# pyarrow and pillow but no network, no diffusers, no ftfy, no Ray. Pure-Python wheels it lacks
# are installed from a local folder first (default .whl/ in the repository root), made on a
# machine with PyPI access:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl diffusers ftfy wcwidth importlib_metadata lazy-importer py-spy
# (add zipp where the machine lacks it; py-spy only for gpu_job_check.py --py-spy, which finds its
# binary in the install folder). Usage: bash bench/gpu_check.sh [WHEEL_DIR] [-- gpu_check.py
# options]. The eager measurements take a few minutes; compiled modes run while --budget-s allows.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels="${1:-.whl}"
if compgen -G "$wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gpu-check-site "$wheels"/*.whl
  export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi
shift $(( $# > 0 ? 1 : 0 ))
[ "${1:-}" = "--" ] && shift
export PYTHONUNBUFFERED=1
timeout 600 python3 "${GPU_CHECK:-bench/gpu_check.py}" "$@"
