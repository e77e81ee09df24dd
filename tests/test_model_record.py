"""Neuron files record the model they were detected on (model.model_record); deactivation.py and train.py refuse a
file of another model even when its indices fit, unless --allow-other-model; files without a record (the authors',
and ours from before the record) are used as before."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from tiny import save_tiny, tiny_dataset

from langneurons.layout import PROVENANCE_FILE, TRAIN_LOG
from langneurons.model import Geometry, config_digest, load_model, model_record, save_model_dir
from langneurons.neurons import random_set, write_neuron_file

TRAIN_FAST = ["--lang", "en", "--langs", "en", "--global-batch-size", "2", "--micro-batch-size", "2",
              "--cutoff-len", "32", "--val-limit", "1", "--max-steps", "1", "--device", "cpu"]
DEACT_FAST = ["--langs", "en", "--limit", "2", "--max-length", "32", "--device", "cpu", "--measure-ppl",
              "--save-variants", "none"]


@pytest.fixture(scope="module")
def m(tmp_path_factory, forked):
    """Tiny llama models: A (2 layers), B (3 layers, otherwise as A: A's indices fit B), C (B with another
    rope_theta: B's geometry, another config); detection's neuron files of A."""
    root = tmp_path_factory.mktemp("model_record")
    w = {"root": root, "data": tiny_dataset(root / "data"),
         "A": save_tiny("llama", root / "A", num_hidden_layers=2), "B": save_tiny("llama", root / "B"),
         "C": save_tiny("llama", root / "C", rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})}
    r = forked("detection.py", "--model", w["A"], "--dataset", w["data"], "--langs", "en,fr", "--out", root / "det",
               "--ratio", "0.3", "--threshold", "0.5", "--device", "cpu", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    w["neurons"] = root / "det" / "A" / "neurons"
    return w


def record_of(model: Path) -> dict:
    return model_record(str(model), AutoConfig.from_pretrained(model))


def one_line_refusal(forked, script: str, argv: list, out: Path, cwd: Path) -> str:
    """Exit status 2, one `error:` line, nothing under `out`; the line."""
    r = forked(script, *argv, "--out", out, cwd=cwd)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))
    return lines[0]


# ---------------------------------------------------------------- the record and its digest

def test_digest_is_the_same_for_every_copy_of_a_model_and_differs_between_models(m, tmp_path):
    a = AutoConfig.from_pretrained(m["A"])
    assert config_digest(a) == config_digest(AutoConfig.from_pretrained(m["A"]))  # read twice
    model, tok = load_model(str(m["A"]), "cpu", "bfloat16")
    assert config_digest(model.config) == config_digest(a)  # the loaded model's config
    # a variant as this tool saves one: another dtype, use_cache off (as training leaves it), another folder
    model.config.use_cache = False
    save_model_dir(model, tok, str(m["A"]), tmp_path / "variant")
    saved = json.loads((tmp_path / "variant" / "config.json").read_text())
    assert saved["dtype"] == "bfloat16" and saved["use_cache"] is False
    assert config_digest(AutoConfig.from_pretrained(tmp_path / "variant")) == config_digest(a)
    # the transformers version that wrote config.json does not enter it
    saved["transformers_version"] = "4.51.3"
    (tmp_path / "variant" / "config.json").write_text(json.dumps(saved))
    assert config_digest(AutoConfig.from_pretrained(tmp_path / "variant")) == config_digest(a)
    # other models: more layers; the same geometry with another rope_theta
    b, c = AutoConfig.from_pretrained(m["B"]), AutoConfig.from_pretrained(m["C"])
    assert len({config_digest(a), config_digest(b), config_digest(c)}) == 3
    assert Geometry.from_config(b) == Geometry.from_config(c)
    rec = record_of(m["A"])
    assert rec["tag"] == "A" and rec["geometry"]["num_layers"] == 2 and rec["config_sha256"] == config_digest(a)


def test_detection_writes_the_record_into_every_neuron_file(m):
    files = [f for f in m["neurons"].glob("*.json") if f.name not in ("meta.json", "stats.json", "stability.json")]
    assert len(files) >= 10
    rec = record_of(m["A"])
    for f in files:
        assert json.loads(f.read_text())["meta"]["model"] == rec, f
    assert json.loads((m["neurons"] / "meta.json").read_text())["config_sha256"] == rec["config_sha256"]


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("script", ["deactivation.py", "train.py"])
def test_a_file_of_a_model_with_other_sizes_is_refused(forked, m, tmp_path, script):
    f = m["neurons"] / "related_all.json"  # A has 2 layers, B 3: every index fits B
    argv = ["--model", m["B"], "--dataset", m["data"], "--neurons", f,
            *(TRAIN_FAST if script == "train.py" else DEACT_FAST)]
    line = one_line_refusal(forked, script, argv, tmp_path / "out", tmp_path)
    assert str(f) in line and "'A' (num_layers 2)" in line and f"--model {m['B']} ('B', num_layers 3)" in line
    assert "--allow-other-model" in line


@pytest.mark.parametrize("script", ["deactivation.py", "train.py"])
def test_a_file_of_a_model_with_the_same_sizes_and_another_config_is_refused(forked, m, tmp_path, script):
    f = tmp_path / "of_B.json"
    geom = Geometry.from_config(AutoConfig.from_pretrained(m["B"]))
    write_neuron_file(f, random_set(20, geom, 0, "b"), {"model": record_of(m["B"]), "set": "of_B"})
    argv = ["--model", m["C"], "--dataset", m["data"], "--neurons", f,
            *(TRAIN_FAST if script == "train.py" else DEACT_FAST)]
    line = one_line_refusal(forked, script, argv, tmp_path / "out", tmp_path)
    assert "'B'" in line and "('C'" in line and "same geometry, different config" in line


def test_a_record_that_is_not_one_is_refused(forked, m, tmp_path):
    f = tmp_path / "broken_record.json"
    f.write_text(json.dumps({"fwd_up": {"0": [1]}, "meta": {"model": {"tag": "A"}, "kv_index_space": "kv_rows"}}))
    line = one_line_refusal(forked, "deactivation.py", ["--model", m["B"], "--dataset", m["data"], "--neurons", f,
                                                        *DEACT_FAST], tmp_path / "out", tmp_path)
    assert str(f) in line and "meta.model is not a model record" in line


# ---------------------------------------------------------------- what is accepted

def test_allow_other_model_uses_the_file_and_the_outputs_record_it(forked, m, tmp_path):
    f = m["neurons"] / "related_all.json"
    rec = record_of(m["A"])
    out = tmp_path / "out"
    r = forked("deactivation.py", "--model", m["B"], "--dataset", m["data"], "--neurons", f, "--out", out,
               *DEACT_FAST[:-2], "--save-variants", "related_all", "--allow-other-model", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((out / "B" / "deactivation.json").read_text())["meta"]
    info = meta["neuron_files"]["related_all"]
    assert info["other_model"] is True and info["model"] == rec and meta["allow_other_model"] is True
    assert meta["run"]["args"]["allow_other_model"] is True and meta["fingerprint"]["args"]["allow_other_model"]
    prov = json.loads((out / "B" / "variants" / "related_all" / PROVENANCE_FILE).read_text())
    assert prov["other_model"] is True and prov["neuron_model"] == rec

    r = forked("train.py", "--model", m["B"], "--dataset", m["data"], "--neurons", f, "--out", out, *TRAIN_FAST,
               "--allow-other-model", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = out / "B" / "trained" / "en-related_all"
    log = json.loads((run / TRAIN_LOG).read_text())
    assert log["neurons"]["other_model"] is True and log["neurons"]["model"] == rec
    assert log["run"]["args"]["allow_other_model"] is True
    assert json.loads((run / PROVENANCE_FILE).read_text())["other_model"] is True


def test_the_same_model_and_its_variants_use_the_file(forked, m, tmp_path):
    """The model itself, a copy under another name and a variant this tool saved: the same config."""
    f = m["neurons"] / "shared.json"
    out = tmp_path / "out"
    r = forked("deactivation.py", "--model", m["A"], "--dataset", m["data"], "--neurons", f, "--out", out,
               *DEACT_FAST[:-2], "--save-variants", "shared", "--dtype", "bfloat16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "A" / "deactivation.json").read_text())["meta"]["neuron_files"]["shared"]
    assert info["other_model"] is False and info["model"] == record_of(m["A"])
    variant = out / "A" / "variants" / "shared"
    r = forked("deactivation.py", "--model", variant, "--dataset", m["data"], "--neurons", f, "--out", out,
               *DEACT_FAST, "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = forked("train.py", "--model", variant, "--dataset", m["data"], "--neurons", m["neurons"] / "related_all.json",
               "--out", out, *TRAIN_FAST, "--gradient-checkpointing", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # a model this tool trained keeps the config digest too (here with gradient checkpointing)
    trained = AutoConfig.from_pretrained(out / "A" / "trained" / "en-related_all")
    assert config_digest(trained) == config_digest(AutoConfig.from_pretrained(m["A"]))


@pytest.mark.parametrize("kind", ["authors", "meta_without_record"])
def test_files_without_a_record_are_used_when_they_fit(forked, m, tmp_path, kind):
    f = tmp_path / f"{kind}.json"
    obj = {"fwd_up": {"0": [1, 5], "2": [7]}, "attn_q": {"1": [3]}, "attn_k": {"2": [40]}}  # 40: query-head space
    if kind == "meta_without_record":  # as detection wrote them before the record: meta.model is --model as given
        obj = {**obj, "attn_k": {"2": [20]},
               "meta": {"model": str(m["A"]), "set": "x", "kv_index_space": "kv_rows"}}
    f.write_text(json.dumps(obj))
    out = tmp_path / "out"
    r = forked("deactivation.py", "--model", m["B"], "--dataset", m["data"], "--neurons", f, "--out", out,
               *DEACT_FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "B" / "deactivation.json").read_text())["meta"]["neuron_files"][kind]
    assert info["model"] is None and info["other_model"] is False and info["size"] == 5
    assert info["format"] == ("authors" if kind == "authors" else "ours")
    r = forked("train.py", "--model", m["B"], "--dataset", m["data"], "--neurons", f, "--out", out, *TRAIN_FAST,
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
