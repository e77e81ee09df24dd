"""figures.py: every figure and report table from fixture outputs written in the stages' formats, one
Fig. 2 panel per model, and skipping (never crashing) when inputs are missing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

import figures
from conftest import run_script

LANGS = ["en", "zh", "sw"]
VAL_LANGS = ["en", "zh", "sw", "fr"]  # train.py measures validation perplexity on languages detection may not have
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


def outcomes(n: int, right: int, lost: int = 0, gained: int = 0) -> tuple[list[int], list[int]]:
    """Per-question outcomes of a model that gets the first `right` of n questions right, and of one that loses
    `lost` of those and gains `gained` of the others (the discordant questions of a paired test)."""
    before = [1] * right + [0] * (n - right)
    after = [0] * lost + [1] * (right - lost) + [1] * gained + [0] * (n - right - gained)
    return before, after


def scored(correct: list[int], items: str) -> dict:
    """One language's accuracy results in the shape evaluate.py writes them."""
    from langneurons.uncertainty import wilson
    return {"accuracy": sum(correct) / len(correct), "n": len(correct),
            "accuracy_ci": list(wilson(sum(correct), len(correct))), "correct": correct, "items_sha256": items}


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
    ev = {"model": tag, "meta": {"role": "base", "provenance": {}}, "results": {
        "ppl": base, "mgsm": {l: scored(outcomes(250, round(a * 250))[0], f"mgsm-{l}") for l, a in zip(LANGS, mgsm)},
        "mmmlu": {l: scored(outcomes(100, round((a / 2 + 0.25) * 100))[0], f"mmlu-{l}") for l, a in zip(LANGS, mgsm)}}}
    (d / "eval" / f"{tag}.json").write_text(json.dumps(ev))
    if with_training:
        run = d / "trained" / "zh_shared"
        run.mkdir(parents=True)
        (run / "train_log.json").write_text(json.dumps({  # the shape train.py writes
            "trained_lang": "zh", "mode": "neurons", "neurons": {"name": "shared", "size": 12},
            "loss_curve": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}],
            "val": {"lang": "zh", "langs": VAL_LANGS, "max_length": 512, "lines": {l: 64 for l in VAL_LANGS},
                    "before": {l: {"loss": 2.5 + i, "ppl": 12.18 + i, "tokens": 100} for i, l in enumerate(VAL_LANGS)},
                    "after": {l: {"loss": 2.2 + i, "ppl": 9.03 + i, "tokens": 100} for i, l in enumerate(VAL_LANGS)}}}))
        # MGSM after training (n = 250 each): en gains 75 questions and loses none (significant), zh loses 10
        # and gains 20 (+4 points, McNemar p = 0.099: not significant), sw unchanged
        trained = {"model": str(run), "meta": {"role": "trained", "provenance": {"tag": tag, "run_name": "zh_shared",
                                                                                  "trained_lang": "zh"}},
                   "results": {"mgsm": {l: scored(outcomes(250, round(a * 250), lost, gained)[1], f"mgsm-{l}")
                                        for l, a, (lost, gained) in zip(LANGS, mgsm, ((0, 75), (10, 20), (0, 0)))}}}
        (d / "eval" / "zh_shared.json").write_text(json.dumps(trained))
        broken = d / "trained" / "broken"
        broken.mkdir()
        (broken / "train_log.json").write_text("{not json")


@pytest.fixture()
def outputs(tmp_path):
    out = tmp_path / "outputs"
    write_model(out, "small-model", shared=30, las=0.8, mgsm=[0.10, 0.06, 0.02])
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


def test_accuracy_tasks_come_from_the_evaluation_registry(outputs, monkeypatch):
    """figures.py draws and tabulates every accuracy task of langneurons.tasks, under its label: a new task is one
    registry entry, here one with another label and results in the fixtures' files."""
    from dataclasses import replace
    from langneurons import tasks
    assert figures.TASKS is tasks.TASKS
    assert figures.ACCURACY_TASKS == tuple(n for n, t in tasks.TASKS.items() if t.metric == "accuracy")
    assert figures.ACCURACY_TASKS == ("mgsm", "mmmlu")
    extra = {**tasks.TASKS, "xtask": replace(tasks.TASKS["mmmlu"], name="xtask", label="X-Task")}
    monkeypatch.setattr(figures, "TASKS", extra)
    monkeypatch.setattr(figures, "ACCURACY_TASKS", (*figures.ACCURACY_TASKS, "xtask"))
    for tag in ("small-model", "mid-model", "big-model"):
        for f in (outputs / tag / "eval").glob("*.json"):
            ev = json.loads(f.read_text())
            ev["results"]["xtask"] = {l: {"accuracy": a["accuracy"] / 4, "n": 40}
                                      for l, a in ev["results"]["mgsm"].items()}
            f.write_text(json.dumps(ev))
    t = figures.load_tag(figures.layout.Outputs(outputs / "small-model"), [])
    assert set(t.runs[0]["acc"]) == {"mgsm", "mmmlu", "xtask"} and t.runs[0]["acc"]["xtask"]
    fig = figures.fig_training("small-model", t.runs)
    assert any(ax.get_ylabel() == "Δ X-Task accuracy (points)" for ax in fig.axes)
    figures.plt.close(fig)

    def emit(fig, name):  # the report's text only
        figures.plt.close(fig)
        return f"![{name}]({name})\n"
    tags = [figures.load_tag(figures.layout.Outputs(outputs / tag), [])
            for tag in ("small-model", "mid-model", "big-model")]
    text = figures.report_ability(tags, emit) + figures.report_training(tags, emit)
    assert "| mean MGSM | mean MMMLU | mean X-Task |" in text
    assert "LAS vs mean X-Task: Pearson 1.00, Spearman 1.00 (3 models" in text
    assert "| zh_shared | X-Task | English |" in text


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
           "val": {"lang": "sw", "langs": ["en", "sw"], "max_length": 512, "lines": {"en": 9, "sw": 9},
                   "before": {"en": {"loss": 2.0, "ppl": 7.4, "tokens": 9}, "sw": {"loss": 5.4, "ppl": 222.9, "tokens": 9}},
                   "after": {"en": {"loss": 2.1, "ppl": 8.2, "tokens": 9}, "sw": {"loss": 4.7, "ppl": 109.1, "tokens": 9}}}}
    r = figures.read_train_log(log, "run")
    assert r == {"run": "run", "lang": "sw", "neurons": "exclusive_sw", "langs": ["en", "sw"],
                 "before": {"en": {"loss": 2.0, "ppl": 7.4}, "sw": {"loss": 5.4, "ppl": 222.9}},
                 "after": {"en": {"loss": 2.1, "ppl": 8.2}, "sw": {"loss": 4.7, "ppl": 109.1}}}
    # logs written before train.py measured every language: one {loss, ppl} for the target
    old = {**log, "val": {"lang": "sw", "lines": 64, "before": {"loss": 5.4, "ppl": 222.9, "tokens": 9},
                          "after": {"loss": 4.7, "ppl": 109.1}}}
    assert figures.read_train_log(old, "run") == {"run": "run", "lang": "sw", "neurons": "exclusive_sw", "langs": ["sw"],
                                                  "before": {"sw": {"loss": 5.4, "ppl": 222.9}},
                                                  "after": {"sw": {"loss": 4.7, "ppl": 109.1}}}
    assert figures.read_train_log({"loss_curve": []}, "run") is None
    assert figures.read_train_log({**log, "mode": "full", "neurons": None}, "run")["neurons"] == "full"


def write_eval(path: Path, role: str | None, provenance: dict, mgsm: float) -> None:
    meta = {"provenance": provenance} | ({"role": role} if role else {})
    path.write_text(json.dumps({"model": path.stem, "meta": meta,
                                "results": {"mgsm": {l: {"accuracy": mgsm, "n": 12} for l in LANGS}}}))


def test_evaluations_are_found_by_role_and_run_name_never_by_file_name(outputs, tmp_path):
    ev = outputs / "small-model" / "eval"
    (ev / "small-model.json").unlink()
    (ev / "zh_shared.json").unlink()
    write_eval(ev / "gemma-3-270m.json", "base", {}, 0.25)  # the base's own name differs from the tag
    write_eval(ev / "small-model.json", "variant", {"tag": "small-model", "neuron_set": "shared"}, 0.9)
    write_eval(ev / "zh_shared.json", "trained", {"tag": "small-model", "run_name": "other-run", "trained_lang": "zh"}, 0.9)
    write_eval(ev / "checkpoint-final.json", "trained",
               {"tag": "small-model", "run_name": "zh_shared", "trained_lang": "zh"}, 0.5)
    notes = []
    t = figures.load_tag(figures.layout.Outputs(outputs / "small-model"), notes)
    assert t.base_evals == ["gemma-3-270m"]
    [r] = t.runs
    assert r["eval"] == "checkpoint-final"
    assert {l: (c["before"], c["after"]) for l, c in r["acc"]["mgsm"].items()} == {l: (0.25, 0.5) for l in LANGS}
    # written before evaluate recorded the role: no provenance is the base model, a trained one's is its run
    write_eval(ev / "gemma-3-270m.json", None, {}, 0.25)
    write_eval(ev / "checkpoint-final.json", None, {"tag": "small-model", "run_name": "zh_shared", "trained_lang": "zh"},
               0.5)
    write_eval(ev / "a-second-base.json", "base", {}, 0.1)  # several: the first in sorted order, named in the report
    t = figures.load_tag(figures.layout.Outputs(outputs / "small-model"), notes)
    assert t.base_evals == ["a-second-base", "gemma-3-270m"] and t.runs[0]["eval"] == "checkpoint-final"
    assert figures.run_evaluation(t.evals, "no-such-run") is None
    r = run_script("figures.py", "--out", outputs, "--models", "small-model")
    assert r.returncode == 0, r.stderr
    report = (outputs / "figures" / "report.md").read_text()
    assert "eval/a-second-base.json" in report and "used eval/a-second-base.json" in report


def test_layer_axes_show_whole_layer_numbers(outputs):
    for layers in (4, 7, 18, 36):
        stats = {"sets": {"shared": set_stats(300, 100_000, layers, 1),
                          **{f"exclusive_{l}": set_stats(90, 100_000, layers, 2) for l in LANGS}}}
        fig = figures.fig_layers("m", stats, LANGS)
        fig.canvas.draw()
        for ax in fig.axes:
            labels = [t.get_text().replace("\u2212", "-") for t in ax.get_xticklabels()]
            assert labels and all(lab.lstrip("-").isdigit() for lab in labels), (layers, labels)
            assert all(float(x).is_integer() for x in ax.get_xticks())
        figures.plt.close(fig)


def test_paired_test_marks_follow_mcnemar_p_and_refuses_other_questions():
    """significant exactly when the exact McNemar p < 0.05, on either side of the threshold; two results are
    paired only when they scored the same questions (items_sha256 and count), else no test and the reason."""
    def pair(lost: int, gained: int, n: int = 100, right: int = 50, items=("q", "q")) -> dict:
        b, a = outcomes(n, right, lost, gained)
        return figures.compare_accuracy(scored(b, items[0]), scored(a, items[1]), 500, 0)
    # 20 discordant questions: 5 vs 15 has p = 0.0414 (significant), 6 vs 14 has p = 0.1153 (not)
    assert pair(5, 15)["p"] == pytest.approx(0.041389, abs=1e-6) and pair(5, 15)["significant"] is True
    assert pair(6, 14)["p"] == pytest.approx(0.115318, abs=1e-6) and pair(6, 14)["significant"] is False
    for lost in range(0, 21, 2):
        c = pair(lost, 20 - lost)
        assert c["significant"] is (c["p"] < 0.05) and figures.verdict(c) == ("significant" if c["p"] < 0.05
                                                                             else "not significant")
        assert c["delta"] == pytest.approx((20 - 2 * lost) / 100) and c["delta_ci"][0] <= c["delta"] <= c["delta_ci"][1]
    assert pair(0, 0)["p"] == 1.0 and pair(0, 0)["significant"] is False  # no change: never significant
    other = pair(0, 30, items=("q", "other"))  # a large change, but on other questions: no paired test
    assert other["significant"] is None and other["p"] is None and other["delta_ci"] is None
    assert "different questions" in other["reason"] and "no paired test: different questions" in figures.verdict(other)
    b, a = outcomes(100, 50, 0, 30)
    assert "different questions" in figures.compare_accuracy(scored(b, "q"), scored(a[:90], "q"), 500, 0)["reason"]
    old = figures.compare_accuracy({"accuracy": 0.5, "n": 100}, scored(a, "q"), 500, 0)  # written without outcomes
    assert old["significant"] is None and "no per-question outcomes" in old["reason"]
    assert old["before_ci"] == pytest.approx(figures.uncertainty.wilson(50, 100))  # Wilson from accuracy and n
    changes = figures.accuracy_changes({"en": scored(b, "q")}, {"en": scored(a, "q"), "fr": scored(a, "q")})
    assert set(changes) == {"en"}  # fr: no before


def test_paired_ppl_change_between_models_from_per_line_values():
    """A model's PPL change against the base over the same validation lines: the bootstrap interval holds the
    change, a consistent drop is significant, different lines (other token counts) are refused."""
    rng = np.random.default_rng(3)
    tok = rng.integers(5, 40, size=60).tolist()
    nll = (np.array(tok) * rng.uniform(2.0, 3.0, size=60)).tolist()
    better = (np.array(nll) - 0.2 * np.array(tok)).tolist()  # 0.2 nats less per token on every line
    base = {"en": {"ppl": 1.0, "tokens": sum(tok), "line_nll": nll, "line_tokens": tok}, "fr": {"ppl": 3.0, "tokens": 9}}
    after = {"en": {"ppl": 1.0, "tokens": sum(tok), "line_nll": better, "line_tokens": tok},
             "fr": {"ppl": 2.0, "tokens": 9}}
    [(l, c)] = figures.ppl_changes(base, after, 400, 0).items()  # fr: no per-line values, no test
    assert l == "en" and c["delta"] == pytest.approx(np.exp(sum(better) / sum(tok)) - np.exp(sum(nll) / sum(tok)))
    assert c["delta_ci"][0] <= c["delta"] <= c["delta_ci"][1] < 0 and c["significant"] is True
    assert figures.ppl_changes(base, after, 400, 0) == figures.ppl_changes(base, after, 400, 0)  # seeded
    shifted = {"en": {**after["en"], "line_tokens": [t + 1 for t in tok]}}
    assert "not the same lines" in figures.ppl_changes(base, shifted, 400, 0)["en"]["reason"]


def test_training_figure_and_report_show_every_language_and_the_paired_tests(outputs):
    t = figures.load_tag(figures.layout.Outputs(outputs / "small-model"), [])
    [r] = t.runs
    assert r["langs"] == VAL_LANGS
    fig = figures.fig_training("small-model", t.runs)
    ppl_ax, mgsm_ax = fig.axes[:2]
    assert [x.get_text() for x in ppl_ax.get_xticklabels()] == ["English", "Chinese (target)", "Swahili", "French"]
    assert [x.get_fontweight() for x in ppl_ax.get_xticklabels()] == ["normal", "bold", "normal", "normal"]
    assert [len(c) for c in ppl_ax.containers] == [len(VAL_LANGS)] * 2  # before, after
    # MGSM change: en +30 significant (plain bar), zh +4 (p = 0.099) and sw 0 not (hatched); intervals drawn
    [bars] = [c for c in mgsm_ax.containers if isinstance(c, BarContainer)]
    assert [p.get_hatch() or "" for p in bars] == ["", "//", "//"]
    [err] = [c for c in mgsm_ax.containers if isinstance(c, ErrorbarContainer)]
    lo, hi = err.lines[2][0].get_segments()[0][:, 1]  # en's bar: its paired interval, in points, around +30
    assert lo < 30 < hi and hi - lo < 20
    assert "not significant (p ≥ 0.05)" in [x.get_text() for x in mgsm_ax.get_legend().get_texts()]
    assert "n = 250 questions" in mgsm_ax.get_title()
    figures.plt.close(fig)
    assert run_script("figures.py", "--out", outputs).returncode == 0
    report = (outputs / "figures" / "report.md").read_text()
    for i, l in enumerate(["English", "Chinese (target)", "Swahili", "French"]):
        assert f"| zh_shared | Chinese | shared | {l} | {2.5 + i:.3f} | {2.2 + i:.3f} | {12.18 + i:.3f} | {9.03 + i:.3f} |" \
            in report
    rows = {line.split(" | ")[2]: line for line in report.splitlines() if line.startswith("| zh_shared | MGSM |")}
    # the Wilson intervals of 25/250 and 100/250; McNemar with 0 vs 75 discordant questions: p = 2 * 0.5^75
    assert rows["English"].startswith("| zh_shared | MGSM | English | 0.100 [0.069, 0.143] | 0.400 [0.341, 0.462] | "
                                      "+30.0 [")
    assert rows["English"].endswith("| 5.29e-23 | 250 | significant |")
    assert rows["Chinese (target)"].startswith("| zh_shared | MGSM | Chinese (target) | 0.060 [")
    assert rows["Chinese (target)"].endswith("| 0.0987 | 250 | not significant |")
    assert rows["Swahili"].endswith("| +0.0 [+0.0, +0.0] | 1 | 250 | not significant |")
    assert "exact McNemar test" in report and "2 SE" not in report
    assert run_script("figures.py", "--out", outputs).returncode == 0  # seeded: the same report again
    assert (outputs / "figures" / "report.md").read_text() == report


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


def test_correlations_against_hand_computed_values():
    """The figures' correlations (scipy): r from the definition, rho with tied ranks, None where undefined."""
    from langneurons.metrics import pearson, spearman
    x, y = np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 5, 9])
    dx, dy = x - x.mean(), y - y.mean()
    assert pearson(x, y) == pytest.approx((dx @ dy) / np.sqrt((dx @ dx) * (dy @ dy)))
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * (16 - 1)))
    # ties: ranks (0.5, 0.5, 2, 3) and (0, 1.5, 1.5, 3), whose Pearson r is 5/6
    assert spearman([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(5 / 6)
    assert pearson([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [2, 1]) is None


def write_log(run: Path, seed: int, lr: float, after_ppl: dict[str, float]) -> None:
    """A train_log.json as train.py writes it: its arguments (fingerprint and run record) and per-language
    validation perplexity before/after."""
    args = {"lang": "sw", "neurons": "n/exclusive_sw.json", "lr": lr, "seed": seed, "max_steps": 20}
    run.mkdir(parents=True)
    (run / "train_log.json").write_text(json.dumps({
        "trained_lang": "sw", "mode": "neurons", "neurons": {"name": "exclusive_sw", "size": 9},
        "run": {"args": {**args, "run_name": run.name, "out": "o"}, "seed": seed}, "fingerprint": {"args": args},
        "val": {"lang": "sw", "langs": ["en", "sw"], "max_length": 512,
                "before": {"en": {"loss": 3.0, "ppl": 20.0, "tokens": 9}, "sw": {"loss": 5.0, "ppl": 200.0, "tokens": 9}},
                "after": {l: {"loss": 1.0, "ppl": p, "tokens": 9} for l, p in after_ppl.items()}}}))


def test_spread_over_seeds_of_runs_that_differ_only_in_seed(outputs):
    trained = outputs / "small-model" / "trained"
    for seed, (en, sw) in zip((1, 2, 3), ((19.0, 120.0), (21.0, 150.0), (20.0, 90.0))):
        write_log(trained / f"sw-exclusive_sw-seed{seed}", seed, 5e-5, {"en": en, "sw": sw})
    write_log(trained / "sw-exclusive_sw-lr", 1, 1e-3, {"en": 30.0, "sw": 10.0})  # another lr: not a repeat
    # per-line values in one log (train.py records metrics.perplexity_by_lang's): the PPL change gets an interval
    log_file = trained / "sw-exclusive_sw-seed1" / "train_log.json"
    log = json.loads(log_file.read_text())
    tok = list(range(5, 45))
    log["val"]["before"]["sw"] |= {"line_nll": [5.3 * t for t in tok], "line_tokens": tok}
    log["val"]["after"]["sw"] |= {"line_nll": [4.8 * t + (0.5 if i % 2 else -0.5) for i, t in enumerate(tok)],
                                  "line_tokens": tok}
    log_file.write_text(json.dumps(log))
    t = figures.load_tag(figures.layout.Outputs(outputs / "small-model"), [])
    [r1] = [r for r in t.runs if r["run"] == "sw-exclusive_sw-seed1"]
    c = r1["ppl_change"]["sw"]
    assert list(r1["ppl_change"]) == ["sw"] and c["delta_ci"][0] <= c["delta"] <= c["delta_ci"][1] < 0
    fig = figures.fig_training("small-model", [r1])
    [err] = [e for e in fig.axes[0].containers if isinstance(e, ErrorbarContainer)]
    lo, hi = err.lines[2][0].get_segments()[0][:, 1]  # on Swahili's 'after' bar: before + the interval of the change
    assert (lo, hi) == pytest.approx((c["before"] + c["delta_ci"][0], c["before"] + c["delta_ci"][1]))
    figures.plt.close(fig)
    [(rs, l0, _), (_, l1, sw)] = figures.seed_spread(t.runs)
    assert [r["run"] for r in rs] == [f"sw-exclusive_sw-seed{s}" for s in (1, 2, 3)] and (l0, l1) == ("en", "sw")
    # ΔPPL of Swahili over the seeds: -80, -50, -110: mean -80, sd sqrt((0 + 900 + 900) / 2) = 30
    assert sw == {"n": 3, "mean": pytest.approx(-80.0), "min": -110.0, "max": -50.0, "sd": pytest.approx(30.0)}
    assert run_script("figures.py", "--out", outputs).returncode == 0
    report = (outputs / "figures" / "report.md").read_text()
    assert ("| sw-exclusive_sw-seed1, sw-exclusive_sw-seed2, sw-exclusive_sw-seed3 | 1, 2, 3 | Swahili (target) | 3 | "
            "-80.000 | -110.000 | -50.000 | 30.000 |") in report
    assert "| English | 3 | +0.000 | -1.000 | +1.000 | 1.000 |" in report
    assert "| sw-exclusive_sw-seed1 | Swahili (target) | " in report.split("paired bootstrap 95% interval over lines")[1]
    assert "sw-exclusive_sw-lr | " not in report.split("spread over seeds")[1].split("\n\n")[1]


def test_deactivated_and_intervened_models_against_the_base(outputs):
    """Every evaluation that is neither the base nor a trained run is compared with the base question by
    question: Wilson error bars, significance marks, other questions refused with the reason, PPL paired over
    lines where both files have per-line values."""
    ev = outputs / "small-model" / "eval"
    base = json.loads((ev / "small-model.json").read_text())
    rng = np.random.default_rng(0)
    tok = rng.integers(5, 30, 40).tolist()
    nll = (np.array(tok) * 2.5).tolist()
    base["results"]["ppl"]["en"] |= {"line_nll": nll, "line_tokens": tok}
    (ev / "small-model.json").write_text(json.dumps(base))
    en_b, en_a = outcomes(250, 25, 20, 0)   # loses 20 of its 25 right answers: significant
    zh_b, zh_a = outcomes(250, 15, 1, 2)    # +1 question: not significant
    variant = {"model": "v", "meta": {"role": "variant", "provenance": {"tag": "small-model", "neuron_set": "shared"}},
               "results": {"mgsm": {"en": scored(en_a, "mgsm-en"), "zh": scored(zh_a, "mgsm-zh"),
                                    "sw": scored(outcomes(100, 2)[0], "mgsm-sw-first-100")},
                           "ppl": {"en": {"ppl": 20.0, "tokens": sum(tok), "line_nll": [x * 1.2 for x in nll],
                                          "line_tokens": tok}}}}
    (ev / "shared.json").write_text(json.dumps(variant))
    # the base model evaluated under an intervention (evaluate.py --neurons/--intervention): compared, not a base
    intervened = {"model": "small-model", "meta": {"role": "base", "provenance": {},
                                                   "args": {"neurons": ["n.json"], "intervention": "scale=0.5"}},
                  "results": {"mgsm": {"en": scored(en_b, "mgsm-en")}}}
    (ev / "small-model+shared@scale0.5.json").write_text(json.dumps(intervened))
    t = figures.load_tag(figures.layout.Outputs(outputs / "small-model"), [])
    assert t.base_evals == ["small-model"] and set(t.compared) == {"shared", "small-model+shared@scale0.5"}
    assert t.compared["small-model+shared@scale0.5"]["mgsm"]["en"]["delta"] == 0
    c = t.compared["shared"]["mgsm"]
    assert [c[l]["significant"] for l in ("en", "zh", "sw")] == [True, False, None]
    assert "different questions" in c["sw"]["reason"]
    assert t.compared_ppl["shared"]["en"]["significant"] is True and t.compared_ppl["shared"]["en"]["delta"] > 0
    fig = figures.fig_comparison("small-model", t.base_eval, {"shared": (t.evals["shared"], t.compared["shared"])})
    ax = fig.axes[0]
    base_bars, model_bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [p.get_hatch() or "" for p in model_bars] == ["", "//", ".."]  # significant, not, no paired test
    errs = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [len(e.lines[2][0].get_segments()) for e in errs] == [3, 3]  # a Wilson interval on every bar
    lo, hi = errs[0].lines[2][0].get_segments()[0][:, 1]  # the base's English bar: 25/250
    assert (lo / 100, hi / 100) == pytest.approx(figures.uncertainty.wilson(25, 250))
    figures.plt.close(fig)
    assert run_script("figures.py", "--out", outputs).returncode == 0
    report = (outputs / "figures" / "report.md").read_text()
    section = report.split("## Deactivated and intervened models against the base")[1].split("\n## ")[0]
    assert "![comparison_small-model.png](comparison_small-model.png)" in section
    assert (outputs / "figures" / "comparison_small-model.png").is_file()
    assert "| shared | MGSM | English | 0.100 [0.069, 0.143] | 0.020 [" in section
    assert "| 250 | significant |" in section and "| 250 | not significant |" in section
    assert "| shared | MGSM | Swahili |" in section and "no paired test: different questions" in section
    assert "| shared | English | " in section and "| 40 | significant |" in section  # PPL over 40 lines


def write_stability(out: Path, tag: str) -> dict:
    """A stability.json in detection's schema for a fixture model: every set's bootstrap size interval is
    [size - 2, size + 3], every component share's [share - 0.05, share + 0.04] within [0, 1]."""
    stats = json.loads((out / tag / "neurons" / "stats.json").read_text())
    summ = lambda lo, hi: {"mean": (lo + hi) / 2, "median": (lo + hi) / 2, "ci": [lo, hi]}
    sets = {}
    for name, s in stats["sets"].items():
        if name.startswith("random"):
            continue
        sets[name] = {"size": s["size"], "size_bootstrap": summ(max(0, s["size"] - 2), s["size"] + 3),
                      "components": {c: {"size": n, **summ(max(0, n - 1), n + 1)} for c, n in s["components"].items()},
                      "component_shares": {c: {"share": v, **summ(max(0.0, v - 0.05), min(1.0, v + 0.04))}
                                           for c, v in s["component_shares"].items()}}
    doc = {"resamples": 50, "level": 0.95, "texts": {l: 24 for l in LANGS}, "sets": sets}
    for name in sets:  # the split-half/bootstrap Jaccard the stability figure reads
        sets[name] |= {k: summ(0.8, 0.9) for k in ("split_half", "bootstrap")}
    (out / tag / "neurons" / "stability.json").write_text(json.dumps(doc))
    return doc


def interval_spans(ax, horizontal: bool = False) -> list[tuple[float, float]]:
    """(low, high) of every error bar of the axes' error-bar series, in drawing order."""
    out = []
    for c in ax.containers:
        if isinstance(c, ErrorbarContainer):
            for seg in c.lines[2][0].get_segments():
                vals = seg[:, 0] if horizontal else seg[:, 1]
                out.append((float(vals.min()), float(vals.max())))
    return out


def test_distribution_and_components_draw_the_bootstrap_intervals_where_stability_json_exists(outputs):
    """With neurons/stability.json the distribution bars carry each size's 95% bootstrap interval (the
    exclusive one on top of the shared bar) and the components each share's; the report's tables give the same
    intervals; a model without stability.json is drawn as before, without error bars, and named in a note."""
    doc = write_stability(outputs, "small-model")
    tags = [figures.load_tag(figures.layout.Outputs(outputs / tag), []) for tag in ("small-model", "mid-model")]
    assert tags[0].stability == doc and tags[1].stability is None
    models, stab = figures.neuron_models(tags), figures.stability_of(tags)
    assert list(stab) == ["small-model"]
    total = 100_000
    fig = figures.fig_distribution(models, stab)
    ax_small, ax_mid = [a for a in fig.axes if a.get_title()]
    spans = interval_spans(ax_small)
    assert len(spans) == 3 * len(LANGS)  # shared, exclusive, unique per language
    # shared: 30 neurons, interval [28, 33]; exclusive_en (50) stacked on the shared bar: 30 + [48, 53]
    assert spans[0] == pytest.approx((100 * 28 / total, 100 * 33 / total))
    assert spans[1] == pytest.approx((100 * (30 + 48) / total, 100 * (30 + 53) / total))
    assert spans[2] == pytest.approx((100 * 3 / total, 100 * 8 / total))  # unique_en: 5 neurons
    assert interval_spans(ax_mid) == []
    figures.plt.close(fig)
    fig = figures.fig_components(models, stab)
    ax_small, ax_mid = fig.axes[:2]
    shares = models["small-model"][0]["sets"]["shared"]["component_shares"]
    spans = interval_spans(ax_small, horizontal=True)
    assert len(spans) == 3 * (1 + len(LANGS))  # QK, VO, FFN of shared and of each exclusive set
    assert spans[0] == pytest.approx((100 * (shares["QK"] - 0.05), 100 * (shares["QK"] + 0.04)))
    assert len(ax_small.patches) == 3 * (1 + len(LANGS))  # one bar per component and set
    assert interval_spans(ax_mid) == [] and len(ax_mid.patches) == 3 * (1 + len(LANGS))  # stacked, as before
    figures.plt.close(fig)

    def emit(fig, name):
        figures.plt.close(fig)
        return f"![{name}]({name})\n"
    text = figures.report_distribution(tags, emit)
    assert "| small-model | English | 0.080% [0.078%, 0.083%] | 0.030% [0.028%, 0.033%] | 0.050% [0.048%, 0.053%] | " \
           "0.005% [0.003%, 0.008%] |" in text
    assert "| small-model | 100000 | 30 [28, 33] |" in text and "| mid-model | 100000 | 60 |" in text
    assert "| mid-model | English | 0.110% | 0.060% |" in text
    assert "50 bootstrap resamples" in text and "_No intervals for mid-model: no neurons/stability.json" in text
    text = figures.report_components(tags, emit)
    assert f"| small-model | shared | {100 * shares['QK']:.3f}% [{100 * (shares['QK'] - 0.05):.3f}%, " \
           f"{100 * (shares['QK'] + 0.04):.3f}%] |" in text
    assert "| mid-model | shared | 70.000% | 10.000% | 20.000% | 60 |" in text


def test_distribution_and_components_without_stability_json_draw_no_intervals(outputs):
    tags = [figures.load_tag(figures.layout.Outputs(outputs / "small-model"), [])]
    models = figures.neuron_models(tags)
    for fig, horizontal in ((figures.fig_distribution(models), False), (figures.fig_components(models), True)):
        assert interval_spans(fig.axes[0], horizontal) == [] and fig.axes[0].patches
        figures.plt.close(fig)
    text = figures.report_distribution(tags, lambda f, n: figures.plt.close(f) or f"![{n}]({n})\n")
    assert "_No intervals for small-model" in text and "[" not in text.split("| strictly unique |")[1]
