"""What every test file shares: where things are, the environment the scripts run in, and the one way to run a
script. pytest.ini puts the repository root and tests/ on sys.path (bench/ is the package `bench`, so
bench/detection.py never stands in for the repository's detection.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# No downloads and no chatter from transformers: in this process, and so in everything it starts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# On top of that, in the scripts the tests run: no progress bars and no tokenizers fork warning, so that stderr
# holds what the script itself says (the one-line error checks read it). Thread settings are left to the caller:
# a test that compares a script with an in-process run needs this process's own.
SCRIPT_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
              "TOKENIZERS_PARALLELISM": "false"}


def script_env(extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment with SCRIPT_ENV and then `extra` on top (a None value removes the variable)."""
    env = {**os.environ, **SCRIPT_ENV}
    for name, value in (extra or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def script_command(script: str, *args, launcher: Sequence[str] = (sys.executable,)) -> list[str]:
    """`launcher REPO/script args`, every part a string."""
    return [*map(str, launcher), str(REPO / script), *map(str, args)]


def run_script(script: str, *args, launcher: Sequence[str] = (sys.executable,), cwd: str | Path = REPO,
               env: Mapping[str, str | None] | None = None, timeout: float = 600, check: bool = False,
               **kwargs) -> subprocess.CompletedProcess:
    """Run the repository's `script` with `args` through `launcher` (python, torchrun, accelerate launch) in `cwd`,
    in script_env(env), its output captured as text; check=True fails the test unless it exits 0. Other keyword
    arguments go to subprocess.run."""
    cmd = script_command(script, *args, launcher=launcher)
    r = subprocess.run(cmd, cwd=cwd, env=script_env(env), capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)}\nexit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    return r


def free_port() -> int:
    """A TCP port nobody listens on now, for the rendezvous of a multi-process launch (no fixed ports:
    tests run in parallel with other launches)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
