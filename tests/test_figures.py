"""figures.py: every figure and report table from fixture outputs written in the stages' formats, one
Fig. 2 panel per model, and skipping (never crashing) when inputs are missing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import figures
from conftest import run_script

LANGS = ["en", "zh", "sw"]
GROUPS = ("fwd_up", "fwd_down", "attn_q", "attn_k", "attn_v", "attn_o")


def set_stats(n: int, total: int, layers: int, seed: int) -> dict:
    qk, vo = int(n * 0.7), int(n * 0.1)
    per_layer = [n // layers + (1 if i < n % layers else 0) for i in range(layers)]
    return {"size": n, "fraction": n / total, "groups": {g: n // 6 for g in GROUPS},
            "group_fractions": {g: 0.001 * seed for g in GROUPS},
            "components": {"QK": qk, "VO": vo, "FFN": n - qk - vo},
            "component_shares": {"QK": qk / n if n else 0.0, "VO": vo / n if n else 0.0,
                                 "FFN": (n - qk - vo) / n if n else 0.0},
            "layers": per_layer}


def write_model(out: Path, tag: str, shared: int, las: float, mgsm: list[float], layers: int = 4,
                with_training: bool = True) -> None:
    d = out / tag
    total = 100_000
    sets = {"shared": set_stats(shared, total, layers, 1), "related_all": set_stats(shared + 300, total, layers, 2),
            "random_shared": set_stats(shared, total, layers, 3)}
    for i, l in enumerate(LANGS):
        sets[f"exclusive_{l}"] = set_stats(50 + 20 * i, total, layers, 4)
        sets[f"related_{l}"] = set_stats(shared + 50 + 20 * i, total, layers, 5)
        sets[f"unique_{l}"] = set_stats(5 + i, total, layers, 6)
        sets[f"random_exclusive_{l}"] = set_stats(50 + 20 * i, total, layers, 7)
    stats = {"total_neurons": total, "neurons_per_group": {g: total // 6 for g in GROUPS},
             "shared_ratio": shared / 70.0, "sets": sets}
    (d / "neurons").mkdir(parents=True)
    (d / "neurons" / "stats.json").write_text(json.dumps(stats))
    (d / "neurons" / "meta.json").write_text(json.dumps({"model": tag, "langs": LANGS}))
    base = {l: {"ppl": 10.0 + i, "tokens": 1000} for i, l in enumerate(LANGS)}
    dsets = {}
    for name, s in sets.items():
        if name.startswith(("shared", "exclusive_", "random_")):
            big = 1.0 if name.startswith("random") else 500.0
            dsets[name] = {"size": s["size"], "ppl": {l: {"ppl": base[l]["ppl"] + big, "tokens": 1000} for l in LANGS},
                           "dppl": {l: big for l in LANGS}}
    (d / "deactivation.json").write_text(json.dumps(
        {"model": tag, "meta": {"langs": LANGS}, "results": {"ppl": base}, "sets": dsets,
         "importance": {l: 1.5 for l in LANGS}, "language_agnostic_score": las}))
    (d / "eval").mkdir()
    ev = {"model": tag, "meta": {}, "results": {
        "ppl": base, "mgsm": {l: {"accuracy": a, "n": 250} for l, a in zip(LANGS, mgsm)},
        "mmmlu": {l: {"accuracy": a / 2 + 0.25, "n": 100} for l, a in zip(LANGS, mgsm)}}}
    (d / "eval" / f"{tag}.json").write_text(json.dumps(ev))
    if with_training:
        run = d / "trained" / "zh_shared"
        run.mkdir(parents=True)
        (run / "train_log.json").write_text(json.dumps({  # the shape train.py writes
            "trained_lang": "zh", "mode": "neurons", "neurons": {"name": "shared", "size": 12},
            "loss_curve": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}],
            "val": {"lang": "zh", "lines": 64, "before": {"loss": 2.5, "ppl": 12.18, "tokens": 100},
                    "after": {"loss": 2.2, "ppl": 9.03, "tokens": 100}}}))
        trained = {**ev, "results": {"mgsm": {l: {"accuracy": a + 0.04, "n": 250} for l, a in zip(LANGS, mgsm)}}}
        (d / "eval" / "zh_shared.json").write_text(json.dumps(trained))
        broken = d / "trained" / "broken"
        broken.mkdir()
        (broken / "train_log.json").write_text("{not json")


@pytest.fixture()
def outputs(tmp_path):
    out = tmp_path / "outputs"
    write_model(out, "small-model", shared=30, las=0.8, mgsm=[0.10, 0.05, 0.02])
    write_model(out, "mid-model", shared=60, las=1.0, mgsm=[0.30, 0.20, 0.10], with_training=False)
    write_model(out, "big-model", shared=90, las=1.3, mgsm=[0.60, 0.50, 0.30], layers=6, with_training=False)
    return out


def test_all_figures_from_fixture_outputs(outputs):
    r = run_script("figures.py", "--out", outputs)
    assert r.returncode == 0, r.stderr
    figs = outputs / "figures"
    expected = ["neuron_distribution.png", "components.png", "ability.png", "training_small-model.png"] + \
        [f"{kind}_{tag}.png" for kind in ("deactivation", "layers") for tag in ("small-model", "mid-model", "big-model")]
    for name in expected:
        f = figs / name
        assert f.is_file() and f.stat().st_size > 1000, name
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (figs / "report.md").read_text()
    for name in expected:
        assert f"]({name})" in report
    # numbers of the fixtures appear in the tables, with full language names
    assert "Swahili" in report and "Chinese" in report
    assert "0.030%" in report  # shared fraction of small-model: 30 / 100000
    assert "Pearson 1.00" in report  # shared ratio grows with ability in the fixtures
    assert "zh_shared" in report and "(target)" in report
    assert "broken" in report  # the unreadable training log is named in the notes
    assert not list(figs.glob(".*"))  # no temporary files left


def test_distribution_has_one_panel_per_model(outputs):
    models = {}
    for tag in ("small-model", "mid-model", "big-model"):
        stats = json.loads((outputs / tag / "neurons" / "stats.json").read_text())
        models[tag] = (stats, LANGS)
    fig = figures.fig_distribution(models)
    axes = [a for a in fig.axes if a.get_title()]
    assert len(axes) == 3
    assert [a.get_title().splitlines()[0] for a in axes] == list(models)
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["English", "Chinese", "Swahili"]
    assert len(figures.fig_components(models).axes) == 3


def test_deactivation_figure_uses_log_scale_for_large_dppl(outputs):
    deact = json.loads((outputs / "small-model" / "deactivation.json").read_text())
    fig = figures.fig_deactivation("small-model", deact, LANGS)
    ax = fig.axes[0]
    assert ax.get_yscale() == "symlog"
    assert len(ax.patches) == 4 * len(LANGS)  # random, shared, random exclusive, exclusive per language
    assert {t.get_text() for t in ax.get_legend().get_texts()} == \
        {"random (shared size)", "shared", "random (exclusive size)", "exclusive"}


def test_train_log_reader_reads_what_train_py_writes():
    log = {"trained_lang": "sw", "mode": "neurons", "neurons": {"name": "exclusive_sw"},
           "val": {"lang": "sw", "before": {"loss": 5.4, "ppl": 222.9, "tokens": 9}, "after": {"loss": 4.7, "ppl": 109.1}}}
    r = figures.read_train_log(log, "run")
    assert r == {"run": "run", "lang": "sw", "neurons": "exclusive_sw",
                 "before": {"sw": {"loss": 5.4, "ppl": 222.9}}, "after": {"sw": {"loss": 4.7, "ppl": 109.1}}}
    assert figures.read_train_log({"loss_curve": []}, "run") is None
    assert figures.read_train_log({**log, "mode": "full", "neurons": None}, "run")["neurons"] == "full"


def test_missing_inputs_skip_with_notes(tmp_path):
    out = tmp_path / "outputs"
    (out / "only-eval" / "eval").mkdir(parents=True)
    (out / "only-eval" / "eval" / "only-eval.json").write_text(json.dumps(
        {"model": "x", "meta": {}, "results": {"mgsm": {"en": {"accuracy": 0.2, "n": 3}}}}))
    (out / "corrupt" / "neurons").mkdir(parents=True)
    (out / "corrupt" / "neurons" / "stats.json").write_text("{")
    r = run_script("figures.py", "--out", out)
    assert r.returncode == 0, r.stderr
    report = (out / "figures" / "report.md").read_text()
    assert "Skipped" in report and "corrupt: no readable neurons/stats.json" in report
    assert not list((out / "figures").glob("*.png"))
    # an empty output root also works (a missing one is an error: tests/test_faults.py)
    (tmp_path / "nothing").mkdir()
    r = run_script("figures.py", "--out", tmp_path / "nothing")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "nothing" / "figures" / "report.md").is_file()


def test_models_flag_selects(outputs):
    r = run_script("figures.py", "--out", outputs, "--models", "big-model")
    assert r.returncode == 0, r.stderr
    figs = outputs / "figures"
    assert (figs / "layers_big-model.png").is_file() and not (figs / "layers_small-model.png").exists()
    assert not (figs / "ability.png").exists()  # one model: no cross-model figure
