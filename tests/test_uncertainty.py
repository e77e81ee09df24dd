"""langneurons.uncertainty: Wilson intervals and exact McNemar p-values against published worked examples, the
paired bootstraps (of an accuracy difference and of a perplexity change) hold their estimate and are seeded,
the significance mark follows p < 0.05, and the per-question records evaluate.py writes (langneurons.tasks)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from langneurons import tasks, uncertainty
from langneurons.uncertainty import (accuracy_summary, mcnemar_exact, paired_accuracy, paired_ppl_change,
                                     significant, spread, wilson)


@pytest.mark.parametrize("k,n,lo,hi", [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
                                       (1, 29, 0.0061, 0.1718)])
def test_wilson_against_newcombe_1998(k, n, lo, hi):
    """Newcombe RG (1998), Two-sided confidence intervals for the single proportion: comparison of seven
    methods, Statistics in Medicine 17:857-872, Table II, method 3 (Wilson score interval without continuity
    correction), 95%: 81/263 -> 0.2553-0.3662, 15/148 -> 0.0624-0.1605, 0/20 -> 0-0.1611, 1/29 -> 0.0061-0.1718."""
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-5)
    assert got[0] <= k / n <= got[1]
    assert wilson(0, 0) == (0.0, 1.0)  # no questions: nothing is known


def test_exact_mcnemar_against_fagerland_2013():
    """Fagerland MW, Lydersen S, Laake P (2013), The McNemar test for binary matched-pairs data: mid-p and
    asymptotic are better than exact conditional, BMC Medical Research Methodology 13:91, Table 1 (Bentur et al.
    2009: airway hyper-responsiveness before/after stem cell transplantation in 21 children): discordant pairs
    n12 = 1, n21 = 7, exact conditional p = 2 * P(Bin(8, 1/2) <= 1) = 18/256 = 0.070."""
    assert mcnemar_exact(1, 7) == pytest.approx(18 / 256, abs=1e-12)
    assert mcnemar_exact(7, 1) == mcnemar_exact(1, 7)  # two-sided: the order of the models does not matter
    assert mcnemar_exact(4, 4) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # all six discordant one way


def test_significance_mark_follows_p_below_005():
    assert significant(0.0499) is True and significant(0.05) is False and significant(0.9) is False
    assert significant(None) is None and significant(float("nan")) is None
    # through the paired comparison: 20 discordant questions, 5 vs 15 (p = 0.041) and 6 vs 14 (p = 0.115)
    for lost, mark in ((5, True), (6, False)):
        before = [1] * lost + [0] * (20 - lost) + [1] * 30
        after = [0] * lost + [1] * (20 - lost) + [1] * 30
        r = paired_accuracy(before, after, resamples=200, seed=0)
        assert (r["only_before"], r["only_after"]) == (lost, 20 - lost)
        assert r["significant"] is mark is (r["p"] < 0.05)


def test_paired_accuracy_bootstrap_holds_the_difference_and_is_seeded():
    rng = np.random.default_rng(0)
    before = rng.integers(0, 2, 250)
    after = np.where(rng.random(250) < 0.15, 1 - before, before)  # 15% of the answers flip
    r = paired_accuracy(before.tolist(), after.tolist(), resamples=1000, seed=7)
    assert r["delta"] == pytest.approx(after.mean() - before.mean())
    assert r["delta_ci"][0] <= r["delta"] <= r["delta_ci"][1]
    assert r["only_before"] + r["only_after"] == int((before != after).sum())
    assert r["p"] == mcnemar_exact(r["only_before"], r["only_after"])
    assert paired_accuracy(before.tolist(), after.tolist(), resamples=1000, seed=7) == r  # same seed, same interval
    assert paired_accuracy(before.tolist(), after.tolist(), resamples=1000, seed=8)["delta_ci"] != r["delta_ci"]
    # identical models: no difference, a zero-width interval, never significant
    same = paired_accuracy(before.tolist(), before.tolist(), resamples=200, seed=0)
    assert same["delta"] == 0 and same["delta_ci"] == [0.0, 0.0] and same["significant"] is False
    with pytest.raises(ValueError):
        paired_accuracy([1, 0, 1], [1, 0], resamples=10, seed=0)  # not the same questions


def test_paired_ppl_change_holds_the_change_and_is_seeded():
    rng = np.random.default_rng(1)
    tok = rng.integers(3, 50, 80)
    nll = tok * rng.uniform(1.5, 3.5, 80)
    after = nll + tok * rng.normal(0.1, 0.3, 80)  # worse by 0.1 nats per token on average
    r = paired_ppl_change(nll, tok, after, tok, resamples=800, seed=3)
    assert r["before"] == pytest.approx(np.exp(nll.sum() / tok.sum()))
    assert r["after"] == pytest.approx(np.exp(after.sum() / tok.sum()))
    assert r["delta_ci"][0] <= r["delta"] <= r["delta_ci"][1] and r["lines"] == 80
    assert r["significant"] is (r["delta_ci"][0] > 0 or r["delta_ci"][1] < 0)
    assert paired_ppl_change(nll, tok, after, tok, resamples=800, seed=3) == r
    same = paired_ppl_change(nll, tok, nll, tok, resamples=100, seed=0)
    assert same["delta"] == 0 and same["delta_ci"] == [0.0, 0.0] and same["significant"] is False
    with pytest.raises(ValueError, match="not the same lines"):
        paired_ppl_change(nll, tok, after, tok + 1, resamples=10, seed=0)
    with pytest.raises(ValueError):
        paired_ppl_change(nll, tok, after[:-1], tok[:-1], resamples=10, seed=0)


def test_spread_over_seeds():
    s = spread([1.0, -2.0, 4.0])
    assert s == {"n": 3, "mean": 1.0, "min": -2.0, "max": 4.0, "sd": pytest.approx(3.0)}  # sqrt((0+9+9)/2)
    assert spread([2.5])["sd"] is None and spread([2.5])["mean"] == 2.5
    assert spread([None, float("nan")])["n"] == 0


def test_accuracy_records_of_evaluate():
    """What MGSM/MMMLU results carry per language: accuracy, n, the Wilson interval, outcomes in item order and
    a digest of the items that changes with any item's text or their order."""
    r = tasks.scored([True, False, True, True], ["q1", "q2", "q3", "q4"])
    assert r["correct"] == [1, 0, 1, 1] and r["n"] == 4 and r["accuracy"] == 0.75
    assert r["accuracy_ci"] == list(wilson(3, 4)) and r["accuracy_ci"][0] < 0.75 < r["accuracy_ci"][1]
    assert r == tasks.scored([1, 0, 1, 1], ["q1", "q2", "q3", "q4"])
    assert tasks.items_sha256(["q1", "q2"]) != tasks.items_sha256(["q2", "q1"])
    assert tasks.items_sha256(["q1", "q2"]) != tasks.items_sha256(["q1", "q2x"])
    assert tasks.items_sha256(["a\tb"]) != tasks.items_sha256(["a", "b"])
    assert accuracy_summary([]) == {"accuracy": None, "n": 0, "accuracy_ci": [0.0, 1.0]}
    assert uncertainty.ALPHA == 0.05


def test_evaluate_records_pair_in_the_report(forked, tmp_path):
    """Through the command lines: evaluate.py's MGSM/MMMLU records of the base and of a variant with identical
    weights pair question by question (no change, p = 1, not significant); a variant scored on fewer questions
    (another --limit) is refused with the reason."""
    from tiny import save_tiny, tiny_dataset
    base = save_tiny("llama", tmp_path / "tinyllama")
    data = tiny_dataset(tmp_path / "dataset")
    common = ["--langs", "en,fr", "--dataset", data, "--out", tmp_path / "out", "--device", "cpu",
              "--tasks", "mgsm,mmmlu", "--max-new-tokens", "3"]
    for name in ("same", "fewer"):
        shutil.copytree(base, tmp_path / name)  # a "variant" with the base's weights
        (tmp_path / name / "langneurons.json").write_text(json.dumps({"tag": "tinyllama", "neuron_set": name}))
    for model, limit in ((base, 3), (tmp_path / "same", 3), (tmp_path / "fewer", 2)):
        r = forked("evaluate.py", "--model", model, "--limit", limit, *common)
        assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads((tmp_path / "out" / "tinyllama" / "eval" / "tinyllama.json").read_text())
    for task in ("mgsm", "mmmlu"):
        for lang, res in ev["results"][task].items():
            assert len(res["correct"]) == res["n"] == 3 and sum(res["correct"]) / 3 == res["accuracy"]
            assert res["accuracy_ci"] == list(wilson(sum(res["correct"]), 3))
            assert len(res["items_sha256"]) == 64
    assert ev["results"]["mgsm"]["en"]["items_sha256"] != ev["results"]["mmmlu"]["en"]["items_sha256"]
    r = forked("figures.py", "--out", tmp_path / "out", "--resamples", "200")
    assert r.returncode == 0, r.stderr[-2000:]
    report = (tmp_path / "out" / "figures" / "report.md").read_text()
    same = [line for line in report.splitlines() if line.startswith("| same | ")]
    fewer = [line for line in report.splitlines() if line.startswith("| fewer | ")]
    assert len(same) == len(fewer) == 4  # two tasks, two languages
    assert all(line.endswith("| 1 | 3 | not significant |") and "+0.0 [+0.0, +0.0]" in line for line in same)
    assert all("no paired test: different questions" in line for line in fewer)
