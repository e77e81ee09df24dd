"""Trustworthy reruns (issue 9): one reuse rule for every stage, no lost or half-written result under kills
and concurrent runs, outputs that follow the umask, one-line errors for damaged or unwritable outputs.

Most runs go through a stage's own command line inside this process (runpy), which keeps the file fast;
kills and concurrency use real processes."""
import contextlib
import hashlib
import io
import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, run_script, script_command, script_env
from kill_at import fs_changes
from langneurons import reuse
from langneurons.model import Geometry
from langneurons.neurons import random_set, write_neuron_file
from tiny import save_tiny, tiny_config, tiny_dataset

@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """Locks and digests of these runs in a cache of their own, not the user's."""
    old = os.environ.get("LANGNEURONS_CACHE")
    os.environ["LANGNEURONS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["LANGNEURONS_CACHE"]
    else:
        os.environ["LANGNEURONS_CACHE"] = old


# ---------------------------------------------------------------- running the stages

def stage(script: str, *args, cwd: Path) -> tuple[int, str, str]:
    """A stage's command line run in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    argv, here = sys.argv, os.getcwd()
    sys.argv = [str(REPO / script), *map(str, args)]
    os.chdir(cwd)
    rc = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
        os.chdir(here)
    return rc, out.getvalue(), err.getvalue()


def ok(script: str, *args, cwd: Path) -> str:
    rc, out, err = stage(script, *args, cwd=cwd)
    assert rc == 0, f"{script}: {err[-3000:]}"
    return out


def error_line(script: str, *args, cwd: Path) -> str:
    rc, out, err = stage(script, *args, cwd=cwd)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err[-3000:])
    return lines[0]


def process(script: str, *args, cwd: Path, kill_at: int | str = 0, sig: str = "SIGKILL") -> subprocess.Popen:
    """The stage started in the background (optionally under tests/kill_at.py, which sends `sig`), its output
    piped. The thread settings are this process's own (script_env leaves them), so that in-process and
    subprocess runs give the same bits."""
    pre = [REPO / "tests" / "kill_at.py", kill_at] if kill_at else []
    return subprocess.Popen(script_command(script, *args, launcher=(sys.executable, *pre)), cwd=cwd,
                            env=script_env({"KILL_AT_SIGNAL": sig}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    model = save_tiny("llama", root / "tiny")
    data = tiny_dataset(root / "data", langs=("en", "fr"))
    geom = Geometry.from_config(tiny_config("llama"))
    for name, seed in (("shared", 1), ("exclusive_en", 2)):
        write_neuron_file(root / f"{name}.json", random_set(60, geom, seed, name))
    return root, model, data


def copy_model(base, dst: Path) -> Path:
    """A model folder of the same name (so the same tag) that a test may rewrite."""
    return Path(shutil.copytree(base[1], dst / "tiny"))


def det(base, model=None, data=None):
    root, m, d = base
    return ["detection.py", "--model", model or m, "--dataset", data or d, "--langs", "en,fr", "--out", "out",
            "--ratio", "0.2", "--device", "cpu"]


def deact(base, model=None, data=None, neurons=None):
    root, m, d = base
    neurons = neurons or root
    return ["deactivation.py", "--model", model or m, "--dataset", data or d, "--langs", "en,fr", "--out", "out",
            "--device", "cpu", "--neurons", f"shared={neurons / 'shared.json'}",
            "--neurons", f"exclusive_en={neurons / 'exclusive_en.json'}", "--measure-ppl", "--save-variants", "shared",
            "--limit", "3", "--batch-size", "4"]


def train(base, model=None, data=None):
    root, m, d = base
    return ["train.py", "--model", model or m, "--dataset", data or d, "--out", "out", "--device", "cpu",
            "--lang", "en", "--langs", "en", "--neurons", root / "shared.json", "--max-steps", "2", "--global-batch-size", "2",
            "--micro-batch-size", "1", "--cutoff-len", "32", "--save-steps", "1", "--lr", "1e-2", "--val-limit", "3"]


def evaluate(base, model=None, data=None, tasks="ppl,mgsm,mmmlu"):
    root, m, d = base
    return ["evaluate.py", "--model", model or m, "--dataset", data or d, "--langs", "en,fr", "--out", "out",
            "--device", "cpu", "--tasks", tasks, "--limit", "2", "--max-new-tokens", "4"]


def figures(base):
    return ["figures.py", "--out", "out"]


STAGES = {"detection": det, "deactivation": deact, "train": train, "evaluate": evaluate, "figures": figures}


@pytest.fixture(scope="module")
def detected(base):
    """A detection run's working folder (figures read its outputs)."""
    cwd = base[0] / "detected"
    cwd.mkdir()
    ok(*det(base), cwd=cwd)
    return cwd


def tree(root: Path) -> dict[str, bytes]:
    """Every file below `root` (hidden ones too: a leftover temporary counts) and its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_outputs(a: Path, b: Path) -> None:
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        if name.endswith("train_log.json"):  # the run time and whether it resumed are the only differences
            la, lb = json.loads(ta[name]), json.loads(tb[name])
            for log in (la, lb):
                del log["train_runtime_s"], log["resumed_from"]
            assert la == lb
        else:
            assert ta[name] == tb[name], name


# ---------------------------------------------------------------- the reuse rule, stage by stage

@pytest.mark.parametrize("name,unit,computation", [
    ("detection", "out/tiny/neurons/meta.json", "detection"),
    ("evaluate", "out/tiny/eval/tiny.json", "evaluate.ppl")])
def test_results_of_other_code_of_the_same_version_are_reused_and_a_raised_version_recomputes(
        base, tmp_path, monkeypatch, name, unit, computation):
    argv = STAGES[name](base) if name == "detection" else evaluate(base, tasks="ppl")
    ok(*argv, cwd=tmp_path)
    meta_file = tmp_path / unit
    meta = json.loads(meta_file.read_text())
    fp = meta["fingerprint"] if name == "detection" else meta["meta"]["tasks"]["ppl"]["fingerprint"]
    assert fp["version"] == {computation: reuse.VERSIONS[computation]}
    fp["code"] = "0" * 64  # as if written by code that differs in a help string
    meta_file.write_text(json.dumps(meta))
    out = ok(*argv, cwd=tmp_path)
    assert f"computed by other code of the same version ({computation} {reuse.VERSIONS[computation]})" in out
    assert json.loads(meta_file.read_text()) == meta  # reused, not rewritten
    monkeypatch.setitem(reuse.VERSIONS, computation, reuse.VERSIONS[computation] + 1)
    out = ok(*argv, cwd=tmp_path)
    assert f"the code computes {computation} differently" in out
    assert json.loads(meta_file.read_text()) != meta


def test_detection_recomputes_when_its_corpus_or_weights_change(base, tmp_path):
    model = copy_model(base, tmp_path)
    data = Path(shutil.copytree(base[2], tmp_path / "data"))
    argv = det(base, model, data)
    ok(*argv, cwd=tmp_path)
    rel = Path("out", "tiny", "neurons")  # as the stage names it: --out is relative
    nd = tmp_path / rel
    assert "Reusing" in ok(*argv, cwd=tmp_path)

    with open(data / "detect" / "fr.txt", "a", encoding="utf-8") as f:
        f.write("Une phrase de plus pour le corpus.\n")
    out = ok(*argv, cwd=tmp_path)
    assert f"Recomputing: {data / 'detect' / 'fr.txt'} changed ({rel})" in out.splitlines()
    assert load_file(nd / "firing.safetensors")["sentences"].tolist() == [6, 7]

    # --threshold alone: re-derived from the stored counts, which are still those of these weights
    assert "Re-deriving" in ok(*argv, "--threshold", "0.5", cwd=tmp_path)
    counts = (nd / "firing.safetensors").read_bytes()
    # the same weights file rewritten in place (other values, same size and path): counts from the model again
    save_tiny("llama", model, seed=1)
    out = ok(*argv, "--threshold", "0.5", cwd=tmp_path)
    assert "Re-deriving" not in out and f"{model / 'model.safetensors'} changed" in out
    assert (nd / "firing.safetensors").read_bytes() != counts
    # another --batch-size is an argument that can change a result: recomputed, and said so
    assert "Recomputing: --batch-size changed (8 -> 2)" in ok(*argv, "--threshold", "0.5", "--batch-size", "2",
                                                                cwd=tmp_path)


def test_deactivation_recomputes_what_a_changed_neuron_or_val_file_feeds(base, tmp_path):
    neurons = tmp_path / "neurons"
    neurons.mkdir()
    for f in ("shared.json", "exclusive_en.json"):
        shutil.copy(base[0] / f, neurons)
    data = Path(shutil.copytree(base[2], tmp_path / "data"))
    argv = deact(base, data=data, neurons=neurons)
    ok(*argv, cwd=tmp_path)
    out_dir = Path("out", "tiny")
    assert "Nothing to recompute" in ok(*argv, cwd=tmp_path)

    # another shared set: the PPL table and the shared variant are both recomputed
    geom = Geometry.from_config(tiny_config("llama"))
    write_neuron_file(neurons / "shared.json", random_set(60, geom, 7, "shared"))
    out = ok(*argv, cwd=tmp_path)
    assert f"{neurons / 'shared.json'} changed ({out_dir / 'deactivation.json'})" in out
    assert f"{neurons / 'shared.json'} changed ({out_dir / 'variants' / 'shared'})" in out
    assert (tmp_path / out_dir / "variants/shared/neurons.json").read_bytes() == (neurons / "shared.json").read_bytes()

    # another validation text: only the PPL table reads it; the variant is reused
    (data / "val" / "en.txt").write_text("A different line.\nAnd another one.\n", encoding="utf-8")
    out = ok(*argv, cwd=tmp_path)
    assert f"Recomputing: {data / 'val' / 'en.txt'} changed ({out_dir / 'deactivation.json'})" in out
    assert f"Reusing {out_dir / 'variants' / 'shared'}" in out
    res = json.loads((tmp_path / out_dir / "deactivation.json").read_text())
    assert res["results"]["ppl"]["en"]["tokens"] < 60  # two short lines, not the three of the first run


def test_train_recomputes_when_val_limit_or_training_text_change(base, tmp_path):
    data = Path(shutil.copytree(base[2], tmp_path / "data"))
    argv = [*train(base, data=data)[:-2], "--max-steps", "1"]
    ok(*argv, "--val-limit", "3", cwd=tmp_path)
    log_file = tmp_path / "out" / "tiny" / "trained" / "en-shared" / "train_log.json"
    assert "Reusing" in ok(*argv, "--val-limit", "3", cwd=tmp_path)
    out = ok(*argv, "--val-limit", "2", cwd=tmp_path)  # once ignored: the old log kept 3 lines
    assert "Recomputing: --val-limit changed (3 -> 2)" in out
    assert json.loads(log_file.read_text())["val"]["lines"] == {"en": 2}
    (data / "train" / "en.jsonl").write_text(json.dumps({"text": "Only one document now."}) + "\n")
    out = ok(*argv, "--val-limit", "2", cwd=tmp_path)
    assert f"{data / 'train' / 'en.jsonl'} changed" in out
    assert json.loads(log_file.read_text())["documents"] == 1


def test_evaluate_recomputes_the_task_whose_file_changed_and_all_when_weights_change(base, tmp_path):
    model = copy_model(base, tmp_path)
    data = Path(shutil.copytree(base[2], tmp_path / "data"))
    argv = evaluate(base, model, data, tasks="ppl,mmmlu")
    ok(*argv, cwd=tmp_path)
    out_file = Path("out", "tiny", "eval", "tiny.json")
    mmlu = data / "test" / "mmlu" / "mmlu_FR-FR.csv"
    mmlu.write_text(",Question,A,B,C,D,Answer,Subject\n0,Which?,a,b,c,d,D,misc\n1,Other?,a,b,c,d,D,misc\n",
                    encoding="utf-8")
    out = ok(*argv, cwd=tmp_path)
    assert f"Recomputing: {mmlu} changed (mmmlu in {out_file})" in out
    assert "Reusing ppl" in out
    first = json.loads((tmp_path / out_file).read_text())["results"]
    save_tiny("llama", model, seed=1)  # same path, same size, other weights
    out = ok(*argv, cwd=tmp_path)
    assert out.count(f"{model / 'model.safetensors'} changed") == 2
    assert json.loads((tmp_path / out_file).read_text())["results"]["ppl"] != first["ppl"]


def test_fingerprint_words_and_the_digest_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LANGNEURONS_CACHE", str(tmp_path / "cache"))
    big = tmp_path / "model.safetensors"
    big.write_bytes(os.urandom(reuse.CACHE_MIN_BYTES + 5))
    hashed = []
    real = reuse._hash_file
    monkeypatch.setattr(reuse, "_hash_file", lambda p, n: hashed.append(p) or real(p, n))
    assert reuse.file_digest(big) == hashlib.sha256(big.read_bytes()).hexdigest()
    assert reuse.file_digest(big) == hashlib.sha256(big.read_bytes()).hexdigest() and len(hashed) == 1  # cached
    # rewritten in place with the same size and the old modification time: still noticed
    st = big.stat()
    with open(big, "r+b") as f:
        f.write(b"\0" * 16)
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert reuse.file_digest(big) == hashlib.sha256(big.read_bytes()).hexdigest() and len(hashed) == 2

    old = {"args": {"ratio": 0.01, "seed": 0}, "context": {}, "model": {"m/w": "1"}, "files": {"d/a": "2"},
           "version": {"detection": 1}, "code": "c"}
    new = {"args": {"ratio": 0.02, "seed": 0}, "context": {}, "model": {"m/w": "1"}, "files": {"d/b": "3"},
           "version": {"detection": 2}, "code": "d"}
    assert reuse.changes(old, old) == []
    assert reuse.changes(old, new) == ["--ratio changed (0.01 -> 0.02)", "d/a is no longer read", "d/b is read now",
                                       "the code computes detection differently (version 1 -> 2)"]
    assert reuse.changes({"args": {}}, new) == ["the earlier output records no fingerprint (written by an older "
                                                "version)"]
    # other code of the same version: nothing to recompute, and the reuse line says whose results they are
    other_code = {**old, "code": "e"}
    assert reuse.changes(old, other_code) == []
    assert reuse.reuse_line(old, old, "x") == "Reusing x (nothing it was computed from changed; --force recomputes)"
    assert reuse.reuse_line(old, other_code, "x") == ("Reusing x, computed by other code of the same version "
                                                      "(detection 1); --force recomputes")


# ---------------------------------------------------------------- kills

def uninterrupted(argv: list, name: str, detected: Path, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """Folder a with the stage run uninterrupted (its filesystem changes counted and returned) and folder b,
    ready for the same run stopped somewhere; figures get the detected outputs in both."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        if name == "figures":
            shutil.copytree(detected / "out", d / "out")
    with fs_changes() as changes:
        ok(*argv, cwd=a)
    return a, b, changes


@pytest.mark.parametrize("name", list(STAGES))
def test_a_run_killed_at_a_random_point_then_rerun_leaves_the_files_of_an_uninterrupted_run(base, detected, tmp_path,
                                                                                              name):
    argv = STAGES[name](base)
    a, b, changes = uninterrupted(argv, name, detected, tmp_path)
    k = random.Random(name).randint(1, len(changes))
    killed = process(*argv, cwd=b, kill_at=k)
    _, err = killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, (k, changes[k - 1], err[-2000:])
    ok(*argv, cwd=b)
    assert_same_outputs(a / "out", b / "out")


def last_line(err: str) -> str:
    """The last line of stderr, past the progress bars that tqdm redraws with carriage returns."""
    return err.replace("\r", "\n").strip().splitlines()[-1]


@pytest.mark.parametrize("name,sig", [("detection", "SIGINT"), ("deactivation", "SIGTERM"), ("train", "SIGINT"),
                                      ("evaluate", "SIGTERM"), ("figures", "SIGINT")])
def test_ctrl_c_or_sigterm_is_one_line_exit_130_or_143_and_the_same_command_resumes(base, detected, tmp_path, name,
                                                                                      sig):
    argv = STAGES[name](base)
    a, b, changes = uninterrupted(argv, name, detected, tmp_path)
    k = random.Random(name + sig).randint(1, len(changes))
    # counted from the stage's own first change: imports in a fresh process make some of their own
    stopped = process(*argv, cwd=b, kill_at=f"{k}@{changes[0]}", sig=sig)
    _, err = stopped.communicate(timeout=600)
    assert stopped.returncode == 128 + getattr(signal, sig), (k, changes[k - 1], err[-2000:])
    assert "Traceback" not in err and last_line(err) == (
        f"error: {argv[0]} interrupted ({'Ctrl-C' if sig == 'SIGINT' else sig}); completed outputs are kept and "
        "nothing partial: the same command resumes"), err[-2000:]
    # nothing partial: no temporary and no empty folder left behind (train's checkpoints are kept to resume)
    leftovers = [p for p in b.rglob("*") if p.name.endswith(".tmp") or (p.is_dir() and not any(p.iterdir()))]
    assert not leftovers, (k, changes[k - 1], leftovers)
    ok(*argv, cwd=b)
    assert_same_outputs(a / "out", b / "out")


def full_disk_command(folder: Path, listing: Path, argv: list) -> list[str] | None:
    """`argv` run with a 4 KiB file system mounted on `folder` (a private mount namespace: no root needed
    where user namespaces are allowed), what it holds afterwards listed in `listing`; None where this machine
    cannot make one."""
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=4k tmpfs {folder}"],
                           capture_output=True)
    if probe.returncode != 0:
        return None
    script = f'mount -t tmpfs -o size=4k tmpfs "$0" || exit 99; "$@"; rc=$?; find "$0" -mindepth 1 > {listing}; exit $rc'
    return ["unshare", "-rm", "sh", "-c", script, str(folder), *script_command(*argv)]


@pytest.mark.parametrize("name", list(STAGES))
def test_a_full_disk_is_one_line_exit_74_naming_the_path_and_leaves_no_empty_folder(base, detected, tmp_path, name):
    argv = STAGES[name](base)
    if name == "figures":
        shutil.copytree(detected / "out", tmp_path / "out")
    full = tmp_path / "out" / ("figures" if name == "figures" else "")
    full.mkdir(parents=True, exist_ok=True)
    command = full_disk_command(full, tmp_path / "listing", argv)
    if command is None:
        pytest.skip("cannot mount a small file system here (no unshare or no user namespaces)")
    r = subprocess.run(command, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=600)
    line = last_line(r.stderr)
    assert r.returncode == 74 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert line.startswith("error: no space left on the device writing out/") and " free" in line, line
    # what the full file system held when the stage had stopped: nothing (no temporary, no empty <tag>/)
    assert (tmp_path / "listing").read_text() == "", (tmp_path / "listing").read_text()


def test_a_closed_stdout_is_one_line_exit_141_and_the_outputs_are_whole(base, tmp_path):
    """`python evaluate.py ... | head -1`: the reader goes away before the table is printed."""
    argv = evaluate(base, tasks="ppl")
    r, w = os.pipe()
    os.close(r)  # nobody will ever read what the stage prints
    p = subprocess.run(script_command(*argv), cwd=tmp_path, env=script_env(), stdout=w, stderr=subprocess.PIPE,
                       text=True, timeout=600)
    os.close(w)
    assert p.returncode == 141 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert last_line(p.stderr) == "error: evaluate.py: its output pipe was closed; stopped"
    assert json.loads((tmp_path / "out/tiny/eval/tiny.json").read_text())["results"]["ppl"]


@pytest.mark.parametrize("name", list(STAGES))
def test_main_called_twice_in_one_process_releases_its_locks(base, detected, tmp_path, name):
    """A notebook calls main() itself, without cli.run: every lock is the with-block of a main(), so the second
    call (which reuses) neither waits on a lock the first kept nor finds one held afterwards."""
    import threading
    from filelock import FileLock
    argv = STAGES[name](base)
    if name == "figures":
        shutil.copytree(detected / "out", tmp_path / "out")
    stage_main = runpy.run_path(str(REPO / argv[0]), run_name="notebook")["main"]
    old_argv, here = sys.argv, os.getcwd()
    sys.argv = [str(REPO / argv[0]), *map(str, argv[1:])]
    os.chdir(tmp_path)
    try:
        for call in (1, 2):
            done = threading.Event()
            t = threading.Thread(target=lambda: (stage_main(), done.set()), daemon=True)
            t.start()
            t.join(timeout=300)
            assert done.is_set(), f"call {call} of {name}'s main() did not finish (waiting on a lock?)"
    finally:
        sys.argv = old_argv
        os.chdir(here)
    for lock in (Path(os.environ["LANGNEURONS_CACHE"]) / "locks").glob("*.lock"):
        FileLock(str(lock)).acquire(timeout=0)  # Timeout if a main() left it held


def test_killed_while_swapping_the_neurons_folder(base, detected, tmp_path):
    """The one moment with no neurons/ at all: the old folder renamed aside, the new one not yet in place."""
    b = tmp_path / "b"
    shutil.copytree(detected / "out", b / "out")
    # the change after the old folder went aside is the new one's coming in
    killed = process(*det(base), "--force", cwd=b, kill_at=f"2@rename {Path('out/tiny/neurons')}")
    killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert not (b / "out/tiny/neurons").exists() and len(list((b / "out/tiny").glob(".neurons.*.tmp"))) == 2
    ok(*det(base), cwd=b)
    assert_same_outputs(detected / "out", b / "out")


def test_folders_swapped_in_by_racing_writers_never_fail(tmp_path):
    """Without any lock, writers of one folder only race to be last: none fails, one complete folder wins."""
    from concurrent.futures import ThreadPoolExecutor
    from langneurons.files import atomic_dir

    def write(i: int) -> None:
        with atomic_dir(tmp_path / "unit") as tmp:
            for name in ("a", "b", "c"):
                (tmp / name).write_text(str(i))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(64)))
    contents = {(tmp_path / "unit" / n).read_text() for n in ("a", "b", "c")}
    assert len(contents) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["unit"]


def test_an_unfinished_checkpoint_never_blocks_training(base, tmp_path):
    argv = [*train(base), "--keep-checkpoints"]
    a = tmp_path / "a"
    a.mkdir()
    ok(*argv, cwd=a)
    ckpt = a / "out" / "tiny" / "trained" / ".en-shared.ckpt"
    weights = load_file(a / "out" / "tiny" / "trained" / "en-shared" / "model.safetensors")
    for resume in ([], ["--resume"]):
        b = tmp_path / f"b{len(resume)}"
        ckb = b / "out" / "tiny" / "trained" / ".en-shared.ckpt"
        ckb.mkdir(parents=True)
        shutil.copy(ckpt / "run_args.json", ckb)
        shutil.copytree(ckpt / "checkpoint-2", ckb / "checkpoint-2")
        (ckb / "checkpoint-2" / "trainer_state.json").unlink()  # killed while saving step 2
        if not resume:  # a finished step-1 checkpoint is resumed from; with --resume there is none
            shutil.copytree(ckpt / "checkpoint-1", ckb / "checkpoint-1")
        out = ok(*argv, *resume, cwd=b)
        assert f"Ignoring {ckb.relative_to(b) / 'checkpoint-2'}" in out
        assert ("Resuming from" in out) == (not resume)
        new = load_file(b / "out" / "tiny" / "trained" / "en-shared" / "model.safetensors")
        assert all((weights[k] == new[k]).all() for k in weights)


# ---------------------------------------------------------------- concurrency

def test_concurrent_runs_on_one_out_lose_nothing(base, detected, tmp_path):
    ev, dt = tmp_path / "ev", tmp_path / "det"
    for d in (ev, dt):
        d.mkdir()
    procs = [process(*evaluate(base, tasks=t), cwd=ev) for t in ("ppl", "mmmlu")]
    procs += [process(*det(base), cwd=dt) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    res = json.loads((ev / "out" / "tiny" / "eval" / "tiny.json").read_text())
    assert set(res["results"]) == set(res["meta"]["tasks"]) == {"ppl", "mmmlu"}  # neither task lost
    ref = tmp_path / "ref"
    ref.mkdir()
    ok(*evaluate(base, tasks="ppl,mmmlu"), cwd=ref)
    expected = json.loads((ref / "out" / "tiny" / "eval" / "tiny.json").read_text())["results"]
    assert res["results"]["mmmlu"] == expected["mmmlu"]
    for l, r in expected["ppl"].items():
        assert res["results"]["ppl"][l] == {"ppl": pytest.approx(r["ppl"], rel=1e-6), "tokens": r["tokens"],
                                            "line_nll": pytest.approx(r["line_nll"], rel=1e-6),
                                            "line_tokens": r["line_tokens"]}
    assert_same_outputs(detected / "out", dt / "out")  # two detections: one complete set of files


# ---------------------------------------------------------------- umask

def test_outputs_follow_the_umask(base, detected, tmp_path):
    old = os.umask(0o027)
    try:
        ok(*det(base), cwd=tmp_path)
        root, m, d = base
        ok("deactivation.py", "--model", m, "--langs", "en,fr", "--out", "out", "--device", "cpu",
           "--neurons", root / "shared.json", cwd=tmp_path)
        ok(*evaluate(base, tasks="ppl"), cwd=tmp_path)
        ok(*figures(base), cwd=tmp_path)
    finally:
        os.umask(old)
    paths = list((tmp_path / "out").rglob("*"))
    assert any(p.name == "model.safetensors" for p in paths) and any(p.suffix == ".png" for p in paths)
    wrong = [(str(p), oct(p.stat().st_mode & 0o777)) for p in paths
             if p.stat().st_mode & 0o777 != (0o750 if p.is_dir() else 0o640)]
    assert not wrong


# ---------------------------------------------------------------- damaged and unwritable outputs

@pytest.mark.parametrize("damaged", ["meta.json", "firing.safetensors"])
def test_a_damaged_stored_output_is_a_one_line_error_and_force_recomputes(base, detected, tmp_path, damaged):
    shutil.copytree(detected / "out", tmp_path / "out")
    f = tmp_path / "out" / "tiny" / "neurons" / damaged
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])  # truncated
    before = tree(tmp_path / "out")
    for extra in ([], ["--threshold", "0.5"]):
        line = error_line(*det(base), *extra, cwd=tmp_path)
        assert str(f.relative_to(tmp_path)) in line and "--force" in line
    assert tree(tmp_path / "out") == before
    ok(*det(base), "--force", cwd=tmp_path)
    fresh, ref = tree(tmp_path / "out"), tree(detected / "out")
    assert sorted(fresh) == sorted(ref)
    assert all(fresh[k] == ref[k] for k in ref if not k.endswith("meta.json"))  # meta.json records --force


@pytest.mark.parametrize("name", list(STAGES))
def test_out_that_is_a_file_is_a_one_line_error(base, tmp_path, name):
    (tmp_path / "out").write_text("not a folder")
    line = error_line(*STAGES[name](base), cwd=tmp_path)
    assert line == "error: --out out: out is a file, not a folder"
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out").read_text() == "not a folder"


def test_a_file_where_an_output_folder_should_be(base, tmp_path):
    tag = tmp_path / "out" / "tiny"
    (tag / "variants").mkdir(parents=True)
    (tag / "neurons").write_text("x")
    (tag / "variants" / "shared").write_text("x")
    (tag / "eval" / "tiny.json").mkdir(parents=True)
    line = error_line(*det(base), cwd=tmp_path)
    assert line == f"error: --out out: {Path('out/tiny/neurons')} is a file, not a folder"
    line = error_line(*deact(base), cwd=tmp_path)
    assert line == f"error: --out out: {Path('out/tiny/variants/shared')} is a file, not a folder"
    line = error_line(*evaluate(base), cwd=tmp_path)
    assert line == f"error: --out out: {Path('out/tiny/eval/tiny.json')} is a folder, not a file"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "out", "out/tiny", "out/tiny/eval", "out/tiny/eval/tiny.json", "out/tiny/neurons", "out/tiny/variants",
        "out/tiny/variants/shared"]


def without_root_privilege() -> None:
    """In the child, before exec: root loses the capabilities that let it write into any folder."""
    if os.geteuid() == 0:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, dropped from the bounding set
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_an_output_folder_that_cannot_be_written(base, tmp_path):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    os.chmod(readonly, 0o555)
    try:
        r = run_script("detection.py", "--model", base[1], "--dataset", base[2], "--langs", "en",
                       "--out", readonly / "out", cwd=tmp_path, preexec_fn=without_root_privilege)
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"cannot take away the right to write here ({e})")
    finally:
        os.chmod(readonly, 0o755)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0] == f"error: --out {readonly / 'out'}: cannot write into {readonly} (permission denied)"
    assert list(readonly.iterdir()) == []
