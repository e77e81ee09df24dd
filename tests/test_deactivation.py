"""Deactivation (docs/method.md section 5): exactly the selected entries are zeroed, in both file formats;
weights, hooks and shard streaming agree; bad neuron files are refused; Imp/LAS arithmetic."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import SHARED_DATA, run_script
from tiny import ARCHS, save_tiny, tiny_config, tiny_dataset, tiny_model

from langneurons.data import val_texts
from langneurons.masking import ablation_hooks, meta_skeleton, zero_neurons, zero_plan, zeroed
from langneurons.metrics import language_agnostic, perplexity
from langneurons.model import GROUPS, Geometry
from langneurons.layout import NEURON_FILE_COPY, PROVENANCE_FILE, SCHEMA_VERSION, model_role, model_tag
from langneurons.neurons import empty_set, load_neuron_set, random_set, read_neuron_file, write_neuron_file

def tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def dense_set(geom: Geometry, seed: int, p: float = 0.15):
    """Every group and layer gets some neurons (random_set could leave a small group empty)."""
    g = torch.Generator().manual_seed(seed)
    return {grp: torch.rand(geom.shape(grp), generator=g) < p for grp in GROUPS}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("deact")
    model_dir = save_tiny("qwen2", root / "qwen2")
    data = tiny_dataset(root / "dataset")
    geom = Geometry.from_config(tiny_config("qwen2"))
    return root, model_dir, data, geom


# ---------------------------------------------------------------- exactly the selected entries

def _expected_zero(model, layer_rows: dict) -> dict[str, torch.Tensor]:
    """Independent of masking.zero_plan: the parameters of tiny Qwen2 with the listed entries zeroed."""
    exp = {n: p.detach().clone() for n, p in model.named_parameters()}
    for (group, layer), idx in layer_rows.items():
        pre = f"model.layers.{layer}."
        idx = torch.tensor(idx)
        if group == "fwd_up":
            for n in ("mlp.up_proj.weight", "mlp.gate_proj.weight"):
                exp[pre + n][idx] = 0
        elif group == "fwd_down":
            exp[pre + "mlp.down_proj.weight"][:, idx] = 0
        elif group == "attn_o":
            exp[pre + "self_attn.o_proj.weight"][:, idx] = 0
        else:
            p = {"attn_q": "q", "attn_k": "k", "attn_v": "v"}[group]
            exp[pre + f"self_attn.{p}_proj.weight"][idx] = 0
            exp[pre + f"self_attn.{p}_proj.bias"][idx] = 0  # Qwen2's q/k/v biases belong to the neuron
    return exp


def _authors_file(path: Path) -> dict:
    """An authors'-format file (no meta): attn_k/attn_v indices in query-head space [0, heads*head_dim)."""
    obj = {"fwd_up": {"0": [5, 90]}, "fwd_down": {"2": [0, 95]}, "attn_q": {"1": [0, 63]},
           "attn_k": {"0": [3, 17, 40, 63]}, "attn_v": {"2": [16, 33]}, "attn_o": {"1": [7]}}
    path.write_text(json.dumps(obj))
    return obj


@pytest.mark.parametrize("legacy", [False, True])
def test_only_selected_entries_zeroed_authors_format(tmp_path, legacy):
    base = tiny_model("qwen2")
    geom = Geometry.from_config(base.config)
    assert (geom.n_rep, geom.head_dim) == (2, 16)
    obj = _authors_file(tmp_path / "authors.json")
    nset, meta = read_neuron_file(tmp_path / "authors.json", geom, legacy_kv=legacy)
    assert meta == {}

    def kv(i):  # query-head index h*head_dim+d -> k/v row (h//n_rep)*head_dim+d; legacy: i//n_rep
        return i // geom.n_rep if legacy else (i // geom.head_dim // geom.n_rep) * geom.head_dim + i % geom.head_dim

    rows = {}
    for group, layers in obj.items():
        for layer, idx in layers.items():
            rows[(group, int(layer))] = [kv(i) for i in idx] if group in ("attn_k", "attn_v") else idx
    assert rows[("attn_k", 0)] == ([1, 8, 20, 31] if legacy else [3, 1, 24, 31])
    exp = _expected_zero(base, rows)

    model = copy.deepcopy(base)
    zero_neurons(model, nset)
    for n, p in model.named_parameters():
        assert torch.equal(p, exp[n]), n  # zeros where selected, bit-for-bit the base elsewhere
    assert int((model.model.layers[0].self_attn.k_proj.bias == 0).sum()) == 4

    # zeroed() switches the same entries off and restores the base exactly
    model = copy.deepcopy(base)
    with zeroed(model, nset):
        for n, p in model.named_parameters():
            assert torch.equal(p, exp[n]), n
    for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n


def test_only_selected_entries_zeroed_our_format(tmp_path):
    base = tiny_model("qwen2")
    geom = Geometry.from_config(base.config)
    nset = empty_set(geom)
    nset["attn_k"][1, [0, 31]] = True  # our files hold true k_proj rows: no mapping
    nset["attn_v"][0, [16]] = True
    nset["fwd_up"][2, [3]] = True
    write_neuron_file(tmp_path / "ours.json", nset, {"model": "tiny"})
    back, meta = read_neuron_file(tmp_path / "ours.json", geom, legacy_kv=True)  # legacy: no effect on ours
    assert meta["kv_index_space"] == "kv_rows"
    exp = _expected_zero(base, {("attn_k", 1): [0, 31], ("attn_v", 0): [16], ("fwd_up", 2): [3]})
    model = copy.deepcopy(base)
    zero_neurons(model, back)
    for n, p in model.named_parameters():
        assert torch.equal(p, exp[n]), n


# ---------------------------------------------------------------- weights == hooks, every architecture

@pytest.mark.parametrize("arch", ARCHS)
def test_zeroed_logits_equal_ablation_hooks(arch):
    base = tiny_model(arch)
    geom = Geometry.from_config(base.config)
    nset = dense_set(geom, seed=1)
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in one row
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
        with ablation_hooks(base, nset):
            hooked = base(input_ids=ids, attention_mask=mask).logits
        again = base(input_ids=ids, attention_mask=mask).logits
        model = copy.deepcopy(base)
        zero_neurons(model, nset)
        zero = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(again, ref)  # hooks are gone after the block
    assert not torch.allclose(zero, ref, atol=1e-3)  # the set does something
    torch.testing.assert_close(zero, hooked, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- streaming == in memory

def test_streaming_equals_in_memory(work, tmp_path):
    root, _, data, geom = work
    src = tmp_path / "sharded"
    model = tiny_model("qwen2")
    model.save_pretrained(src, max_shard_size="60KB")
    save_tiny("qwen2", tmp_path / "tok")  # the tokenizer files
    for f in (tmp_path / "tok").glob("tokenizer*"):
        (src / f.name).write_bytes(f.read_bytes())
    assert len(list(src.glob("*.safetensors"))) > 2 and (src / "model.safetensors.index.json").is_file()
    write_neuron_file(tmp_path / "s.json", dense_set(geom, seed=2))

    a = run_script("deactivation.py", "--model", src, "--dataset", data, "--out", tmp_path / "mem",
                   "--neurons", tmp_path / "s.json", "--device", "cpu")
    b = run_script("deactivation.py", "--model", src, "--dataset", data, "--out", tmp_path / "stream",
                   "--neurons", tmp_path / "s.json", "--device", "cpu", "--streaming")
    assert a.returncode == 0, a.stderr
    assert b.returncode == 0, b.stderr
    mem, stream = tmp_path / "mem/sharded/variants/s", tmp_path / "stream/sharded/variants/s"
    tm, ts = tensors(mem), tensors(stream)
    assert set(tm) == set(ts)
    for k in tm:
        assert tm[k].dtype == ts[k].dtype and tm[k].shape == ts[k].shape, k
        assert tm[k].contiguous().view(torch.uint8).equal(ts[k].contiguous().view(torch.uint8)), k
    assert len(list(stream.glob("*.safetensors"))) == len(list(src.glob("*.safetensors")))
    for f in stream.glob("*.safetensors"):
        with safe_open(f, framework="pt") as fh:
            assert fh.metadata()["format"] == "pt"
    prov = json.loads((stream / PROVENANCE_FILE).read_text())
    assert prov["streaming"] and prov["tag"] == "sharded" and prov["size"] > 0
    assert model_tag(str(stream)) == "sharded"
    # the streamed directory is a working model
    m = AutoModelForCausalLM.from_pretrained(stream)
    tok = AutoTokenizer.from_pretrained(stream)
    m.generate(**tok(["The cat"], return_tensors="pt"), max_new_tokens=3, do_sample=False)


# ---------------------------------------------------------------- refusals

BAD = {
    "layer": {"fwd_up": {"3": [1]}},
    "index": {"fwd_down": {"0": [96]}},
    "kv_index": {"attn_k": {"1": [5, 32]}, "meta": {"kv_index_space": "kv_rows"}},
    "group": {"fwd_sideways": {"0": [1]}},
    "negative": {"attn_q": {"0": [-1]}},
}


@pytest.mark.parametrize("case", [*BAD, "corrupt", "missing", "no_default", "streaming_bin", "unknown_save"])
def test_refused_with_status_2_and_nothing_written(forked, work, tmp_path, case):
    root, model_dir, data, geom = work
    out = tmp_path / "out"
    nfile = tmp_path / "bad.json"
    args = ["--model", model_dir, "--dataset", data, "--out", out, "--langs", "en,fr", "--measure-ppl"]
    if case in BAD:
        nfile.write_text(json.dumps(BAD[case]))
        args += ["--neurons", nfile]
    elif case == "corrupt":
        nfile.write_text('{"fwd_up": {"0": [1, 2}')
        args += ["--neurons", nfile]
    elif case == "missing":
        args += ["--neurons", tmp_path / "nope.json"]
    elif case == "streaming_bin":  # weights in pytorch format only
        d = tmp_path / "binmodel"
        d.mkdir()
        (d / "config.json").write_text((model_dir / "config.json").read_text())
        torch.save(tiny_model("qwen2").state_dict(), d / "pytorch_model.bin")
        write_neuron_file(nfile, random_set(5, geom, 0, "x"))
        args = ["--model", d, "--dataset", data, "--out", out, "--neurons", nfile, "--streaming"]
    elif case == "unknown_save":
        write_neuron_file(nfile, random_set(5, geom, 0, "x"))
        args += ["--neurons", nfile, "--save-variants", "shared"]
    r = forked("deactivation.py", *args)  # a real process, forked from conftest's fork server
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    if case in BAD or case in ("corrupt", "missing"):
        assert str(nfile if case != "missing" else tmp_path / "nope.json") in lines[0]
    if case in ("layer", "index", "kv_index", "negative"):
        group, layer = next((g, l) for g, v in BAD[case].items() if g != "meta" for l in v)
        assert f"group {group} layer {layer}" in lines[0]
    if case == "group":
        assert "fwd_sideways" in lines[0]
    leftovers = [p for p in out.rglob("*")] if out.exists() else []
    assert not [p for p in leftovers if p.name in ("variants", "deactivation.json") or p.suffix == ".safetensors"]


# ---------------------------------------------------------------- the authors' published files

@pytest.mark.skipif(not (SHARED_DATA / "reference_neurons").is_dir(), reason="shared data absent")
def test_authors_files_fit_llama_31_8b_skeleton():
    cfg = json.loads((SHARED_DATA / "configs" / "llama-3.1-8b.json").read_text())
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    skeleton = meta_skeleton(config)
    geom = Geometry.from_config(config)
    params = dict(skeleton.named_parameters())
    files = sorted((SHARED_DATA / "reference_neurons").glob("*.json"))
    assert len(files) == 7
    for f in files:
        raw = json.loads(f.read_text())
        assert max(max(v, default=-1) for v in raw["attn_k"].values()) >= geom.num_kv_heads * geom.head_dim
        for legacy in (False, True):
            nset, _ = read_neuron_file(f, geom, legacy_kv=legacy)
            plan = zero_plan(skeleton, nset)
            assert plan
            for name, (dim, idx) in plan.items():
                assert 0 <= int(idx.min()) and int(idx.max()) < params[name].shape[dim], (f.name, name)
            assert "model.layers.0.self_attn.k_proj.weight" in plan or nset["attn_k"][0].sum() == 0


# ---------------------------------------------------------------- perplexity and saved variants

def test_in_memory_ppl_equals_reloaded_variant(work, tmp_path):
    root, model_dir, data, geom = work
    neurons = tmp_path / "out" / "qwen2" / "neurons"
    sets = {"shared": dense_set(geom, 3, 0.05), "exclusive_en": dense_set(geom, 4, 0.05),
            "exclusive_fr": dense_set(geom, 5, 0.05), "random_shared": dense_set(geom, 6, 0.05)}
    for n, s in sets.items():
        write_neuron_file(neurons / f"{n}.json", s)
    r = run_script("deactivation.py", "--model", model_dir, "--dataset", data, "--out", tmp_path / "out",
                   "--langs", "en,fr", "--measure-ppl", "--save-variants", "shared,exclusive_fr", "--batch-size", "4",
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "out/qwen2/deactivation.json").read_text())
    assert set(res["sets"]) == set(sets)
    assert set(res["results"]["ppl"]) == {"en", "fr"}
    assert res["meta"]["run"]["args"]["measure_ppl"] is True
    assert set(res["importance"]) == {"en", "fr"} and res["language_agnostic_score"] is not None
    assert res["meta"]["schema_version"] == SCHEMA_VERSION
    for name in sets:  # what load_neuron_set records about each file, e.g. its size and hash
        info = load_neuron_set(neurons / f"{name}.json", geom)[1]
        assert res["meta"]["neuron_files"][name] == info and info["size"] == res["sets"][name]["size"]
    for name in ("shared", "exclusive_fr"):
        assert res["sets"][name]["size"] == int(sum(int(m.sum()) for m in sets[name].values()))
        vdir = tmp_path / "out/qwen2/variants" / name
        assert model_tag(str(vdir)) == "qwen2"
        prov = json.loads((vdir / PROVENANCE_FILE).read_text())
        assert prov["neuron_set"] == name and prov["base_model"] == str(model_dir)
        assert prov["schema_version"] == SCHEMA_VERSION and model_role(str(vdir)) == "variant"
        assert (vdir / NEURON_FILE_COPY).read_bytes() == (neurons / f"{name}.json").read_bytes()
        m = AutoModelForCausalLM.from_pretrained(vdir).eval()
        tok = AutoTokenizer.from_pretrained(vdir)
        for lang in ("en", "fr"):
            p = perplexity(m, tok, val_texts(data, lang), 512, 4)
            assert p["tokens"] == res["sets"][name]["ppl"][lang]["tokens"]
            assert p["ppl"] == pytest.approx(res["sets"][name]["ppl"][lang]["ppl"], rel=1e-6)
            d = res["sets"][name]["ppl"][lang]["ppl"] - res["results"]["ppl"][lang]["ppl"]
            assert res["sets"][name]["dppl"][lang] == pytest.approx(d)
        out = m.generate(**tok(["Le chat"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
        assert out.shape[1] > 1
    assert not (tmp_path / "out/qwen2/variants/exclusive_en").exists()  # not asked for
    # a second run with the same arguments and files reuses everything
    r2 = run_script("deactivation.py", "--model", model_dir, "--dataset", data, "--out", tmp_path / "out",
                    "--langs", "en,fr", "--measure-ppl", "--save-variants", "shared,exclusive_fr", "--batch-size", "4",
                    "--device", "cpu")
    assert r2.returncode == 0 and "Nothing to recompute" in r2.stdout


def test_legacy_kv_mapping_flag(work, tmp_path):
    root, model_dir, data, geom = work
    _authors_file(tmp_path / "authors.json")
    for flag, rows in (([], [3, 1, 24, 31]), (["--legacy-kv-mapping"], [1, 8, 20, 31])):
        out = tmp_path / f"out{len(flag)}"
        r = run_script("deactivation.py", "--model", model_dir, "--dataset", data, "--out", out,
                       "--neurons", f"shared={tmp_path / 'authors.json'}", "--device", "cpu", *flag)
        assert r.returncode == 0, r.stderr
        t = tensors(out / "qwen2/variants/shared")
        k = t["model.layers.0.self_attn.k_proj.weight"]
        assert sorted(torch.nonzero((k == 0).all(1)).flatten().tolist()) == sorted(rows)


# ---------------------------------------------------------------- Imp / LAS

def test_importance_and_las_arithmetic():
    sets = {"shared": {"size": 10, "dppl": {"en": 5.0, "fr": 2.0, "de": 1.0, "th": 3.0}},
            "exclusive_en": {"size": 20, "dppl": {"en": 40.0}},
            "exclusive_fr": {"size": 5, "dppl": {"fr": 1.0}},
            "exclusive_de": {"size": 0, "dppl": {"de": 0.0}},  # empty set: Imp undefined
            "exclusive_th": {"size": 7, "dppl": {"th": 0.0}}}  # no effect: Imp undefined
    imp, las = language_agnostic(sets, ["en", "fr", "de", "th", "sw"])
    assert imp["en"] == pytest.approx((5 / 10) / (40 / 20)) == pytest.approx(0.25)
    assert imp["fr"] == pytest.approx((2 / 10) / (1 / 5)) == pytest.approx(1.0)
    assert imp["de"] is None and imp["th"] is None and "sw" not in imp
    assert las == pytest.approx(math.log(1 + 0.625))
    # Imp = 1 everywhere gives log 2
    eq = {"shared": {"size": 4, "dppl": {"en": 8.0}}, "exclusive_en": {"size": 2, "dppl": {"en": 4.0}}}
    assert language_agnostic(eq, ["en"])[1] == pytest.approx(math.log(2))
    assert language_agnostic({"exclusive_en": sets["exclusive_en"]}, ["en"]) == ({}, None)


def test_help():
    r = run_script("deactivation.py", "--help")
    assert r.returncode == 0 and "--legacy-kv-mapping" in r.stdout and "--save-variants" in r.stdout
