"""Set stability (langneurons/stability.py, detection.py --resamples/--stable-core): per-text selections rebuild
the written sets, resampled Jaccard and its intervals, seeding, the stable core, bad flags."""
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from langneurons import stability
from langneurons.model import GROUPS, Geometry
from langneurons.neurons import (empty_set, language_sets, load_neuron_set, read_neuron_file, related_from_counts,
                                 to_json)
from tiny import save_tiny, tiny_dataset

LANGS = ("en", "fr", "de")
WORDS = {"en": "the cat dog sun rain walks sleeps runs over under red blue big small house tree river".split(),
         "fr": "le chat chien soleil pluie marche dort court sur sous rouge bleu grand petit maison arbre".split(),
         "de": "die Katze Hund Sonne Regen geht schläft läuft über unter rot blau groß klein Haus Baum".split()}


def word_dataset(root, n: int, identical: bool = False):
    """tiny_dataset's layout with `n` detection texts per language: seeded random word strings (or one
    text repeated)."""
    tiny_dataset(root, LANGS)
    rng = random.Random(0)
    for lang in LANGS:
        lines = [" ".join(rng.choice(WORDS[lang]) for _ in range(rng.randint(5, 12))) for _ in range(n)]
        if identical:
            lines = [lines[0]] * n
        (root / "detect" / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stability")
    return save_tiny("llama", root / "model"), word_dataset(root / "data", 24), root


def detect(forked, tiny, out, *extra, data=None):
    model, words, root = tiny
    r = forked("detection.py", "--model", model, "--dataset", data or words, "--langs", ",".join(LANGS), "--out", out,
               "--device", "cpu", "--ratio", "0.2", "--resamples", "60", *extra, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "model" / "neurons"


def stats_of(d) -> dict:
    return json.loads((d / "stability.json").read_text())


def test_jaccard_and_its_empty_case():
    g = Geometry(num_layers=1, intermediate_size=4, num_heads=1, num_kv_heads=1, head_dim=2)
    a, b, e = empty_set(g), empty_set(g), empty_set(g)
    a["fwd_up"][0, :3] = True          # {0, 1, 2}
    b["fwd_up"][0, 1:] = True          # {1, 2, 3}
    batch = lambda *sets: {k: torch.stack([s[k] for s in sets]) for k in GROUPS}
    assert stability.jaccard(batch(a, e, a), batch(b, e, a)).tolist() == [0.5, 1.0, 1.0]
    assert stability.jaccard(batch(a), batch(e)).tolist() == [0.0]


def test_component_counts_and_shares_of_a_batch():
    g = Geometry(num_layers=2, intermediate_size=4, num_heads=1, num_kv_heads=1, head_dim=2)
    a, e = empty_set(g), empty_set(g)
    a["attn_q"][0, :2] = a["attn_k"][1, 0] = a["attn_o"][1, 1] = a["fwd_down"][0, 3] = True
    batch = {k: torch.stack([a[k], e[k]]) for k in GROUPS}
    comps = stability.component_sizes(stability.group_sizes(batch))
    assert {c: v.tolist() for c, v in comps.items()} == {"QK": [3, 0], "VO": [1, 0], "FFN": [1, 0]}
    assert {c: v.tolist() for c, v in stability.shares(comps).items()} == \
        {"QK": [0.6, 0.0], "VO": [0.2, 0.0], "FFN": [0.2, 0.0]}  # an empty draw has no shares, as set_stats


def test_full_data_rebuild_equals_the_written_files(forked, tiny, tmp_path):
    d = detect(forked, tiny, tmp_path)
    pt = stability.load_per_text(d / "per_text.safetensors")
    meta = json.loads((d / "meta.json").read_text())
    geom = Geometry(**meta["geometry"])
    assert pt.texts() == [24, 24, 24]
    # the firing counts are the per-text top lists counted text by text (the counting detection always did)
    firing = load_file(d / "firing.safetensors")
    for g in GROUPS:
        for li in range(len(LANGS)):
            counts = torch.zeros(geom.num_layers, geom.group_size(g), dtype=torch.int64)
            for top in pt.data[g][li]:
                for layer in range(geom.num_layers):
                    counts[layer, top[layer]] += 1
            for layer in range(geom.num_layers):
                assert torch.equal(firing[f"{g}.{layer}"][li].long(), counts[layer]), (g, layer)
    # every set file is what related_from_counts + language_sets give on those counts, and what the rebuild gives
    counts = {g: torch.stack([firing[f"{g}.{layer}"] for layer in range(geom.num_layers)], 1).long() for g in GROUPS}
    by_counts = language_sets(related_from_counts(counts, firing["sentences"], list(LANGS), 1.0, geom), geom, 0)
    rebuilt = language_sets(stability.full_data_related(pt, geom, 1.0, 0.2), geom, 0)
    for name, s in by_counts.items():
        on_disk = {g: v for g, v in json.loads((d / f"{name}.json").read_text()).items() if g != "meta"}
        assert {g: v for g, v in to_json(s).items() if g != "meta"} == on_disk, name
        assert {g: v for g, v in to_json(rebuilt[name]).items() if g != "meta"} == on_disk, name


def test_identical_texts_give_jaccard_one_for_every_set(forked, tiny, tmp_path):
    same = word_dataset(tmp_path / "same", 10, identical=True)
    doc = stats_of(detect(forked, tiny, tmp_path / "out", data=same))
    names = {f"{k}_{l}" for k in ("related", "exclusive", "unique") for l in LANGS} | {"related_all", "shared"}
    assert set(doc["sets"]) == names  # every set detection writes but the random controls
    assert any(doc["sets"][n]["size"] > 0 for n in names)
    for name, s in doc["sets"].items():
        for key in ("split_half", "bootstrap"):
            assert s[key]["mean"] == s[key]["median"] == 1.0 and s[key]["ci"] == [1.0, 1.0], (name, key)
        assert s["size_bootstrap"]["ci"] == [s["size"], s["size"]], name
        for c, v in s["components"].items():
            assert v["ci"] == [v["size"], v["size"]], (name, c)
            assert s["component_shares"][c]["ci"] == [s["component_shares"][c]["share"]] * 2, (name, c)


def test_every_interval_holds_its_estimate_and_jaccard_is_a_fraction(forked, tiny, tmp_path):
    doc = stats_of(detect(forked, tiny, tmp_path))
    assert doc["resamples"] == 60 and doc["half_texts"] == {l: 12 for l in LANGS}
    varied = 0
    for name, s in doc["sets"].items():
        for key in ("split_half", "bootstrap", "size_split_half", "size_bootstrap"):
            lo, hi = s[key]["ci"]
            assert lo <= s[key]["median"] <= hi, (name, key)
            if key in ("split_half", "bootstrap"):
                assert 0.0 <= lo and hi <= 1.0, (name, key)
            varied += lo < hi
    assert varied  # real texts: resamples do disagree


def test_component_and_group_counts_of_every_set_over_the_bootstrap(forked, tiny, tmp_path):
    """Per set, each group's and each component's (QK, VO, FFN) count over the bootstrap resamples: the
    full-data counts are the set file's and sum to the set size, every interval holds its median, the per-resample
    counts add up to the resample's size (so their means add up to the size's mean), and the shares to 1."""
    from langneurons.neurons import COMPONENTS, set_stats
    d = detect(forked, tiny, tmp_path)
    doc = stats_of(d)
    geom = Geometry(**json.loads((d / "meta.json").read_text())["geometry"])
    varied = 0
    for name, s in doc["sets"].items():
        assert set(s["components"]) == set(s["component_shares"]) == set(COMPONENTS) and set(s["groups"]) == set(GROUPS)
        on_disk = set_stats(load_neuron_set(d / f"{name}.json", geom)[0], geom)
        assert {c: v["size"] for c, v in s["components"].items()} == on_disk["components"], name
        assert {g: v["size"] for g, v in s["groups"].items()} == on_disk["groups"], name
        assert sum(v["size"] for v in s["components"].values()) == s["size"] == sum(v["size"] for v in s["groups"].values())
        for key in ("components", "groups", "component_shares"):
            for part, v in s[key].items():
                lo, hi = v["ci"]
                assert lo <= v["median"] <= hi, (name, key, part)
                varied += lo < hi
            mean = sum(v["mean"] for v in s[key].values())
            if key == "component_shares":  # 1 per non-empty resample, 0 per empty one
                assert 0.0 <= mean <= 1.0 + 1e-9, name
            else:
                assert mean == pytest.approx(s["size_bootstrap"]["mean"]), (name, key)
        for c, v in s["component_shares"].items():
            assert v["share"] == pytest.approx(on_disk["component_shares"][c]) and 0.0 <= v["ci"][0] <= v["ci"][1] <= 1.0
    assert varied  # real texts: the components vary over resamples too


def test_threshold_one_bootstrap_sets_contain_the_full_sets_so_the_core_at_one_does(forked, tiny, tmp_path):
    """At --threshold 1.0 a language's set is the intersection over its texts; a bootstrap resample holds a
    subset of those texts, so its intersection contains the full one: every related neuron has selection
    frequency 1, and the core at F = 1 contains related_<l>, shared and related_all. The core shrinks as F grows
    and is exactly the neurons whose stored frequency reaches F."""
    d = detect(forked, tiny, tmp_path, "--stable-core", "1")
    geom = Geometry(**json.loads((d / "meta.json").read_text())["geometry"])
    freq, resamples = stability.load_frequencies(d / "stability.safetensors")
    assert resamples == 60
    for name in [f"related_{l}" for l in LANGS] + ["related_all", "shared"]:
        full = read_neuron_file(d / f"{name}.json", geom)[0]
        core, meta = read_neuron_file(d / f"core_{name}.json", geom)
        assert meta["core_of"] == name and meta["stable_core"] == 1.0
        assert all(bool((core[g] | ~full[g]).all()) for g in GROUPS), name  # full ⊆ core
        assert all(bool((freq[name][g][full[g]] == 1.0).all()) for g in GROUPS), name
    for name in freq:
        half = stability.stable_core(freq[name], 0.5, resamples)
        one = read_neuron_file(d / f"core_{name}.json", geom)[0]
        assert all(torch.equal(one[g] & half[g], one[g]) for g in GROUPS), name    # core(1) ⊆ core(0.5)
        assert all(torch.equal(half[g], freq[name][g] >= 0.5) for g in GROUPS), name
        assert stats_of(d)["sets"][name]["core_size"] == sum(int(one[g].sum()) for g in GROUPS)


def test_core_file_is_an_ordinary_neuron_file_every_stage_reads(forked, tiny, tmp_path):
    model, _, root = tiny
    d = detect(forked, tiny, tmp_path, "--stable-core", "0.8")
    geom = Geometry(**json.loads((d / "meta.json").read_text())["geometry"])
    nset, record = load_neuron_set(d / "core_shared.json", geom)
    assert record["format"] == "ours" and record["size"] == sum(int(nset[g].sum()) for g in GROUPS)
    r = forked("deactivation.py", "--model", model, "--dataset", tiny[1], "--langs", "en", "--out", tmp_path,
               "--device", "cpu", "--neurons", d / "core_shared.json", "--measure-ppl", "--limit", "2",
               "--save-variants", "none", cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    deact = json.loads((tmp_path / "model" / "deactivation.json").read_text())
    assert deact["sets"]["core_shared"]["size"] == record["size"]


def test_same_seed_same_stability_files_other_seed_other_draws(forked, tiny, tmp_path):
    a = detect(forked, tiny, tmp_path / "a", "--stable-core", "0.5", "--batch-size", "5")
    b = detect(forked, tiny, tmp_path / "b", "--stable-core", "0.5", "--batch-size", "2")
    files = ["per_text.safetensors", "stability.json", "stability.safetensors", "core_shared.json"]
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    # only --resamples changed: re-derived from the stored per-text selections, no model run; another seed draws
    # other resamples (of the same texts: the corpus is not sampled)
    model, words, root = tiny
    r = forked("detection.py", "--model", model, "--dataset", words, "--langs", ",".join(LANGS), "--out", tmp_path / "a",
               "--device", "cpu", "--ratio", "0.2", "--resamples", "30", "--batch-size", "5", cwd=root)
    assert r.returncode == 0 and "stored firing counts" in r.stdout, r.stderr[-2000:]
    assert stats_of(a)["resamples"] == 30 and not (a / "core_shared.json").exists()
    c = detect(forked, tiny, tmp_path / "c", "--stable-core", "0.5", "--seed", "1")
    assert (c / "per_text.safetensors").read_bytes() == (b / "per_text.safetensors").read_bytes()
    assert stats_of(c)["sets"] != stats_of(b)["sets"]


def test_twice_the_texts_is_at_least_as_stable(forked, tiny, tmp_path):
    """From one run's per-text data, two disjoint draws of n and of 2n texts per language: at --threshold 0.5 the
    sets of 2n texts agree at least as well (the measured property, on a seeded tiny model)."""
    out = tmp_path
    detect(forked, tiny, out, "--resamples", "0")
    nd = out / "model" / "neurons"
    pt = stability.load_per_text(nd / "per_text.safetensors")
    geom = Geometry(**json.loads((nd / "meta.json").read_text())["geometry"])
    names = ["shared", "related_all"] + [f"related_{l}" for l in LANGS]
    points = stability.curve(pt, geom, 0.5, 0.2, [3, 6, 12, 24], 80, 0, names)
    assert [(p["texts"], p["kind"]) for p in points] == [(3, "split_half"), (6, "split_half"), (12, "split_half"),
                                                         (24, "bootstrap")]
    for name in names:
        means = [p["sets"][name]["jaccard"]["mean"] for p in points if p["kind"] == "split_half"]
        assert means == sorted(means), (name, means)
        assert means[-1] > means[0], (name, means)


@pytest.mark.parametrize("extra,message", [
    (["--stable-core", "0"], "--stable-core"),
    (["--stable-core", "1.5"], "--stable-core"),
    (["--resamples", "-1"], "--resamples"),
    (["--resamples", "0", "--stable-core", "0.5"], "--stable-core 0.5: needs --resamples > 0"),
    (["--sample-size", "1"], "--resamples 200: split halves need at least 2 texts per language (en: 1, fr: 1)"),
])
def test_bad_stability_flags_exit_2_and_write_nothing(forked, tiny, tmp_path, extra, message):
    model, words, root = tiny
    r = forked("detection.py", "--model", model, "--dataset", words, "--langs", "en,fr", "--out", tmp_path / "out",
               "--device", "cpu", *extra, cwd=root)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


def test_figures_draw_the_stability_figure_when_stability_json_exists(forked, tiny, tmp_path):
    _, _, root = tiny
    d = detect(forked, tiny, tmp_path)
    r = forked("figures.py", "--out", tmp_path, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    report = (tmp_path / "figures" / "report.md").read_text()
    assert (tmp_path / "figures" / "stability_model.png").is_file() and "stability_model.png" in report
    shared = stats_of(d)["sets"]["shared"]["split_half"]
    assert f"| shared | {stats_of(d)['sets']['shared']['size']} | {shared['mean']:.2f} [" in report
    # the distribution and components tables carry the same run's bootstrap intervals
    total = json.loads((d / "stats.json").read_text())["total_neurons"]
    size = stats_of(d)["sets"]["shared"]
    lo, hi = size["size_bootstrap"]["ci"]
    assert f"| model | {total} | {size['size']} [{lo:.0f}, {hi:.0f}] |" in report
    qk = size["component_shares"]["QK"]
    assert f"| model | shared | {100 * qk['share']:.3f}% [{100 * qk['ci'][0]:.3f}%, {100 * qk['ci'][1]:.3f}%] |" in report
    (d / "stability.json").unlink()
    r = forked("figures.py", "--out", tmp_path, cwd=root)
    assert r.returncode == 0 and not (tmp_path / "figures" / "stability_model.png").exists()
    report = (tmp_path / "figures" / "report.md").read_text()
    assert f"| model | {total} | {size['size']} |" in report and "_No intervals for model:" in report


@pytest.mark.parametrize("method", ["activation", "authors"])
def test_every_method_rebuilds_its_sets_from_the_per_text_data(forked, tiny, tmp_path, method):
    d = detect(forked, tiny, tmp_path, "--method", method, "--resamples", "20")
    meta = json.loads((d / "meta.json").read_text())
    geom = Geometry(**meta["geometry"])
    pt = stability.load_per_text(d / "per_text.safetensors")
    assert pt.method == method and pt.texts() == [24, 24, 24]
    firing = load_file(d / "firing.safetensors")
    counts, units = stability.weighted_counts(pt, stability.full_weights(pt))
    assert units[0].tolist() == firing["sentences"].tolist()
    for g in pt.sizes:
        for layer in range(geom.num_layers):
            assert torch.equal(counts[g][0, :, layer].int(), firing[f"{g}.{layer}"]), (g, layer)
    kv = meta.get("authors", {}).get("kv_index_space", "kv_rows")
    for name, s in language_sets(stability.full_data_related(pt, geom, 1.0, 0.2), geom, 0).items():
        on_disk = {g: v for g, v in json.loads((d / f"{name}.json").read_text()).items() if g != "meta"}
        assert {g: v for g, v in to_json(s, kv_index_space=kv).items() if g != "meta"} == on_disk, name
    assert set(stats_of(d)["sets"]) >= {"shared", "related_all"}
