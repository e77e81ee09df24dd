"""The GPU path (bf16, CUDA kernels, device maps, FSDP): what the CPU tests cannot cover.

Every test is marked `cuda` and skipped without a GPU. LANGNEURONS_CUDA_TESTS_ON_CPU=1 runs the same steps
on the CPU with small sizes (a dry run of bench/gpu_check.sh: it catches typos, not GPU behaviour); the
tests that need CUDA itself (memory statistics, device maps, FSDP) still skip there.
Measured numbers go to the junit XML (record_property), which bench/gpu_check.sh turns into its table."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from bench.random_model import random_config, random_model
from conftest import REPO, free_port, run_script
from langneurons.importance import ImportanceProbe, qk_importance
from langneurons.masking import meta_skeleton, zero_plan
from langneurons.data import pad_batch
from langneurons.metrics import perplexity
from langneurons.model import GROUPS, Geometry, embedded_model_dir, load_model
from langneurons.neurons import random_set, write_neuron_file
from tiny import ARCHS, SENTENCES, save_tiny, tiny_config, tiny_dataset, tiny_model, tiny_tokenizer

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else ("cpu" if os.environ.get("LANGNEURONS_CUDA_TESTS_ON_CPU") else None)
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE is None, reason="needs a GPU")]
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="measures CUDA itself")
BF16 = torch.bfloat16
TOK = tiny_tokenizer()
TEXTS = [s for lang in SENTENCES for s in SENTENCES[lang]]


def run(script: str, *args, **kwargs) -> subprocess.CompletedProcess:
    """run_script that must succeed, skipped on a GPU box without the datasets package."""
    r = run_script(script, *args, **kwargs)
    if r.returncode != 0 and "No module named 'datasets'" in r.stderr:
        pytest.skip(f"{script} needs the datasets package, which is not installed here (carry its wheels)")
    assert r.returncode == 0, f"{' '.join(r.args)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def embedded_available() -> bool:
    try:
        return (embedded_model_dir() / "config.json").is_file()
    except Exception:  # the package that carries it is not installed (as on a lent GPU box)
        return False


def real_shape_model(dtype=torch.float32):
    """The embedded model when it is here, else random weights of its config (bench/gemma-3-270m.config.json);
    on the CPU dry run, two of its layers. Returns (model, tokenizer, which)."""
    if ON_GPU and embedded_available():
        model, tok = load_model("gemma-3-270m", DEVICE, "float32")
        return model.to(dtype), tok, "embedded gemma-3-270m"
    overrides = {} if ON_GPU else dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    model = random_model(random_config(**overrides), dtype).to(DEVICE)
    model.set_attn_implementation("eager")
    return model, TOK, "random weights, gemma-3-270m config" + ("" if ON_GPU else " (2 layers)")


def encode(tok, texts, left=False):
    return pad_batch([tok(t)["input_ids"] for t in texts], tok.pad_token_id, DEVICE, left=left)


# ---------------------------------------------------------------- probing and detection in bf16

@pytest.mark.parametrize("arch", ARCHS + ["real-shape"])
def test_probing_leaves_bf16_logits_unchanged(arch):
    if arch == "real-shape":
        model, tok, _ = real_shape_model(BF16)
    else:
        model, tok = tiny_model(arch).to(DEVICE, BF16), TOK
    model.set_attn_implementation("eager")
    ids, mask = encode(tok, TEXTS[:4], left=True)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        plain = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                                    use_cache=False).last_hidden_state
    seen = {}
    handle = model.get_decoder().register_forward_hook(lambda m, a, o: seen.update(h=o.last_hidden_state.clone()))
    with ImportanceProbe(model) as probe:
        with torch.no_grad():
            during = model(input_ids=ids, attention_mask=mask).logits
        scores = probe(ids, mask)
    handle.remove()
    assert model.config._attn_implementation == "eager"
    assert torch.equal(before, during)
    assert torch.equal(seen["h"], plain)  # the measuring forward itself computes what the model computes
    assert all(torch.isfinite(s).all() for s in scores.values())


def top_sets(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    out = {}
    for g, s in scores.items():
        k = max(1, int(ratio * s.shape[-1]))
        out[g] = torch.zeros(s.shape, dtype=torch.bool).scatter_(-1, s.topk(k, dim=-1).indices, True)
    return out


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gemma3", "real-shape"])
def test_detection_in_bf16_agrees_with_float32(arch, record_property):
    """Per-sentence top sets in bf16 equal float32's except at near-ties: a neuron bf16 takes instead has a
    float32 score within TOL of the float32 threshold (the k-th score), one it leaves out too."""
    tol, ratio = 0.1, 0.05
    if arch == "real-shape":
        m32, tok, which = real_shape_model(torch.float32)
        texts = TEXTS
        if which.startswith("embedded"):
            texts = [l for lang in ("en", "zh", "sw") for l in
                     (REPO / "dataset" / "detect" / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:8]]
    else:
        m32, tok, which, texts = tiny_model(arch).to(DEVICE), TOK, arch, TEXTS
    m16 = copy.deepcopy(m32).to(BF16)
    ids, mask = encode(tok, texts)
    with ImportanceProbe(m32) as probe:
        s32 = probe(ids, mask)
    with ImportanceProbe(m16) as probe:
        s16 = probe(ids, mask)
    a, b = top_sets(s32, ratio), top_sets(s16, ratio)
    same = sum(int((a[g] & b[g]).sum()) for g in GROUPS)
    total = sum(int(a[g].sum()) for g in GROUPS)
    worst = 0.0  # the tolerance every swap needs: |score - threshold| / threshold, float32 scores
    for g in GROUPS:
        s = s32[g].double()
        k = max(1, int(ratio * s.shape[-1]))
        kth = s.topk(k, dim=-1).values[..., -1:].clamp(min=1e-30)
        gap = ((s - kth).abs() / kth)[a[g] ^ b[g]]
        worst = max(worst, float(gap.max()) if gap.numel() else 0.0)
        rel = ((s16[g].double() - s) / s.abs().clamp(min=1e-30))[a[g]]
        record_property(f"{arch}.{g}.median_rel_score_error", float(rel.abs().median()))
    record_property(f"{arch}.model", which)
    record_property(f"{arch}.top_set_overlap", same / total)
    record_property(f"{arch}.max_swap_gap", worst)
    print(f"{which}: bf16 top sets share {same}/{total} = {same / total:.4f} of float32's; "
          f"the widest swap is {worst:.4f} of the threshold")
    assert worst <= tol, f"bf16 swapped neurons {worst:.3f} of the threshold apart (near-ties allowed: {tol})"
    assert same / total > 0.5


def qk_budget(B: int, H: int, T: int, S: int, D: int, chunk_bytes: int) -> int:
    """What qk_importance may hold at once: a few float32 [B,H,T,S] score tensors (scores, their clone,
    the softmax, per-block slices), float32 copies of q/k/v/out, and per channel chunk its buffer (about
    chunk_bytes) plus the product with V, which is D / block-rows times larger in the first, causal block.
    Never D x [B,H,T,S], which the unchunked formula needs. Peak / budget measured on the CPU with the
    profiler: 0.32-0.34 on 1024-token batches of these shapes (right padding, as detection pads)."""
    rows = max(16, -(-T // 8))  # qk_importance's query block
    return 8 * 4 * B * H * T * S + 12 * 4 * B * H * T * D + int(chunk_bytes * (4 + D / rows)) + (64 << 20)


def attention_inputs(B, H, KV, T, D, seed=0, dtype=BF16):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, n, T, D, generator=g).to(DEVICE, dtype) for n in (H, KV, KV))
    keep = torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril()[None, None].expand(B, 1, T, T).clone()
    valid = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    valid[-1, T // 2:] = False  # a padded sentence
    return q, k, v, keep, valid


@needs_cuda
@pytest.mark.parametrize("shape", ["llama-3.1-8b", "gemma-3-270m"])
def test_qk_importance_stays_within_its_memory_budget_on_1024_tokens(shape, record_property):
    B, H, KV, D = {"llama-3.1-8b": (2, 32, 8, 128), "gemma-3-270m": (8, 4, 1, 256)}[shape]
    T = 1024
    q, k, v, keep, valid = attention_inputs(B, H, KV, T, D)
    chunk = 1 << 28
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    qi, ki = qk_importance(q, k, v, keep, valid, D ** -0.5, None, chunk)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    budget = qk_budget(B, H, T, T, D, chunk)
    naive = 4 * B * H * T * T * D
    record_property(f"{shape}.peak_MiB", peak / 2**20)
    record_property(f"{shape}.budget_MiB", budget / 2**20)
    record_property(f"{shape}.seconds", seconds)
    print(f"{shape}: B={B} T={T}: peak {peak / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB, "
          f"unchunked {naive / 2**30:.0f} GiB, {seconds:.2f} s")
    assert peak <= budget
    # chunking changes the memory, not the numbers
    qs, ks = qk_importance(q, k, v, keep, valid, D ** -0.5, None, 1 << 24)
    torch.testing.assert_close(qs, qi, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ks, ki, rtol=1e-4, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_qk_importance_on_the_gpu_equals_the_cpu(softcap):
    q, k, v, keep, valid = attention_inputs(3, 4, 2, 40, 16, dtype=torch.float32)
    qg, kg = qk_importance(q, k, v, keep, valid, 0.25, softcap)
    qc, kc = qk_importance(q.cpu(), k.cpu(), v.cpu(), keep.cpu(), valid.cpu(), 0.25, softcap)
    torch.testing.assert_close(qg.cpu(), qc, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(kg.cpu(), kc, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- deactivation and training in bf16

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    data = tiny_dataset(root / "data")
    models = {}
    for arch, dtype in (("qwen2", BF16), ("llama", BF16), ("llama", torch.float32)):
        d = root / f"{arch}-{str(dtype).split('.')[-1]}"
        tiny_model(arch).to(dtype).save_pretrained(d)
        TOK.save_pretrained(d)
        models[(arch, dtype)] = d
    sets = {}
    for arch in ("qwen2", "llama"):
        nset = random_set(40, Geometry.from_config(tiny_config(arch)), 0, "cuda-test")
        nset["attn_q"][1, :3] = True  # a q bias entry (qwen2) and every kind of projection
        nset["fwd_down"][2, 5] = True
        sets[arch] = (nset, root / f"set_{arch}.json")
        write_neuron_file(sets[arch][1], nset)
    return {"root": root, "data": data, "models": models, "sets": sets}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def test_deactivation_zeroes_exactly_in_bf16(work, tmp_path):
    model = work["models"][("qwen2", BF16)]
    nset, file = work["sets"]["qwen2"]
    out = tmp_path / "out"
    run("deactivation.py", "--model", model, "--dataset", work["data"], "--langs", "en,fr", "--out", out,
        "--device", DEVICE, "--dtype", "bfloat16", "--neurons", f"s={file}", "--measure-ppl")
    base, variant = load_file(model / "model.safetensors"), load_file(out / model.name / "variants" / "s" / "model.safetensors")
    plan = zero_plan(meta_skeleton(tiny_config("qwen2")), nset)
    assert set(base) == set(variant) and any(n.endswith("bias") for n in plan)
    for name, a in base.items():
        b = variant[name]
        assert b.dtype == BF16 == a.dtype
        if name not in plan:
            assert torch.equal(bits(a), bits(b)), name
            continue
        dim, idx = plan[name]
        assert not b.index_select(dim, idx).any(), f"{name}: a selected entry is not zero"
        keep = torch.ones(a.shape[dim], dtype=torch.bool)
        keep[idx] = False
        rest = torch.nonzero(keep).flatten()
        assert torch.equal(bits(a.index_select(dim, rest)), bits(b.index_select(dim, rest))), name
    # the saved variant, reloaded, has the perplexity measured in memory (zeroed, then restored)
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(out / model.name / "variants" / "s", dtype=BF16).to(DEVICE).eval()
    measured = json.loads((out / model.name / "deactivation.json").read_text())
    texts = (work["data"] / "val" / "fr.txt").read_text(encoding="utf-8").splitlines()
    ppl = perplexity(reloaded, TOK, texts, 512, 8, desc="reloaded")["ppl"]
    assert ppl == pytest.approx(measured["sets"]["s"]["ppl"]["fr"]["ppl"], rel=1e-3)
    assert measured["sets"]["s"]["ppl"]["fr"]["ppl"] != measured["results"]["ppl"]["fr"]["ppl"]


TRAIN = ["--lang", "en", "--langs", "en", "--global-batch-size", "4", "--micro-batch-size", "2", "--cutoff-len", "64", "--val-limit", "2",
         "--warmup", "0"]


def test_targeted_training_in_bf16_keeps_every_other_entry(work, tmp_path):
    model = work["models"][("llama", BF16)]
    nset, file = work["sets"]["llama"]
    out = tmp_path / "out"
    run("train.py", "--model", model, "--dataset", work["data"], "--out", out, "--device", DEVICE,
        "--dtype", "bfloat16", "--neurons", file, "--max-steps", "2", "--lr", "1e-2", *TRAIN)
    trained = out / model.name / "trained" / "en-set_llama"
    base, new = load_file(model / "model.safetensors"), load_file(trained / "model.safetensors")
    plan = zero_plan(meta_skeleton(tiny_config("llama")), nset)
    moved = 0
    for name, a in base.items():
        b = new[name]
        assert b.dtype == BF16
        if name not in plan:
            assert torch.equal(bits(a), bits(b)), f"{name} changed"
            continue
        dim, idx = plan[name]
        keep = torch.ones(a.shape[dim], dtype=torch.bool)
        keep[idx] = False
        rest = torch.nonzero(keep).flatten()
        assert torch.equal(bits(a.index_select(dim, rest)), bits(b.index_select(dim, rest))), \
            f"{name}: an entry outside the selected neurons changed"
        moved += int((a.index_select(dim, idx) != b.index_select(dim, idx)).sum())
    assert moved > 0
    log = json.loads((trained / "train_log.json").read_text())
    assert log["device"].startswith(DEVICE) and log["dtype"] == "bfloat16"


def test_full_finetuning_default_precision_changes_weights_as_float32_would(work, tmp_path, record_property):
    """Default bf16 full fine-tuning keeps float32 master weights: the saved bf16 weights are float32
    training's, rounded. The authors' pure bf16 (--pure-bf16) loses updates smaller than half a bf16 step."""
    model = work["models"][("llama", torch.float32)]
    steps = ["--neurons", "full", "--max-steps", "8", "--lr", "2e-4", "--seed", "3", *TRAIN]
    runs = {}
    for name, extra in (("float32", ["--dtype", "float32"]), ("default", ["--dtype", "bfloat16"]),
                        ("pure", ["--dtype", "bfloat16", "--pure-bf16"])):
        run("train.py", "--model", model, "--dataset", work["data"], "--out", tmp_path / name, "--device", DEVICE,
            *steps, *extra)
        runs[name] = load_file(tmp_path / name / model.name / "trained" / "en-full" / "model.safetensors")
    base = load_file(model / "model.safetensors")
    ref = {k: v.to(BF16) for k, v in runs["float32"].items()}  # float32 training, rounded like the saved bf16
    n = sum(v.numel() for v in ref.values())
    frac = lambda pred: sum(int(pred(k).sum()) for k in ref) / n
    moved = frac(lambda k: ref[k] != base[k].to(BF16))
    agree_default = frac(lambda k: runs["default"][k].to(BF16) == ref[k])
    agree_pure = frac(lambda k: runs["pure"][k].to(BF16) == ref[k])
    record_property("moved_by_float32_training", moved)
    record_property("default_equal_to_float32_rounded", agree_default)
    record_property("pure_bf16_equal_to_float32_rounded", agree_pure)
    print(f"float32 training moves {moved:.3f} of the bf16-rounded entries; default bf16 run equals it on "
          f"{agree_default:.3f}, pure bf16 on {agree_pure:.3f}")
    assert moved > 0.4  # the updates are large enough to show in bf16 (0.60 in a CPU simulation)
    assert agree_default > 0.9  # 0.96 in a CPU simulation of float32 masters + bf16 autocast; pure bf16 0.48
    assert agree_pure < agree_default - 0.3


@needs_cuda
def test_fsdp_full_finetuning_equals_a_plain_run(work, tmp_path):
    """accelerate launch --use_fsdp (FULL_SHARD, FULL_STATE_DICT) over the GPUs that are here (one is
    enough to run the FSDP code path: wrapping, sharded optimizer, gathered save)."""
    model = work["models"][("llama", torch.float32)]
    common = ["--model", model, "--dataset", work["data"], "--neurons", "full", "--max-steps", "2", "--lr", "1e-3",
              "--dtype", "float32", *TRAIN]
    n = torch.cuda.device_count()
    launch = (sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", str(n),
              "--main_process_port", str(free_port()), "--fsdp_sharding_strategy", "FULL_SHARD",
              "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_state_dict_type", "FULL_STATE_DICT")
    per_process = str(4 // n) if n in (1, 2, 4) else "1"
    run("train.py", *common, "--out", tmp_path / "fsdp", "--micro-batch-size", per_process, launcher=launch)
    run("train.py", *common, "--out", tmp_path / "plain", "--micro-batch-size", per_process)
    a = load_file(tmp_path / "fsdp" / model.name / "trained" / "en-full" / "model.safetensors")
    b = load_file(tmp_path / "plain" / model.name / "trained" / "en-full" / "model.safetensors")
    base = load_file(model / "model.safetensors")
    assert set(a) == set(b) == set(base)
    for k in base:
        assert not torch.equal(a[k], base[k]), f"{k} did not train under FSDP"
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------- --device auto

@needs_cuda
def test_device_auto_uses_the_gpus_that_are_here(tmp_path, record_property):
    """load_model as detection, deactivation and evaluation call it: bf16 on the GPU; with several GPUs
    the model is spread over all of them (accelerate's balanced map, as transformers' device_map="auto")."""
    from bench.random_model import save_random_model
    path = save_random_model(tmp_path / "random", dtype="float32")
    model, _ = load_model(str(path), "auto", "auto", device_map_auto=True)
    n = torch.cuda.device_count()
    used = {p.device for p in model.parameters()}
    record_property("gpus", n)
    record_property("devices_used", sorted(str(d) for d in used))
    assert model.dtype == BF16
    if n == 1:
        assert used == {torch.device("cuda", 0)}
    else:
        assert {d.index for d in used} == set(range(n)), used


@needs_cuda
def test_every_stage_runs_with_device_auto(work, tmp_path):
    model = save_tiny("qwen2", tmp_path / "tiny-qwen2")
    common = ["--langs", "en,fr", "--dataset", work["data"], "--out", tmp_path / "out", "--device", "auto"]
    run("detection.py", "--model", model, *common, "--ratio", "0.2", "--threshold", "0.5")
    neurons = tmp_path / "out" / "tiny-qwen2" / "neurons"
    run("deactivation.py", "--model", model, *common, "--measure-ppl", "--save-variants", "exclusive_fr")
    run("train.py", "--model", model, *common, "--lang", "fr", "--neurons", neurons / "exclusive_fr.json",
        "--max-steps", "2", "--batch-size", "2", "--micro-batch-size", "1", "--cutoff-len", "32", "--lr", "1e-2")
    trained = tmp_path / "out" / "tiny-qwen2" / "trained" / "fr-exclusive_fr"
    log = json.loads((trained / "train_log.json").read_text())
    assert log["device"].startswith("cuda") and log["dtype"] == "bfloat16"
    run("evaluate.py", "--model", trained, *common, "--tasks", "ppl,mgsm,mmmlu", "--max-new-tokens", "8")
    result = json.loads((tmp_path / "out" / "tiny-qwen2" / "eval" / f"{trained.name}.json").read_text())
    assert set(result["results"]) == {"ppl", "mgsm", "mmmlu"}
