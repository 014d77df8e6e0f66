#!/usr/bin/env bash
# Fetch (on a machine with network) what bench/gpu_mstep.sh installs on the GPU machine, which has torch and
# transformers (and sympy) but no deepspeed, pydantic, liger-kernel or math-verify (zero3full's validation grades
# with it) and cannot reach PyPI (docs/measurements.md):
#   bash bench/gpu_wheels.sh            # -> .gpu-wheels/ (git-ignored; name it in the device tool's carry)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.gpu-wheels}
mkdir -p "$dest"
py=${PYTHON:-.venv/bin/python}
# Pure-python or cp312 manylinux wheels for the GPU machine's Python 3.12; deepspeed only ships an sdist.
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 -d "$dest" \
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types>=0.6" "typing-inspection>=0.4" \
  "typing-extensions>=4.14" hjson "accelerate==1.15.0" "transformers==5.19.0" msgpack ninja py-cpuinfo \
  "liger-kernel==0.8.5" einops \
  "math-verify==0.9.0" "latex2sympy2_extended==1.11.0" "antlr4-python3-runtime==4.13.2"
"$py" -m pip download -q --no-deps --no-binary=:all: -d "$dest" "deepspeed==0.19.8"
du -sh "$dest"
