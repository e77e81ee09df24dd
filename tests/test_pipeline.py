"""All four stages and the figures through their command lines on a tiny model: files only."""
import json
import os
import subprocess
import sys

from safetensors.torch import load_file

from conftest import REPO
from tiny import save_tiny, tiny_dataset

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def stage(script, *args):
    r = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                       env=ENV, cwd=REPO)
    assert r.returncode == 0, f"{script}: {r.stderr[-3000:]}"
    return r


def test_four_stages_and_figures_through_their_command_lines(tmp_path):
    model = save_tiny("qwen2", tmp_path / "tiny-qwen2")
    data = tiny_dataset(tmp_path / "data")
    out = tmp_path / "out"
    common = ["--langs", "en,fr,de", "--dataset", data, "--out", out]
    tag_dir = out / "tiny-qwen2"

    stage("detection.py", "--model", model, *common, "--ratio", "0.2", "--threshold", "0.5")
    neurons = tag_dir / "neurons"
    shared = json.loads((neurons / "shared.json").read_text())
    assert shared["meta"]["kv_index_space"] == "kv_rows"
    assert json.loads((neurons / "stats.json").read_text())["sets"]["shared"]["size"] > 0

    stage("deactivation.py", "--model", model, *common, "--measure-ppl", "--save-variants", "shared")
    deact = json.loads((tag_dir / "deactivation.json").read_text())
    assert set(deact["results"]["ppl"]) == {"en", "fr", "de"}
    assert {"shared", "exclusive_fr", "random_shared"} <= set(deact["sets"])
    assert set(deact["importance"]) == {"en", "fr", "de"} and "language_agnostic_score" in deact
    variant = tag_dir / "variants" / "shared"
    assert (variant / "config.json").is_file() and (variant / "neurons.json").is_file()

    stage("train.py", "--model", model, *common, "--lang", "fr", "--neurons", neurons / "exclusive_fr.json",
          "--max-steps", "2", "--batch-size", "2", "--micro-batch-size", "1", "--cutoff-len", "32", "--lr", "1e-2")
    runs = [p for p in (tag_dir / "trained").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1
    trained = runs[0]
    log = json.loads((trained / "train_log.json").read_text())
    assert log["val"]["before"] and log["val"]["after"]
    base_w = load_file(model / "model.safetensors")
    new_w = load_file(trained / "model.safetensors")
    assert any(not (base_w[k] == new_w[k]).all() for k in base_w)  # something trained...
    assert all((base_w[k] == new_w[k]).all() for k in base_w if "embed" in k or "norm" in k)  # ...not these

    for m in (model, variant, trained):
        stage("evaluate.py", "--model", m, *common, "--tasks", "ppl,mgsm,mmmlu", "--max-new-tokens", "8")
    evals = {p.stem: json.loads(p.read_text()) for p in (tag_dir / "eval").glob("*.json")}
    assert set(evals) == {"tiny-qwen2", "shared", trained.name}  # variants report under their base's tag
    for e in evals.values():
        assert set(e["results"]) == {"ppl", "mgsm", "mmmlu"}
        assert e["results"]["mmmlu"]["fr"]["n"] == 3 and 0 <= e["results"]["mgsm"]["de"]["accuracy"] <= 1
    assert evals["shared"]["results"]["ppl"]["en"]["ppl"] == deact["sets"]["shared"]["ppl"]["en"]["ppl"]

    stage("figures.py", "--out", out)
    figures = out / "figures"
    assert (figures / "report.md").is_file()
    pngs = list(figures.glob("*.png"))
    assert len(pngs) >= 4 and all(p.stat().st_size > 1000 for p in pngs)

    again = stage("detection.py", "--model", model, *common, "--ratio", "0.2", "--threshold", "0.5")
    assert "Reusing" in again.stdout
