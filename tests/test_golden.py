"""Golden outputs: the results of every versioned computation (langneurons.reuse.VERSIONS) on a fixed tiny
model, against tests/golden.json. Stored results are reused across code changes of the same version, so a
change of results without a raised version would silently mix old and new results: this test fails then,
naming the computation and what changed. After a deliberate change: raise its version, check the new
results, and rewrite the file with LANGNEURONS_UPDATE_GOLDEN=1 (then the test passes and says so).

The weights are drawn here from numpy by parameter name, not by transformers' initialisation (which may
change between versions); floats are compared to a relative 1e-4, everything else exactly."""
from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from langneurons.reuse import VERSIONS
from tiny import tiny_dataset, tiny_model, tiny_tokenizer

GOLDEN = Path(__file__).with_name("golden.json")
UPDATE = os.environ.get("LANGNEURONS_UPDATE_GOLDEN") == "1"


def fixed_model(path: Path) -> Path:
    model = tiny_model("llama")
    with torch.no_grad():
        for name, p in model.named_parameters():
            rng = np.random.default_rng([7, zlib.crc32(name.encode())])
            base = 1.0 if p.dim() == 1 else 0.0  # norm weights around 1
            p.copy_(torch.from_numpy(base + rng.normal(0, 0.2, tuple(p.shape))).to(p.dtype))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def outputs(forked, tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    model, data = fixed_model(root / "tiny"), tiny_dataset(root / "data", langs=("en", "fr"))
    common = ["--model", model, "--dataset", data, "--out", "out", "--device", "cpu", "--seed", "0"]
    for argv in (["detection.py", *common, "--langs", "en,fr", "--ratio", "0.2"],
                 ["deactivation.py", *common, "--langs", "en,fr", "--measure-ppl", "--save-variants", "shared",
                  "--limit", "3"],
                 ["train.py", *common, "--lang", "en", "--langs", "en", "--neurons", "out/tiny/neurons/shared.json",
                  "--max-steps", "2", "--global-batch-size", "2", "--micro-batch-size", "1", "--cutoff-len", "32",
                  "--lr", "1e-2", "--val-limit", "3"],
                 ["evaluate.py", *common, "--langs", "en,fr", "--limit", "2", "--max-new-tokens", "4"],
                 ["evaluate.py", *common, "--langs", "en", "--limit", "2", "--tasks", "ppl",
                  "--neurons", "out/tiny/neurons/shared.json", "--intervention", "mean=fr"],
                 ["steering.py", *common, "--langs", "en", "--target", "fr", "--neurons", "out/tiny/neurons/related_fr.json",
                  "--intervention", "mean=fr", "--limit", "2", "--max-new-tokens", "4", "--random-controls", "1"]):
        r = forked(*argv, cwd=root)
        assert r.returncode == 0, r.stderr[-3000:]
    return root / "out" / "tiny"


def results(out: Path) -> dict[str, object]:
    """What each computation's outputs say, without where or when they were made."""
    neurons = out / "neurons"
    sets = {f.name: {g: v for g, v in json.loads(f.read_text()).items() if g != "meta"}
            for f in sorted(neurons.glob("*.json")) if f.name not in ("meta.json", "stats.json")}
    deact = json.loads((out / "deactivation.json").read_text())
    log = json.loads((out / "trained" / "en-shared" / "train_log.json").read_text())
    evaluation = json.loads((out / "eval" / "tiny.json").read_text())["results"]
    variant = load_file(out / "variants" / "shared" / "model.safetensors")
    means = load_file(out / "means" / "tiny" / "detect" / "fr" / "means.safetensors")
    steer = json.loads((out / "steering" / "related_fr.mean-fr.to-fr.json").read_text())
    return {
        "detection": {"sets": sets, "stats": json.loads((neurons / "stats.json").read_text()),
                      "firing": {k: v.tolist() for k, v in sorted(load_file(neurons / "firing.safetensors").items())}},
        "deactivation.ppl": {k: deact[k] for k in ("results", "sets", "importance", "importance_ci",
                                                   "language_agnostic_score", "language_agnostic_score_ci")},
        "deactivation.variant": {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in sorted(variant.items())},
        "train": {k: log[k] for k in ("train_loss", "loss_curve", "val", "steps", "tokens_seen", "trainable_parameters")},
        **{f"evaluate.{t}": evaluation[t] for t in ("ppl", "mgsm", "mmmlu")},
        "means": {k: v.tolist() for k, v in sorted(means.items())},
        "steering": {k: steer[k] for k in ("results", "generations")},
    }


def differences(old, new, where: str = "") -> list[str]:
    if isinstance(old, float) or isinstance(new, float):
        ok = isinstance(old, (int, float)) and isinstance(new, (int, float)) and math.isclose(old, new, rel_tol=1e-4,
                                                                                            abs_tol=1e-9)
        return [] if ok else [f"{where}: {old} -> {new}"]
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in (differences(old[k], new[k], f"{where}/{k}") if k in old and k in new
                          else [f"{where}/{k}: {'added' if k in new else 'gone'}"])]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{where}[{i}]")]
    return [] if old == new else [f"{where}: {json.dumps(old)[:60]} -> {json.dumps(new)[:60]}"]


def test_every_versioned_computation_has_golden_results():
    assert set(json.loads(GOLDEN.read_text())) == set(VERSIONS) if GOLDEN.exists() else UPDATE


@pytest.mark.parametrize("computation", sorted(VERSIONS))
def test_results_change_only_with_a_raised_version(outputs, computation):
    now = results(outputs)[computation]
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if UPDATE:
        golden[computation] = {"version": VERSIONS[computation], "results": now}
        GOLDEN.write_text(json.dumps(dict(sorted(golden.items())), indent=1, ensure_ascii=False) + "\n")
        return
    assert computation in golden, f"{computation}: no golden results (LANGNEURONS_UPDATE_GOLDEN=1 writes them)"
    stored = golden[computation]
    diffs = differences(stored["results"], now)
    if stored["version"] == VERSIONS[computation]:
        assert not diffs, (f"the results of {computation} changed without raising reuse.VERSIONS['{computation}'] "
                           f"(stored results would be reused): {'; '.join(diffs[:5])}")
    else:
        pytest.fail(f"{computation} is at version {VERSIONS[computation]}, its golden results at "
                    f"{stored['version']}: check the new results, then LANGNEURONS_UPDATE_GOLDEN=1 rewrites them"
                    + (f" (they differ: {'; '.join(diffs[:3])})" if diffs else " (they did not change)"))
