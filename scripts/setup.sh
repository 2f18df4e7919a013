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

# The demo's browser test (tests/test_app.py) renders the app in Debian's headless Chromium.
if [[ "$extras" == *dev* ]] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi
  if [ "$sudo" != none ]; then
    echo "setup: installing Debian's chromium for the demo's browser test"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium; } \
      >/dev/null 2>&1 || echo "setup: could not install chromium; the browser test will be skipped" >&2
  else
    echo "setup: chromium is missing and apt-get needs root; the browser test will be skipped" >&2
  fi
fi
