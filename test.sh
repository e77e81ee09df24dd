#!/usr/bin/env bash
# Sets up (./setup.sh) and runs the test suite; extra arguments go to pytest (e.g. -m "not e2e").
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
