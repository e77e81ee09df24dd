"""Detection stage: set algebra, files, re-derivation, reproducibility, multi-process, bad input."""
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, free_port, run_script
from langneurons.model import GROUPS, Geometry
from langneurons.neurons import (empty_set, language_sets, read_neuron_file, related_from_counts, size, stats,
                                 write_neuron_file)
from tiny import save_tiny, tiny_dataset

GEOM = Geometry(num_layers=2, intermediate_size=6, num_heads=2, num_kv_heads=1, head_dim=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny("qwen2", root / "model"), tiny_dataset(root / "data")


def one_set(**groups):
    s = empty_set(GEOM)
    for g, entries in groups.items():
        for layer, i in entries:
            s[g][layer, i] = True
    return s


# ---------------------------------------------------------------- set algebra

def test_shared_exclusive_unique_follow_their_definitions():
    related = {"en": one_set(fwd_up=[(0, 1), (0, 2), (1, 3)], attn_q=[(1, 0)]),
               "fr": one_set(fwd_up=[(0, 1), (0, 2), (1, 4)], attn_k=[(0, 1)]),
               "de": one_set(fwd_up=[(0, 1), (1, 3)], attn_k=[(0, 1)])}
    sets = language_sets(related, GEOM, seed=0)
    as_list = lambda s: sorted((g, *map(int, ix)) for g in GROUPS for ix in torch.nonzero(s[g]))
    assert as_list(sets["shared"]) == [("fwd_up", 0, 1)]
    assert as_list(sets["exclusive_en"]) == [("attn_q", 1, 0), ("fwd_up", 0, 2), ("fwd_up", 1, 3)]
    assert as_list(sets["unique_en"]) == [("attn_q", 1, 0)]            # (0,2) is fr's too, (1,3) de's
    assert as_list(sets["unique_fr"]) == [("fwd_up", 1, 4)]
    assert as_list(sets["unique_de"]) == []
    assert size(sets["related_all"]) == 6
    for name, ref in [("random_shared", "shared")] + [(f"random_exclusive_{l}", f"exclusive_{l}") for l in related]:
        assert size(sets[name]) == size(sets[ref])
    again = language_sets(related, GEOM, seed=0)
    other = language_sets(related, GEOM, seed=1)
    assert all(torch.equal(again["random_exclusive_en"][g], sets["random_exclusive_en"][g]) for g in GROUPS)
    assert any(not torch.equal(other["random_exclusive_en"][g], sets["random_exclusive_en"][g]) for g in GROUPS)
    st = stats(sets, list(related), GEOM)
    assert st["total_neurons"] == 2 * (6 + 6 + 4 + 2 + 2 + 4)
    assert st["shared_ratio"] == pytest.approx(1 / ((3 + 3 + 2) / 3))
    assert st["sets"]["exclusive_en"]["components"] == {"QK": 1, "VO": 0, "FFN": 2}
    assert st["sets"]["exclusive_en"]["layers"] == [1, 2]


def test_threshold_is_a_firing_rate():
    counts = {g: torch.zeros(2, *GEOM.shape(g), dtype=torch.long) for g in GROUPS}
    counts["fwd_up"][0, 0, :4] = torch.tensor([10, 9, 5, 4])
    counts["fwd_up"][1, 0, :4] = torch.tensor([3, 3, 2, 1])
    sentences = torch.tensor([10, 3])
    at1 = related_from_counts(counts, sentences, ["en", "fr"], 1.0)
    assert at1["en"]["fwd_up"][0, :4].tolist() == [True, False, False, False]
    assert at1["fr"]["fwd_up"][0, :4].tolist() == [True, True, False, False]
    at05 = related_from_counts(counts, sentences, ["en", "fr"], 0.5)
    assert at05["en"]["fwd_up"][0, :4].tolist() == [True, True, True, False]
    assert at05["fr"]["fwd_up"][0, :4].tolist() == [True, True, True, False]


def test_neuron_file_round_trip(tmp_path):
    s = one_set(fwd_down=[(1, 5)], attn_v=[(0, 1)], attn_o=[(1, 3)])
    write_neuron_file(tmp_path / "s.json", s, {"set": "x"})
    obj = json.loads((tmp_path / "s.json").read_text())
    assert obj["meta"]["kv_index_space"] == "kv_rows" and obj["fwd_down"]["1"] == [5]
    back, meta = read_neuron_file(tmp_path / "s.json", GEOM)
    assert all(torch.equal(back[g], s[g]) for g in GROUPS) and meta["set"] == "x"


# ---------------------------------------------------------------- the script

def test_detection_writes_every_file_and_rederives_without_the_model(tiny, tmp_path):
    model, data = tiny
    r = run_script("detection.py", "--model", model, "--dataset", data, "--langs", "en,fr,de", "--out", tmp_path,
                   "--ratio", "0.2")
    assert r.returncode == 0, r.stderr
    nd = tmp_path / "model" / "neurons"
    names = {p.name for p in nd.iterdir()}
    expected = {"meta.json", "firing.safetensors", "stats.json", "related_all.json", "shared.json", "random_shared.json",
                "per_text.safetensors", "stability.json", "stability.safetensors"}
    expected |= {f"{k}_{l}.json" for k in ("related", "exclusive", "unique", "random_exclusive") for l in ("en", "fr", "de")}
    assert names == expected
    firing = load_file(nd / "firing.safetensors")
    assert firing["sentences"].tolist() == [6, 6, 6]
    geom = Geometry(**json.loads((nd / "meta.json").read_text())["geometry"])
    for g in GROUPS:  # every sentence activates exactly int(ratio * n) neurons per layer and group
        k = max(1, int(0.2 * geom.group_size(g)))
        assert firing[f"{g}.0"].sum(1).tolist() == [6 * k] * 3
    shared_at_1 = read_neuron_file(nd / "shared.json", geom)[0]
    # another threshold comes from the stored counts: the model is not run again (its files are still
    # hashed: counts of other weights are never re-derived, tests/test_reuse.py)
    r = run_script("detection.py", "--model", model, "--dataset", data, "--langs", "en,fr,de", "--out", tmp_path,
                   "--ratio", "0.2", "--threshold", "0.5")
    assert r.returncode == 0, r.stderr
    assert "stored firing counts" in r.stdout
    shared_at_half = read_neuron_file(nd / "shared.json", geom)[0]
    assert size(shared_at_half) > size(shared_at_1)
    assert all(torch.equal(shared_at_half[g] | shared_at_1[g], shared_at_half[g]) for g in GROUPS)


def test_same_seed_same_files_and_batch_size_does_not_matter(tiny, tmp_path):
    model, data = tiny
    common = ["--model", model, "--dataset", data, "--langs", "en,fr", "--sample-size", "4", "--ratio", "0.1"]
    a = run_script("detection.py", *common, "--out", tmp_path / "a", "--batch-size", "3")
    b = run_script("detection.py", *common, "--out", tmp_path / "b", "--batch-size", "1")
    c = run_script("detection.py", *common, "--out", tmp_path / "c", "--seed", "1")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr + b.stderr + c.stderr
    da, db, dc = (tmp_path / x / "model" / "neurons" for x in "abc")
    for f in da.iterdir():
        if f.name != "meta.json":
            assert f.read_bytes() == (db / f.name).read_bytes(), f.name
    assert (da / "random_shared.json").read_bytes() != (dc / "random_shared.json").read_bytes() or \
        (da / "firing.safetensors").read_bytes() != (dc / "firing.safetensors").read_bytes()


def test_activation_method_writes_the_same_files(tiny, tmp_path):
    model, data = tiny
    r = run_script("detection.py", "--model", model, "--dataset", data, "--langs", "en,fr,de", "--out", tmp_path,
                   "--method", "activation", "--ratio", "0.1")
    assert r.returncode == 0, r.stderr
    nd = tmp_path / "model" / "neurons"
    assert (nd / "shared.json").is_file() and (nd / "exclusive_fr.json").is_file()
    meta = json.loads((nd / "meta.json").read_text())
    assert meta["method"] == "activation" and meta["unit"] == "tokens"
    related = json.loads((nd / "related_all.json").read_text())
    assert sum(map(len, related["fwd_up"].values())) > 0
    assert sum(map(len, related["attn_q"].values())) == 0


def test_two_processes_give_the_same_files_as_one(tiny, tmp_path):
    model, data = tiny
    common = ["--model", model, "--dataset", data, "--langs", "en,fr", "--ratio", "0.1", "--device", "cpu"]
    one = run_script("detection.py", *common, "--out", tmp_path / "one")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port())
    two = run_script("detection.py", *common, "--out", tmp_path / "two", launcher=torchrun)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr[-2000:]
    assert "split over 2 processes" in two.stdout  # not two processes that each did everything
    d1, d2 = tmp_path / "one" / "model" / "neurons", tmp_path / "two" / "model" / "neurons"
    for f in d1.iterdir():
        if f.name != "meta.json":
            assert f.read_bytes() == (d2 / f.name).read_bytes(), f.name


def non_utf8(root):
    (root / "detect" / "en.txt").write_bytes("fine line\n".encode() + b"bad \xff\xfe line\n")


def empty(root):
    (root / "detect" / "en.txt").write_text("\n\n")


@pytest.mark.parametrize("case,extra,prepare,message", [
    ("missing corpus", ["--langs", "en,xx"], None, "unknown language 'xx'"),
    ("empty corpus", [], empty, "empty"),
    ("non-UTF-8 line", [], non_utf8, "line 2 is not UTF-8"),
    ("ratio zero", ["--ratio", "0"], None, "--ratio"),
    ("ratio above one", ["--ratio", "1.5"], None, "--ratio"),
    ("threshold above one", ["--threshold", "2"], None, "--threshold"),
    ("model missing", ["--model", "./no/such/model"], None, "no such file or directory"),
    ("unknown group", ["--groups", "fwd_up,attn_x"], None, "--groups"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny, tmp_path, case, extra, prepare, message):
    model, data = tiny
    data_copy = shutil.copytree(data, tmp_path / "data")
    if prepare:
        prepare(data_copy)
    args = ["--model", model, "--dataset", data_copy, "--langs", "en,fr", "--out", tmp_path / "out"]
    r = run_script("detection.py", *args, *extra)
    assert r.returncode == 2, (case, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], (case, r.stderr)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


@pytest.mark.e2e
def test_embedded_model_end_to_end(tmp_path):
    r = run_script("detection.py", "--langs", "en,fr", "--sample-size", "3", "--out", tmp_path,
                   "--dataset", REPO / "dataset")
    assert r.returncode == 0, r.stderr[-3000:]
    nd = tmp_path / "gemma-3-270m" / "neurons"
    meta = json.loads((nd / "meta.json").read_text())
    assert meta["geometry"] == {"num_layers": 18, "intermediate_size": 2048, "num_heads": 4, "num_kv_heads": 1,
                                "head_dim": 256}
    st = json.loads((nd / "stats.json").read_text())
    assert 0 < st["sets"]["shared"]["size"] < st["sets"]["related_all"]["size"]


def test_random_like_matches_every_layer_and_group():
    import torch
    from langneurons.model import GROUPS
    from langneurons.neurons import random_like
    g = torch.Generator().manual_seed(0)
    s = {grp: torch.rand(3, 40, generator=g) < 0.2 for grp in GROUPS}
    a, b, a2 = random_like(s, 1, "random-1"), random_like(s, 1, "random-2"), random_like(s, 1, "random-1")
    for grp in GROUPS:
        assert torch.equal(a[grp].sum(1), s[grp].sum(1))  # same count per layer and group
        assert torch.equal(a[grp], a2[grp])               # seeded
    assert any(not torch.equal(a[grp], b[grp]) for grp in GROUPS)  # controls differ from each other
