#!/usr/bin/env bash
# Creates .venv and installs unsee with everything it needs, CPU-only.
# torch is pinned and installed first: an unpinned torch (or one pulled in by
# another package) downloads a multi-GB CUDA build.
# Usage: scripts/setup.sh [extras]   (default extras: dev)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=68" wheel
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[${extras}]"
