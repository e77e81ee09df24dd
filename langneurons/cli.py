"""The command line every stage script shares: common flags, argparse types that check a flag as it is
parsed, and one-line errors with exit status 2 (file I/O is langneurons.files, run records
langneurons.runinfo)."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
from typing import Callable

DEFAULT_LANGS = "en,zh,th,sw,fr,de"
EMBEDDED_MODEL = "gemma-3-270m"


class InputError(Exception):
    """Bad input from the user: reported as one line, exit status 2, nothing written."""


class OutOfSpace(Exception):
    """The disk (or quota) filled while writing an output: one line, exit status 74 (sysexits' EX_IOERR)."""


class Interrupted(BaseException):
    """SIGTERM, raised where the stage is, so that it unwinds like Ctrl-C (temporaries removed, locks freed)."""


# exit statuses of docs/outputs.md section 10: 128 + the signal, as a shell reports a process it stopped
EXIT_INPUT, EXIT_NO_SPACE, EXIT_SIGPIPE = 2, 74, 128 + signal.SIGPIPE
EXIT_SIGNAL = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported like every other bad input: one line, exit status 2."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        if getattr(ns, "revision", None) is not None:
            ns.model = with_revision(ns.model, ns.revision)
        return ns, rest


def with_revision(model: str, revision: str) -> str:
    """`--model ID --revision REV` as the one model spec `ID@REV` that every stage resolves, names and records
    (model.resolve_model, layout.model_name); a local folder, a .gguf file or the embedded model has no
    revisions and is refused."""
    if not revision.strip() or revision != revision.strip():
        raise_usage(f"--revision '{revision}': empty or padded with blanks")
    if model == EMBEDDED_MODEL or model.endswith(".gguf") or os.path.exists(model) or model.startswith((".", "/", "~")):
        what = "the embedded model" if model == EMBEDDED_MODEL else "a .gguf file" if model.endswith(".gguf") \
            else "a local folder"
        raise_usage(f"--revision {revision}: --model {model} is {what}; a revision selects a cached hub "
                    "revision of a hub id (owner/name)")
    if "@" in model:  # a recorded run's --model ID@REV given again with its --revision REV
        if model.split("@", 1)[1] != revision:
            raise_usage(f"--revision {revision}: --model {model} already names another revision")
        return model
    return f"{model}@{revision}"


def raise_usage(message: str):
    """A bad flag found after parsing: the parser's one line, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
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


def split_list(text: str, flag: str | None = None) -> list[str]:
    """The items of a comma list; with `flag`, an item named twice is an error naming the flag (a repeated
    output name would otherwise wait on its own lock)."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if flag and (twice := next((s for i, s in enumerate(items) if s in items[:i]), None)) is not None:
        raise InputError(f"{flag}: '{twice}' is named twice")
    return items


def common_parser(description: str, add_help: bool = True) -> argparse.ArgumentParser:
    p = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       add_help=add_help)
    p.add_argument("--model", default=EMBEDDED_MODEL,
                   help=f"HF hub id, local model directory, or a .gguf file; '{EMBEDDED_MODEL}' is the "
                        "embedded default (google/gemma-3-270m shipped through PyPI as GGUF)")
    # SUPPRESS: unset, the flag is absent from the namespace, so the records (and fingerprints) of runs without
    # it stay what they were; set, --model becomes ID@REV (ArgumentParser.parse_known_args)
    p.add_argument("--revision", default=argparse.SUPPRESS, metavar="REV",
                   help="a branch, tag or commit of a hub --model, from the local Hugging Face cache (nothing is "
                        "downloaded), e.g. Pythia's step1000; outputs go under <tag> <name>@<REV>")
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


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); an ordinary fault ends in one line on stderr and a documented exit status instead
    of a traceback: bad input (2), a full disk (74), Ctrl-C or SIGTERM (130 / 143), a closed stdout (141).
    Outputs appear only by rename and every lock is a with-block of main(), so whatever stops a stage leaves
    the completed outputs, nothing partial, and no lock held."""
    stage = os.path.basename(sys.argv[0]) or "the stage"
    on_main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _raise_interrupted) if on_main_thread else None
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_INPUT)
    except OutOfSpace as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_NO_SPACE)
    except (KeyboardInterrupt, Interrupted) as e:
        signum = e.args[0] if isinstance(e, Interrupted) else signal.SIGINT
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"error: {stage} interrupted ({name}); completed outputs are kept and nothing partial: "
              "the same command resumes", file=sys.stderr)
        sys.exit(EXIT_SIGNAL[signum])
    except BrokenPipeError:
        # the reader of stdout went away (`| head`): say nothing more there, and stop as the shell expects
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"error: {stage}: its output pipe was closed; stopped", file=sys.stderr)
        sys.exit(EXIT_SIGPIPE)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, old_term)
