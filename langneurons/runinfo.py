"""What every run records next to its outputs (arguments, seed, package versions) and how it seeds."""
from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata
from typing import Any


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (every device) from one seed: transformers' set_seed."""
    from transformers import set_seed
    set_seed(seed)


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
