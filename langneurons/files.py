"""Files the stages write and read: atomic writes (a temporary name, then a rename, modes under the user's
umask), JSON reading with one-line errors, and the two name rules every writer shares."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

from .cli import InputError, OutOfSpace


def safe_name(text: str, fallback: str = "") -> str:
    """`text` as one filesystem-safe path component: runs of other characters become `_`, no leading or
    trailing dot/underscore (so never a hidden file, '.' or '..'); `fallback` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or fallback


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) as None, which JSON can hold and readers test for."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def temp_name(path: str | Path) -> Path:
    """A fresh sibling name `.<name>.<random>.tmp` for writing `path`: hidden, and recognisable as a leftover
    when the run writing it was killed (langneurons.reuse removes those once no live run holds the lock)."""
    path = Path(path)
    return path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"


def _no_space(e: BaseException, path: Path) -> bool:
    """Whether `e`, raised while writing under `path`, means the disk or the quota is full. Python and
    safetensors say so (errno 28 / 122); torch.save only reports that its writer failed, so that counts when
    the file system is nearly full."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    if any(s in text for s in ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")):
        return True
    return isinstance(e, RuntimeError) and "inline_container" in text and free_space(path) < 64 * 2**20


def free_space(path: str | Path) -> int:
    """Bytes free on the file system that holds `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@contextlib.contextmanager
def writing(path: str | Path, needed: int | None = None) -> Iterator[None]:
    """A full disk while the block writes `path` becomes one line naming the path, what is free there and,
    when the caller knows it (`needed` bytes), what it needs (cli.OutOfSpace, exit status 74)."""
    try:
        yield
    except OutOfSpace:
        raise
    except Exception as e:
        if not _no_space(e, Path(path)):
            raise
        need = f", about {_size(needed)} needed" if needed else ""
        raise OutOfSpace(f"no space left on the device writing {path} ({_size(free_space(path))} free{need}); "
                         "free some and run the same command again") from None


def make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; the folders it made, deepest first (remove_empty takes them back on failure, so that
    a run that writes nothing leaves no empty `<tag>/` behind)."""
    made, p = [], Path(folder)
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made


def remove_empty(folders: list[Path]) -> None:
    for f in folders:
        with contextlib.suppress(OSError):  # not empty: another write put something there
            f.rmdir()


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write under a temporary name, then rename, so readers never see half a file. The file gets the mode
    open() would give it (0666 narrowed by the umask), not mkstemp's 0600."""
    path = Path(path)
    made = make_parents(path.parent)
    tmp = temp_name(path)
    try:
        with writing(path, len(data)):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        remove_empty(made)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON under a temporary name, then rename, so readers never see half a file; NaN/inf become null."""
    write_bytes(path, (json.dumps(json_safe(obj), indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is not JSON
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path}: corrupt JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


@contextlib.contextmanager
def atomic_dir(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` whole, on error it vanishes (with
    the parents it made). `needed`: the bytes it will hold, if known, for the message of a full disk."""
    path = Path(path)
    made = make_parents(path.parent)
    tmp = temp_name(path)
    try:
        with writing(path, needed):
            os.mkdir(tmp)  # 0777 narrowed by the umask, like any folder (mkdtemp would make it 0700)
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(made)
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
