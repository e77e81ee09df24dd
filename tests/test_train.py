"""train.py and langneurons/sparse.py: only the selected neurons change (bit-for-bit elsewhere), also under
gradient accumulation and two processes; resume = uninterrupted; LoRA/full baselines; bad inputs."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, run_script
from tiny import save_tiny, tiny_config, tiny_dataset, tiny_model

from langneurons.masking import meta_skeleton, zero_plan
from langneurons.model import Geometry
from langneurons.layout import SCHEMA_VERSION, model_tag
from langneurons.neurons import random_set, read_neuron_file, write_neuron_file
from langneurons.sparse import (attach_deltas, delta_modules, merge_deltas,
                                optimizer_state_bytes)

FAST = ["--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-2", "--cutoff-len", "64", "--val-limit", "2",
        "--langs", "en"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    ds = tiny_dataset(root / "dataset")
    models, sets = {}, {}
    for arch in ("llama", "qwen2"):
        models[arch] = save_tiny(arch, root / arch)
        geom = Geometry.from_config(tiny_config(arch))
        nset = random_set(40, geom, 0, "train-test")
        nset["attn_q"][1, :3] = True  # make sure every group and a q bias entry (qwen2) are in the set
        nset["fwd_down"][2, 5] = True
        sets[arch] = root / f"set_{arch}.json"
        write_neuron_file(sets[arch], nset)
    return {"root": root, "dataset": ds, "models": models, "sets": sets}


def train(work, out, *extra, arch="llama", launcher=(sys.executable,), check=True, cache=None):
    """Run train.py in the work folder; datasets' cache goes to `cache` (default: one folder of this module's work
    tree). One thread per process, and progress bars on: a test counts them."""
    env = {"HF_DATASETS_CACHE": cache or work["root"] / "hf_datasets", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": None}
    return run_script("train.py", "--model", work["models"][arch], "--dataset", work["dataset"], "--out", out,
                      "--lang", "en", *FAST, *extra, launcher=launcher, cwd=work["root"], env=env, timeout=300,
                      check=check)


def assert_one_line_errors(forked, work, out: Path, cases, arch="llama") -> None:
    """Each (extra arguments, message) case exits 2 with one error line holding the message, writing nothing
    (each case a process forked from conftest's fork server: the same run without seconds of imports)."""
    for extra, msg in cases:
        r = forked("train.py", "--model", work["models"][arch], "--dataset", work["dataset"], "--out", out,
                   "--lang", "en", *FAST, *extra, cwd=work["root"])
        assert r.returncode == 2, (extra, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], (extra, r.stderr)
        assert not out.exists(), extra


def run_dir(out, arch, name):
    return Path(out) / arch / "trained" / name


def assert_only_selected_changed(work, arch, trained_dir):
    """Entries of the selected rows/columns move; every other entry of every tensor is bit-identical."""
    base = load_file(work["models"][arch] / "model.safetensors")
    new = load_file(trained_dir / "model.safetensors")
    assert set(base) == set(new)
    config = tiny_config(arch)
    nset, _ = read_neuron_file(work["sets"][arch], Geometry.from_config(config))
    plan = zero_plan(meta_skeleton(config), nset)
    assert any(k.endswith(".bias") for k in plan) == (arch == "qwen2")
    for name, a in base.items():
        b = new[name]
        assert a.dtype == b.dtype and a.shape == b.shape
        if name not in plan:
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{name} changed"
            continue
        dim, idx = plan[name]
        keep = torch.ones(a.shape[dim], dtype=torch.bool)
        keep[idx] = False
        other = torch.nonzero(keep).flatten()
        assert torch.equal(a.index_select(dim, other).view(torch.int32), b.index_select(dim, other).view(torch.int32)), \
            f"{name}: an entry outside the selected neurons changed"
        moved = (a.index_select(dim, idx) != b.index_select(dim, idx))
        moved = moved.flatten(1).any(1) if moved.dim() > 1 and dim == 0 else (moved.any(0) if moved.dim() > 1 else moved)
        assert bool(moved.all()), f"{name}: a selected neuron did not move"


# ---------------------------------------------------------------- unit level: langneurons/sparse.py

def test_deltas_are_the_only_optimized_parameters(tmp_path):
    from transformers import Trainer, TrainingArguments
    model = tiny_model("qwen2")
    geom = Geometry.from_config(model.config)
    nset = random_set(30, geom, 1, "unit")
    nset["attn_v"][:] = False
    nset["fwd_down"][0, :] = False
    nset["fwd_down"][0, 7] = True
    ids = torch.randint(3, 200, (2, 9))
    ref = model(ids).logits
    touched = attach_deltas(model, nset)
    deltas = {id(p) for _, (_, d) in delta_modules(model).items() for p in d.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == deltas
    assert not any(n.endswith("v_proj") for n in touched)  # a projection without selected neurons gets nothing
    assert torch.equal(model(ids).logits, ref)  # zero deltas: the same function, exactly

    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    opt = trainer.create_optimizer()
    # parameters with no selected neuron never reach the optimizer
    assert {id(p) for g in getattr(opt, "optimizer", opt).param_groups for p in g["params"]} == deltas

    with torch.no_grad():  # the additive form equals the merged weights
        for _, (_, d) in delta_modules(model).items():
            for p in d.parameters():
                p.normal_(0, 0.1)
    hooked = model(ids).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    merge_deltas(model)
    assert not delta_modules(model) and not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(ids).logits, hooked, rtol=1e-4, atol=1e-4)
    plan = zero_plan(model, nset)
    after = dict(model.named_parameters())
    for n, p in before.items():
        if n not in plan:
            assert torch.equal(p, after[n]), n

    # optimizer state is counted from the wrapped optimizer's state tensors
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.ones(10))])
    opt2.param_groups[0]["params"][0].grad = torch.ones(10)
    opt2.step()
    assert optimizer_state_bytes(opt2) == 10 * 4 * 2 + 4  # exp_avg, exp_avg_sq (float32) and a float32 step


# ---------------------------------------------------------------- the command line

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_only_selected_neurons_change(work, arch, tmp_path):
    out = tmp_path / "out"
    train(work, out, "--neurons", str(work["sets"][arch]), "--max-steps", "2", arch=arch)
    d = run_dir(out, arch, f"en-set_{arch}")
    assert_only_selected_changed(work, arch, d)
    log = json.loads((d / "train_log.json").read_text())
    assert log["gradient_accumulation_steps"] == 2 and log["steps"] == 2 and log["effective_batch_size"] == 4
    assert log["neurons"]["size"] > 0 and log["neurons"]["format"] == "ours"
    assert log["trainable_parameters"] < log["total_parameters"] / 10
    # AdamW: two float32 moments per trainable entry, plus one step counter per delta tensor
    assert log["trainable_parameters"] * 8 <= log["optimizer_state_bytes"] <= log["trainable_parameters"] * 8 + 4096
    assert [p["step"] for p in log["loss_curve"]] == [1, 2] and log["tokens_seen"] > 0
    assert log["val"]["before"]["en"]["loss"] > 0 and log["val"]["after"]["en"]["ppl"] > 0
    assert log["schema_version"] == SCHEMA_VERSION and log["val"]["max_length"] == 512
    assert log["run"]["args"]["lang"] == "en" and "torch" in log["run"]["versions"]
    assert model_tag(str(d)) == model_tag(str(work["models"][arch])) == arch
    prov = json.loads((d / "langneurons.json").read_text())
    assert prov["trained_lang"] == "en" and prov["neurons"] == f"set_{arch}" and prov["schema_version"] == SCHEMA_VERSION
    assert (d / "neurons.json").read_bytes() == work["sets"][arch].read_bytes()
    assert not (out / arch / "trained" / f".en-set_{arch}.ckpt").exists()  # checkpoints removed after success
    assert not list((out / arch / "trained").glob(".*tmp"))
    # the same command again reuses the finished run
    r = train(work, out, "--neurons", str(work["sets"][arch]), "--max-steps", "2", arch=arch)
    assert "Reusing" in r.stdout


def test_two_processes_keep_unselected_entries(work, tmp_path):
    out = tmp_path / "out"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port())
    # batch 4 = micro 1 x 2 accumulation steps x 2 processes
    r = train(work, out, "--neurons", str(work["sets"]["qwen2"]), "--max-steps", "2", "--micro-batch-size", "1",
              "--device", "cpu", arch="qwen2", launcher=launcher, cache=tmp_path / "hf_datasets")
    assert r.stderr.count("tokenize: 100%") == 1  # one process tokenizes, the other reads its cache
    d = run_dir(out, "qwen2", "en-set_qwen2")
    assert_only_selected_changed(work, "qwen2", d)
    log = json.loads((d / "train_log.json").read_text())
    assert log["world_size"] == 2 and log["gradient_accumulation_steps"] == 2 and log["effective_batch_size"] == 4


def test_resume_gives_the_same_weights_and_train_log(work, tmp_path):
    """A run killed after its step-2 checkpoint and resumed by the same command ends with the weights and the
    train_log.json of an uninterrupted run, train_loss (the whole run's mean) included; only the run time and
    `resumed_from` differ."""
    args = ("--neurons", str(work["sets"]["llama"]), "--max-steps", "4", "--save-steps", "2", "--run-name", "r",
            "--keep-checkpoints")
    out, a = tmp_path / "out", tmp_path / "a"
    train(work, out, *args)
    out.rename(a)  # the resumed run writes to the same --out: its recorded arguments are the same
    ckpt = a / "llama" / "trained" / ".r.ckpt"
    assert (ckpt / "checkpoint-2" / "neuron_deltas.safetensors").is_file()
    assert not (ckpt / "checkpoint-2" / "model.safetensors").exists()  # checkpoints hold the deltas only
    # an interrupted run: killed after its step-2 checkpoint, before the end
    resumed_ckpt = out / "llama" / "trained" / ".r.ckpt"
    resumed_ckpt.mkdir(parents=True)
    shutil.copytree(ckpt / "checkpoint-2", resumed_ckpt / "checkpoint-2")
    shutil.copy(ckpt / "run_args.json", resumed_ckpt / "run_args.json")
    r = train(work, out, *args)
    assert "Resuming from" in r.stdout
    wa = load_file(a / "llama" / "trained" / "r" / "model.safetensors")
    wb = load_file(out / "llama" / "trained" / "r" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la = json.loads((a / "llama" / "trained" / "r" / "train_log.json").read_text())
    lb = json.loads((out / "llama" / "trained" / "r" / "train_log.json").read_text())
    assert lb["resumed_from"] and la["resumed_from"] is None
    # the same per-step losses summed in the same order: equal, up to float rounding at most
    assert lb["train_loss"] == pytest.approx(la["train_loss"], rel=1e-6)
    assert la["train_loss"] == pytest.approx(sum(p["loss"] for p in la["loss_curve"]) / 4, rel=1e-12)
    for log in (la, lb):
        del log["train_runtime_s"], log["resumed_from"], log["train_loss"]
    assert la == lb
    # checkpoints of a run with other arguments are not silently resumed
    shutil.rmtree(out)
    resumed_ckpt.mkdir(parents=True)
    shutil.copytree(ckpt / "checkpoint-2", resumed_ckpt / "checkpoint-2")
    shutil.copy(ckpt / "run_args.json", resumed_ckpt / "run_args.json")
    r = train(work, out, *args[:-3], "--lr", "3e-3", "--run-name", "r", check=False)
    assert r.returncode == 2 and "other arguments" in r.stderr


@pytest.mark.parametrize("mode", [("--neurons", "full"), ("--lora-rank", "2")])
def test_full_and_lora_save_a_loadable_model(work, tmp_path, mode):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "out"
    train(work, out, *mode, "--max-steps", "1", "--warmup", "0")
    name = "en-full" if mode[1] == "full" else "en-lora2"
    d = run_dir(out, "llama", name)
    m = AutoModelForCausalLM.from_pretrained(d)
    assert not any("lora" in n for n, _ in m.named_parameters())  # merged, an ordinary model
    base, new = load_file(work["models"]["llama"] / "model.safetensors"), load_file(d / "model.safetensors")
    changed = [k for k in base if not torch.equal(base[k], new[k])]
    log = json.loads((d / "train_log.json").read_text())
    if mode[1] == "full":
        assert len(changed) == len(base) and log["trainable_parameters"] == log["total_parameters"]
    else:
        assert changed and all("proj" in k for k in changed) and log["trainable_parameters"] < log["total_parameters"]
        assert log["lora"]["rank"] == 2


def test_validation_covers_langs_and_the_target_with_max_length_512(work, tmp_path):
    """--langs en,fr --lang de: perplexity before and after in de (the target, not in --langs), en and fr.
    Before training it is metrics.perplexity of the base model on the first --val-limit lines, at 512 tokens
    per line (a line longer than --cutoff-len is not cut at the cutoff)."""
    from langneurons.data import read_lines
    from langneurons.metrics import perplexity
    from langneurons.model import load_model
    data = Path(shutil.copytree(work["dataset"], tmp_path / "dataset"))
    long_line = " ".join(["Le chat dort sur le tapis et le chien regarde par la fenêtre."] * 12)
    (data / "val" / "fr.txt").write_text(long_line + "\nUne phrase courte.\nEt une troisième.\n", encoding="utf-8")
    out = tmp_path / "out"
    train(work, out, "--neurons", str(work["sets"]["llama"]), "--max-steps", "1", "--warmup", "0", "--dataset", str(data),
          "--lang", "de", "--langs", "en,fr", "--device", "cpu", "--dtype", "float32")
    log = json.loads((run_dir(out, "llama", "de-set_llama") / "train_log.json").read_text())
    val = log["val"]
    assert val["lang"] == "de" and sorted(val["langs"]) == ["de", "en", "fr"] and val["max_length"] == 512
    assert val["lines"] == {"de": 2, "en": 2, "fr": 2}
    assert set(val["before"]) == set(val["after"]) == {"de", "en", "fr"}
    assert val["after"]["de"]["ppl"] != val["before"]["de"]["ppl"]  # the target's text was trained on
    model, tok = load_model(str(work["models"]["llama"]), "cpu", "float32")
    for lang in ("de", "en", "fr"):
        lines = read_lines(data / "val" / f"{lang}.txt")[:2]
        ref = perplexity(model, tok, lines, max_length=512, batch_size=2)  # --micro-batch-size of FAST
        assert val["before"][lang]["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)
        assert val["before"][lang]["tokens"] == ref["tokens"]
        assert val["before"][lang]["loss"] == pytest.approx(math.log(ref["ppl"]), rel=1e-9)
    assert val["before"]["fr"]["tokens"] > 64  # the long line is measured beyond --cutoff-len


def test_bad_inputs_exit_2_and_write_nothing(forked, work, tmp_path):
    empty = tmp_path / "empty_ds"
    shutil.copytree(work["dataset"], empty)
    (empty / "train" / "en.jsonl").write_text("\n")
    misfit = tmp_path / "misfit.json"
    misfit.write_text(json.dumps({"fwd_up": {"7": [1]}}))
    cases = [(("--neurons", str(work["sets"]["llama"]), "--lang", "xx"), "unknown language"),
             (("--neurons", str(misfit)), "layer 7 does not exist"),
             (("--neurons", str(work["sets"]["llama"]), "--lr", "0"), "--lr"),
             (("--neurons", str(work["sets"]["llama"]), "--micro-batch-size", "8"), "--micro-batch-size"),
             (("--neurons", str(tmp_path / "nope.json")), "no such file"),
             # every measured language's validation text is checked before the model loads
             (("--neurons", str(work["sets"]["llama"]), "--langs", "en,fr,zh"), "unknown language 'zh'"),
             (("--neurons", "full", "--langs", "en,fr", "--val-data", str(work["dataset"] / "val" / "en.txt")),
              "--val-data"),
             (("--neurons", str(work["sets"]["llama"]), "--dataset", str(empty)), "empty"),
             (("--neurons", "full", "--report-to", "mlflow"), "--report-to: unknown 'mlflow'"),
             (("--neurons", "full", "--report-to", "none,tensorboard"), "'none' together with a target")]
    # a reporting target whose package is not installed fails before any work (exit 2, nothing written)
    missing = [t for t, mods in (("wandb", ("wandb",)), ("tensorboard", ("tensorboard", "tensorboardX")))
               if not any(importlib.util.find_spec(m) for m in mods)]
    cases += [(("--neurons", "full", "--report-to", t), f"--report-to {t}: the package") for t in missing]
    assert_one_line_errors(forked, work, tmp_path / "out", cases)


def test_report_to_reaches_the_trainer(monkeypatch, tmp_path):
    """--report-to is the Trainer's report_to ('none': no callback); the packages are found by name."""
    from types import SimpleNamespace
    import train as stage
    state = SimpleNamespace(num_processes=1, is_main_process=True)

    def report_to(*flag):
        args = stage.parse_args(["--lang", "en", "--neurons", "full", *flag])
        return stage.training_arguments(args, tmp_path, state, "full", torch.float32, True,
                                        stage.report_targets(args)).report_to
    assert report_to() == [] and report_to("--report-to", "none") == []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in ("tensorboardX", "wandb") else None)
    assert report_to("--report-to", "tensorboard,wandb") == ["tensorboard", "wandb"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(stage.InputError, match="--report-to wandb: the package 'wandb' is not installed"):
        report_to("--report-to", "wandb")


# ---------------------------------------------------------------- training text through datasets

def test_train_data_parquet_packing_sample_size_and_val_data(work, tmp_path):
    import datasets
    texts = [f"Document {i}: " + " ".join(["the cat sleeps on the mat"] * (1 + i % 5)) for i in range(40)]
    datasets.Dataset.from_dict({"body": texts, "n": list(range(40))}).to_parquet(str(tmp_path / "en.parquet"))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"body": t}) + "\n" for t in ("A short line.", "Another one.", "Third.")))
    out = tmp_path / "out"
    common = ("--neurons", str(work["sets"]["llama"]), "--train-data", str(tmp_path / "{lang}.parquet"),
              "--text-column", "body", "--val-data", str(val), "--val-limit", "0", "--sample-size", "24", "--max-steps", "2")
    train(work, out, *common, "--packing", "--cutoff-len", "32", "--run-name", "packed")
    log = json.loads((run_dir(out, "llama", "packed") / "train_log.json").read_text())
    assert log["documents"] == 24 and log["train_data"]["packing"]
    assert log["train_data"]["source"].endswith("en.parquet")
    # packed blocks are full: every micro-batch is all tokens, no padding
    assert log["tokens_seen"] == 2 * 4 * 32 and log["sequences"] > 0
    assert log["val"]["lines"] == {"en": 3}
    # without packing: one sequence per drawn document (all have two tokens), the same draw of 24
    train(work, out, *common, "--run-name", "docs")
    log2 = json.loads((run_dir(out, "llama", "docs") / "train_log.json").read_text())
    assert log2["documents"] == log2["sequences"] == 24 and log2["tokens_seen"] < 2 * 4 * 64
    assert log["train_data"]["id"] == log2["train_data"]["id"]
    assert log["val"]["before"] == log2["val"]["before"]  # same model, same validation text


def test_bad_training_text_exits_2_naming_the_line(forked, work, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine document"}\n{"text": "broken\n')
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text('{"body": "fine document"}\n')
    s = ("--neurons", str(work["sets"]["llama"]))
    cases = [((*s, "--train-data", str(bad)), "bad.jsonl: line 2: corrupt JSON"),
             ((*s, "--train-data", str(nocol)), "no column 'text'"),
             ((*s, "--train-data", "nobody/no-such-dataset"), "no such file or folder"),
             ((*s, "--val-data", str(bad)), "validation text"),
             ((*s, "--pure-bf16", "--dtype", "bfloat16"), "--pure-bf16"),
             (("--neurons", "full", "--pure-bf16", "--dtype", "float32"), "--pure-bf16"),
             ((*s, "--num-proc", "0"), "--num-proc")]
    assert_one_line_errors(forked, work, tmp_path / "out", cases)


# ---------------------------------------------------------------- precision of the full fine-tuning baseline

def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers at |x| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.float().abs().clamp_min(2.0 ** -126))) - 7)


def test_full_finetuning_keeps_float32_masters_unless_pure_bf16(work, tmp_path):
    """A bf16 model with LLM-like weights (std 0.02), lr 5e-5, 3 AdamW steps. The default (float32 masters,
    bf16 autocast) ends where float32 training ends, up to the final bf16 rounding; --pure-bf16 updates the
    bf16 weights in place, and many lr-sized steps round away (the authors' setting)."""
    from transformers import AutoModelForCausalLM
    src = AutoModelForCausalLM.from_pretrained(work["models"]["llama"])
    torch.manual_seed(1)
    with torch.no_grad():
        for p_ in src.parameters():
            if p_.dim() == 2:
                p_.normal_(0, 0.02)
    bf = tmp_path / "bf16"
    src.to(torch.bfloat16).save_pretrained(bf)
    for f in work["models"]["llama"].glob("*token*"):
        shutil.copy(f, bf)
    work = {**work, "models": {"llama": bf}}
    out = tmp_path / "out"
    args = ("--neurons", "full", "--lr", "5e-5", "--warmup", "0", "--max-steps", "3", "--device", "cpu")
    runs = {}
    for name, extra in (("f32", ("--dtype", "float32")), ("mixed", ("--dtype", "bfloat16")),
                        ("pure", ("--dtype", "bfloat16", "--pure-bf16"))):
        train(work, out, *args, *extra, "--run-name", name)
        runs[name] = load_file(run_dir(out, "bf16", name) / "model.safetensors")
        log = json.loads((run_dir(out, "bf16", name) / "train_log.json").read_text())
        assert log["precision"]["master_weights"] == {"f32": "float32", "mixed": "float32", "pure": "bfloat16"}[name]
        assert log["precision"]["saved_dtype"] == ("float32" if name == "f32" else "bfloat16")
        assert all(t.dtype == (torch.float32 if name == "f32" else torch.bfloat16) for t in runs[name].values())
    base = load_file(bf / "model.safetensors")
    f32 = runs["f32"]
    moved = {k: f32[k] != base[k].float() for k in base}  # entries float32 training changes
    n_moved = sum(int(m.sum()) for m in moved.values())
    assert n_moved > 0.5 * sum(t.numel() for t in base.values())

    def off(run):
        """Fraction of entries further from the float32 result than its bf16 rounding (+ a tenth of lr, for
        autocast's gradient noise), and fraction of the float32-moved entries left exactly unchanged."""
        far = sum(int(((run[k].float() - f32[k]).abs() > bf16_ulp(f32[k]) / 2 + 5e-6).sum()) for k in base)
        stuck = sum(int(((run[k] == base[k]) & moved[k]).sum()) for k in base)
        return far / sum(t.numel() for t in base.values()), stuck / n_moved

    rounded = {k: v.to(torch.bfloat16) for k, v in f32.items()}
    far, stuck = off(runs["mixed"])
    _, stuck_rounding = off(rounded)  # what the final rounding alone leaves unchanged
    assert far < 0.01 and abs(stuck - stuck_rounding) < 0.02
    same = sum(int((runs["mixed"][k] == rounded[k]).sum()) for k in base) / sum(t.numel() for t in base.values())
    assert same > 0.97
    far_pure, stuck_pure = off(runs["pure"])
    assert far_pure > 0.1 and stuck_pure > stuck_rounding + 0.15  # lr-sized updates of bf16 weights round away


def test_lora_in_bf16_keeps_float32_masters_and_saves_bf16(work, tmp_path):
    out = tmp_path / "out"
    train(work, out, "--lora-rank", "2", "--max-steps", "1", "--warmup", "0", "--dtype", "bfloat16", "--device", "cpu")
    d = run_dir(out, "llama", "en-lora2")
    log = json.loads((d / "train_log.json").read_text())
    assert log["precision"] == {"requested_dtype": "bfloat16", "master_weights": "float32", "autocast": "bfloat16",
                                "pure_bf16": False, "saved_dtype": "bfloat16"}
    new = load_file(d / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in new.values())
    base = load_file(work["models"]["llama"] / "model.safetensors")  # float32: one rounding of the merged weights
    assert any(not torch.equal(base[k].to(torch.bfloat16), new[k]) for k in base if "proj" in k)
    assert all(torch.equal(base[k].to(torch.bfloat16), new[k]) for k in base if "proj" not in k)
