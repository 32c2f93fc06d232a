#!/usr/bin/env bash
# Fill the git-ignored .device/ folder that scripts/gpu_eval.sh needs on the GPU machine
# (which has no internet): a trimmed llama-cpp-python sdist (the full one is over the 64 MiB
# that travels) and the wheels that machine's Python 3.12 lacks. Run here, where PyPI works.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .device/whl
"$PY" scripts/build_backend.py --trim-sdist .device/llama_cpp_python-0.3.36-trimmed.tar.gz
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/whl gguf==0.19.0 diskcache platformdirs
du -sh .device
