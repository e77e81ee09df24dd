"""All four stages and the figures through their command lines on a tiny model: files only."""
import json

from safetensors.torch import load_file

from conftest import run_script
from tiny import save_tiny, tiny_dataset


def test_four_stages_and_figures_through_their_command_lines(tmp_path):
    model = save_tiny("qwen2", tmp_path / "tiny-qwen2")
    data = tiny_dataset(tmp_path / "data")
    out = tmp_path / "out"
    common = ["--langs", "en,fr,de", "--dataset", data, "--out", out]
    tag_dir = out / "tiny-qwen2"

    run_script("detection.py", "--model", model, *common, "--ratio", "0.2", "--threshold", "0.5", check=True)
    neurons = tag_dir / "neurons"
    shared = json.loads((neurons / "shared.json").read_text())
    assert shared["meta"]["kv_index_space"] == "kv_rows"
    assert json.loads((neurons / "stats.json").read_text())["sets"]["shared"]["size"] > 0

    run_script("deactivation.py", "--model", model, *common, "--measure-ppl", "--save-variants", "shared", check=True)
    deact = json.loads((tag_dir / "deactivation.json").read_text())
    assert set(deact["results"]["ppl"]) == {"en", "fr", "de"}
    assert {"shared", "exclusive_fr", "random_shared"} <= set(deact["sets"])
    assert set(deact["importance"]) == {"en", "fr", "de"} and "language_agnostic_score" in deact
    variant = tag_dir / "variants" / "shared"
    assert (variant / "config.json").is_file() and (variant / "neurons.json").is_file()

    run_script("train.py", "--model", model, *common, "--lang", "fr", "--neurons", neurons / "exclusive_fr.json",
               "--max-steps", "2", "--batch-size", "2", "--micro-batch-size", "1", "--cutoff-len", "32", "--lr", "1e-2",
               check=True)
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
        run_script("evaluate.py", "--model", m, *common, "--tasks", "ppl,mgsm,mmmlu", "--max-new-tokens", "8", check=True)
    evals = {p.stem: json.loads(p.read_text()) for p in (tag_dir / "eval").glob("*.json")}
    assert set(evals) == {"tiny-qwen2", "shared", trained.name}  # variants report under their base's tag
    for e in evals.values():
        assert set(e["results"]) == {"ppl", "mgsm", "mmmlu"}
        assert e["results"]["mmmlu"]["fr"]["n"] == 3 and 0 <= e["results"]["mgsm"]["de"]["accuracy"] <= 1
    assert evals["shared"]["results"]["ppl"]["en"]["ppl"] == deact["sets"]["shared"]["ppl"]["en"]["ppl"]

    run_script("figures.py", "--out", out, check=True)
    figures = out / "figures"
    assert (figures / "report.md").is_file()
    pngs = list(figures.glob("*.png"))
    assert len(pngs) >= 4 and all(p.stat().st_size > 1000 for p in pngs)

    again = run_script("detection.py", "--model", model, *common, "--ratio", "0.2", "--threshold", "0.5", check=True)
    assert "Reusing" in again.stdout
