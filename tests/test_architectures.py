"""Fused and Conv1D projections (GPT-NeoX, Phi-3, GPT-2, Falcon in two layouts, BLOOM): neuron slots against the
tensors attention reads, importance against brute force and the reference formula, zeroing, streaming, training
and the scripts; unsupported architectures refused before any work."""
import copy
import inspect
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import run_script
from langneurons.authors import AuthorsProbe
from langneurons.cli import InputError
from langneurons.importance import (ImportanceProbe, _rotate, qk_importance_reference, qk_importance_with_bias,
                                    uses_attention_registry, visible_keys)
from langneurons.interventions import Intervention, intervened, neuron_means_and_tokens
from langneurons.masking import ablation_hooks, zero_neurons, zero_neurons_streaming, zeroed
from langneurons.model import (GROUPS, Geometry, check_architecture, decoder_layers, neuron_slots, projections,
                               weight_dim)
from langneurons.neurons import empty_set, random_set
from langneurons.sparse import attach_deltas, merge_deltas
from test_importance import capture_call, encode, output_of
from tiny import FUSED_ARCHS, SENTENCES, save_tiny, tiny_config, tiny_dataset, tiny_model, tiny_tokenizer

INLINE = ("falcon", "falcon_grouped", "bloom")  # attention computed inside the module, not by the registry


def expected_positions(arch: str, geom: Geometry) -> dict[str, torch.Tensor]:
    """The fused q/k/v rows of each logical neuron, written from each family's own split (not model.py's)."""
    H, KV, D = geom.num_heads, geom.num_kv_heads, geom.head_dim
    pos = torch.arange((H + 2 * KV) * D)
    if arch in ("phi3", "gpt2", "falcon"):  # qkv[..., :H*D], then k, then v (Phi3Attention, GPT-2's split, MQA)
        return {"q": pos[:H * D], "k": pos[H * D:(H + KV) * D], "v": pos[(H + KV) * D:]}
    rep = H // KV  # view(KV, rep + 2, D): gpt_neox/bloom [H, 3, D], Falcon's new_decoder_architecture grouped
    grid = pos.view(KV, rep + 2, D)
    return {"q": grid[:, :rep].flatten(), "k": grid[:, rep].flatten(), "v": grid[:, rep + 1].flatten()}


def expected_zero(model, nset) -> dict[str, torch.Tensor]:
    """{param name: bool mask of the entries zeroing `nset` sets to 0}, from expected_positions and each
    module's storage (nn.Linear [out, in], Conv1D [in, out])."""
    arch = model.config.model_type
    arch = "falcon_grouped" if arch == "falcon" and model.config.new_decoder_architecture else arch
    geom = Geometry.from_config(model.config)
    names = {id(m): n for n, m in model.named_modules()}
    params = dict(model.named_parameters())
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params.items()}
    fused = expected_positions(arch, geom)
    I = geom.intermediate_size

    def mark(mod, side, rows):
        d = weight_dim(mod, side)
        masks[names[id(mod)] + ".weight"].index_fill_(d, rows, True)
        if side == "out" and mod.bias is not None:
            masks[names[id(mod)] + ".bias"][rows] = True

    for li, layer in enumerate(decoder_layers(model)):
        p = projections(layer)
        for g in GROUPS:
            k = torch.nonzero(nset[g][li]).flatten()
            if not k.numel():
                continue
            if g in ("attn_q", "attn_k", "attn_v"):
                mark(p["qkv"], "out", fused[g[-1]][k])
            elif g == "attn_o":
                mark(p["o"], "in", k)
            elif g == "fwd_down":
                mark(p["down"], "in", k)
            elif "gate_up" in p:  # Phi-3: [gate | up]
                mark(p["gate_up"], "out", torch.cat([k, I + k]))
            else:
                mark(p["up"], "out", k)
    return masks


class Recording(ImportanceProbe):
    """Records what every layer's attention computes with (query, key, value after rotary, mask, bias)."""

    def query_key_importance(self, module, query, key, value, attention_mask, scaling, softcap, bias=None):
        self.calls = getattr(self, "calls", []) + [(module, query, key, value, attention_mask, scaling, softcap,
                                                   bias)]
        super().query_key_importance(module, query, key, value, attention_mask, scaling, softcap, bias=bias)


def one_neuron(geom: Geometry, group: str, layer: int, k: int):
    s = empty_set(geom)
    s[group][layer, k] = True
    return s


@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_slots_are_the_rows_attention_reads(arch):
    """Every size from the config, and neuron_slots' q/k/v rows of the fused output are, after the module's own
    rotary, exactly the query/key/value the attention computes with; inline attention (Falcon, BLOOM) recomputed
    from them gives exactly the input of the output projection."""
    model = tiny_model(arch)
    geom = Geometry.from_config(model.config)
    assert geom.intermediate_size == {"gpt2": 256, "bloom": 256}.get(arch, 96)
    assert geom.num_kv_heads == {"phi3": 2, "falcon": 1, "falcon_grouped": 2}.get(arch, 4)
    ids, mask = encode(SENTENCES["en"][:2])
    seen, handles = {}, []
    for i, layer in enumerate(decoder_layers(model)):
        p = projections(layer)
        handles.append(p["qkv"].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("fused", i), o)))
        handles.append(p["o"].register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("o_in", i), a[0])))
        handles.append(p["attn"].register_forward_pre_hook(
            lambda m, a, k, i=i: seen.__setitem__(("rotary", i), inspect.signature(m.forward).bind_partial(
                *a, **k).arguments.get("position_embeddings")), with_kwargs=True))
    with Recording(model, groups=("attn_q", "attn_k")) as probe:
        probe(ids, mask)
    for h in handles:
        h.remove()
    assert len(probe.calls) == geom.num_layers
    for i, (module, q, k, v, am, scaling, softcap, bias) in enumerate(probe.calls):
        slots = neuron_slots(decoder_layers(model)[i], geom, model.config)
        fused = seen[("fused", i)]
        for group, seen_x in (("attn_q", q), ("attn_k", k), ("attn_v", v)):
            slot = slots[group][0]
            assert slot.module is projections(decoder_layers(model)[i])["qkv"]
            assert torch.equal(slot.index, expected_positions(arch, geom)[group[-1]])
            heads = fused[..., slot.index].view(*fused.shape[:2], -1, geom.head_dim).transpose(1, 2)
            if group != "attn_v":
                heads = _rotate(module, heads, seen[("rotary", i)])
            torch.testing.assert_close(heads, seen_x, rtol=0, atol=1e-6)
        if arch in INLINE:  # the recomputation is the module's attention
            keep = visible_keys(am, q.shape[2], k.shape[2], q.device)
            rep = q.shape[1] // k.shape[1]
            s = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scaling
            s = s + (0 if bias is None else bias[:, :, None, :])
            out = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v.repeat_interleave(rep, 1)
            o_in = out.transpose(1, 2).reshape(seen[("o_in", i)].shape)
            torch.testing.assert_close(o_in, seen[("o_in", i)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_ffn_value_and_output_importance_equal_ablation(arch):
    """Zero one FFN channel (up side, down side), one value row of the fused tensor (its bias entry included) or
    one output-projection column in the weights and measure the change at the model's own modules."""
    model = tiny_model(arch)
    geom = Geometry.from_config(model.config)
    ids, mask = encode(SENTENCES["fr"][:1])
    with ImportanceProbe(model, groups=("fwd_up", "fwd_down", "attn_v", "attn_o")) as probe:
        scores = probe(ids, mask)
    for li, layer in enumerate(decoder_layers(model)):
        p = projections(layer)
        margs, mkw = capture_call(p["mlp"], model, ids)
        aargs, akw = capture_call(p["attn"], model, ids)
        base_mlp = output_of(p["mlp"], p["mlp"], margs, mkw)
        base_o, base_y = output_of(p["o"], p["attn"], aargs, akw, pre=True), output_of(p["o"], p["attn"], aargs, akw)
        for k in range(li, geom.intermediate_size, 9):
            for g in ("fwd_up", "fwd_down"):
                with zeroed(model, one_neuron(geom, g, li, k)):
                    change = (base_mlp - output_of(p["mlp"], p["mlp"], margs, mkw)).norm()
                torch.testing.assert_close(change, scores[g][0, li, k], rtol=1e-4, atol=1e-6)
        for r in range(geom.group_size("attn_v")):
            with zeroed(model, one_neuron(geom, "attn_v", li, r)):
                change = (base_o - output_of(p["o"], p["attn"], aargs, akw, pre=True)).norm()
            torch.testing.assert_close(change, scores["attn_v"][0, li, r], rtol=1e-4, atol=1e-6)
        for k in range(li, geom.group_size("attn_o"), 5):
            with zeroed(model, one_neuron(geom, "attn_o", li, k)):
                change = (base_y - output_of(p["o"], p["attn"], aargs, akw)).norm()
            torch.testing.assert_close(change, scores["attn_o"][0, li, k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_query_key_importance_equals_the_reference_formula(arch):
    """Padded batch; BLOOM's alibi as a bias the formula adds to the scores. GPT-2 and BLOOM have no rotary, so
    the row score (the q/k rows deactivation zeroes) equals the channel score."""
    model = tiny_model(arch)
    ids, mask = encode(SENTENCES["de"][:3])
    with Recording(model, groups=("attn_q", "attn_k")) as probe:
        scores = probe(ids, mask)
    for li, (module, q, k, v, am, scaling, softcap, bias) in enumerate(probe.calls):
        keep = visible_keys(am, q.shape[2], k.shape[2], q.device)
        if bias is None:
            ref = qk_importance_reference(q, k, v, keep, mask.bool(), scaling, softcap)
        else:
            ref = qk_importance_with_bias(q, k, v, keep, mask.bool(), scaling, bias, reference=True)
        torch.testing.assert_close(scores["attn_q"][:, li], ref[0], rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(scores["attn_k"][:, li], ref[1], rtol=1e-3, atol=1e-6)
    if arch in ("gpt2", "bloom"):
        with ImportanceProbe(model, groups=("attn_q", "attn_k"), qk_score="row") as probe:
            rows = probe(ids, mask)
        for g in ("attn_q", "attn_k"):
            torch.testing.assert_close(rows[g], scores[g], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_query_key_row_importance_equals_zeroing_the_fused_rows(arch):
    """--qk-score row: zero one query (key) row of the fused tensor, its bias entry included, replay the attention
    module and measure the change of the output projection's input: the row's score (a key row's change spans
    every head reading it)."""
    model = tiny_model(arch)
    geom = Geometry.from_config(model.config)
    ids, mask = encode(SENTENCES["en"][4:5])
    with ImportanceProbe(model, groups=("attn_q", "attn_k"), qk_score="row") as probe:
        scores = probe(ids, mask)
    for li, layer in enumerate(decoder_layers(model)):
        p = projections(layer)
        args, kwargs = capture_call(p["attn"], model, ids)
        base = output_of(p["o"], p["attn"], args, kwargs, pre=True)
        for g in ("attn_q", "attn_k"):
            for k in range(li, geom.group_size(g), 7):
                with zeroed(model, one_neuron(geom, g, li, k)):
                    change = (base - output_of(p["o"], p["attn"], args, kwargs, pre=True)).norm()
                torch.testing.assert_close(change, scores[g][0, li, k], rtol=1e-3, atol=1e-6)


def test_alibi_bias_channel_equals_the_formula_with_the_bias_added():
    """qk_importance_with_bias against the formula written with the bias inside the scores (grouped kv heads)."""
    torch.manual_seed(0)
    B, H, KV, T, D = 2, 4, 2, 7, 3
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, KV, T, D), torch.randn(B, KV, T, D)
    bias = torch.randn(B, H, T)
    keep = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)
    valid = torch.ones(B, T, dtype=torch.bool)
    got = qk_importance_with_bias(q, k, v, keep, valid, 0.5, bias)
    n2q, n2k = torch.zeros(B, H, D), torch.zeros(B, KV, D)
    for h in range(H):
        g = h // (H // KV)
        attend = lambda qq, kk: torch.softmax((qq @ kk.transpose(-1, -2) * 0.5 + bias[:, h, None, :])
                                              .masked_fill(~keep[:, 0], float("-inf")), -1) @ v[:, g]
        base = attend(q[:, h], k[:, g])
        for d in range(D):
            q2, k2 = q[:, h].clone(), k[:, g].clone()
            q2[..., d], k2[..., d] = 0, 0
            n2q[:, h, d] = (base - attend(q2, k[:, g])).square().sum((1, 2))
            n2k[:, g, d] += (base - attend(q[:, h], k2)).square().sum((1, 2))
    torch.testing.assert_close(got[0], n2q.sqrt().reshape(B, -1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[1], n2k.sqrt().reshape(B, -1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_zeroing_paths_agree_and_touch_only_the_listed_entries(arch):
    """Weights == ablation hooks == interventions' zero; the fused tensors change exactly at the listed rows
    (bit-identical elsewhere)."""
    base = tiny_model(arch)
    geom = Geometry.from_config(base.config)
    nset = random_set(60, geom, 3, "fused")
    ids, mask = encode(SENTENCES["en"][:2])
    with torch.no_grad():
        with ablation_hooks(base, nset):
            hooked = base(input_ids=ids, attention_mask=mask).logits
        with intervened(base, nset, Intervention("zero")):
            intervention = base(input_ids=ids, attention_mask=mask).logits
        model = copy.deepcopy(base)
        zero_neurons(model, nset)
        weights = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(hooked, weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(intervention, weights, rtol=0, atol=1e-6)
    assert not torch.allclose(weights, base(input_ids=ids, attention_mask=mask).logits.detach())
    exp = expected_zero(base, nset)
    before, after = dict(base.named_parameters()), dict(model.named_parameters())
    for n, m in exp.items():
        assert torch.equal(after[n][~m], before[n][~m]), n
        assert (after[n][m] == 0).all(), n


@pytest.mark.parametrize("arch", ["gpt_neox", "phi3", "falcon_grouped"])
def test_means_and_scale_read_the_fused_rows(arch):
    """mean=L's means of attn_q/attn_k/attn_v are the means of their fused rows (positions from each family's own
    split) over every token; scale=A multiplies exactly those rows of the fused output, the others bit-identical."""
    model = tiny_model(arch)
    geom = Geometry.from_config(model.config)
    texts = SENTENCES["de"][:3]
    pos = expected_positions(arch, geom)
    layer = 2
    qkv = projections(decoder_layers(model)[layer])["qkv"]
    outs = []
    h = qkv.register_forward_hook(lambda m, a, o: outs.append(o.detach()[0].clone()))
    means, tokens = neuron_means_and_tokens(model, tiny_tokenizer(), texts, 64, 1)  # one text a batch: no padding
    h.remove()
    every = torch.cat(outs).double()
    assert tokens == every.shape[0]
    for g in ("attn_q", "attn_k", "attn_v"):
        torch.testing.assert_close(means[g][layer].double(), every[:, pos[g[-1]]].mean(0), rtol=1e-5, atol=1e-6)
    nset = empty_set(geom)
    for g, ks in (("attn_q", [0, 17, 40]), ("attn_k", [3]), ("attn_v", [1, geom.group_size("attn_v") - 1])):
        nset[g][layer, ks] = True
    sel = torch.cat([pos[g[-1]][torch.nonzero(nset[g][layer]).flatten()] for g in ("attn_q", "attn_k", "attn_v")])
    ids, mask = encode(texts)
    got = []
    record = lambda m, a, o: got.append(o.detach().clone())
    with torch.no_grad():
        h = qkv.register_forward_hook(record)
        model(input_ids=ids, attention_mask=mask)
        h.remove()
        with intervened(model, nset, Intervention("scale", alpha=3.0)):
            h = qkv.register_forward_hook(record)  # after the intervention's hook: reads what it left
            model(input_ids=ids, attention_mask=mask)
            h.remove()
    base, scaled = got
    other = torch.ones(base.shape[-1], dtype=torch.bool)
    other[sel] = False
    torch.testing.assert_close(scaled[..., sel], base[..., sel] * 3.0, rtol=0, atol=1e-6)
    assert torch.equal(scaled[..., other], base[..., other])


@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_streamed_variant_equals_the_in_memory_one_and_reloads(arch, tmp_path):
    src = save_tiny(arch, tmp_path / "src")
    config = AutoConfig.from_pretrained(src)
    geom = Geometry.from_config(config)
    nset = random_set(50, geom, 5, "stream")
    zero_neurons_streaming(src, tmp_path / "streamed", nset, geom)
    model = AutoModelForCausalLM.from_pretrained(src)
    zero_neurons(model, nset)
    model.save_pretrained(tmp_path / "memory")
    a, b = load_file(tmp_path / "streamed" / "model.safetensors"), load_file(tmp_path / "memory" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    for n, p in reloaded.state_dict().items():
        assert torch.equal(p, model.state_dict()[n]), n


@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_neuron_training_changes_only_the_selected_entries(arch, tmp_path):
    """Deltas on fused and Conv1D tensors: a few optimizer steps, merged: every entry outside the selection is
    bit-identical, selected ones moved; the merged model saves and reloads with AutoModelForCausalLM."""
    base = tiny_model(arch)
    geom = Geometry.from_config(base.config)
    nset = random_set(60, geom, 7, "train")
    model = copy.deepcopy(base)
    attach_deltas(model, nset)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids, mask = encode(SENTENCES["fr"][:2])
    for _ in range(3):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        trained_logits = model(input_ids=ids, attention_mask=mask).logits
    assert merge_deltas(model) > 0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, trained_logits,
                                   rtol=1e-4, atol=1e-4)
    exp = expected_zero(base, nset)
    before, after = dict(base.named_parameters()), dict(model.named_parameters())
    moved = 0
    for n, m in exp.items():
        assert torch.equal(after[n][~m], before[n][~m]), n
        moved += int((after[n][m] != before[n][m]).sum())
    assert moved > 0
    model.save_pretrained(tmp_path / "trained")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    for n, p in reloaded.state_dict().items():
        assert torch.equal(p, model.state_dict()[n]), n


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_four_stages_through_their_command_lines(arch, tmp_path):
    """detection -> deactivation (in memory and --streaming variants) -> neuron training -> evaluation on a fused
    model (GPT-NeoX) and a Conv1D one (GPT-2)."""
    model = save_tiny(arch, tmp_path / f"tiny-{arch}")
    data = tiny_dataset(tmp_path / "data", langs=("en", "fr"))
    out = tmp_path / "out"
    common = ["--langs", "en,fr", "--dataset", data, "--out", out]
    env = {"OMP_NUM_THREADS": "1"}
    run_script("detection.py", "--model", model, *common, "--ratio", "0.2", "--threshold", "0.5", env=env, check=True)
    neurons = out / model.name / "neurons"
    assert json.loads((neurons / "stats.json").read_text())["sets"]["shared"]["size"] > 0
    run_script("deactivation.py", "--model", model, *common, "--measure-ppl", "--save-variants", "shared",
               "--streaming", env=env, check=True)
    variant = out / model.name / "variants" / "shared"
    AutoModelForCausalLM.from_pretrained(variant)
    run_script("train.py", "--model", model, *common, "--lang", "fr", "--neurons", neurons / "exclusive_fr.json",
               "--max-steps", "2", "--batch-size", "2", "--micro-batch-size", "1", "--cutoff-len", "32", "--lr", "1e-2",
               env=env, check=True)
    trained = next(p for p in (out / model.name / "trained").iterdir() if not p.name.startswith("."))
    run_script("evaluate.py", "--model", trained, *common, "--tasks", "ppl,mgsm", "--max-new-tokens", "4",
               env=env, check=True)
    assert any((out / model.name / "eval").glob("*.json"))


# ---------------------------------------------------------------- refusal

def _save_unsupported(kind: str, path):
    cfg = {"mamba": dict(model_type="mamba", hidden_size=32, num_hidden_layers=2, state_size=4, vocab_size=259),
           # fused query/key/value whose layout this tool does not know
           "gpt_bigcode": dict(model_type="gpt_bigcode", n_embd=32, n_layer=2, n_head=4, vocab_size=259),
           # an encoder's layers are not decoder blocks (BertLMHeadModel is a causal LM class)
           "bert": dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, vocab_size=259, is_decoder=True)}[kind]
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("kind,why", [("mamba", "no attention"), ("gpt_bigcode", "no known layout"),
                                      ("bert", "no decoder layers")])
def test_unsupported_architectures_are_refused_at_check_time(kind, why, tmp_path):
    path = _save_unsupported(kind, tmp_path / kind)
    with pytest.raises(InputError, match=f"model type '{kind}' is not supported:.*{why}"):
        check_architecture(AutoConfig.from_pretrained(path), str(path))


def test_gpt2_cross_attention_layers_are_not_neurons():
    """GPT-2 built with add_cross_attention has cross-attention blocks that a causal LM run never calls (no
    encoder states): its neurons and every importance are those of the same weights without them."""
    cfg = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=259, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", **cfg)).eval()
    cross = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", add_cross_attention=True, **cfg)).eval()
    missing = cross.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all("crossattention" in k or "ln_cross_attn" in k for k in missing)
    check_architecture(cross.config, "tiny-gpt2-cross")
    assert Geometry.from_config(cross.config) == Geometry.from_config(plain.config)
    ids, mask = encode(SENTENCES["en"][:2] + SENTENCES["fr"][:1])
    with torch.no_grad():
        with ImportanceProbe(plain) as p:
            want = p(ids, mask)
        with ImportanceProbe(cross) as p:
            got = p(ids, mask)
    for g in GROUPS:
        torch.testing.assert_close(torch.stack(list(got[g])), torch.stack(list(want[g])), rtol=0, atol=0)


def test_bloom_slow_but_exact_is_refused():
    """BLOOM with slow_but_exact and pretraining_tp > 1 multiplies slices of its dense weights directly: the
    hooks on those modules would never run, so it is refused (the same model without slow_but_exact is not)."""
    cfg = dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=259, pretraining_tp=2)
    with pytest.raises(InputError, match="model type 'bloom' is not supported: slow_but_exact"):
        check_architecture(AutoConfig.for_model("bloom", slow_but_exact=True, **cfg), "tiny-bloom")
    check_architecture(AutoConfig.for_model("bloom", slow_but_exact=False, **cfg), "tiny-bloom")


@pytest.mark.parametrize("script,extra", [("detection.py", []), ("deactivation.py", []),
                                          ("train.py", ["--lang", "fr", "--neurons", "full"]),
                                          ("evaluate.py", ["--tasks", "ppl"])])
def test_every_stage_refuses_an_unsupported_model_in_one_line(forked, script, extra, tmp_path):
    model = _save_unsupported("mamba", tmp_path / "tiny-mamba")
    data = tiny_dataset(tmp_path / "data")
    out = tmp_path / "out"
    r = forked(script, "--model", model, "--langs", "en,fr", "--dataset", data, "--out", out, *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "model type 'mamba' is not supported" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not out.exists() or not any(p for p in out.rglob("*") if p.is_file())


def test_what_inline_attention_cannot_score_is_refused_before_any_forward():
    """Falcon with alibi: no q/k score (the other groups work); the authors' q/k and bidirectional attention need an
    attention function, which Falcon and BLOOM do not call."""
    alibi = tiny_model("falcon", alibi=True)
    with pytest.raises(InputError, match="Falcon with alibi"):
        ImportanceProbe(alibi, groups=("attn_q",))
    ids, mask = encode(SENTENCES["en"][:1])
    with ImportanceProbe(alibi, groups=("fwd_up", "attn_v")) as probe:
        assert set(probe(ids, mask)) == {"fwd_up", "attn_v"}
    for arch in ("falcon", "bloom"):
        # transformers 5.25 moved Falcon onto the attention registry: there the authors' probe reads it like any
        # other model; inline attention (and BLOOM's alibi, on either path) is refused
        refused = arch == "bloom" or not uses_attention_registry(tiny_model(arch))
        for kw in (dict(authors_groups=("attn_k",)), dict(authors_groups=("fwd_up",), attention="bidirectional")):
            if refused:
                with pytest.raises(InputError, match="attn_q/attn_k and --authors-attention bidirectional"):
                    AuthorsProbe(tiny_model(arch), **kw)
            else:
                AuthorsProbe(tiny_model(arch), **kw)
        with AuthorsProbe(tiny_model(arch), authors_groups=("fwd_up", "attn_o")) as probe:
            authors, _ = probe(ids, mask)
        assert set(authors) == {"fwd_up", "attn_o"}


@pytest.mark.parametrize("arch", ["phi3", "gpt2"])
def test_authors_ffn_score_reads_the_up_half_of_a_fused_gate_up(arch):
    """The authors' fwd_up score is sum |up output| over tokens: Phi-3's up is the second half of gate_up_proj
    ([gate | up]), GPT-2's the Conv1D c_fc."""
    model = tiny_model(arch)
    I = Geometry.from_config(model.config).intermediate_size
    ids, mask = encode(SENTENCES["fr"][:1])
    seen = {}
    p = projections(decoder_layers(model)[1])
    up = p.get("gate_up", p.get("up"))
    h = up.register_forward_hook(lambda m, a, o: seen.__setitem__("up", o[..., -I:]))
    with AuthorsProbe(model, authors_groups=("fwd_up",)) as probe:
        authors, _ = probe(ids, mask)
    h.remove()
    torch.testing.assert_close(authors["fwd_up"][0, 1], seen["up"][0].abs().sum(0), rtol=1e-5, atol=1e-6)


def test_geometry_of_a_fused_config_needs_no_intermediate_size():
    """GPT-2 spells the FFN width n_inner (None: 4 * n_embd), Falcon ffn_hidden_size, BLOOM has none."""
    assert Geometry.from_config(tiny_config("gpt2", n_inner=80)).intermediate_size == 80
    assert Geometry.from_config(tiny_config("falcon", ffn_hidden_size=40)).intermediate_size == 40
    assert Geometry.from_config(tiny_config("falcon", multi_query=False)).num_kv_heads == 4
