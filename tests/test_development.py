"""Language neurons across development (docs/development.md): --revision from a local Hugging Face cache, the
series of detection.sh, train.py --save-every step models, the development series and figure of figures.py,
and uncertainty.correlation against scipy."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from scipy import stats

from conftest import REPO, run_script, script_env
from tiny import save_tiny, tiny_dataset

from langneurons import development, layout, uncertainty
from langneurons.cli import InputError

FAST_DETECT = ["--langs", "en,fr", "--ratio", "0.1", "--max-length", "16", "--resamples", "20", "--batch-size", "6"]
COMMITS = {"step100": "a" * 40, "step200": "b" * 40}


def fake_hub_cache(root: Path) -> Path:
    """A Hugging Face hub cache holding org/tiny-dev at two revisions, as huggingface_hub lays it out:
    models--org--tiny-dev/snapshots/<commit>/ (two different tiny models) and refs/<revision> naming the commit."""
    repo = root / "models--org--tiny-dev"
    for seed, (rev, commit) in enumerate(COMMITS.items()):
        save_tiny("llama", repo / "snapshots" / commit, seed=seed)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / rev).write_text(commit)
    return root


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("development")
    return {"root": root, "cache": fake_hub_cache(root / "hub"), "dataset": tiny_dataset(root / "dataset")}


@pytest.fixture
def cached(hub, monkeypatch):
    """huggingface_hub reads its cache folder at import: point the imported module at the fake cache."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub["cache"]))
    return hub


def env(hub) -> dict:
    return {"HF_HUB_CACHE": hub["cache"], "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- --revision

def test_revision_resolves_the_cached_snapshot_and_names_the_tag(cached):
    from langneurons.model import check_model, model_record, resolve_model
    for rev, commit in COMMITS.items():
        path, gguf = resolve_model(f"org/tiny-dev@{rev}")
        assert Path(path) == cached["cache"] / "models--org--tiny-dev" / "snapshots" / commit and gguf is None
        rec = model_record(f"org/tiny-dev@{rev}", check_model(f"org/tiny-dev@{rev}"))
        assert rec["revision"] == {"hub_id": "org/tiny-dev", "revision": rev, "commit": commit,
                                   "step": int(rev[4:])}
        assert rec["tag"] == f"tiny-dev@{rev}"
    # a commit works as a revision too; a revision with '/' is safe-named in the tag
    assert Path(resolve_model(f"org/tiny-dev@{COMMITS['step100']}")[0]).name == COMMITS["step100"]
    assert layout.model_tag("org/tiny-dev@refs/pr/1") == "tiny-dev@refs_pr_1"
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        resolve_model("org/tiny-dev@step300")


def test_revision_flag_becomes_the_model_spec_and_refuses_local_models(tmp_path):
    from langneurons.cli import common_parser
    p = common_parser("x")
    args = p.parse_args(["--model", "org/tiny-dev", "--revision", "step100"])
    assert args.model == "org/tiny-dev@step100" and args.revision == "step100"
    assert "revision" not in vars(p.parse_args(["--model", "org/tiny-dev"]))  # records without it stay as they were
    # a recorded run's arguments given again
    assert p.parse_args(["--model", "org/tiny-dev@step100", "--revision", "step100"]).model == "org/tiny-dev@step100"
    local = save_tiny("llama", tmp_path / "local")
    (tmp_path / "m.gguf").write_bytes(b"")
    for model in (str(local), str(tmp_path / "m.gguf"), "gemma-3-270m"):
        with pytest.raises(SystemExit) as e:
            p.parse_args(["--model", model, "--revision", "step100"])
        assert e.value.code == 2


def test_detection_series_over_revisions_records_each_revision(hub, tmp_path):
    """detection.sh with REVISIONS runs detection once per revision: each into its own tag, recording the
    revision in meta.json's arguments and in every neuron file's model record; a neuron file of one revision is
    refused on the other; a missing revision and a local folder with --revision are one line, exit 2."""
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(REPO / "detection.sh"), "--dataset", hub["dataset"], "--out", out, *FAST_DETECT],
                       env=script_env({**env(hub), "MODELS": "org/tiny-dev", "REVISIONS": "step100 step200",
                                       "PYTHON": sys.executable}),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    firing = {}
    for rev, commit in COMMITS.items():
        neurons = out / f"tiny-dev@{rev}" / "neurons"
        meta = json.loads((neurons / "meta.json").read_text())
        assert meta["run"]["args"]["revision"] == rev and meta["model"] == f"org/tiny-dev@{rev}"
        rec = json.loads((neurons / "shared.json").read_text())["meta"]["model"]
        assert rec["revision"]["commit"] == commit
        firing[rev] = load_file(neurons / "firing.safetensors")
    # two different models: the counts differ (the second run did not reuse or overwrite the first)
    assert any(not (firing["step100"][k] == firing["step200"][k]).all() for k in firing["step100"])
    # the other revision's neuron file: refused (same config, another commit)
    r = run_script("deactivation.py", "--model", "org/tiny-dev", "--revision", "step200", "--dataset", hub["dataset"],
                   "--out", out, "--langs", "en,fr", "--save-variants", "none", "--measure-ppl", "--neurons",
                   out / "tiny-dev@step100" / "neurons" / "shared.json", env=env(hub))
    assert r.returncode == 2 and "another revision" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    for extra, msg in ((["--model", "org/tiny-dev", "--revision", "step300"], "not in the local Hugging Face cache"),
                       (["--model", str(hub["cache"] / "models--org--tiny-dev" / "snapshots" / COMMITS["step100"]),
                         "--revision", "step100"], "is a local folder")):
        r = run_script("detection.py", *extra, "--dataset", hub["dataset"], "--out", tmp_path / "bad", *FAST_DETECT,
                       env=env(hub))
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- train.py --save-every

def test_save_every_writes_step_models_with_their_own_tag(tmp_path):
    """Step models after steps 2 and 4 of 4 (neuron mode): ordinary model folders inside the run folder, each with
    its own tag and step; the last equals the run's final model bit for bit, the first lies between the base and
    it, and outside the selected neurons both are the base model bit for bit."""
    from langneurons.model import Geometry
    from langneurons.neurons import random_set, write_neuron_file
    from tiny import tiny_config
    base = save_tiny("llama", tmp_path / "llama")
    ds = tiny_dataset(tmp_path / "dataset")
    nset = random_set(30, Geometry.from_config(tiny_config("llama")), 0, "dev-test")
    write_neuron_file(tmp_path / "set.json", nset)
    args = ["--model", base, "--dataset", ds, "--out", tmp_path / "out", "--lang", "en", "--langs", "en",
            "--global-batch-size", "2", "--micro-batch-size", "2", "--lr", "1e-2", "--cutoff-len", "32",
            "--val-limit", "2", "--max-steps", "4", "--neurons", tmp_path / "set.json", "--save-every", "2"]
    run_script("train.py", *args, cwd=tmp_path, env={"HF_DATASETS_CACHE": tmp_path / "hfd", "OMP_NUM_THREADS": "1"},
               check=True)
    run_dir = tmp_path / "out" / "llama" / "trained" / "en-set"
    log = json.loads((run_dir / "train_log.json").read_text())
    assert [s["step"] for s in log["step_models"]] == [2, 4]
    w = {name: load_file(d / "model.safetensors") for name, d in
         (("base", base), ("final", run_dir), ("step2", run_dir / "step-2"), ("step4", run_dir / "step-4"))}
    for step in (2, 4):
        prov = json.loads((run_dir / f"step-{step}" / "langneurons.json").read_text())
        assert prov["step"] == step and prov["checkpoint_of"] == "en-set" and prov["base_tag"] == "llama"
        assert layout.model_tag(str(run_dir / f"step-{step}")) == f"llama@en-set-step{step}"
        assert layout.model_role(str(run_dir / f"step-{step}")) == "base"  # the base of its own tag
    assert all((w["step4"][k] == w["final"][k]).all() for k in w["final"])
    changed2 = {k for k in w["base"] if not (w["step2"][k] == w["base"][k]).all()}
    changed4 = {k for k in w["base"] if not (w["step4"][k] == w["base"][k]).all()}
    assert changed2 and changed2 <= changed4
    assert any(not (w["step2"][k] == w["step4"][k]).all() for k in changed4)
    from langneurons.masking import meta_skeleton, zero_plan
    plan = zero_plan(meta_skeleton(tiny_config("llama")), nset)
    for k, t in w["base"].items():  # entries outside the selection: the base model's, in every step model
        keep = np.ones(t.shape, dtype=bool)
        if k in plan:
            dim, idx = plan[k]
            keep[(slice(None),) * dim + (idx.numpy(),)] = False
        for name in ("step2", "step4"):
            assert (w[name][k].numpy()[keep] == t.numpy()[keep]).all(), (name, k)
    r = run_script("train.py", *args[:-4], "--lora-rank", "2", "--save-every", "2", cwd=tmp_path,
                   env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "--save-every with --lora-rank" in r.stderr


# ---------------------------------------------------------------- the series and the figure

def stats_for(shared: int, excl: list[int], total: int = 10000) -> dict:
    sets = {"shared": {"size": shared, "fraction": shared / total}}
    sets.update({f"exclusive_{l}": {"size": n, "fraction": n / total} for l, n in zip(("en", "fr"), excl)})
    return {"total_neurons": total, "shared_ratio": shared / float(np.mean(excl)), "sets": sets}


def stability_for(shared_ci, excl_cis) -> dict:
    """stability.json's shape (docs/outputs.md) with the given size intervals; the Jaccard entries are filler."""
    jaccard = {"mean": 0.8, "median": 0.8, "ci": [0.7, 0.9]}
    entry = lambda ci: {"size_bootstrap": {"mean": sum(ci) / 2, "median": sum(ci) / 2, "ci": list(ci)},  # noqa: E731
                        "split_half": jaccard, "bootstrap": jaccard}
    sets = {"shared": entry(shared_ci)}
    sets.update({f"exclusive_{l}": entry(c) for l, c in zip(("en", "fr"), excl_cis)})
    return {"resamples": 20, "level": 0.95, "sets": sets}


def test_series_orders_steps_and_adds_the_base_at_step_zero():
    ck = lambda step: {"checkpoint": {"run": "cpt", "base_tag": "m", "step": step}}  # noqa: E731
    models = {"m@cpt-step20": {"record": ck(20), "stats": stats_for(30, [10, 20])},
              "m@cpt-step5": {"record": ck(5), "stats": stats_for(10, [10, 30])},
              "m": {"record": {}, "stats": stats_for(5, [10, 10])},
              "m@cpt-step10": {"record": ck(10), "stats": stats_for(20, [20, 20]), "deactivation": {
                  "language_agnostic_score": 1.5, "language_agnostic_score_ci": [1.2, 1.9]}},
              "p@step3000": {"record": {"revision": {"step": 3000}}, "stats": stats_for(8, [4, 4])},
              "p@step1000": {"record": {"revision": {"step": 1000}}, "stats": stats_for(2, [4, 4])},
              "q@main": {"record": {"revision": {"step": None}}, "stats": stats_for(1, [1, 1])}}
    found = development.series(models)
    assert list(found) == ["m@cpt", "p"]  # q: no step; a single point is no series
    pts = found["m@cpt"]["points"]
    assert [(p["x"], p["tag"]) for p in pts] == [(0, "m"), (5, "m@cpt-step5"), (10, "m@cpt-step10"), (20, "m@cpt-step20")]
    assert [p["shared_ratio"] for p in pts] == pytest.approx([0.5, 0.5, 1.0, 2.0])
    assert pts[2]["las"] == 1.5 and pts[2]["las_ci"] == [1.2, 1.9] and pts[0]["las"] is None
    assert [p["x"] for p in found["p"]["points"]] == [1000, 3000]
    # a release order: exactly the listed tags, in the file's order
    order = development.series(models, ["p@step3000", "m", "q@main"])
    assert [(p["x"], p["tag"]) for p in order[development.ORDER_SERIES]["points"]] == \
        [(1, "p@step3000"), (2, "m"), (3, "q@main")]
    with pytest.raises(InputError, match="'nope' has no neuron statistics"):
        development.series(models, ["m", "nope"])


def test_statistics_intervals_from_stability():
    s = development.statistics(stats_for(20, [10, 30]), stability_for((16, 24), [(8, 12), (20, 40)]),
                               {"language_agnostic_score": 2.0, "language_agnostic_score_ci": [1.0, 3.0]})
    assert s["shared_fraction"] == pytest.approx(20 / 10000) and s["exclusive_fraction"] == pytest.approx(20 / 10000)
    assert s["shared_fraction_ci"] == pytest.approx([16 / 10000, 24 / 10000])
    assert s["exclusive_fraction_ci"] == pytest.approx([14 / 10000, 26 / 10000])  # the mean of the bounds
    assert s["shared_ratio_ci"] == pytest.approx([16 / 26, 24 / 14])  # the envelope
    assert s["shared_ratio_ci"][0] <= s["shared_ratio"] <= s["shared_ratio_ci"][1]
    none = development.statistics(stats_for(20, [10, 30]), None, None)
    assert none["shared_ratio_ci"] is None and none["las"] is None and none["shared_ratio"] == pytest.approx(1.0)


def test_read_order(tmp_path):
    f = tmp_path / "order.txt"
    f.write_text("\ufeffllama-2  # 2023\n\n# comment\nllama-3\r\nllama-3.1\n", encoding="utf-8")
    assert development.read_order(f) == ["llama-2", "llama-3", "llama-3.1"]
    f.write_text("a\nb\na\n")
    with pytest.raises(InputError, match="'a' is listed twice"):
        development.read_order(f)
    f.write_text("# nothing\n")
    with pytest.raises(InputError, match="names no model tag"):
        development.read_order(f)


def write_tag(out: Path, tag: str, record: dict, stats: dict, stab: dict | None = None, deact: dict | None = None):
    neurons = out / tag / "neurons"
    neurons.mkdir(parents=True)
    (neurons / "stats.json").write_text(json.dumps(stats))
    (neurons / "shared.json").write_text(json.dumps({"meta": {"model": record}}))
    if stab:
        (neurons / "stability.json").write_text(json.dumps(stab))
    if deact:
        (out / tag / "deactivation.json").write_text(json.dumps({"sets": {}, **deact}))


def test_figures_draws_the_development_of_a_run(tmp_path):
    """figures.py on synthetic result folders: a base model and three step models written out of order give the
    development figure and a table in step order with the numbers and intervals of each; --order FILE puts the
    models at 1, 2, 3 in the file's order; a tag it lists without results is one line, exit 2."""
    out = tmp_path / "out"
    ck = lambda step: {"name": f"x/step-{step}", "tag": f"m@r-step{step}",  # noqa: E731
                       "checkpoint": {"run": "r", "base_tag": "m", "step": step}}
    write_tag(out, "m@r-step8", ck(8), stats_for(40, [10, 30]), stability_for((30, 50), [(8, 12), (25, 35)]),
              {"language_agnostic_score": 2.5, "language_agnostic_score_ci": [2.0, 3.0]})
    write_tag(out, "m@r-step4", ck(4), stats_for(30, [10, 30]))
    write_tag(out, "m", {"name": "m", "tag": "m"}, stats_for(20, [10, 30]))
    r = run_script("figures.py", "--out", out, "--resamples", "100", check=True)
    report = (out / "figures" / "report.md").read_text()
    assert (out / "figures" / "development.png").is_file(), r.stdout
    section = report.split("## Language neurons across development")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["0", "4", "8"]
    assert [row.split("|")[2].strip() for row in rows] == ["m", "m@r-step4", "m@r-step8"]
    # the ratio envelope 30 / mean(12, 35), 50 / mean(8, 25); the exclusive bounds averaged; LAS as written
    assert "2.000 [1.277, 3.030]" in rows[2] and "0.200% [0.165, 0.235]" in rows[2] and "2.500 [2.000, 3.000]" in rows[2]
    order = tmp_path / "order.txt"
    order.write_text("m@r-step8\nm\n")
    run_script("figures.py", "--out", out, "--order", order, "--resamples", "100", check=True)
    section = (out / "figures" / "report.md").read_text().split("## Language neurons across development")[1]
    assert "| 1 | m@r-step8 |" in section and "| 2 | m |" in section and "m@r-step4 |" not in section.split("\n## ")[0]
    order.write_text("m\nother\n")
    r = run_script("figures.py", "--out", out, "--order", order)
    assert r.returncode == 2 and "'other' has no neuron statistics" in r.stderr


# ---------------------------------------------------------------- correlation across models

def test_correlation_matches_scipy_and_its_bootstrap():
    rng = np.random.default_rng(3)
    x = rng.normal(size=12)
    y = 0.7 * x + rng.normal(scale=0.5, size=12)
    for method, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        c = uncertainty.correlation(x, y, method, resamples=500, seed=7)
        ref = fn(x, y)
        assert c["r"] == pytest.approx(ref.statistic) and c["p"] == pytest.approx(ref.pvalue)
        # the interval: percentiles of the statistic over resampled pairs (the same draws, recomputed here)
        boot = [fn(x[i], y[i]).statistic for i in uncertainty.resample_indices(12, 500, 7)]
        assert c["ci"] == pytest.approx(list(np.quantile(boot, [0.025, 0.975])))
        assert c["ci"][0] < c["r"] < c["ci"][1]
        assert uncertainty.correlation(x, y, method, resamples=500, seed=7) == c  # seeded
        assert uncertainty.correlation(x, y, method, resamples=500, seed=8)["ci"] != c["ci"]
    # Spearman is a rank statistic: a monotone transform of y changes Pearson, not Spearman
    assert uncertainty.correlation(x, np.exp(3 * y), "spearman")["r"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert uncertainty.correlation(x, -y, "pearson")["r"] == pytest.approx(-stats.pearsonr(x, y).statistic)
    for xs, ys in (([1, 2], [1, 2]), ([1, 2, 3], [5, 5, 5])):  # too few pairs; a constant sequence
        c = uncertainty.correlation(xs, ys)
        assert c["r"] is None and c["ci"] is None
    with pytest.raises(ValueError):
        uncertainty.correlation([1, 2, 3], [1, 2], "pearson")
