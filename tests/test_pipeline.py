"""All four stages and the figures through their command lines on a tiny model, then the four .sh scripts with
flags passed through: files only."""
import json
import re
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from conftest import REPO, run_script, script_env
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


def sh_checkout(root: Path, variables: dict[str, dict[str, str]]) -> Path:
    """A checkout in `root` whose .sh scripts have their variables edited as a user edits them (NAME=(...)); the
    stage scripts and the package are links to the repository's."""
    root.mkdir()
    for name in ("detection.py", "deactivation.py", "train.py", "evaluate.py", "langneurons"):
        (root / name).symlink_to(REPO / name)
    for script, values in variables.items():
        text = (REPO / script).read_text()
        for name, value in values.items():
            text, n = re.subn(rf"^{name}=\(.*?\)", f"{name}=({value})", text, count=1, flags=re.M)
            assert n == 1, (script, name)
        (root / script).write_text(text)
    return root


def test_sh_scripts_pass_their_flags_to_every_call(tmp_path):
    """bash <stage>.sh FLAGS: FLAGS reach the stage (and the printed paths) for every model of MODELS; deliberate
    choices of a script (deactivation's --measure-ppl, evaluate's task list) stay."""
    model = save_tiny("qwen2", tmp_path / "tiny-qwen2")
    data = tiny_dataset(tmp_path / "data")
    out = tmp_path / "out"
    tag_dir = out / "tiny-qwen2"
    variant = tag_dir / "variants" / "shared"
    root = sh_checkout(tmp_path / "checkout", {
        "detection.sh": {"MODELS": f"'{model}'"}, "deactivation.sh": {"MODELS": f"'{model}'"},
        "train.sh": {"MODELS": f"'{model}'", "TRAIN_LANGS": "fr", "NEURON_SETS": "exclusive_LANG"},
        "evaluate.sh": {"MODELS": f"'{model}' '{variant}'"}})
    common = ["--langs", "en,fr,de", "--dataset", data, "--out", out, "--device", "cpu"]

    def sh(script: str, *flags) -> str:
        r = subprocess.run(["bash", root / script, *map(str, flags)], cwd=tmp_path,
                           env=script_env({"PYTHON": sys.executable}), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{script}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    stdout = sh("detection.sh", *common, "--ratio", "0.2", "--threshold", "0.5", "--sample-size", "5")
    meta = json.loads((tag_dir / "neurons" / "meta.json").read_text())
    assert (meta["ratio"], meta["threshold"], meta["run"]["args"]["sample_size"]) == (0.2, 0.5, 5)
    assert f"neuron files: {tag_dir / 'neurons'}\n" in stdout

    stdout = sh("deactivation.sh", *common, "--save-variants", "shared", "--limit", "2")
    deact = json.loads((tag_dir / "deactivation.json").read_text())  # --measure-ppl, the script's own choice
    assert deact["meta"]["run"]["args"]["limit"] == 2 and set(deact["results"]["ppl"]) == {"en", "fr", "de"}
    assert sorted(p.name for p in (tag_dir / "variants").iterdir() if not p.name.startswith(".")) == ["shared"]
    assert f"(sets from {tag_dir / 'neurons'})" in stdout

    sh("train.sh", *common, "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "1", "--cutoff-len", "32")
    [run] = [p for p in (tag_dir / "trained").iterdir() if not p.name.startswith(".")]
    log = json.loads((run / "train_log.json").read_text())
    args = log["run"]["args"]
    assert args["lang"] == "fr" and args["neurons"] == str(tag_dir / "neurons" / "exclusive_fr.json")
    assert (args["max_steps"], args["cutoff_len"], args["dataset"]) == (1, 32, str(data))

    stdout = sh("evaluate.sh", *common, "--limit", "1", "--max-new-tokens", "2")
    for name in ("tiny-qwen2", "shared"):
        ev = json.loads((tag_dir / "eval" / f"{name}.json").read_text())
        assert list(ev["results"]) == ["ppl", "mgsm", "mmmlu"] and ev["meta"]["args"]["tasks"] == "ppl,mmmlu,mgsm"
        assert (ev["meta"]["args"]["limit"], ev["meta"]["args"]["max_new_tokens"]) == (1, 2)
    assert stdout.count(f"(results in {tag_dir / 'eval'})") == 2


def test_layout_finds_a_stage_s_folders_from_its_flags():
    """What the .sh scripts print: the folder of a stage run with the flags they pass it (its other flags, --help
    included, are the stage's business; a flag given twice counts as the stage counts it, the last)."""
    from langneurons.layout import stage_outputs
    assert stage_outputs(["--model", "org/m1", "--ratio", "0.2", "--help", "--out", "o"]).neurons == Path("o/m1/neurons")
    assert stage_outputs(["--model", "m1", "--out=o", "--model", "m2"]).eval == Path("o/m2/eval")
    assert stage_outputs(["--force"]).trained == Path("outputs/gemma-3-270m/trained")  # the stages' defaults
