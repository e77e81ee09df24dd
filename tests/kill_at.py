"""Run a stage script and SIGKILL it just before its K-th change to the filesystem (a file opened for
writing, a folder made, a rename, a deletion): a kill at a chosen point of the run.

    python tests/kill_at.py K detection.py --model ...
    python tests/kill_at.py K@TEXT detection.py ...   # the K-th change counting from the first that names TEXT

(fs_changes() with no kill counts and names the changes, as in "rename out/tiny/neurons".) With
KILL_AT_SIGNAL=SIGINT or SIGTERM in the environment, that signal is sent instead of SIGKILL (Ctrl-C or a
polite stop at that point)."""
from __future__ import annotations

import builtins
import contextlib
import io
import os
import runpy
import shutil
import signal
import sys
from typing import Iterator

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


@contextlib.contextmanager
def fs_changes(kill_at: int = 0, start: str = "") -> Iterator[list[str]]:
    """Count (and name) the filesystem changes made inside the block; SIGKILL the process before the
    `kill_at`-th one when it is positive, counted from the first whose name is `start` (when given)."""
    seen: list[str] = []
    first = [] if start else [0]

    def change(what: str) -> None:
        seen.append(what)
        if not first and what == start:
            first.append(len(seen) - 1)
        if first and len(seen) - first[0] == kill_at:
            os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_AT_SIGNAL", "SIGKILL")))

    originals = {}

    def patch(owner, name, is_change):
        orig = getattr(owner, name)
        originals[(owner, name)] = orig

        def wrapper(*args, **kwargs):
            if is_change(*args, **kwargs):
                change(f"{name} {args[0] if args else ''}")
            return orig(*args, **kwargs)
        setattr(owner, name, wrapper)

    def open_writes(file, mode="r", *a, **k):
        return isinstance(mode, str) and any(c in mode for c in "wax+")

    def os_open_writes(path, flags, *a, **k):
        return bool(flags & _WRITE_FLAGS)

    always = lambda *a, **k: True  # noqa: E731
    patch(builtins, "open", open_writes)
    patch(io, "open", open_writes)
    patch(os, "open", os_open_writes)
    for name in ("mkdir", "rename", "replace", "unlink", "remove", "rmdir"):
        patch(os, name, always)
    patch(shutil, "rmtree", always)
    try:
        yield seen
    finally:
        for (owner, name), orig in originals.items():
            setattr(owner, name, orig)


if __name__ == "__main__":
    k, _, start = sys.argv[1].partition("@")
    script = sys.argv[2]
    sys.argv = sys.argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script` would
    with fs_changes(int(k), start):
        runpy.run_path(script, run_name="__main__")
