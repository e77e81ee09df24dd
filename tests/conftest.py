"""What every test file shares: where things are, the environment the scripts run in, and the one way to run a
script. pytest.ini puts the repository root and tests/ on sys.path (bench/ is the package `bench`, so
bench/detection.py never stands in for the repository's detection.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

import pytest

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


# ---------------------------------------------------------------- many short runs: one import, a fork per run

# Reads one case per line ({"argv", "cwd", "env", "stdout", "stderr"}) and answers with the forked child's exit status.
_FORK_SERVER = r"""
import json, os, runpy, sys, traceback
import torch, transformers, accelerate, datasets, safetensors.torch, matplotlib, tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
import langneurons.cli, langneurons.data, langneurons.importance, langneurons.masking, langneurons.metrics
import langneurons.model, langneurons.neurons, langneurons.sparse
for line in sys.stdin:
    case = json.loads(line)
    pid = os.fork()
    if pid == 0:
        out = os.open(case["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.chdir(case["cwd"])
        os.environ.update(case["env"])
        sys.argv = case["argv"]
        sys.path[0] = os.path.dirname(case["argv"][0])
        code = 0
        try:
            runpy.run_path(case["argv"][0], run_name="__main__")
        except SystemExit as e:
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


class ForkServer:
    """Runs the repository's scripts as forked children of one process that imported torch, transformers and
    the package once: each run is still a real process (its own exit status, stdout and stderr) without the
    seconds of imports, for tests that run a script dozens of times on bad input. One thread per process."""

    def __init__(self, root: Path):
        self.root = root
        # PYTHONPATH: the server imports the package before any case puts its script's folder on sys.path
        env = script_env({"PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": root / "hf_datasets"})
        self.proc = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.n = 0

    def __call__(self, script: str, *args, cwd: str | Path = REPO,
                 env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        self.n += 1
        out, err = self.root / f"{self.n}.out", self.root / f"{self.n}.err"
        argv = [str(REPO / script), *map(str, args)]
        case = {"argv": argv, "cwd": str(cwd), "env": {k: str(v) for k, v in (env or {}).items()},
                "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return subprocess.CompletedProcess(argv, int(line), out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def forked(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("fork_server"))
    yield server
    server.close()
