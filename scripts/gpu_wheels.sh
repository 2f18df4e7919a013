#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the lent GPU machine lacks, for benchmarks/gpu_speed.py: that machine has
# PyTorch (CUDA), transformers, accelerate, peft and safetensors but no network, no diffusers and no xformers.
# Python 3.12 wheels for x86-64 Linux, without dependencies (the machine has the rest).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
mkdir -p .whl
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "diffusers==0.42.1" "importlib_metadata" "xformers==0.0.35"
ls -l .whl
