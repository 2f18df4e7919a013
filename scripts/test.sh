#!/usr/bin/env bash
# Sets up .venv (torch 2.13.0 CPU first, then unsee with its test tools) and runs the test suite offline.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not toy".
# Tests run in UNSEE_TEST_WORKERS pytest-xdist worker processes (default 2; 0: in this process), one torch thread each:
# small tensors gain little from a second thread, so two workers on two cores finish the suite in about 60% of the
# time of one process with two threads.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q -n "${UNSEE_TEST_WORKERS:-2}" "$@"
