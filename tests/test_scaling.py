"""Scaling out without GPUs: where `--device auto` puts the modules of a model too large for one GPU
(accelerate's device map on a meta-device skeleton with fake GPU budgets), which stages ask for it, and the
multi-process recipes of docs/gpu.md and docs/training.md run in their exact command shape with two CPU processes (gloo).

On the CPU `accelerate launch` starts several processes only with `--multi_gpu` (on a machine with several
GPUs, `--num_processes N` implies it). FSDP through accelerate refuses the CPU ("no available devices"),
and DeepSpeed is not installed here: both are covered by tests/test_cuda.py on a GPU."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

import langneurons.model as lm
from bench.random_model import random_config
from conftest import REPO, SHARED_DATA, free_port, run_script
from langneurons.masking import meta_skeleton, zero_plan
from langneurons.model import Geometry, auto_device_map
from langneurons.neurons import random_set, read_neuron_file, write_neuron_file
from tiny import save_tiny, tiny_config, tiny_dataset

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two processes on the CPU share its cores
LAUNCH = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2")
GiB = 2 ** 30


def placement(config, dtype, budget):
    """(device map, parameter bytes per device) of `config` under `budget`."""
    dmap = auto_device_map(config, dtype, budget)
    skeleton = meta_skeleton(config)
    unique = {id(p) for p in skeleton.parameters()}  # a tied tensor counts once
    per_device: dict = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        owners = [m for m in dmap if name == m or name.startswith(m + ".")]
        assert len(owners) == 1, f"{name} is placed {len(owners)} times"
        if id(p) in unique:
            unique.discard(id(p))
            dev = dmap[owners[0]]
            per_device[dev] = per_device.get(dev, 0) + p.numel() * torch.finfo(dtype).bits // 8
    return dmap, per_device


def whole_blocks(dmap) -> bool:
    """No decoder block is split between devices (its residual stream must stay on one)."""
    return not any(".layers." in m and m.split(".layers.")[1].count(".") for m in dmap)


@pytest.mark.skipif(not (SHARED_DATA / "configs" / "llama-3.1-8b.json").is_file(), reason="shared data absent")
def test_llama_8b_is_spread_over_four_fake_gpus():
    cfg = json.loads((SHARED_DATA / "configs" / "llama-3.1-8b.json").read_text())
    from transformers import AutoConfig
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    budget = {i: 6 * GiB for i in range(4)}  # 16 GB of bf16 weights, four GPUs of 6 GB: no one holds it
    dmap, per_device = placement(config, torch.bfloat16, budget)
    assert set(per_device) == {0, 1, 2, 3}
    assert all(per_device[d] <= budget[d] for d in per_device)
    assert whole_blocks(dmap)
    assert sum(per_device.values()) > 14.9 * GiB  # all 8.03B parameters on the four GPUs
    # blocks keep their order along the devices (the forward hops GPU 0 -> 1 -> 2 -> 3 once)
    layer_devices = [dmap[f"model.layers.{i}"] for i in range(config.num_hidden_layers)]
    assert layer_devices == sorted(layer_devices)
    # more than all GPUs hold: the rest continues on the CPU
    dmap, per_device = placement(config, torch.bfloat16, {0: 3 * GiB, 1: 3 * GiB, "cpu": 64 * GiB})
    assert set(per_device) == {0, 1, "cpu"} and whole_blocks(dmap)


def test_tied_embedding_model_is_spread_and_keeps_its_tie():
    config = random_config()  # gemma-3-270m: the 262k x 640 embedding is tied to the LM head
    dmap, per_device = placement(config, torch.bfloat16, {0: 400 * 2**20, 1: 400 * 2**20, 2: 400 * 2**20})
    assert len(per_device) >= 2 and whole_blocks(dmap)
    head = [m for m in dmap if m == "lm_head" or m.startswith("lm_head")]
    assert all(dmap[m] == dmap["model.embed_tokens"] for m in head)  # one tensor, one device


def test_load_model_passes_the_map_when_there_are_several_gpus(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    model_dir = save_tiny("llama", tmp_path / "llama")
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    fake_gpus = lambda config, dtype: auto_device_map(config, dtype, {0: 200_000, 1: 200_000, "cpu": 10**9})
    monkeypatch.setattr(lm, "auto_device_map", fake_gpus)
    real = AutoModelForCausalLM.from_pretrained

    def spy(path, **kw):
        seen.update(kw)
        m = real(path, dtype=kw["dtype"])  # built on the CPU: the GPUs are pretend
        m.to = lambda *a, **k: m
        return m
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    lm.load_model(str(model_dir), "auto", "auto", device_map_auto=True)
    assert seen["dtype"] == torch.bfloat16 and {0, 1} <= set(seen["device_map"].values())
    seen.clear()
    lm.load_model(str(model_dir), "auto", "auto")  # training: one device per process, no map
    assert "device_map" not in seen
    seen.clear()
    lm.load_model(str(model_dir), "cpu", "auto", device_map_auto=True)  # an explicit device wins
    assert "device_map" not in seen


class Loaded(Exception):
    pass


@pytest.mark.parametrize("stage,wants_map", [("detection", True), ("deactivation", True), ("evaluate", True),
                                             ("train", False)])
def test_every_stage_that_loads_a_model_asks_for_the_map(stage, wants_map, tmp_path, monkeypatch):
    model_dir = save_tiny("llama", tmp_path / "llama")
    data = tiny_dataset(tmp_path / "data")
    nset = random_set(5, Geometry.from_config(tiny_config("llama")), 0, "x")
    write_neuron_file(tmp_path / "s.json", nset)
    args = {"detection": [], "deactivation": ["--neurons", str(tmp_path / "s.json"), "--measure-ppl"],
            "evaluate": ["--tasks", "ppl"], "train": ["--lang", "en", "--neurons", str(tmp_path / "s.json")]}[stage]
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"stage_{stage}", REPO / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # as an import would: dataclasses look their module up
    spec.loader.exec_module(module)
    calls = []

    def spy(*a, **kw):
        calls.append(kw)
        raise Loaded
    monkeypatch.setattr(module, "load_model", spy)
    monkeypatch.setattr(sys, "argv", [f"{stage}.py", "--model", str(model_dir), "--dataset", str(data),
                                      "--langs", "en,fr", "--out", str(tmp_path / "out"), *args])
    with pytest.raises(Loaded):
        module.main()
    assert bool(calls[0].get("device_map_auto")) == wants_map


# ---------------------------------------------------------------- the launch recipes of docs/gpu.md, two CPU processes

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling")
    return save_tiny("qwen2", root / "model"), tiny_dataset(root / "data"), root


def test_detection_through_accelerate_launch_gives_the_files_of_one_process(tiny, tmp_path):
    model, data, _ = tiny
    common = ["--model", model, "--dataset", data, "--langs", "en,fr", "--ratio", "0.1", "--device", "cpu"]
    run_script("detection.py", *common, "--out", tmp_path / "one", env=ONE_THREAD, check=True)
    accelerate = (*LAUNCH, "--main_process_port", free_port())
    two = run_script("detection.py", *common, "--out", tmp_path / "two", launcher=accelerate, env=ONE_THREAD,
                     check=True)
    assert "split over 2 processes" in two.stdout
    d1, d2 = tmp_path / "one" / "model" / "neurons", tmp_path / "two" / "model" / "neurons"
    for f in d1.iterdir():
        if f.name != "meta.json":
            assert f.read_bytes() == (d2 / f.name).read_bytes(), f.name


def test_ddp_training_through_accelerate_launch_keeps_unselected_entries(tiny, tmp_path):
    model, data, root = tiny
    config = tiny_config("qwen2")
    nset = random_set(30, Geometry.from_config(config), 2, "ddp")
    write_neuron_file(tmp_path / "s.json", nset)
    # batch 4 = micro 1 x 2 accumulation steps x 2 processes
    run_script("train.py", "--model", model, "--dataset", data, "--out", tmp_path / "out", "--lang", "en",
               "--langs", "en", "--neurons", tmp_path / "s.json", "--device", "cpu", "--max-steps", "2",
               "--global-batch-size", "4", "--micro-batch-size", "1", "--lr", "1e-2", "--cutoff-len", "64",
               "--val-limit", "2", launcher=(*LAUNCH, "--main_process_port", free_port()), env=ONE_THREAD, check=True)
    trained = tmp_path / "out" / "model" / "trained" / "en-s"
    log = json.loads((trained / "train_log.json").read_text())
    assert log["world_size"] == 2 and log["gradient_accumulation_steps"] == 2
    base, new = load_file(model / "model.safetensors"), load_file(trained / "model.safetensors")
    plan = zero_plan(meta_skeleton(config), read_neuron_file(tmp_path / "s.json", Geometry.from_config(config))[0])
    for name, a in base.items():
        b = new[name]
        if name not in plan:
            assert torch.equal(a, b), name
            continue
        dim, idx = plan[name]
        rest = torch.tensor([i for i in range(a.shape[dim]) if i not in set(idx.tolist())], dtype=torch.long)
        assert torch.equal(a.index_select(dim, rest), b.index_select(dim, rest)), name
        assert not torch.equal(a.index_select(dim, idx), b.index_select(dim, idx)), name
