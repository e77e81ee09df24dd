"""One reuse rule for every stage, and what keeps results whole under kills and concurrent runs.

An output is reused only when everything it was computed from is unchanged: every argument that can change
it, the content of every input file the stage read (dataset files, neuron files, the model's weights, config
and tokenizer) and the version of the computation (`VERSIONS`). That record, the fingerprint, is written
into the output's metadata; a rerun compares it with its own and says in one line what changed. The hash
of the code (the package and the stage script) is recorded too, for provenance, but an edit that leaves
every result as it was (a help string, a refactoring) does not throw stored results away: a rerun says
in one line that they were computed by other code of the same version, and reuses them.

Each output unit (a folder: neurons/, a variant, a trained run, figures/; or a file: deactivation.json,
eval/<name>.json) has a lock (filelock) in <cache_root>/locks, named after its resolved path: a second run on
the same unit waits for the first, and a run that stops early leaves nothing in the output folder. Temporaries
are `.<name>.<random>.tmp` (langneurons.files.temp_name); whoever takes a lock removes the temporaries of
every unit in that folder whose lock no live run holds, i.e. those of killed runs."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from .cli import InputError
from .files import read_json, safe_name, write_bytes
from .model import cache_root, local_dir, resolve_model

# The version of each computation whose results an output holds: raise one whenever the code changes its
# results (tests/test_golden.py fails until you do, and names it), so that stored results are recomputed.
VERSIONS = {"detection": 2, "deactivation.variant": 1, "train": 1,
            "evaluate.mgsm": 2,
            "evaluate.mmmlu": 2,
            "means": 1,
            "deactivation.ppl": 2,
            "evaluate.ppl": 2,
            "steering": 1,
            }
# where the results go and whether to recompute them, never what they are
ALWAYS_IGNORED = ("force", "out")
# files at least this large are hashed once; the digest is cached by path, size, mtime, ctime and inode
CACHE_MIN_BYTES = 1 << 20
# files of a model folder that cannot change what the model computes: provenance, logs, licences, docs
NOT_MODEL_FILES = re.compile(r"langneurons\.json|train_log\.json|neurons\.json|.*\.md|LICEN[CS]E.*|NOTICE.*|"
                             r".*TERMS.*", re.I)
_LEFTOVER = re.compile(r"\.(?P<unit>.+)\.[A-Za-z0-9_]+\.tmp")


# ---------------------------------------------------------------- content hashes

def _hash_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"hash {path.name}",
                                     leave=False, disable=size < CACHE_MIN_BYTES * 64) as bar:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> tuple:
    # ctime and inode too: a file rewritten in place or replaced keeps neither, even at the same size and mtime
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content. Large files (model weights) are read once: the digest is cached in
    <cache_root>/digests under their path, size, modification and change times and inode."""
    path = Path(path)
    st = path.stat()
    if st.st_size < CACHE_MIN_BYTES:
        return _hash_file(path, st.st_size)
    key = json.dumps([str(path.resolve()), *_stat_key(st)])
    entry = cache_root() / "digests" / f"{hashlib.sha256(key.encode()).hexdigest()}.sha256"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        cached = entry.read_text(encoding="ascii").strip()
        if re.fullmatch(r"[0-9a-f]{64}", cached):
            return cached
    digest = _hash_file(path, st.st_size)
    if _stat_key(path.stat()) == _stat_key(st):  # not rewritten while it was being read
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
            write_bytes(entry, digest.encode("ascii"))
    return digest


def model_files(model: str) -> list[Path]:
    """The files of `--model` that decide what it computes: weights, config, generation config, tokenizer
    (every top-level file of its folder but provenance, logs and licences); the file itself for a .gguf."""
    path, gguf = resolve_model(model)
    if gguf:
        return [Path(path) / gguf]
    folder = local_dir(path)
    if folder is None:  # not cached: loading it fails later with its own message
        return []
    return sorted(f for f in folder.iterdir()
                  if f.is_file() and not f.name.startswith(".") and not NOT_MODEL_FILES.fullmatch(f.name))


def code_version(script: str | Path) -> str:
    """Hash of the package's sources and the stage script: results of other code are not reused."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for f in sorted(pkg.rglob("*.py")) + [Path(script).resolve()]:
        name = f.relative_to(pkg).as_posix() if f.is_relative_to(pkg) else f.name
        h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------- fingerprints

def fingerprint(args: argparse.Namespace, script: str | Path, computation: str, *, ignore: Iterable[str] = (),
                files: Iterable[str | Path] = (), models: Iterable[str] = (),
                context: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an output of `computation` (a key of VERSIONS) is computed from: every argument but `ignore`
    (and --force, --out), the digest of every input file and model file, facts outside the arguments
    (`context`, e.g. the number of processes) and the computation's version; the code's hash rides along
    for provenance. JSON-normal, so it compares equal to its stored copy."""
    skip = set(ALWAYS_IGNORED) | set(ignore)
    fp = {"args": {k: v for k, v in sorted(vars(args).items()) if k not in skip},
          "context": dict(context or {}),
          "model": {str(f): file_digest(f) for m in models for f in model_files(m)},
          "files": {str(Path(f)): file_digest(f) for f in files},
          "version": {computation: VERSIONS[computation]},
          "code": code_version(script)}
    return json.loads(json.dumps(fp))


def text_digest(texts: Iterable[str]) -> str:
    """SHA-256 of a list of texts (a corpus read from a folder or a dataset id rather than one file)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    return h.hexdigest()


def _show(v: Any) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 40 else s[:37] + "..."


def changes(old: Any, new: dict[str, Any], ignore_args: Iterable[str] = ()) -> list[str]:
    """What differs between a stored fingerprint and a new one, in words (empty: nothing)."""
    if not isinstance(old, dict) or not all(isinstance(old.get(k), dict) for k in ("args", "model", "files")):
        return ["the earlier output records no fingerprint (written by an older version)"]
    if not isinstance(old.get("version"), dict):
        return ["the earlier output records no computation version (written by an older version)"]
    out = []
    for key, label in (("args", lambda k: "--" + k.replace("_", "-")), ("context", str)):
        o, n = old.get(key) or {}, new[key]
        for k in sorted((set(o) | set(n)) - set(ignore_args)):
            if k not in o or k not in n or o[k] != n[k]:
                out.append(f"{label(k)} changed ({_show(o.get(k))} -> {_show(n.get(k))})")
    for key in ("model", "files"):
        o, n = old[key], new[key]
        for f in sorted(set(o) | set(n)):
            if f not in o:
                out.append(f"{f} is read now")
            elif f not in n:
                out.append(f"{f} is no longer read")
            elif o[f] != n[f]:
                out.append(f"{f} changed")
    for k in sorted(set(old["version"]) | set(new["version"])):
        if old["version"].get(k) != new["version"].get(k):
            out.append(f"the code computes {k} differently (version {old['version'].get(k)} -> "
                       f"{new['version'].get(k)})")
    return out


def recompute_line(diffs: list[str], what: str | Path) -> str:
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return f"Recomputing: {'; '.join(diffs[:3])}{more} ({what})"


def reuse_line(old: dict, new: dict, what: str | Path) -> str:
    """The line of a rerun that reuses `what`, whose stored fingerprint `old` has no changes from `new`."""
    if old.get("code") == new["code"]:
        return f"Reusing {what} (nothing it was computed from changed; --force recomputes)"
    versions = ", ".join(f"{k} {v}" for k, v in new["version"].items())
    return f"Reusing {what}, computed by other code of the same version ({versions}); --force recomputes"


def read_stored(path: str | Path) -> dict | None:
    """An earlier run's metadata file, None when there is none. A damaged one is an error (every file is
    written atomically, so something else broke it) that --force overrides."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        obj = read_json(path, "stored output")
    except InputError as e:
        raise InputError(f"{e}; --force recomputes it") from None
    if not isinstance(obj, dict):
        raise InputError(f"stored output {path}: not a JSON object; --force recomputes it")
    return obj


def stored_fingerprint(meta: dict) -> Any:
    """The fingerprint in a stored metadata file: at the top, or under "meta" (deactivation.json)."""
    return meta.get("fingerprint", (meta.get("meta") or {}).get("fingerprint"))


# ---------------------------------------------------------------- output folders, locks, leftovers

def main_process() -> bool:
    """False on the other processes of a torchrun / accelerate launch: only the first writes and locks."""
    return int(os.environ.get("RANK", "0")) == 0


def check_writable(target: str | Path, flag: str, folder: bool) -> None:
    """Before any work: the output `target` (a folder, or a file when not `folder`) can be written where it
    is asked for; `flag` names it in the error (e.g. '--out outputs')."""
    target = Path(target)
    if target.exists() and target.is_dir() != folder:
        raise InputError(f"{flag}: {target} is {'a file, not a folder' if folder else 'a folder, not a file'}")
    p = target.parent
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise InputError(f"{flag}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise InputError(f"{flag}: cannot write into {p} (permission denied)")


def lock_file(target: str | Path) -> Path:
    """Where the lock of the output unit `target` lives: outside the output folder, so that a run stopped by
    bad input before writing anything leaves nothing there (<cache_root>/locks, else the temporary folder)."""
    target = Path(target).resolve()
    readable = safe_name(target.name, "out")[:60]
    name = f"{readable}-{hashlib.sha256(str(target).encode()).hexdigest()[:24]}.lock"
    for folder in (cache_root() / "locks", Path(tempfile.gettempdir()) / f"langneurons-locks-{os.getuid()}"):
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK | os.X_OK):
                return folder / name
    raise InputError(f"cannot create a lock for {target}: neither {cache_root() / 'locks'} nor the temporary "
                     "folder can be written")


def _lock(target: Path) -> FileLock:
    return FileLock(str(lock_file(target)))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def clean_leftovers(folder: Path, held: Path) -> None:
    """Remove the temporaries that killed runs left in `folder`: those of `held` (whose lock we hold), and
    those of any other unit whose lock no live run holds."""
    for p in sorted(folder.glob(".*.tmp")):
        m = _LEFTOVER.fullmatch(p.name)
        if not m:
            continue
        unit = folder / m["unit"]
        if unit == held:
            _remove(p)
            continue
        other = _lock(unit)
        try:
            other.acquire(timeout=0)
        except (Timeout, OSError):
            continue  # a live run is writing it
        try:
            _remove(p)
        finally:
            other.release()


def remove_temporaries(folder: Path) -> None:
    """Remove every temporary in `folder`, which belongs to an output unit whose lock the caller holds."""
    for p in folder.glob(".*.tmp") if folder.is_dir() else []:
        _remove(p)


@contextlib.contextmanager
def locked(target: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of the output unit `target` (a second run on it waits) and remove killed runs'
    temporaries beside it."""
    target = Path(target)
    if not enabled:
        yield
        return
    lock = _lock(target)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"Waiting for another run writing {target} to finish", flush=True)
        lock.acquire()
    try:
        if target.parent.is_dir():
            clean_leftovers(target.parent, target)
        yield
    finally:
        lock.release()


@dataclasses.dataclass
class Unit:
    """An output unit held by `unit()`: its path, and whether its stored copy can be reused."""
    path: Path
    record: Path  # the metadata file that holds its fingerprint
    force: bool

    def stored(self) -> dict | None:
        """The earlier output's metadata (None when there is none, or with --force)."""
        return None if self.force else read_stored(self.record)

    def up_to_date(self, fp: dict[str, Any]) -> bool:
        """True (and says so) when the stored output records fingerprint `fp`; otherwise False, with one line
        saying what changed when there is an earlier output."""
        meta = self.stored()
        if meta is None:
            return False
        if diffs := changes(stored_fingerprint(meta), fp):
            print(recompute_line(diffs, self.path))
            return False
        print(reuse_line(stored_fingerprint(meta), fp, self.path))
        return True


@contextlib.contextmanager
def unit(path: str | Path, flag: str, *, force: bool, record: str | Path | None = None, folder: bool = True,
         enabled: bool = True) -> Iterator[Unit]:
    """What every stage does around one output, for the with-block: check that it can be written where it
    is asked for (`flag` names it in the error), hold its lock (a second run on it waits, then reuses it),
    remove the temporaries killed runs left beside it, and answer whether the stored copy is up to date
    (its fingerprint in `record`: the file itself, or the named metadata file of a folder). `enabled`:
    False on the other processes of a launch, which neither lock nor write."""
    path = Path(path)
    if enabled:
        check_writable(path, flag, folder)
    with locked(path, enabled):
        if enabled and folder:
            remove_temporaries(path)  # written inside it by a killed run (figures/)
        yield Unit(path, Path(record) if record is not None else path, force)
