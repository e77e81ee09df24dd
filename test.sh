#!/usr/bin/env bash
# Sets up (./setup.sh) and runs the test suite; extra arguments go to pytest (e.g. -m "not e2e").
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
# two worker processes with one thread each, whole test files per worker (TEST_WORKERS=0: one process)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
