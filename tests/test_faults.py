"""A catalogue of hostile inputs: each must give exit status 2 and one line on stderr that names the culprit
(the flag or the file), before the expensive part, leaving nothing partial behind.

Every case is a real process (its own exit status and stderr), forked from one server that has imported
torch and transformers once (conftest.ForkServer), so the catalogue stays fast. The faults of a running stage
(Ctrl-C and SIGTERM at a random point, a full disk, a closed stdout) need a process of their own, stopped from
outside or given a tiny file system: they are in tests/test_reuse.py, beside the kills."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tiny import ARCHS, save_tiny, tiny_config, tiny_dataset, tiny_tokenizer

from langneurons.model import Geometry, model_record
from langneurons.neurons import empty_set, write_neuron_file

@pytest.fixture(scope="module")
def run(forked):
    """(exit status, stdout, stderr) of a script run as a forked child of conftest's fork server."""
    def case(script: str, *argv, cwd: Path) -> tuple[int, str, str]:
        r = forked(script, *argv, cwd=cwd)
        return r.returncode, r.stdout, r.stderr
    return case


# ---------------------------------------------------------------- the material: a tiny model, a dataset, broken copies

def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = save_tiny("llama", root / "model")
    config = __import__("transformers").AutoConfig.from_pretrained(model)
    geom = Geometry.from_config(config)
    m = {"model": model, "data": tiny_dataset(root / "data"), "root": root}

    weights = (model / "model.safetensors").read_bytes()
    m["truncated"] = copy_model(model, root / "truncated")
    (m["truncated"] / "model.safetensors").write_bytes(weights[:len(weights) * 2 // 3])
    m["no_tokenizer"] = copy_model(model, root / "no_tokenizer")
    for f in m["no_tokenizer"].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    cfg = json.loads((model / "config.json").read_text())
    m["no_model_type"] = copy_model(model, root / "no_model_type")
    (m["no_model_type"] / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "model_type"}))
    m["corrupt_config"] = copy_model(model, root / "corrupt_config")
    (m["corrupt_config"] / "config.json").write_text(json.dumps(cfg)[:-20])
    m["corrupt_provenance"] = copy_model(model, root / "corrupt_provenance")
    (m["corrupt_provenance"] / "langneurons.json").write_text('{"tag": "base", ')
    m["no_config"] = copy_model(model, root / "no_config")
    (m["no_config"] / "config.json").unlink()
    m["missing_shard"] = copy_model(model, root / "missing_shard")
    (m["missing_shard"] / "model.safetensors").rename(m["missing_shard"] / "model-00001-of-00002.safetensors")
    (m["missing_shard"] / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                                        "model.norm.weight": "model-00001-of-00002.safetensors"}}))

    # configs that do not match their weights (loading would initialise what is missing at random)
    from safetensors.torch import load_file, save_file
    m["more_layers"] = copy_model(model, root / "more_layers")
    (m["more_layers"] / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 4}))  # the weights have 3
    m["other_ffn"] = copy_model(model, root / "other_ffn")
    (m["other_ffn"] / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] - 16}))
    m["extra_tensor"] = copy_model(model, root / "extra_tensor")
    tensors = load_file(model / "model.safetensors")
    save_file({**tensors, "model.layers.1.mlp.extra.weight": tensors["model.norm.weight"].clone()},
              m["extra_tensor"] / "model.safetensors", metadata={"format": "pt"})
    m["bin_more_layers"] = copy_model(m["more_layers"], root / "bin_more_layers")
    (m["bin_more_layers"] / "model.safetensors").unlink()
    __import__("torch").save(tensors, m["bin_more_layers"] / "pytorch_model.bin")
    m["bin_pickle"] = copy_model(m["bin_more_layers"], root / "bin_pickle")  # more than tensors: weights_only refuses
    __import__("torch").save({**tensors, "args": __import__("argparse").Namespace(lr=1)},
                             m["bin_pickle"] / "pytorch_model.bin")

    s = empty_set(geom)
    s["fwd_up"][0, :3] = True
    write_neuron_file(root / "good.json", s, {"set": "good"})
    good = json.loads((root / "good.json").read_text())
    hostile = {
        "superscript_layer": {"fwd_up": {"²": [1]}},
        "huge_index": {"fwd_up": {"0": [2 ** 70]}},
        "negative_index": {"attn_q": {"1": [-1]}},
        "layer_out_of_range": {"fwd_up": {"3": [0]}},
        "unknown_group": {"mlp": {"0": [1]}},
        "float_index": {"fwd_down": {"0": [1.5]}},
        "not_an_object": [1, 2, 3],
        "not_a_record": {"fwd_up": {"0": [1]}, "meta": {"model": {"tag": "other"}, "kv_index_space": "kv_rows"}},
    }
    for name, obj in hostile.items():
        (root / f"{name}.json").write_text(json.dumps(obj), encoding="utf-8")
    (root / "corrupt.json").write_text(json.dumps(good)[:-5])
    (root / "latin1.json").write_bytes('{"fwd_up": {"0": [1]}, "meta": {"set": "caf\xe9"}}'.encode("latin-1"))
    write_neuron_file(root / "empty_set.json", empty_set(geom))
    # good.json as detection would have written it on a model with one layer less (its indices fit this one)
    rec = model_record(str(model), config)
    other = {**rec, "tag": "other", "config_sha256": "0" * 64, "geometry": {**rec["geometry"], "num_layers": 2}}
    write_neuron_file(root / "other_model.json", s, {"model": other, "set": "good"})
    return m


def dataset_with(w, tmp_path: Path, file: str, content: str | bytes) -> Path:
    """A copy of the tiny dataset with one file replaced."""
    d = tiny_dataset(tmp_path / "data")
    target = d / file
    target.parent.mkdir(parents=True, exist_ok=True)
    (target.write_bytes if isinstance(content, bytes) else target.write_text)(content)
    return d


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def assert_fault(run, tmp_path: Path, script: str, argv: list, needle: str, out: Path | None = None):
    """Exit status 2, one line naming `needle`, and nothing written under the output root (or under cwd)."""
    out = out or tmp_path / "out"
    before = files_under(out)
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    rc, stdout, stderr = run(script, *argv, cwd=cwd)
    lines = stderr.strip().splitlines()
    assert rc == 2, f"exit {rc}\n{stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert needle in lines[0], lines[0]
    assert files_under(out) == before, f"{script} left {files_under(out)}"
    assert files_under(cwd) == [], f"{script} left {files_under(cwd)} in the working directory"
    return lines[0]


# ---------------------------------------------------------------- detection.py

DETECTION_FLAGS = [
    (["--ratio", "0"], "--ratio"),
    (["--ratio", "1.5"], "--ratio"),
    (["--ratio", "nan"], "--ratio"),
    (["--threshold", "inf"], "--threshold"),
    (["--threshold", "0"], "--threshold"),
    (["--sample-size", "-1"], "--sample-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-length", "1"], "--max-length"),
    (["--max-length", "2.5"], "--max-length"),
    (["--groups", ","], "--groups"),
    (["--groups", "fwd_up,mlp"], "mlp"),
    (["--groups", "fwd_up,fwd_up"], "--groups"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "99999999999999999999"], "--seed"),
    (["--method", "magic"], "--method"),
    (["--dtype", "float64"], "--dtype"),
    (["--langs", "en,en"], "--langs"),
    (["--langs", ","], "--langs"),
    (["--langs", "en,xx"], "'xx'"),
    (["--device", "tpu"], "--device"),
    (["--bogus-flag"], "--bogus-flag"),
]


@pytest.mark.parametrize("argv,needle", DETECTION_FLAGS, ids=[" ".join(a) for a, _ in DETECTION_FLAGS])
def test_detection_bad_flags(run, w, tmp_path, argv, needle):
    assert_fault(run, tmp_path, "detection.py", ["--model", w["model"], "--dataset", w["data"], "--langs", "en,fr",
                                                 "--out", tmp_path / "out", *argv], needle)


BROKEN_MODELS = [
    ("truncated", "model.safetensors"),
    ("no_tokenizer", "tokenizer"),
    ("no_model_type", "model_type"),
    ("corrupt_config", "config"),
    ("corrupt_provenance", "langneurons.json"),
    ("no_config", "config.json"),
    ("missing_shard", "model-00002-of-00002.safetensors"),
    ("more_layers", "config.json does not match the weights: model.layers.3.input_layernorm.weight is missing"),
    ("other_ffn", "model.layers.0.mlp.down_proj.weight has shape [64, 96] in model.safetensors but [64, 80] in the "
                  "config"),
    ("extra_tensor", "model.layers.1.mlp.extra.weight in model.safetensors is not a tensor of the model"),
    ("bin_more_layers", "model.layers.3.input_layernorm.weight is missing from the weight files"),
    ("bin_pickle", "pytorch_model.bin is not a plain state dict"),
]


@pytest.mark.parametrize("which,needle", BROKEN_MODELS, ids=[b for b, _ in BROKEN_MODELS])
def test_detection_broken_model(run, w, tmp_path, which, needle):
    msg = assert_fault(run, tmp_path, "detection.py", ["--model", w[which], "--dataset", w["data"], "--langs", "en",
                                                       "--out", tmp_path / "out"], needle)
    assert str(w[which]) in msg


def test_missing_model_and_gguf(run, w, tmp_path):
    for model in (tmp_path / "nowhere", tmp_path / "model.gguf"):
        assert_fault(run, tmp_path, "detection.py", ["--model", model, "--dataset", w["data"], "--langs", "en",
                                                     "--out", tmp_path / "out"], str(model))


@pytest.mark.parametrize("file,content,needle", [
    ("detect/en.txt", "", "empty"),
    ("detect/en.txt", "\n  \n\n", "empty"),
    ("detect/en.txt", b"good line\n\xff\xfe bad bytes\n", "line 2 is not UTF-8"),
], ids=["empty", "blank", "not-utf8"])
def test_detection_bad_corpus(run, w, tmp_path, file, content, needle):
    data = dataset_with(w, tmp_path, file, content)
    msg = assert_fault(run, tmp_path, "detection.py", ["--model", w["model"], "--dataset", data, "--langs", "en",
                                                       "--out", tmp_path / "out"], needle)
    assert str(data / file) in msg


@pytest.mark.parametrize("kind,needle", [("folder", "a folder, not a file"), ("loop", "a symlink loop"),
                                         ("dangling", "a link to a missing file")])
def test_detection_dataset_file_that_is_no_file(run, w, tmp_path, kind, needle):
    """The message names what is wrong with the file that is there, not 'unknown language' (which it is not)."""
    data = tiny_dataset(tmp_path / "data")
    target = data / "detect" / "en.txt"
    target.unlink()
    if kind == "folder":
        target.mkdir()
    elif kind == "loop":
        target.symlink_to(target)
    else:
        target.symlink_to(tmp_path / "gone.txt")
    msg = assert_fault(run, tmp_path, "detection.py", ["--model", w["model"], "--dataset", data, "--langs", "en",
                                                       "--out", tmp_path / "out"], needle)
    assert str(target) in msg and "unknown language" not in msg


def test_detection_missing_dataset(run, w, tmp_path):
    assert_fault(run, tmp_path, "detection.py", ["--model", w["model"], "--dataset", tmp_path / "nodata",
                                                 "--langs", "en", "--out", tmp_path / "out"], "nodata")


def test_detection_mgsm_corpus_with_nan_gold(run, w, tmp_path):
    data = dataset_with(w, tmp_path, "test/mgsm/mgsm_en.tsv", "2 + 3 = ?\t5\n1 / 0 = ?\tnan\n")
    assert_fault(run, tmp_path, "detection.py", ["--model", w["model"], "--dataset", data, "--langs", "en",
                                                 "--corpus", "mgsm", "--out", tmp_path / "out"], "line 2")


# ---------------------------------------------------------------- deactivation.py

NEURON_FILES = [
    ("superscript_layer", "²"),
    ("huge_index", str(2 ** 70)),
    ("negative_index", "-1"),
    ("layer_out_of_range", "layer 3"),
    ("unknown_group", "'mlp'"),
    ("float_index", "integers"),
    ("not_an_object", "object"),
    ("corrupt", "corrupt JSON"),
    ("latin1", "not UTF-8"),
    ("not_a_record", "meta.model is not a model record"),
    ("other_model", "detected on model 'other' (num_layers 2)"),
]


@pytest.mark.parametrize("name,needle", NEURON_FILES, ids=[n for n, _ in NEURON_FILES])
def test_deactivation_bad_neuron_file(run, w, tmp_path, name, needle):
    f = w["root"] / f"{name}.json"
    msg = assert_fault(run, tmp_path, "deactivation.py", ["--model", w["model"], "--dataset", w["data"],
                                                          "--langs", "en", "--out", tmp_path / "out",
                                                          "--neurons", f, "--measure-ppl"], needle)
    assert str(f) in msg


@pytest.mark.parametrize("argv,needle", [
    (["--neurons", "missing.json"], "missing.json"),
    (["--save-variants", "nosuchset"], "--save-variants"),
    (["--save-variants", "none"], "--save-variants"),
    (["--batch-size", "0"], "--batch-size"),
    (["--limit", "-3"], "--limit"),
    (["--neurons", "bad name!=GOOD"], "set name"),
    (["--save-variants", "good,good", "--measure-ppl"], "--save-variants: 'good' is named twice"),
], ids=["missing", "unknown-variant", "nothing-to-do", "batch", "limit", "unsafe-name", "variant-twice"])
def test_deactivation_bad_flags(run, w, tmp_path, argv, needle):
    argv = [a.replace("GOOD", str(w["root"] / "good.json")) for a in argv]
    if "--neurons" not in argv:
        argv += ["--neurons", str(w["root"] / "good.json")]
    assert_fault(run, tmp_path, "deactivation.py", ["--model", w["model"], "--dataset", w["data"], "--langs", "en",
                                                    "--out", tmp_path / "out", *argv], needle)


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_deactivation_truncated_weights(run, w, tmp_path, streaming):
    assert_fault(run, tmp_path, "deactivation.py", ["--model", w["truncated"], "--dataset", w["data"], "--langs", "en",
                                                    "--out", tmp_path / "out", "--neurons", w["root"] / "good.json",
                                                    *(["--streaming"] if streaming else [])], "model.safetensors")


def test_deactivation_no_neurons_yet(run, w, tmp_path):
    assert_fault(run, tmp_path, "deactivation.py", ["--model", w["model"], "--dataset", w["data"], "--langs", "en",
                                                    "--out", tmp_path / "out", "--measure-ppl"], "detection.py")


# ---------------------------------------------------------------- train.py

TRAIN_FLAGS = [
    (["--save-steps", "inf"], "--save-steps"),
    (["--save-steps", "2.5"], "--save-steps"),
    (["--save-steps", "0"], "--save-steps"),
    (["--epochs", "inf"], "--epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "-1e-5"], "--lr"),
    (["--warmup", "1"], "--warmup"),
    (["--max-steps", "-2"], "--max-steps"),
    (["--global-batch-size", "4", "--micro-batch-size", "3"], "--global-batch-size"),
    (["--batch-size", "4", "--micro-batch-size", "3"], "--global-batch-size"),  # the original contract's name (docs/outputs.md), an alias
    (["--max-length", "1"], "--max-length"),
    (["--sample-size", "-1"], "--sample-size"),
    (["--langs", "en,xx"], "'xx'"),
    (["--micro-batch-size", "0"], "--micro-batch-size"),
    (["--cutoff-len", "1"], "--cutoff-len"),
    (["--lora-alpha", "8"], "--lora-alpha"),
    (["--lang", "xx"], "'xx'"),
    (["--report-to", "mlflow"], "--report-to"),
    (["--report-to", "none,wandb"], "--report-to"),
    (["--report-to", "wandb,wandb"], "--report-to"),
]


@pytest.mark.parametrize("argv,needle", TRAIN_FLAGS, ids=[" ".join(a) for a, _ in TRAIN_FLAGS])
def test_train_bad_flags(run, w, tmp_path, argv, needle):
    base = ["--model", w["model"], "--dataset", w["data"], "--out", tmp_path / "out", "--neurons",
            w["root"] / "good.json", "--global-batch-size", "2", "--micro-batch-size", "1", "--langs", "en"]
    if "--lang" not in argv:
        base += ["--lang", "en"]
    assert_fault(run, tmp_path, "train.py", base + argv, needle)


def test_train_lora_rank_zero_and_no_mode(run, w, tmp_path):
    base = ["--model", w["model"], "--dataset", w["data"], "--out", tmp_path / "out", "--lang", "en"]
    assert_fault(run, tmp_path, "train.py", base + ["--lora-rank", "0"], "--lora-rank")
    assert_fault(run, tmp_path, "train.py", base, "--neurons")  # one of --neurons / --lora-rank is required


@pytest.mark.parametrize("content,needle", [
    ("", "empty"),
    ('{"text": "fine"}\n{"text": "cut in the mid\n', "line 2"),
    ('{"text": "fine"}\n["not", "an", "object"]\n', "line 2"),
], ids=["empty", "corrupt-line", "not-an-object"])
def test_train_bad_training_file(run, w, tmp_path, content, needle):
    data = dataset_with(w, tmp_path, "train/en.jsonl", content)
    msg = assert_fault(run, tmp_path, "train.py", ["--model", w["model"], "--dataset", data, "--out", tmp_path / "out",
                                                   "--lang", "en", "--langs", "en", "--neurons", w["root"] / "good.json"],
                       needle)
    assert str(data / "train/en.jsonl") in msg


def test_train_empty_neuron_set_and_broken_model(run, w, tmp_path):
    base = ["--dataset", w["data"], "--out", tmp_path / "out", "--lang", "en"]
    assert_fault(run, tmp_path, "train.py", base + ["--model", w["model"], "--neurons", w["root"] / "empty_set.json"],
                 "empty")
    assert_fault(run, tmp_path, "train.py", base + ["--model", w["truncated"], "--neurons", "full"],
                 "model.safetensors")


def test_train_neuron_file_of_another_model(run, w, tmp_path):
    f = w["root"] / "other_model.json"
    msg = assert_fault(run, tmp_path, "train.py", ["--model", w["model"], "--dataset", w["data"], "--out",
                                                   tmp_path / "out", "--lang", "en", "--neurons", f],
                       "detected on model 'other' (num_layers 2)")
    assert str(f) in msg and "num_layers 3" in msg and "--allow-other-model" in msg


# ---------------------------------------------------------------- evaluate.py

@pytest.mark.parametrize("argv,needle", [
    (["--tasks", ","], "--tasks"),
    (["--tasks", "ppl,bleu"], "bleu"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--limit", "1.5"], "--limit"),
    (["--max-length", "4"], "--max-length"),
    (["--name", "..."], "--name"),
    (["--tasks", "ppl,ppl"], "twice"),
], ids=["no-task", "unknown-task", "max-new-tokens", "limit", "max-length", "name", "task-twice"])
def test_evaluate_bad_flags(run, w, tmp_path, argv, needle):
    assert_fault(run, tmp_path, "evaluate.py", ["--model", w["model"], "--dataset", w["data"], "--langs", "en",
                                                "--out", tmp_path / "out", *argv], needle)


@pytest.mark.parametrize("gold", ["nan", "inf", "-Infinity"])
def test_evaluate_non_finite_mgsm_gold(run, w, tmp_path, gold):
    data = dataset_with(w, tmp_path, "test/mgsm/mgsm_en.tsv", f"2 + 3 = ?\t5\nforever?\t{gold}\n")
    msg = assert_fault(run, tmp_path, "evaluate.py", ["--model", w["model"], "--dataset", data, "--langs", "en",
                                                      "--out", tmp_path / "out", "--tasks", "mgsm"], "line 2")
    assert str(data / "test/mgsm/mgsm_en.tsv") in msg


def test_evaluate_bad_task_files(run, w, tmp_path):
    data = dataset_with(w, tmp_path, "test/mmlu/mmlu_EN-EN.csv", ",Question,A,B,C,Answer\n0,q,a,b,c,A\n")
    assert_fault(run, tmp_path, "evaluate.py", ["--model", w["model"], "--dataset", data, "--langs", "en",
                                                "--out", tmp_path / "out", "--tasks", "mmmlu"], "missing column D")
    data = dataset_with(w, tmp_path / "2", "val/en.txt", "")
    assert_fault(run, tmp_path, "evaluate.py", ["--model", w["model"], "--dataset", data, "--langs", "en",
                                                "--out", tmp_path / "out", "--tasks", "ppl"], "empty")


@pytest.mark.parametrize("which,needle", [("truncated", "model.safetensors"), ("no_tokenizer", "tokenizer")])
def test_evaluate_broken_model(run, w, tmp_path, which, needle):
    assert_fault(run, tmp_path, "evaluate.py", ["--model", w[which], "--dataset", w["data"], "--langs", "en",
                                                "--out", tmp_path / "out", "--tasks", "ppl"], needle)


# ---------------------------------------------------------------- figures.py

def test_figures_out_missing(run, tmp_path):
    assert_fault(run, tmp_path, "figures.py", ["--out", tmp_path / "no_outputs"], "--out")


def test_figures_unknown_model(run, tmp_path):
    out = tmp_path / "out"
    (out / "model_a" / "eval").mkdir(parents=True)
    assert_fault(run, tmp_path, "figures.py", ["--out", out, "--models", "model_a,ghost"], "ghost", out=out)
    assert_fault(run, tmp_path, "figures.py", ["--out", out, "--models", ","], "--models", out=out)


# ---------------------------------------------------------------- not a fault: weights that match their config

@pytest.mark.parametrize("arch", ARCHS + ["tied", "no_prefix"])
def test_weights_match_config(tmp_path, arch):
    """Every tiny architecture, a model whose head is its embedding (no lm_head.weight in the file) and a
    checkpoint whose keys lack the base model's prefix pass the check (transformers loads them whole)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    from langneurons.model import check_model
    if arch == "tied":
        cfg = tiny_config("llama")
        cfg.tie_word_embeddings = True
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / arch)
        tiny_tokenizer().save_pretrained(tmp_path / arch)
        assert "lm_head.weight" not in load_file(tmp_path / arch / "model.safetensors")
    elif arch == "no_prefix":
        save_tiny("llama", tmp_path / arch)
        tensors = load_file(tmp_path / arch / "model.safetensors")
        save_file({k.removeprefix("model."): t for k, t in tensors.items()}, tmp_path / arch / "model.safetensors",
                  metadata={"format": "pt"})
    else:
        save_tiny(arch, tmp_path / arch)
    assert check_model(str(tmp_path / arch)).num_hidden_layers == 3


# ---------------------------------------------------------------- not a fault: a tokenizer with neither pad nor eos

def with_tokenizer(src: Path, dst: Path, **special) -> Path:
    """A copy of model folder `src` with tiny_tokenizer(**special); a special token left out is also gone from the
    config and the generation config, as in a model that never had one."""
    copy_model(src, dst)
    for f in dst.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    tiny_tokenizer(**special).save_pretrained(dst)
    gone = [f"{k.removesuffix('_token')}_token_id" for k, v in special.items() if v is None]
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((dst / name).read_text())
        (dst / name).write_text(json.dumps({k: v for k, v in cfg.items() if k not in gone}))
    return dst


def test_tokenizer_without_pad_and_eos(run, w, tmp_path):
    """Padding is masked everywhere, so the id that fills it (0 with neither pad nor eos token, 2 with eos as pad)
    changes no firing count, perplexity or MMMLU score; MGSM generation, with no EOS to stop at, also runs."""
    from safetensors.torch import load_file
    models = {"eos_pad": with_tokenizer(w["model"], tmp_path / "eos_pad", pad_token="<eos>"),
              "no_pad": with_tokenizer(w["model"], tmp_path / "no_pad", pad_token=None, eos_token=None)}
    firing, results = {}, {}
    for name, model in models.items():
        for method in ("activation", "importance"):
            out = tmp_path / "out" / method
            rc, _, stderr = run("detection.py", "--model", model, "--dataset", w["data"], "--langs", "en,fr",
                                "--out", out, "--device", "cpu", "--method", method, "--batch-size", "4", cwd=tmp_path)
            assert rc == 0, stderr[-3000:]
            firing[name, method] = load_file(out / name / "neurons" / "firing.safetensors")
        rc, _, stderr = run("evaluate.py", "--model", model, "--dataset", w["data"], "--langs", "en,fr", "--out",
                            tmp_path / "out", "--device", "cpu", "--tasks", "ppl,mmmlu,mgsm", "--max-new-tokens", "8",
                            cwd=tmp_path)
        assert rc == 0, stderr[-3000:]
        results[name] = json.loads((tmp_path / "out" / name / "eval" / f"{name}.json").read_text())["results"]
    for method in ("activation", "importance"):
        a, b = firing["eos_pad", method], firing["no_pad", method]
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), method
        assert any(a[k].any() for k in a if not k.startswith("sentences"))
    for task in ("ppl", "mmmlu"):
        assert results["no_pad"][task] == results["eos_pad"][task], task
    assert results["no_pad"]["mgsm"]["en"]["n"] == 3


# ---------------------------------------------------------------- not a fault: any subset of groups works end to end

def test_detection_with_a_subset_of_groups(run, w, tmp_path):
    out = tmp_path / "out"
    argv = ["--model", w["model"], "--dataset", w["data"], "--langs", "en,fr", "--out", out, "--device", "cpu",
            "--groups", "fwd_up,fwd_down", "--ratio", "0.1", "--threshold", "0.5"]
    rc, stdout, stderr = run("detection.py", *argv, cwd=tmp_path)
    assert rc == 0, stderr[-3000:]
    neurons = out / "model" / "neurons"
    shared = json.loads((neurons / "shared.json").read_text())
    related = json.loads((neurons / "related_en.json").read_text())
    assert sum(map(len, related["fwd_up"].values())) > 0
    for g in ("attn_q", "attn_k", "attn_v", "attn_o"):  # not scored: no neuron of theirs is related
        assert all(v == [] for v in related[g].values()) and all(v == [] for v in shared[g].values())
    meta = json.loads((neurons / "meta.json").read_text())
    assert meta["groups"] == ["fwd_up", "fwd_down"]
    from safetensors import safe_open
    with safe_open(str(neurons / "firing.safetensors"), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"fwd_up", "fwd_down", "sentences"}
    # a --threshold-only rerun re-derives the sets from the stored counts of these groups
    rc, stdout, stderr = run("detection.py", *argv[:-1], "1.0", cwd=tmp_path)
    assert rc == 0 and "Re-deriving" in stdout, stderr[-3000:]
    strict = json.loads((neurons / "related_en.json").read_text())
    count = lambda s: sum(len(v) for g in ("fwd_up", "fwd_down") for v in s[g].values())
    assert count(strict) <= count(related)
