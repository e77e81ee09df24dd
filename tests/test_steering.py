"""steering.py: conditions, rates and intervals, random controls, reuse and bad input (tiny random model)."""
import json

import pytest
import torch
from transformers import AutoConfig

import steering
from conftest import run_script
from langneurons.metrics import repeated_ngram_share
from langneurons.model import GROUPS, Geometry
from langneurons.neurons import empty_set, write_neuron_file
from langneurons.uncertainty import wilson
from tiny import save_tiny, tiny_dataset

FAST = ["--limit", "3", "--max-new-tokens", "4", "--batch-size", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model and dataset, a set of two neurons per layer and group, and an empty set."""
    root = tmp_path_factory.mktemp("tiny_steer")
    model, data = save_tiny("qwen2", root / "model"), tiny_dataset(root / "data")
    geom = Geometry.from_config(AutoConfig.from_pretrained(model))
    s = empty_set(geom)
    for g in GROUPS:
        s[g][:, :2] = True
    write_neuron_file(root / "some.json", s, {"set": "some"})
    write_neuron_file(root / "empty.json", empty_set(geom), {"set": "empty"})
    return model, data, root, geom


def steer(tiny, out, *extra, check=True):
    model, data, root, _ = tiny
    return run_script("steering.py", "--model", model, "--dataset", data, "--out", out, *FAST, *extra, check=check)


def result(out, name):
    return json.loads((out / "model" / "steering" / f"{name}.json").read_text())


def test_rates_intervals_and_counts_are_consistent(tiny, tmp_path):
    root = tiny[2]
    r = steer(tiny, tmp_path / "a", "--langs", "en,fr", "--target", "fr", "--neurons", f"x={root / 'some.json'}",
              "--intervention", "mean=fr", "--random-controls", "2")
    obj = result(tmp_path / "a", "x.mean-fr.to-fr")
    assert "Wrote" in r.stdout
    assert list(obj["results"]) == obj["meta"]["conditions"] == ["none", "x", "random-1", "random-2"]
    for cname, by_src in obj["results"].items():
        assert set(by_src) == {"en", "fr"}
        for src, row in by_src.items():
            gens = obj["generations"][cname][src]
            langs = [g["lang"] for g in gens]
            assert row["n"] == len(gens) == 3
            assert sum(row["identified"].values()) == row["n"]
            assert row["target"] == langs.count("fr") and row["source"] == langs.count(src)
            assert row["target_rate"] == row["target"] / row["n"]
            lo, hi = row["target_rate_ci"]
            assert lo <= row["target_rate"] <= hi and [lo, hi] == list(wilson(row["target"], row["n"]))
            assert row["source_rate_ci"][0] <= row["source_rate"] <= row["source_rate_ci"][1]
            assert row["fluency"]["ngram"] == steering.REPEAT_N
            # the prompt is cut off: the stored text is the continuation only
            assert all(not g["text"].startswith(g["prompt"]) or not g["prompt"] for g in gens)
    # the intervention changes what the model writes; the unmodified model's generations stay the same
    assert obj["generations"]["x"] != obj["generations"]["none"]
    assert obj["meta"]["intervention"]["spec"] == "mean=fr"
    assert obj["meta"]["set"]["size"] == 2 * len(GROUPS) * tiny[3].num_layers
    assert (tmp_path / "a" / "model" / "means" / "model" / "detect" / "fr" / "means.safetensors").is_file()


def test_empty_set_equals_no_intervention_and_same_seed_same_file(tiny, tmp_path):
    root = tiny[2]
    args = ["--langs", "en", "--target", "fr", "--neurons", f"e={root / 'empty.json'}", "--intervention", "scale=8",
            "--random-controls", "1"]
    steer(tiny, tmp_path / "a", *args)
    steer(tiny, tmp_path / "b", *args)
    a, b = result(tmp_path / "a", "e.scale-8.to-fr"), result(tmp_path / "b", "e.scale-8.to-fr")
    assert a["results"]["e"] == a["results"]["none"] == a["results"]["random-1"]
    assert a["generations"]["e"] == a["generations"]["none"]
    assert (a["results"], a["generations"], a["meta"]["fingerprint"]["args"]) == \
        (b["results"], b["generations"], b["meta"]["fingerprint"]["args"])
    before = (tmp_path / "a" / "model" / "steering" / "e.scale-8.to-fr.json").read_bytes()
    r = steer(tiny, tmp_path / "a", *args)
    assert "reus" in r.stdout.lower()
    assert (tmp_path / "a" / "model" / "steering" / "e.scale-8.to-fr.json").read_bytes() == before


def test_alphas_give_one_table_per_strength(tiny, tmp_path):
    root = tiny[2]
    steer(tiny, tmp_path, "--langs", "en", "--target", "de", "--neurons", f"exclusive_de={root / 'some.json'}",
          "--intervention", "scale=2", "--alphas", "1,4", "--random-controls", "1")
    name = "exclusive_de.scale-2.alphas-1-2-4.to-de"
    obj = result(tmp_path, name)
    assert list(obj["strengths"]) == ["scale=1", "scale=2", "scale=4"] and obj["meta"]["alphas"] == [1, 2, 4]
    assert obj["strengths"]["scale=2"] == obj["results"]
    # scale=1 is the identity: the set's row equals the unmodified model's
    assert obj["strengths"]["scale=1"]["exclusive_de"] == obj["strengths"]["scale=1"]["none"]
    assert all(t["none"] == obj["results"]["none"] for t in obj["strengths"].values())
    # figures.py draws the heatmap of the exclusive sets and the dose-response curve, and tabulates the run
    run_script("figures.py", "--out", tmp_path, check=True)
    figs = tmp_path / "figures"
    for png in ("steering_model.png", f"dose_model_{name}.png"):
        assert (figs / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in (figs / "report.md").read_text()
    rate = obj["results"]["exclusive_de"]["en"]["target_rate"]
    assert f"| {name} | exclusive_de | scale=2 | English | German | 3 |" in (figs / "report.md").read_text()
    assert f"{rate:.2f} [" in (figs / "report.md").read_text()


def test_random_controls_have_the_sets_counts_and_differ(tiny):
    geom = tiny[3]
    s = empty_set(geom)
    s["fwd_up"][0, :3] = True
    s["attn_k"][1, [0, 1]] = True
    conds = steering.conditions("x", s, 3, seed=0)
    assert list(conds) == ["x", "random-1", "random-2", "random-3"]
    for name in ("random-1", "random-2", "random-3"):
        for g in GROUPS:
            assert conds[name][g].sum(1).tolist() == s[g].sum(1).tolist()
    fwd = [conds[n]["fwd_up"][0] for n in conds]
    assert len({tuple(t.tolist()) for t in fwd}) == 4  # the set and three different draws
    again = steering.conditions("x", s, 3, seed=0)
    assert all(torch.equal(again[n][g], conds[n][g]) for n in conds for g in GROUPS)


def test_prompts_and_repeated_ngrams():
    assert steering.first_words("The cat sleeps on the warm mat tonight.", 3) == "The cat sleeps"
    assert steering.first_words("今天早上孩子们冒着雨走路去上学。", 3) == "今天早上孩子"
    # a prompt is never the whole line: a short line gives at most half its words
    assert steering.first_words("The price rose today.", 6) == "The price"
    assert steering.first_words("Hello", 6) == "Hello"
    assert repeated_ngram_share([[1, 2, 3, 1, 2, 3]], 3) == pytest.approx(1 / 4)
    assert repeated_ngram_share([[1, 2, 3, 4], [1, 2, 3]], 3) == 0.0  # repeats count within a sequence only
    assert repeated_ngram_share([[1, 2]], 3) is None


@pytest.mark.parametrize("case,extra,message", [
    ("unknown target", ["--target", "xx"], "--target xx"),
    ("alphas not positive", ["--target", "fr", "--intervention", "scale=2", "--alphas", "0,-1"], "--alphas"),
    ("alphas without scale", ["--target", "fr", "--intervention", "mean=fr", "--alphas", "2"], "--alphas"),
    ("neuron file missing", ["--target", "fr", "--neurons", "no/such.json"], "no such file"),
    ("no detection output", ["--target", "fr"], "run detection.py first"),
    ("bad intervention", ["--target", "fr", "--intervention", "boost=3"], "--intervention"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny, tmp_path, case, extra, message):
    args = [*extra] if "--neurons" in extra or case == "no detection output" else \
        [*extra, "--neurons", str(tiny[2] / "some.json")]
    r = steer(tiny, tmp_path / "out", "--langs", "en", *args, check=False)
    assert r.returncode == 2, (case, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], (case, r.stderr)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))
