"""train.sh's seed loop: SEEDS="1 2 3" runs every run once per seed, named <run>-seed<N>; one seed or none keeps
the plain run name (no model is trained: a stand-in for the Python interpreter records each call)."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_PYTHON = """#!/usr/bin/env bash
# `-m langneurons.layout neurons ...` answers a neurons folder; every other call is train.py: record its arguments
if [[ $1 == -m ]]; then echo /n; exit 0; fi
printf '%q ' "$@" >> "$CALLS"; echo >> "$CALLS"
"""


def train_sh(tmp_path: Path, seeds: str | None, *flags: str) -> list[list[str]]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = {**os.environ, "PYTHON": str(fake), "CALLS": str(calls)}
    env.pop("SEEDS", None)
    if seeds is not None:
        env["SEEDS"] = seeds
    script = (ROOT / "train.sh").read_text()
    # one language and one set, so the calls are few and known (the variables are meant to be edited)
    script = script.replace("TRAIN_LANGS=(sw th zh)", "TRAIN_LANGS=(sw)").replace(
        "NEURON_SETS=(exclusive_LANG random_exclusive_LANG)", "NEURON_SETS=(exclusive_LANG)").replace(
        "LORA_RANKS=()", "LORA_RANKS=(8)")
    assert "TRAIN_LANGS=(sw)" in script and "LORA_RANKS=(8)" in script
    (tmp_path / "train.sh").write_text(script)
    r = subprocess.run(["bash", str(tmp_path / "train.sh"), *flags], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in calls.read_text().splitlines()]


def option(call: list[str], flag: str) -> str | None:
    """The value the last occurrence of `flag` gives (argparse: the last one wins)."""
    values = [call[i + 1] for i, a in enumerate(call[:-1]) if a == flag]
    return values[-1] if values else None


def test_one_run_per_seed_named_by_seed(tmp_path):
    calls = train_sh(tmp_path, "1 2 3", "--max-steps", "2", "--seed", "9")
    assert [(option(c, "--lang"), option(c, "--neurons") or f"lora{option(c, '--lora-rank')}", option(c, "--seed"),
             option(c, "--run-name")) for c in calls] == \
        [("sw", "/n/exclusive_sw.json", s, f"sw-exclusive_sw-seed{s}") for s in "123"] + \
        [("sw", "lora8", s, f"sw-lora8-seed{s}") for s in "123"]  # SEEDS wins over a --seed among the flags
    assert all(option(c, "--max-steps") == "2" and c[0] == "train.py" for c in calls)


@pytest.mark.parametrize("seeds", [None, "", "5"])
def test_one_seed_or_none_keeps_the_run_name(tmp_path, seeds):
    calls = train_sh(tmp_path, seeds)
    assert len(calls) == 2 and all(option(c, "--run-name") is None for c in calls)
    assert [option(c, "--seed") for c in calls] == ([None, None] if not seeds else ["5", "5"])
