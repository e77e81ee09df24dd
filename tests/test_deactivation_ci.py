"""How sure deactivation's numbers are (issue 17): each line's NLL reproduces the perplexity; dPPL, Imp and
LAS intervals from a paired, seeded bootstrap over validation lines; K random controls per set with the set's
per-layer, per-group counts; the figures draw both."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import deactivation
import figures
from tiny import SENTENCES, save_tiny, tiny_config, tiny_dataset, tiny_model, tiny_tokenizer

from langneurons.data import val_texts
from langneurons.masking import zeroed
from langneurons.metrics import language_agnostic, perplexity
from langneurons.model import GROUPS, Geometry
from langneurons.neurons import empty_set, random_like, read_neuron_file, write_neuron_file
from langneurons.uncertainty import derived_seed, percentile_interval, ppl_of_lines, resample_indices, resampled_ppl

LANGS = ["en", "fr"]


def dense_set(geom: Geometry, seed: int, p: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    return {grp: torch.rand(geom.shape(grp), generator=g) < p for grp in GROUPS}


def inside(ci, x) -> bool:
    return ci[0] - 1e-9 * max(1.0, abs(x)) <= x <= ci[1] + 1e-9 * max(1.0, abs(x))


# ---------------------------------------------------------------- perplexity per line

def test_line_nll_reproduces_ppl_and_does_not_depend_on_batching():
    model, tok = tiny_model("qwen2").eval(), tiny_tokenizer()
    texts = SENTENCES["en"] + SENTENCES["fr"]
    r = perplexity(model, tok, texts, max_length=12, batch_size=4)  # 12 tokens: some lines are truncated
    assert len(r["line_nll"]) == len(r["line_tokens"]) == len(texts)
    # the measured PPL is the per-line formula on all lines, bit for bit, and the plain formula to rounding
    assert ppl_of_lines(r["line_nll"], r["line_tokens"]) == r["ppl"]
    assert r["ppl"] == pytest.approx(math.exp(math.fsum(r["line_nll"]) / sum(r["line_tokens"])), rel=1e-12)
    assert sum(r["line_tokens"]) == r["tokens"]
    # each line against the model's own loss on that line alone (mean NLL of its predicted tokens)
    for i, t in enumerate(texts):
        ids = torch.tensor([tok(t, truncation=True, max_length=12)["input_ids"]])
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=ids).loss)
        assert r["line_tokens"][i] == ids.shape[1] - 1
        assert r["line_nll"][i] == pytest.approx(loss * (ids.shape[1] - 1), rel=1e-5)
    one = perplexity(model, tok, texts, max_length=12, batch_size=1)  # no padding at all
    assert one["line_tokens"] == r["line_tokens"]
    assert one["line_nll"] == pytest.approx(r["line_nll"], rel=1e-5)
    # a resample is the same formula on the lines it draws (a line drawn twice counts twice)
    rows = np.array([np.arange(len(texts)), [0, 0, 3] + [1] * (len(texts) - 3)])
    got = resampled_ppl(r["line_nll"], r["line_tokens"], rows)
    assert got[0] == pytest.approx(r["ppl"], rel=1e-12)
    nll = [r["line_nll"][i] for i in rows[1]]
    assert got[1] == pytest.approx(math.exp(sum(nll) / sum(r["line_tokens"][i] for i in rows[1])), rel=1e-12)


# ---------------------------------------------------------------- intervals (deactivation.intervals)

def _lines(rng: np.random.Generator, n: int) -> dict:
    tokens = rng.integers(3, 30, n).tolist()
    nll = [float(t * rng.uniform(2.0, 6.0)) for t in tokens]
    return {"ppl": ppl_of_lines(nll, tokens), "tokens": sum(tokens), "line_nll": nll, "line_tokens": tokens}


def _shifted(lines: dict, per_token: float, rng: np.random.Generator | None = None) -> dict:
    """The same lines with `per_token` more NLL per token (plus noise per line when rng is given)."""
    nll = [x + per_token * t + (rng.normal(0, 2.0) if rng else 0.0) for x, t in zip(lines["line_nll"], lines["line_tokens"])]
    return {**lines, "line_nll": nll, "ppl": ppl_of_lines(nll, lines["line_tokens"])}


def _synthetic(seed: int = 0):
    rng = np.random.default_rng(seed)
    base = {"en": _lines(rng, 40), "fr": _lines(rng, 25)}
    ppl = {"shared": {l: _shifted(base[l], 0.3, rng) for l in LANGS},
           "exclusive_en": {"en": _shifted(base["en"], 0.5, rng), "fr": _shifted(base["fr"], 0.05, rng)},
           "exclusive_fr": {"en": _shifted(base["en"], 0.02, rng), "fr": _shifted(base["fr"], 0.4, rng)},
           "itself": {l: copy.deepcopy(base[l]) for l in LANGS}}
    geom = Geometry.from_config(tiny_config("qwen2"))
    sets = {"shared": dense_set(geom, 1, 0.02), "exclusive_en": dense_set(geom, 2), "exclusive_fr": dense_set(geom, 3),
            "itself": dense_set(geom, 4)}
    return base, deactivation.summarize(base, ppl, {}, sets, LANGS)


def test_intervals_contain_estimates_are_paired_and_seeded():
    base, results = _synthetic()
    dppl_ci, imp_ci, las_ci = deactivation.intervals(base, results, LANGS, 500, seed=0)
    # a set compared with itself: every resample draws the same lines for both, so dPPL is 0 in all of them
    assert dppl_ci["itself"] == {"en": [0.0, 0.0], "fr": [0.0, 0.0]}
    for name in ("shared", "exclusive_en", "exclusive_fr"):
        for l in LANGS:
            assert inside(dppl_ci[name][l], results[name]["dppl"][l]), (name, l)
            assert dppl_ci[name][l][0] < dppl_ci[name][l][1]
    imp, las = language_agnostic(results, LANGS)
    assert set(imp_ci) == set(imp) == set(LANGS)
    for l in LANGS:
        assert inside(imp_ci[l], imp[l]), l
    assert inside(las_ci, las)
    # seeded: the same seed gives the same intervals, another seed others
    assert deactivation.intervals(base, results, LANGS, 500, seed=0) == (dppl_ci, imp_ci, las_ci)
    other = deactivation.intervals(base, results, LANGS, 500, seed=1)
    assert other[0]["shared"] != dppl_ci["shared"] and other[2] != las_ci
    # more lines, narrower interval: the same per-line noise over 4x the lines
    rng = np.random.default_rng(5)
    wide = {"en": _lines(rng, 20)}
    many = {"en": {k: (v * 4 if isinstance(v, list) else v) for k, v in wide["en"].items()}}
    many["en"]["ppl"] = ppl_of_lines(many["en"]["line_nll"], many["en"]["line_tokens"])
    width = []
    for b in (wide, many):
        s = {"x": {"size": 1, "ppl": {"en": _shifted(b["en"], 0.1, np.random.default_rng(6))}}}
        s["x"]["dppl"] = {"en": s["x"]["ppl"]["en"]["ppl"] - b["en"]["ppl"]}
        lo, hi = deactivation.intervals(b, s, ["en"], 500, seed=0)[0]["x"]["en"]
        width.append(hi - lo)
    assert width[1] < width[0]


def test_undefined_estimate_has_no_interval():
    """exclusive_fr leaves fr's PPL as it is: Imp_fr divides by a zero dPPL and is undefined, and so is its
    interval; LAS then rests on en alone."""
    base, results = _synthetic()
    results["exclusive_fr"]["ppl"]["fr"] = copy.deepcopy(base["fr"])
    results["exclusive_fr"]["dppl"]["fr"] = 0.0
    imp, las = language_agnostic(results, LANGS)
    assert imp["fr"] is None and imp["en"] is not None
    _, imp_ci, las_ci = deactivation.intervals(base, results, LANGS, 200, seed=0)
    assert imp_ci["fr"] is None and inside(imp_ci["en"], imp["en"]) and inside(las_ci, las)
    # Imp below -1 everywhere: LAS = log(1 + mean Imp) is undefined, and has no interval even where
    # some resamples give a mean above -1
    results["shared"]["dppl"] = {l: -abs(v) * 1e3 for l, v in results["shared"]["dppl"].items()}
    assert language_agnostic(results, LANGS)[1] is None
    assert deactivation.intervals(base, results, LANGS, 200, seed=0)[2] is None


def test_dppl_interval_is_the_paired_difference():
    """A set that adds the same NLL per token to every line multiplies every resample's PPL by the same factor:
    its dPPL interval is the base PPL's interval times (factor - 1) exactly when the same lines are drawn for
    both (unpaired resamples would add the spread of two independent draws)."""
    base, _ = _synthetic()
    ppl = {"shared": {l: _shifted(base[l], 0.25) for l in LANGS}}
    geom = Geometry.from_config(tiny_config("qwen2"))
    results = deactivation.summarize(base, ppl, {}, {"shared": dense_set(geom, 1)}, LANGS)
    dppl_ci = deactivation.intervals(base, results, LANGS, 400, seed=3)[0]["shared"]
    for l in LANGS:
        idx = resample_indices(len(base[l]["line_nll"]), 400, derived_seed(3, "deactivation-lines", l))
        lo, hi = percentile_interval(resampled_ppl(base[l]["line_nll"], base[l]["line_tokens"], idx))
        assert dppl_ci[l] == pytest.approx([lo * (math.exp(0.25) - 1), hi * (math.exp(0.25) - 1)], rel=1e-9)


# ---------------------------------------------------------------- random controls

def test_controls_match_their_set_and_differ_from_it_and_each_other():
    geom = Geometry.from_config(tiny_config("qwen2"))
    s = dense_set(geom, 7, 0.2)
    controls = [random_like(s, 0, deactivation.control_name("shared", i)) for i in range(1, 5)]
    for c in controls:
        for g in GROUPS:
            assert c[g].shape == s[g].shape and c[g].dtype == torch.bool
            assert c[g].sum(1).tolist() == s[g].sum(1).tolist(), g  # per layer, per group
        assert any(not torch.equal(c[g], s[g]) for g in GROUPS)
    for a in range(len(controls)):
        for b in range(a + 1, len(controls)):
            assert any(not torch.equal(controls[a][g], controls[b][g]) for g in GROUPS)
    # controls of another set of the same shape are others: the set's name is in the seed
    other = random_like(s, 0, deactivation.control_name("exclusive_en", 1))
    assert any(not torch.equal(other[g], controls[0][g]) for g in GROUPS)


def test_summary_of_controls():
    base, _ = _synthetic()
    geom = Geometry.from_config(tiny_config("qwen2"))
    ppl = {"shared": {l: _shifted(base[l], 0.3) for l in LANGS}}
    controls = {"shared": {"shared/random-1": {l: _shifted(base[l], 0.01) for l in LANGS},
                           "shared/random-2": {l: _shifted(base[l], 0.03) for l in LANGS},
                           "shared/random-3": {"en": _shifted(base["en"], -0.02), "fr": _shifted(base["fr"], -0.01)}}}
    r = deactivation.summarize(base, ppl, controls, {"shared": dense_set(geom, 1)}, LANGS)["shared"]
    c = r["controls"]
    assert c["k"] == 3 and list(c["sets"]) == ["random-1", "random-2", "random-3"]
    assert c["sets"]["random-2"]["seed_name"] == "shared/random-2"
    for l in LANGS:
        d = [c["sets"][k]["dppl"][l] for k in c["sets"]]
        assert d[0] == pytest.approx(controls["shared"]["shared/random-1"][l]["ppl"] - base[l]["ppl"])
        assert c["dppl_mean"][l] == pytest.approx(np.mean(d))
        assert c["dppl_range"][l] == [min(d), max(d)]
        assert c["dppl_ratio"][l] == pytest.approx(r["dppl"][l] / np.mean(d))
    # controls whose mean change is not an increase give no ratio
    controls["shared"] = {"shared/random-1": {l: _shifted(base[l], -0.01) for l in LANGS}}
    r = deactivation.summarize(base, ppl, controls, {"shared": dense_set(geom, 1)}, LANGS)["shared"]
    assert r["controls"]["dppl_ratio"] == {"en": None, "fr": None}


# ---------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("deact_ci")
    model_dir = save_tiny("qwen2", root / "qwen2")
    data = tiny_dataset(root / "dataset", langs=tuple(LANGS))
    geom = Geometry.from_config(tiny_config("qwen2"))
    neurons = root / "out" / "qwen2" / "neurons"
    sets = {"shared": dense_set(geom, 3, 0.05), "exclusive_en": dense_set(geom, 4, 0.05),
            "exclusive_fr": dense_set(geom, 5, 0.05), "random_shared": dense_set(geom, 6, 0.05)}
    for n, s in sets.items():
        write_neuron_file(neurons / f"{n}.json", s)
    write_neuron_file(root / "empty.json", empty_set(geom))
    return root, model_dir, data, geom


def _args(stage, out, *extra):
    root, model_dir, data, _ = stage
    return ["--model", model_dir, "--dataset", data, "--out", out, "--langs", ",".join(LANGS), "--measure-ppl",
            "--save-variants", "none", "--device", "cpu", "--batch-size", "4", "--resamples", "300", *extra]


def test_stage_writes_intervals_and_controls(forked, stage):
    root, model_dir, data, geom = stage
    out = root / "out"
    r = forked("deactivation.py", *_args(stage, out, "--random-controls", "2", "--force"))
    assert r.returncode == 0, r.stderr[-3000:]
    path = out / "qwen2" / "deactivation.json"
    first = path.read_bytes()
    res = json.loads(first)
    assert res["meta"]["intervals"]["resamples"] == 300 and res["meta"]["intervals"]["level"] == 0.95
    assert res["meta"]["random_controls"] == {"k": 2, "sets": ["shared", "exclusive_en", "exclusive_fr"]}
    assert "controls" not in res["sets"]["random_shared"]  # detection's own control is an ordinary set
    for name, s in res["sets"].items():
        for l in LANGS:
            assert inside(s["dppl_ci"][l], s["dppl"][l]), (name, l)
            lines = s["ppl"][l]
            assert ppl_of_lines(lines["line_nll"], lines["line_tokens"]) == pytest.approx(lines["ppl"], rel=1e-12)
    for l in LANGS:
        assert inside(res["importance_ci"][l], res["importance"][l])
    assert inside(res["language_agnostic_score_ci"], res["language_agnostic_score"])
    assert "[" in r.stdout and "2 random" in r.stdout  # the table shows the intervals and the controls

    # the recorded controls are random_like(set, --seed, seed_name): measured again here, the same PPL
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    nset, _ = read_neuron_file(out / "qwen2" / "neurons" / "exclusive_fr.json", geom)
    c = res["sets"]["exclusive_fr"]["controls"]
    assert c["k"] == 2 and set(c["sets"]) == {"random-1", "random-2"}
    with zeroed(model, random_like(nset, 0, c["sets"]["random-2"]["seed_name"])):
        p = perplexity(model, tok, val_texts(data, "fr"), 512, 4)["ppl"]
    assert p == pytest.approx(c["sets"]["random-2"]["ppl"]["fr"], rel=1e-6)
    assert c["dppl_range"]["fr"] == [min(c["sets"][k]["dppl"]["fr"] for k in c["sets"]),
                                     max(c["sets"][k]["dppl"]["fr"] for k in c["sets"])]

    # the same seed: the same file, byte for byte
    r = forked("deactivation.py", *_args(stage, out, "--random-controls", "2", "--force"))
    assert r.returncode == 0 and path.read_bytes() == first
    # another seed: the same estimates, other intervals (and other controls)
    r = forked("deactivation.py", *_args(stage, out, "--random-controls", "2", "--seed", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--seed changed" in r.stdout
    again = json.loads(path.read_text())
    assert again["sets"]["shared"]["dppl"] == res["sets"]["shared"]["dppl"]
    assert again["sets"]["shared"]["dppl_ci"] != res["sets"]["shared"]["dppl_ci"]
    assert again["sets"]["shared"]["controls"]["sets"] != res["sets"]["shared"]["controls"]["sets"]
    # K is fingerprinted; K = 0 measures no control and writes no control keys
    r = forked("deactivation.py", *_args(stage, out, "--random-controls", "0", "--seed", "1"))
    assert r.returncode == 0 and "--random-controls changed" in r.stdout
    none = json.loads(path.read_text())
    assert not [n for n, s in none["sets"].items() if "controls" in s]
    assert none["meta"]["random_controls"] == {"k": 0, "sets": []}
    assert none["sets"]["shared"]["dppl_ci"] == again["sets"]["shared"]["dppl_ci"]  # controls do not move them


def test_empty_set_has_zero_interval(forked, stage, tmp_path):
    root = stage[0]
    r = forked("deactivation.py", *_args(stage, tmp_path / "out", "--neurons", f"nothing={root / 'empty.json'}",
                                         "--random-controls", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "out" / "qwen2" / "deactivation.json").read_text())["sets"]["nothing"]
    assert s["size"] == 0 and s["dppl"] == {"en": 0.0, "fr": 0.0}
    assert s["dppl_ci"] == {"en": [0.0, 0.0], "fr": [0.0, 0.0]}
    assert s["controls"]["dppl_mean"] == {"en": 0.0, "fr": 0.0} and s["controls"]["dppl_ratio"] == {"en": None, "fr": None}


@pytest.mark.parametrize("flag", [("--random-controls", "-1"), ("--resamples", "0"), ("--random-controls", "two")])
def test_bad_counts_exit_2_and_write_nothing(forked, stage, tmp_path, flag):
    r = forked("deactivation.py", *_args(stage, tmp_path / "out", *flag))
    assert r.returncode == 2 and flag[0] in r.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- figures

def _deact_file() -> dict:
    base, results = _synthetic()
    langs = LANGS
    dppl_ci, imp_ci, las_ci = deactivation.intervals(base, results, langs, 200, seed=0)
    for n, r in results.items():
        r["dppl_ci"] = dppl_ci[n]
    results["shared"]["controls"] = {"k": 2, "sets": {}, "dppl_mean": {"en": 1.0, "fr": 2.0},
                                     "dppl_range": {"en": [0.5, 1.5], "fr": [1.0, 3.0]}, "dppl_ratio": {}}
    imp, las = language_agnostic(results, langs)
    return {"meta": {"langs": langs}, "results": {"ppl": base}, "sets": results, "importance": imp,
            "importance_ci": imp_ci, "language_agnostic_score": las, "language_agnostic_score_ci": las_ci}


def test_figures_draw_intervals_and_controls():
    deact = _deact_file()
    ax = figures.fig_deactivation("tiny", deact, LANGS).axes[0]
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"95% interval", "random controls (mean, range)"} <= labels
    # one error bar per bar with an interval (shared and exclusive in each language), from lo to hi
    bars = {c.get_label(): c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"}
    drawn = sorted(tuple(seg[:, 1]) for seg in bars["95% interval"].lines[2][0].get_segments())
    want = sorted(tuple(deact["sets"][n]["dppl_ci"][l]) for l in LANGS for n in ("shared", f"exclusive_{l}"))
    assert np.allclose(drawn, want)
    drawn = sorted(tuple(seg[:, 1]) for seg in bars["random controls (mean, range)"].lines[2][0].get_segments())
    assert drawn == [(0.5, 1.5), (1.0, 3.0)]
    fig = figures.fig_importance("tiny", deact)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [figures.lang_name(l) for l in LANGS]
    assert "LAS" in ax.get_title() and "[" in ax.get_title()
    # without intervals (files of older versions) the figures still draw, without error bars
    for s in deact["sets"].values():
        s.pop("dppl_ci"), s.pop("controls", None)
    ax = figures.fig_deactivation("tiny", deact, LANGS).axes[0]
    assert not [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]


def test_report_gives_intervals_and_controls(tmp_path):
    from langneurons import layout
    deact = _deact_file()
    t = figures.TagResults(layout.outputs(tmp_path, "tiny"), deact=deact, deact_langs=LANGS)
    emitted = []
    text = figures.report_deactivation([t], lambda fig, name: emitted.append(name) or f"![]({name})\n")
    assert emitted == ["deactivation_tiny.png", "importance_tiny.png"]
    lo, hi = deact["sets"]["shared"]["dppl_ci"]["en"]
    assert f"[{lo:.3g}, {hi:.3g}]" in text  # the shared set's en interval in its table cell
    assert "↳ 2 random controls" in text and "+1.000 [0.5, 1.5]" in text
    lo, hi = deact["language_agnostic_score_ci"]
    assert f"[{lo:.4f}, {hi:.4f}]" in text
