#!/usr/bin/env bash
# Sets up .venv (torch 2.13.0 CPU first, then unsee with its test tools) and runs the test suite offline.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not toy".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python -m pytest -q "$@"
