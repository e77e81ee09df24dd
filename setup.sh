#!/usr/bin/env bash
# Creates ./.venv and installs what the project needs; quick when already done.
# The venv sees the system's packages, so a GPU box's own torch / transformers are used as they are
# (requirements are lower bounds). Where no torch is installed and no GPU is present, the CPU build of
# torch is installed first ($TORCH_SPEC), so that pip never pulls the CUDA packages.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv --system-site-packages .venv
stamp=.venv/.langneurons-installed
want=$(cat requirements.txt setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      .venv/bin/pip install -q "${TORCH_SPEC:-torch}"
    else
      .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"   # the CPU wheel here; set TORCH_SPEC elsewhere
    fi
  fi
  .venv/bin/pip install -q -r requirements.txt
  echo "$want" > "$stamp"
fi
