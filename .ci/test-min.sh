#!/usr/bin/env bash
# The fast tests (-m "not e2e") in a second environment with the LOWEST transformers and accelerate that
# requirements.txt allows, so that every lower bound there is a version the suite has passed on.
# torch is the CPU build as in setup.sh; the other packages are requirements.txt's. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MIN_VENV:-.venv-min}
# "transformers>=5.17" -> "transformers==5.17"
pins=$(sed -nE 's/^(transformers|accelerate)>=([0-9][0-9.]*).*/\1==\2/p' requirements.txt)
if [ "$(echo "$pins" | wc -l)" != 2 ]; then
  echo "test-min.sh: requirements.txt has no lower bound for transformers or accelerate" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp=$VENV/.langneurons-installed
want=$( (cat requirements.txt; echo "$pins"; cat "$0") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q "${TORCH_SPEC:-torch==2.13.0}"
  echo "$pins" > "$VENV/constraints-min.txt"
  "$VENV/bin/pip" install -q -r requirements.txt -c "$VENV/constraints-min.txt"
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" - "$pins" <<'PYEOF'
import sys
from importlib.metadata import version
from packaging.version import Version
for pin in sys.argv[1].split():
    name, want = pin.split("==")
    if Version(version(name)) != Version(want):
        sys.exit(f"test-min.sh: {name} {version(name)} is installed, the lowest allowed is {want}")
print("lowest allowed versions:", ", ".join(f"{n} {version(n)}" for n in ("transformers", "accelerate", "torch")))
PYEOF
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q -m "not e2e" "$@"
