"""Interventions (langneurons/interventions.py): zero equals deactivation's zeroed model, the identities are
bit for bit the model, the hooked values are what each kind says, grouped-query k/v rows stay in their kv head,
means are token means stored once, bad specs exit 2, evaluate.py and deactivation.py run under an intervention."""
from __future__ import annotations

import json

import pytest
import torch

import tiny
from tiny import save_tiny, tiny_dataset, tiny_model, tiny_tokenizer

from langneurons import interventions as iv_mod
from langneurons.cli import InputError
from langneurons.interventions import (Intervention, intervened, neuron_means, neuron_means_and_tokens,
                                       parse_intervention, stored_means, value_points)
from langneurons.layout import Outputs
from langneurons.masking import zeroed
from langneurons.model import Geometry, load_model, model_record
from langneurons.neurons import empty_set, write_neuron_file

# every tiny architecture: Qwen2 has grouped-query attention with q/k/v biases, Qwen3 and Gemma3 q/k norms,
# Gemma2 soft-capping
ARCHS = tiny.ARCHS
TEXTS = ["The cat sleeps on the warm mat.", "Rain.", "We walked to the market early in the morning."]


def some_set(model, layers=(0, 2), k=3, seed=0) -> dict:
    """k neurons of every group in `layers` (different ones per group)."""
    geom = Geometry.from_config(model.config)
    g = torch.Generator().manual_seed(seed)
    s = empty_set(geom)
    for grp in s:
        for li in layers:
            s[grp][li, torch.randperm(geom.group_size(grp), generator=g)[:k]] = True
    return s


def batch(tok, texts=TEXTS):
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def capture(model):
    """Records the value at every hook point of every forward while installed (registered after the
    intervention's hooks, so it reads what the intervention left): {(layer, group-of-point): tensor}."""
    seen, handles = {}, []
    for li, mod, where, groups, pos in value_points(model):
        key = (li, groups[0])
        pick = (lambda x: x.clone()) if pos is None else (lambda x, pos=pos: x.index_select(-1, pos))
        if where == "in":
            handles.append(mod.register_forward_pre_hook(lambda m, a, key=key, f=pick: seen.__setitem__(key, f(a[0]))))
        else:
            handles.append(mod.register_forward_hook(lambda m, a, o, key=key, f=pick: seen.__setitem__(key, f(o))))
    return seen, handles


# ---------------------------------------------------------------- specs

@pytest.mark.parametrize("spec,canon", [("zero", "zero"), ("scale=4", "scale=4"), ("scale=4.0", "scale=4"),
                                        ("scale=0.5", "scale=0.5"), ("scale=-2", "scale=-2"), ("mean=sw", "mean=sw"),
                                        ("shift=en:sw", "shift=en:sw"), (" shift=en:en ", "shift=en:en")])
def test_spec_round_trip(spec, canon):
    iv = parse_intervention(spec)
    assert iv.spec == canon
    assert parse_intervention(iv.spec) == iv


def test_spec_fields_and_mean_langs():
    assert parse_intervention("shift=en:sw") == Intervention("shift", source="en", target="sw")
    assert parse_intervention("shift=en:sw").mean_langs() == ["en", "sw"]
    assert parse_intervention("shift=fr:fr").mean_langs() == []
    assert parse_intervention("mean=de").mean_langs() == ["de"]
    assert parse_intervention("scale=2").alpha == 2.0 and parse_intervention("scale=2").mean_langs() == []
    assert parse_intervention("shift=en:sw").safe_spec == "shift-en-sw"


@pytest.mark.parametrize("spec", ["scale=x", "shift=en", "shift=en:", "shift=:en", "shift=a:b:c", "mean=", "mean",
                                  "scale=inf", "scale=nan", "zero=1", "boost=2", "", "mean=e n", "mean=xx"])
def test_bad_specs(spec):
    with pytest.raises(InputError):
        parse_intervention(spec, langs=["en", "fr"])


def test_unknown_language_only_with_a_list():
    assert parse_intervention("mean=xx").lang == "xx"  # spelling only: the corpus decides
    with pytest.raises(InputError, match="unknown language 'xx'"):
        parse_intervention("shift=en:xx", langs=["en", "fr"])


# ---------------------------------------------------------------- what the hooks do

@pytest.mark.parametrize("arch", ARCHS)
def test_zero_equals_the_zeroed_variant(arch):
    model, tok = tiny_model(arch), tiny_tokenizer()
    s = some_set(model)
    ids, mask = batch(tok)
    base = logits(model, ids, mask)
    with zeroed(model, s):  # what deactivation.py saves as the variant
        variant = logits(model, ids, mask)
    with intervened(model, s, parse_intervention("zero")):
        hooked = logits(model, ids, mask)
    assert (variant - base).abs().max() > 1e-3  # the set matters, so the comparison means something
    torch.testing.assert_close(hooked, variant, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_identities_are_bit_identical(arch):
    model, tok = tiny_model(arch), tiny_tokenizer()
    s = some_set(model)
    ids, mask = batch(tok)
    base = logits(model, ids, mask)
    means = neuron_means(model, tok, {"en": TEXTS[:2], "fr": TEXTS[2:]}, 64, 2)
    for spec, nset in (("scale=1", s), ("shift=en:en", s), ("mean=en", empty_set(Geometry.from_config(model.config))),
                       ("scale=7", empty_set(Geometry.from_config(model.config)))):
        with intervened(model, nset, parse_intervention(spec), means):
            assert torch.equal(logits(model, ids, mask), base), spec
    with intervened(model, s, parse_intervention("shift=en:fr"), means):
        assert not torch.equal(logits(model, ids, mask), base)
    assert torch.equal(logits(model, ids, mask), base)  # hooks are gone after the block


def test_scale_zero_is_zero_and_hooks_go_on_error():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    s = some_set(model)
    ids, mask = batch(tok)
    base = logits(model, ids, mask)
    with intervened(model, s, parse_intervention("zero")):
        z = logits(model, ids, mask)
    with intervened(model, s, parse_intervention("scale=0")):
        assert torch.equal(logits(model, ids, mask), z)
    with pytest.raises(RuntimeError):
        with intervened(model, s, parse_intervention("scale=3")):
            raise RuntimeError("stop")
    assert torch.equal(logits(model, ids, mask), base)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_scale_multiplies_only_the_sets_values(arch):
    """One layer's neurons scaled: at that layer's points the set's channels are A times the plain values,
    every other channel is unchanged (inputs of the first intervened point are untouched upstream)."""
    model, tok = tiny_model(arch), tiny_tokenizer()
    s = some_set(model, layers=(1,))
    ids, mask = batch(tok)
    seen, handles = capture(model)
    logits(model, ids, mask)
    plain = dict(seen)
    for h in handles:
        h.remove()
    with intervened(model, s, parse_intervention("scale=3")):
        seen, handles = capture(model)
        logits(model, ids, mask)
        for h in handles:
            h.remove()
    # q, k, v of layer 1 read the same input with or without the intervention: compare them exactly
    for grp in ("attn_q", "attn_k", "attn_v"):
        idx = torch.nonzero(s[grp][1]).flatten()
        other = torch.ones(s[grp].shape[1], dtype=torch.bool)
        other[idx] = False
        torch.testing.assert_close(seen[(1, grp)][..., idx], 3 * plain[(1, grp)][..., idx])
        assert torch.equal(seen[(1, grp)][..., other], plain[(1, grp)][..., other])
    for li in (0,):  # the layer before is untouched
        for grp in ("fwd_up", "attn_o", "attn_q"):
            assert torch.equal(seen[(li, grp)], plain[(li, grp)])


@pytest.mark.parametrize("arch", ARCHS)
def test_mean_sets_every_value_to_the_mean(arch):
    model, tok = tiny_model(arch), tiny_tokenizer()
    s = some_set(model, layers=(0, 1, 2))
    means = neuron_means(model, tok, {"fr": TEXTS}, 64, 2)
    ids, mask = batch(tok, ["Le chat dort.", "Nous sommes allés au marché tôt."])
    with intervened(model, s, parse_intervention("mean=fr"), means):
        seen, handles = capture(model)
        logits(model, ids, mask)
        for h in handles:
            h.remove()
    checked = 0
    for (li, grp), x in seen.items():
        groups = ("fwd_up", "fwd_down") if grp == "fwd_up" else (grp,)
        idx = torch.unique(torch.cat([torch.nonzero(s[g][li]).flatten() for g in groups]))
        want = means["fr"][grp][li][idx].expand(*x.shape[:-1], idx.numel())
        assert torch.equal(x[..., idx], want), (li, grp)  # every position, padding included
        checked += idx.numel()
    assert checked == sum(int(s[g].sum()) for g in s) - int((s["fwd_up"] & s["fwd_down"]).sum())


def test_shift_adds_the_difference_of_means():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    s = some_set(model, layers=(0,))
    means = neuron_means(model, tok, {"en": TEXTS[:2], "fr": TEXTS[2:]}, 64, 2)
    ids, mask = batch(tok)
    seen, handles = capture(model)
    logits(model, ids, mask)
    plain = dict(seen)
    for h in handles:
        h.remove()
    with intervened(model, s, parse_intervention("shift=en:fr"), means):
        seen, handles = capture(model)
        logits(model, ids, mask)
        for h in handles:
            h.remove()
    idx = torch.nonzero(s["attn_q"][0]).flatten()  # q of layer 0 reads the embeddings: same input
    delta = means["fr"]["attn_q"][0][idx] - means["en"]["attn_q"][0][idx]
    torch.testing.assert_close(seen[(0, "attn_q")][..., idx], plain[(0, "attn_q")][..., idx] + delta)


@pytest.mark.parametrize("group", ["attn_k", "attn_v"])
def test_gqa_kv_row_touches_only_its_kv_head(group):
    """Qwen2 tiny: 4 query heads, 2 kv heads (n_rep 2), head_dim 16. A row of kv head 1 changes the attention
    output (o_proj's input) of query heads 2 and 3 only."""
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    geom = Geometry.from_config(model.config)
    assert geom.num_kv_heads == 2 and geom.n_rep == 2
    s = empty_set(geom)
    s[group][0, [geom.head_dim + 3, geom.head_dim + 9]] = True  # rows of kv head 1
    ids, mask = batch(tok)
    seen, handles = capture(model)
    logits(model, ids, mask)
    plain = seen[(0, "attn_o")].clone()
    with intervened(model, s, parse_intervention("scale=5")):
        logits(model, ids, mask)
    for h in handles:
        h.remove()
    hooked = seen[(0, "attn_o")]
    d = geom.head_dim
    for head in range(geom.num_heads):
        cols = slice(head * d, (head + 1) * d)
        same = torch.equal(hooked[..., cols], plain[..., cols])
        assert same == (head // geom.n_rep != 1), head


# ---------------------------------------------------------------- means

def test_means_are_means_over_non_padding_tokens():
    model, tok = tiny_model("gemma3"), tiny_tokenizer()
    padded, tokens = neuron_means_and_tokens(model, tok, TEXTS, 64, batch_size=3)
    # one text at a time, no padding: the plain values of every token, averaged by hand
    seen, handles = capture(model)
    values, n = {}, 0
    for t in TEXTS:
        ids = torch.tensor([tok(t)["input_ids"]])  # detection's tokenization: <bos> included
        logits(model, ids, torch.ones_like(ids))
        n += ids.shape[1]
        for key, x in seen.items():
            values.setdefault(key, []).append(x[0].double())
    for h in handles:
        h.remove()
    assert tokens == n
    for (li, grp), xs in values.items():
        want = torch.cat(xs).mean(0).float()
        torch.testing.assert_close(padded[grp][li], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(padded["fwd_up"], padded["fwd_down"])  # one point: down_proj's input
    assert padded["fwd_up"].dtype == torch.float32


def test_stored_means_computed_once_and_reused(tmp_path):
    model_dir = save_tiny("qwen2", tmp_path / "m")
    data = tiny_dataset(tmp_path / "data")
    model, tok = load_model(str(model_dir), "cpu", "float32")
    calls = []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    out = Outputs(tmp_path / "out" / "m")
    first = stored_means(out, str(model_dir), model, tok, data, "detect", ["en", "fr"], 64, 4)
    n_first = len(calls)
    assert n_first > 0
    path = iv_mod.means_dir(out, str(model_dir), "detect", "en")
    assert (path / iv_mod.MEANS_FILE).is_file()
    meta = json.loads((path / "meta.json").read_text())
    assert meta["fingerprint"]["version"] == {"means": 1} and meta["tokens"] > 0
    again = stored_means(out, str(model_dir), model, tok, data, "detect", ["en", "fr"], 64, 4)
    assert len(calls) == n_first  # read back, no forward pass
    for lang in ("en", "fr"):
        for g in first[lang]:
            assert torch.equal(first[lang][g], again[lang][g])
    direct = neuron_means(model, tok, {"en": (data / "detect" / "en.txt").read_text().splitlines()}, 64, 4)
    torch.testing.assert_close(first["en"]["attn_v"], direct["en"]["attn_v"])
    # another --mean-max-length is another computation: recomputed
    stored_means(out, str(model_dir), model, tok, data, "detect", ["en"], 8, 4)
    assert len(calls) > n_first


# ---------------------------------------------------------------- the stages

@pytest.fixture(scope="module")
def stage_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("iv")
    model_dir = save_tiny("qwen2", root / "tiny")
    data = tiny_dataset(root / "data", langs=("en", "fr"))
    model = tiny_model("qwen2")
    s = some_set(model, layers=(0, 1, 2), k=6)
    from transformers import AutoConfig
    record = model_record(str(model_dir), AutoConfig.from_pretrained(model_dir))
    write_neuron_file(root / "shared.json", s, {"model": record, "set": "shared"})
    return root, model_dir, data


def common(root, model_dir, data):
    return ["--model", model_dir, "--dataset", data, "--out", root / "out", "--device", "cpu", "--langs", "en,fr",
            "--limit", "2"]


def test_evaluate_under_an_intervention(forked, stage_setup):
    root, model_dir, data = stage_setup
    args = [*common(root, model_dir, data), "--tasks", "ppl,mmmlu"]
    r = forked("evaluate.py", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    r = forked("evaluate.py", *args, "--neurons", root / "shared.json", "--intervention", "mean=fr")
    assert r.returncode == 0, r.stderr[-2000:]
    eval_dir = root / "out" / "tiny" / "eval"
    base = json.loads((eval_dir / "tiny.json").read_text())
    under = json.loads((eval_dir / "tiny+shared@mean-fr.json").read_text())
    assert base["meta"]["intervention"] is None
    rec = under["meta"]["intervention"]
    assert rec["spec"] == "mean=fr" and rec["neuron_set"]["name"] == "shared"
    from langneurons.reuse import file_digest
    assert rec["neuron_set"]["sha256"] == file_digest(root / "shared.json")
    assert under["results"]["ppl"]["en"]["ppl"] != base["results"]["ppl"]["en"]["ppl"]
    assert (root / "out" / "tiny" / "means" / "tiny" / "detect" / "fr" / "means.safetensors").is_file()
    # a rerun reuses it; scale=1 equals the base model exactly
    r = forked("evaluate.py", *args, "--neurons", root / "shared.json", "--intervention", "mean=fr")
    assert r.returncode == 0 and "Reusing" in r.stdout
    r = forked("evaluate.py", *args, "--neurons", f"s={root / 'shared.json'}", "--intervention", "scale=1")
    assert r.returncode == 0, r.stderr[-2000:]
    one = json.loads((eval_dir / "tiny+s@scale-1.json").read_text())
    assert one["results"] == base["results"]

    # figures.py: the intervened results beside the base model's; the base evaluation stays the base
    import figures
    t = figures.load_tag(Outputs(root / "out" / "tiny"), [])
    assert t.base_evals == ["tiny"]
    made = []
    text = figures.report_interventions([t], lambda fig, name: made.append(name) or f"![{name}]({name})\n")
    assert made == ["interventions_tiny.png"]
    assert "shared @ mean=fr" in text and "s @ scale=1" in text
    base_row = next(line for line in text.splitlines() if line.startswith("| base | tiny | PPL |"))
    assert f"{base['results']['ppl']['en']['ppl']:.3f}" in base_row
    meaned_row = next(line for line in text.splitlines() if line.startswith("| shared @ mean=fr |") and "| PPL |" in line)
    assert f"{under['results']['ppl']['en']['ppl']:.3f}" in meaned_row


@pytest.mark.parametrize("spec", ["scale=x", "shift=en", "mean=xx"])
def test_evaluate_bad_spec_exits_2(forked, stage_setup, spec):
    root, model_dir, data = stage_setup
    out = root / f"bad-{spec.replace('=', '_')}"
    r = forked("evaluate.py", *common(out, model_dir, data), "--tasks", "ppl", "--neurons", root / "shared.json",
               "--intervention", spec)
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "error:" in r.stderr
    assert not (out / "out").exists()


def test_evaluate_intervention_needs_a_set(forked, stage_setup):
    root, model_dir, data = stage_setup
    r = forked("evaluate.py", *common(root / "bad-noset", model_dir, data), "--tasks", "ppl", "--intervention", "zero")
    assert r.returncode == 2 and "--neurons" in r.stderr


def test_deactivation_zero_is_todays_and_mean_is_recorded(forked, stage_setup):
    root, model_dir, data = stage_setup
    args = [*common(root / "d", model_dir, data), "--neurons", root / "shared.json", "--measure-ppl",
            "--save-variants", "none"]
    r = forked("deactivation.py", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    out = root / "d" / "out" / "tiny" / "deactivation.json"
    plain = json.loads(out.read_text())
    assert plain["meta"]["intervention"]["spec"] == "zero"
    r = forked("deactivation.py", *args, "--intervention", "zero")
    assert r.returncode == 0 and "Reusing" in r.stdout  # zero is the default: the same output
    # the hook path gives the same numbers as the weight path (zeroed): within float rounding
    model, tok = load_model(str(model_dir), "cpu", "float32")
    from langneurons.metrics import perplexity_by_lang
    from langneurons.neurons import read_neuron_file
    s, _ = read_neuron_file(root / "shared.json", Geometry.from_config(model.config))
    texts = {l: (data / "val" / f"{l}.txt").read_text().splitlines()[:2] for l in ("en", "fr")}
    with zeroed(model, s):
        want = perplexity_by_lang(model, tok, texts, 512, 8, "z")
    for l in texts:
        assert plain["sets"]["shared"]["ppl"][l]["ppl"] == pytest.approx(want[l]["ppl"], rel=1e-5)
    r = forked("deactivation.py", *args, "--intervention", "mean=en")
    assert r.returncode == 0, r.stderr[-2000:]
    meaned = json.loads(out.read_text())
    assert meaned["meta"]["intervention"]["spec"] == "mean=en"
    assert meaned["sets"]["shared"]["ppl"] != plain["sets"]["shared"]["ppl"]
    assert meaned["results"]["ppl"] == plain["results"]["ppl"]  # the base model is the base model
    r = forked("deactivation.py", *args, "--intervention", "shift=en")
    assert r.returncode == 2


def test_means_of_an_external_corpus_follow_its_texts(tmp_path):
    model_dir = save_tiny("llama", tmp_path / "m")
    model, tok = load_model(str(model_dir), "cpu", "float32")
    calls = []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    (tmp_path / "corpus_en.txt").write_text("one line\nanother line here\n", encoding="utf-8")
    spec = str(tmp_path / "corpus_{lang}.txt")
    out = Outputs(tmp_path / "out" / "m")
    first = stored_means(out, str(model_dir), model, tok, tmp_path / "nodata", spec, ["en"], 32, 2)
    n = len(calls)
    assert n > 0 and iv_mod.means_dir(out, str(model_dir), spec, "en").parent.name.endswith("corpus_LANG.txt")
    stored_means(out, str(model_dir), model, tok, tmp_path / "nodata", spec, ["en"], 32, 2)
    assert len(calls) == n
    (tmp_path / "corpus_en.txt").write_text("a different text entirely\n", encoding="utf-8")
    second = stored_means(out, str(model_dir), model, tok, tmp_path / "nodata", spec, ["en"], 32, 2)
    assert len(calls) > n  # other texts: recomputed
    assert not torch.equal(first["en"]["attn_q"], second["en"]["attn_q"])


def test_evaluate_refuses_another_models_set(forked, stage_setup, tmp_path):
    root, model_dir, data = stage_setup
    other = save_tiny("llama", tmp_path / "other")  # the same geometry, another model
    from transformers import AutoConfig
    s = some_set(tiny_model("qwen2"))
    write_neuron_file(tmp_path / "theirs.json", s, {"model": model_record(str(other), AutoConfig.from_pretrained(other))})
    args = [*common(tmp_path / "o", model_dir, data), "--tasks", "ppl", "--neurons", tmp_path / "theirs.json"]
    r = forked("evaluate.py", *args)
    assert r.returncode == 2 and "--allow-other-model" in r.stderr
    r = forked("evaluate.py", *args, "--allow-other-model")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "out" / "tiny" / "eval" / "tiny+theirs@zero.json").is_file()


def test_evaluate_fingerprint_arguments():
    """A base evaluation's fingerprint is the one it had before these flags existed; under an intervention the
    SPEC (and for mean/shift the mean flags) decide reuse."""
    import evaluate
    base = evaluate.result_args(evaluate.parse_args([]), "ppl")
    assert not set(base) & evaluate.INTERVENTION_ARGS
    args = evaluate.parse_args(["--neurons", "x.json", "--intervention", "scale=2"])
    kept = evaluate.result_args(args, "ppl", parse_intervention("scale=2"))
    assert {"neurons", "intervention", "allow_other_model"} <= set(kept) and not {"mean_corpus"} & set(kept)
    kept = evaluate.result_args(args, "ppl", parse_intervention("mean=en"))
    assert {"mean_corpus", "mean_max_length", "intervention"} <= set(kept)
    assert iv_mod.unused_args(parse_intervention("zero")) == iv_mod.INTERVENTION_FLAGS
    assert iv_mod.unused_args(parse_intervention("shift=en:fr")) == ()
