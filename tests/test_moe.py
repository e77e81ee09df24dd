"""Mixture-of-experts decoders (langneurons/moe.py, docs/method.md section 1): expert-channel importance equals
brute-force ablation, unrouted experts score 0, deactivation and training touch only the listed expert slices
(router and everything else bit-identical), weights == hooks == intervention, streamed == in-memory, and the
stages run end to end on a tiny MoE."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_script
from tiny import MOE_ARCHS, save_tiny, tiny_dataset, tiny_model

from langneurons import moe
from langneurons.importance import ImportanceProbe
from langneurons.masking import ablation_hooks, zero_neurons, zero_neurons_streaming, zeroed
from langneurons.model import GROUPS, Geometry, decoder_layers, projections
from langneurons.neurons import empty_set

torch.set_num_threads(1)


def batch(seed: int = 0, B: int = 2, T: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with right padding in the second sentence (padding must never count)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 259, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 3:] = 0
    return ids, mask


def block_inputs(model, ids, mask) -> list[torch.Tensor]:
    """The input of every layer's MoE block [B, T, H] in one ordinary forward pass."""
    seen = []
    handles = [projections(l)["mlp"].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
               for l in decoder_layers(model)]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_channel_importance_equals_brute_force(arch):
    """Per sentence, layer and (expert, channel): || change of the MoE block output over the real tokens || when
    the channel's down column alone is zeroed (the shared expert's too), against the probe's closed form."""
    model = tiny_model(arch)
    geom = Geometry.from_config(model.config)
    ids, mask = batch()
    with ImportanceProbe(model, groups=("fwd_up", "fwd_down")) as probe:
        scores = probe(ids, mask)
    assert scores["fwd_up"].shape == (2, geom.num_layers, geom.intermediate_size)
    assert torch.equal(scores["fwd_up"], scores["fwd_down"])
    real = mask.bool()
    for li, x in enumerate(block_inputs(model, ids, mask)):
        block = projections(decoder_layers(model)[li])["moe"]
        with torch.no_grad():
            base = block.block(x)
            brute = torch.zeros(2, geom.intermediate_size)
            for n in range(geom.intermediate_size):
                e, k = divmod(n, geom.expert_size)
                if n < geom.moe.routed:
                    w, ix = block.experts.down_proj, (e, slice(None), k)
                else:
                    w, ix = block.shared.down_proj.weight, (slice(None), n - geom.moe.routed)
                old = w[ix].clone()
                w[ix] = 0
                change = (block.block(x) - base) * real[..., None]
                w[ix] = old
                brute[:, n] = change.flatten(1).norm(dim=1)
        torch.testing.assert_close(scores["fwd_up"][:, li], brute, rtol=1e-3, atol=2e-5)
        assert (brute > 0).any(1).all()


def reroute(block: moe.MoeBlock, expert: int, sentence_tokens: slice) -> None:
    """Make the router send none of the tokens in `sentence_tokens` (flat token positions) to `expert`: each
    such choice is replaced by an expert the token has not chosen; the routing weights stay."""
    original = block.router.forward

    def forward(hidden_states):
        logits, weights, idx = original(hidden_states)
        idx = idx.clone()
        for t in range(idx.shape[0])[sentence_tokens]:
            for j in range(idx.shape[1]):
                if idx[t, j] == expert:
                    idx[t, j] = next(e for e in range(block.experts.num_experts) if e not in idx[t].tolist())
        return logits, weights, idx

    block.router.forward = forward


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_no_token_of_a_sentence_reached_scores_zero(arch):
    """Expert 1 gets no token of sentence 1: its channels score exactly 0 there and its routed count is 0, while
    sentence 0's tokens still reach it; in the activation method too."""
    model = tiny_model(arch)
    geom = Geometry.from_config(model.config)
    ids, mask = batch(B=2, T=7)
    for layer in decoder_layers(model):
        reroute(projections(layer)["moe"], 1, slice(7, 14))
    span = slice(geom.expert_size, 2 * geom.expert_size)
    with ImportanceProbe(model, groups=GROUPS) as probe:
        scores = probe(ids, mask)
    assert scores["experts"].shape == (2, geom.num_layers, geom.num_experts)
    assert (scores["experts"][1, :, 1] == 0).all() and (scores["experts"][0, :, 1] > 0).any()
    assert (scores["fwd_up"][1, :, span] == 0).all() and (scores["fwd_up"][0, :, span] > 0).any()
    # every real token is routed to top_k experts; padding is not counted
    assert torch.equal(scores["experts"].sum(-1), (mask.sum(1) * geom.top_k)[:, None].expand(2, geom.num_layers).float())
    with ImportanceProbe(model, method="activation") as probe:
        act = probe(ids, mask)
    assert (act["active"][1, :, span] == 0).all() and (act["active"][0, :, span] > 0).any()
    assert act["active"].shape == (2, geom.num_layers, geom.intermediate_size)


def some_set(geom: Geometry, seed: int = 0, p: float = 0.15) -> dict[str, torch.Tensor]:
    """Neurons in every group and layer; the FFN groups reach routed experts and (Qwen2-MoE) the shared expert."""
    g = torch.Generator().manual_seed(seed)
    return {grp: torch.rand(geom.shape(grp), generator=g) < p for grp in GROUPS}


def expected_zeroed(model, nset) -> dict[str, torch.Tensor]:
    """Independent of masking.zero_plan: every parameter with the set's entries zeroed, written out per layout."""
    geom = Geometry.from_config(model.config)
    I, R = geom.expert_size, geom.moe.routed
    exp = {n: p.detach().clone() for n, p in model.named_parameters()}
    for li in range(geom.num_layers):
        pre = f"model.layers.{li}."
        for group in GROUPS:
            for n in torch.nonzero(nset[group][li]).flatten().tolist():
                if group in ("fwd_up", "fwd_down") and n >= R:  # the shared expert, a dense gated MLP
                    s = n - R
                    if group == "fwd_up":
                        exp[pre + "mlp.shared_expert.up_proj.weight"][s] = 0
                        exp[pre + "mlp.shared_expert.gate_proj.weight"][s] = 0
                    else:
                        exp[pre + "mlp.shared_expert.down_proj.weight"][:, s] = 0
                elif group == "fwd_up":
                    e, k = divmod(n, I)
                    exp[pre + "mlp.experts.gate_up_proj"][e, k] = 0       # gate row
                    exp[pre + "mlp.experts.gate_up_proj"][e, I + k] = 0   # up row
                elif group == "fwd_down":
                    e, k = divmod(n, I)
                    exp[pre + "mlp.experts.down_proj"][e, :, k] = 0
                else:
                    proj, dim = {"attn_q": ("q_proj", 0), "attn_k": ("k_proj", 0), "attn_v": ("v_proj", 0),
                                 "attn_o": ("o_proj", 1)}[group]
                    key = pre + f"self_attn.{proj}.weight"
                    if dim == 0:
                        exp[key][n] = 0
                        if pre + f"self_attn.{proj}.bias" in exp:
                            exp[pre + f"self_attn.{proj}.bias"][n] = 0
                    else:
                        exp[key][:, n] = 0
    return exp


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_deactivation_zeroes_only_the_listed_expert_slices(arch):
    model = tiny_model(arch)
    nset = some_set(Geometry.from_config(model.config))
    expected = expected_zeroed(model, nset)
    zero_neurons(model, nset)
    got = dict(model.named_parameters())
    assert set(got) == set(expected)
    for name, p in got.items():
        assert torch.equal(p.detach(), expected[name]), name
    assert any("router" in n or n.endswith("mlp.gate.weight") for n in got)  # the router is among the compared


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_zeroed_equals_hooks_equals_intervention_zero(arch):
    from langneurons.interventions import intervened, parse_intervention
    model = tiny_model(arch)
    nset = some_set(Geometry.from_config(model.config), seed=1)
    ids, mask = batch(seed=1)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        before = {n: p.clone() for n, p in model.named_parameters()}
        with zeroed(model, nset):
            weights = model(input_ids=ids, attention_mask=mask).logits
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored exactly
        with ablation_hooks(model, nset):
            hooks = model(input_ids=ids, attention_mask=mask).logits
        with intervened(model, nset, parse_intervention("zero")):
            zero = model(input_ids=ids, attention_mask=mask).logits
        after = model(input_ids=ids, attention_mask=mask).logits
    assert (weights - plain).abs().max() > 1e-3  # the set changes the output
    torch.testing.assert_close(hooks, weights, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(zero, weights, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)  # nothing left attached
    assert model.config._experts_implementation != moe.EXPERTS_NAME


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_scale_multiplies_expert_channel_values(arch):
    """scale=A on an expert channel equals that channel's down column multiplied by A."""
    from langneurons.interventions import intervened, parse_intervention
    model = tiny_model(arch)
    geom = Geometry.from_config(model.config)
    nset = empty_set(geom)
    nset["fwd_down"][1, [3, geom.expert_size + 5]] = True  # experts 0 and 1
    ids, mask = batch(seed=2)
    with torch.no_grad():
        with intervened(model, nset, parse_intervention("scale=3")):
            scaled = model(input_ids=ids, attention_mask=mask).logits
        down = projections(decoder_layers(model)[1])["moe"].experts.down_proj
        down[0, :, 3] *= 3
        down[1, :, 5] *= 3
        ref = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(scaled, ref, rtol=1e-4, atol=1e-5)


def routed_values(block: moe.MoeBlock, x: torch.Tensor, real: torch.Tensor) -> list[tuple]:
    """Per expert e, written plainly from the router and the fused weights: (flat real token positions routed to e,
    their routing weights, their channel values h_e [n, I_e])."""
    flat, keep = x.reshape(-1, x.shape[-1]), real.reshape(-1)
    _, weights, idx = block.router(flat)
    E, I = block.experts.gate_up_proj.shape[0], block.experts.down_proj.shape[2]
    out = []
    for e in range(E):
        tok, pos = torch.nonzero((idx == e) & keep[:, None], as_tuple=True)
        gate = flat[tok] @ block.experts.gate_up_proj[e, :I].T
        up = flat[tok] @ block.experts.gate_up_proj[e, I:].T
        out.append((tok, weights[tok, pos], block.experts.act_fn(gate) * up))
    return out


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_means_of_expert_channels_are_over_the_tokens_routed_to_them(arch):
    """A routed channel's mean is over the real tokens routed to its expert, a shared expert channel's over every
    real token; mean=L then replaces the values of routed tokens only: the block output moves by
    sum_t w_t * W_down_e[:, K] (mean_K - h_K[t]) exactly."""
    from langneurons.interventions import intervened, neuron_means_and_tokens, parse_intervention
    from tiny import tiny_tokenizer
    model, tok = tiny_model(arch), tiny_tokenizer()
    geom = Geometry.from_config(model.config)
    texts = ["The cat sleeps on the warm mat.", "Rain fell all night.", "We walked to the market early today."]
    means, tokens = neuron_means_and_tokens(model, tok, texts, 64, 2)
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(tok(t)["input_ids"]) for t in texts], batch_first=True)
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor([len(tok(t)["input_ids"]) for t in texts])[:, None]).long()
    assert tokens == int(mask.sum())
    li = 1
    x = block_inputs(model, ids, mask)[li]
    block = projections(decoder_layers(model)[li])["moe"]
    with torch.no_grad():
        per_expert = routed_values(block, x, mask.bool())
        for e, (tok_e, _, h) in enumerate(per_expert):
            expect = h.double().mean(0) if len(tok_e) else torch.zeros(geom.expert_size, dtype=torch.float64)
            torch.testing.assert_close(means["fwd_up"][li, e * geom.expert_size:(e + 1) * geom.expert_size],
                                       expect.float(), rtol=1e-4, atol=1e-6)
        if block.shared is not None:
            flat = x.reshape(-1, x.shape[-1])[mask.bool().reshape(-1)]
            sh = block.shared
            hs = sh.act_fn(sh.gate_proj(flat)) * sh.up_proj(flat)
            torch.testing.assert_close(means["fwd_up"][li, geom.moe.routed:], hs.mean(0), rtol=1e-4, atol=1e-6)
        assert torch.equal(means["fwd_up"], means["fwd_down"])
        # mean=en on channels K of expert 0 in layer li: the exact change of the block output
        K = torch.tensor([2, 5, 11])
        nset = empty_set(geom)
        nset["fwd_down"][li, K] = True
        base = block.block(x)
        with intervened(model, nset, parse_intervention("mean=en"), {"en": means}):
            moved = block.block(x)
        tok_0, w_0, h_0 = per_expert[0]
        delta = ((means["fwd_up"][li, K][None] - h_0[:, K]) * w_0[:, None]) @ block.experts.down_proj[0][:, K].T
        expect = base.reshape(-1, base.shape[-1]).clone()
        expect.index_add_(0, tok_0, delta)
        # padding tokens are routed too and rewritten as well (as every intervention acts at every position)
        real = mask.bool().reshape(-1)
        torch.testing.assert_close(moved.reshape(-1, base.shape[-1])[real], expect[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_training_changes_only_the_selected_slices(arch):
    """A few AdamW steps (weight decay on) on the deltas, merged: every entry outside the set is bit-identical to
    before (the router and the shared expert's other channels included); entries inside it moved."""
    from langneurons.sparse import attach_deltas, merge_deltas
    model = tiny_model(arch)
    geom = Geometry.from_config(model.config)
    nset = some_set(geom, seed=3)
    expected_frozen = expected_zeroed(model, nset)  # zero where the set is: the complement is what must stay
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    attach_deltas(model, nset)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    ids, mask = batch(seed=3)
    model.train()
    for _ in range(3):
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    merge_deltas(model)
    model.eval()
    assert model.config._experts_implementation != moe.EXPERTS_NAME
    moved = 0
    for name, p in model.named_parameters():
        outside = expected_frozen[name] != 0  # entries the set does not reach (weights are never exactly 0)
        assert torch.equal(p.detach()[outside], before[name][outside]), name
        moved += int((p.detach()[~outside] != before[name][~outside]).sum())
    experts = projections(decoder_layers(model)[0])["moe"].experts
    assert moved > 0 and not hasattr(experts, moe.DELTA_ATTR)
    changed = (experts.gate_up_proj != before["model.layers.0.mlp.experts.gate_up_proj"]).any(-1)
    assert changed.any()  # expert rows themselves trained


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_streamed_variant_equals_in_memory_and_reloads(arch, tmp_path):
    """The shards store one 2D tensor per expert (what save_pretrained writes): streaming zeroes their rows and
    columns; the result loads with AutoModelForCausalLM and equals zeroing the loaded model in memory."""
    src = save_tiny(arch, tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    geom = Geometry.from_config(model.config)
    nset = some_set(geom, seed=4)
    zero_neurons_streaming(src, tmp_path / "dst", nset, geom)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", dtype=torch.float32)
    zero_neurons(model, nset)
    model.save_pretrained(tmp_path / "saved")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    mine, theirs, reloaded = (dict(m.named_parameters()) for m in (model, streamed, saved))
    assert set(mine) == set(theirs) == set(reloaded)
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
        assert torch.equal(mine[name], reloaded[name]), name


def test_detection_deactivation_training_figures_through_the_scripts(tmp_path):
    """detection.py -> deactivation.py (streamed variants, perplexity) -> evaluate.py under shift=A:B -> train.py
    (neuron mode) -> figures.py on tiny Qwen2-MoE: experts.json holds shares that sum to top_k per layer and the
    expert set algebra; the trained model differs from the base only in the set's slices; the experts figure is
    drawn; --method authors is refused with one line."""
    model = save_tiny("qwen2_moe", tmp_path / "model")
    data = tiny_dataset(tmp_path / "dataset")
    out = tmp_path / "out"
    common = ["--model", model, "--dataset", data, "--langs", "en,fr,de", "--out", out]
    env = {"OMP_NUM_THREADS": "1"}
    r = run_script("detection.py", *common, "--ratio", "0.1", "--threshold", "0.5", "--resamples", "0", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    nd = out / "model" / "neurons"
    ex = json.loads((nd / "experts.json").read_text())
    geom = Geometry.from_config(AutoModelForCausalLM.from_pretrained(model).config)
    assert ex["num_experts"] == geom.num_experts and ex["uniform_share"] == geom.top_k / geom.num_experts
    for lang in ("en", "fr", "de"):
        for li, row in enumerate(ex["share"][lang]):
            assert abs(sum(row) - geom.top_k) < 1e-4
            related = {e for e, s in enumerate(row) if s >= ex["uniform_share"] - 1e-12}
            assert set(ex["related"][lang][str(li)]) == related
            assert set(ex["exclusive"][lang][str(li)]) == related - set(ex["shared"][str(li)])
    for li in range(geom.num_layers):
        assert set(ex["shared"][str(li)]) == set.intersection(*(set(ex["related"][l][str(li)]) for l in ex["related"]))
    # a re-derivation at another threshold keeps experts.json (from the stored routed counts)
    r = run_script("detection.py", *common, "--ratio", "0.1", "--threshold", "0.4", "--resamples", "0", env=env)
    assert r.returncode == 0 and "stored firing counts" in r.stdout, r.stderr[-3000:]
    assert json.loads((nd / "experts.json").read_text())["share"] == ex["share"]

    r = run_script("deactivation.py", *common, "--measure-ppl", "--limit", "2", "--neurons", nd / "shared.json",
                   "--neurons", nd / "exclusive_en.json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    variant = out / "model" / "variants" / "shared"
    AutoModelForCausalLM.from_pretrained(variant)  # an ordinary model directory

    r = run_script("evaluate.py", *common, "--tasks", "ppl", "--limit", "2", "--neurons", nd / "related_all.json",
                   "--intervention", "shift=en:fr", env=env)  # per-language means of expert channels, stored
    assert r.returncode == 0, r.stderr[-3000:]
    assert any((out / "model" / "means").rglob("means.safetensors"))

    r = run_script("train.py", *common, "--lang", "en", "--langs", "en", "--neurons", nd / "related_all.json",
                   "--max-steps", "2", "--global-batch-size", "2", "--micro-batch-size", "2", "--lr", "1e-2",
                   "--cutoff-len", "32", "--val-limit", "1", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    trained_dir = next(p for p in (out / "model" / "trained").iterdir() if p.is_dir())
    base = dict(AutoModelForCausalLM.from_pretrained(model).named_parameters())
    trained = dict(AutoModelForCausalLM.from_pretrained(trained_dir).named_parameters())
    from langneurons.neurons import read_neuron_file
    nset = read_neuron_file(nd / "related_all.json", geom)[0]
    frozen = expected_zeroed(AutoModelForCausalLM.from_pretrained(model), nset)
    moved = {}
    for name, p in trained.items():
        outside = frozen[name] != 0
        assert torch.equal(p.detach()[outside], base[name].detach()[outside]), name
        moved[name] = int((p.detach()[~outside] != base[name].detach()[~outside]).sum())
    assert sum(v for n, v in moved.items() if "experts." in n) > 0  # routed expert slices trained

    r = run_script("figures.py", "--out", out, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    figure = out / "figures" / "experts_model.png"
    assert figure.is_file() and figure.stat().st_size > 1000
    assert "experts_model.png" in (out / "figures" / "report.md").read_text()

    r = run_script("detection.py", *common, "--method", "authors", "--out", tmp_path / "authors", env=env)
    assert r.returncode == 2 and "mixture-of-experts" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "authors" / "model" / "neurons").exists()


def test_probe_leaves_the_model_as_it_was():
    """After the probe, no tap is left and the experts run their own implementation again (bit-identical logits)."""
    model = tiny_model("mixtral")
    ids, mask = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        with ImportanceProbe(model) as probe:
            probe(ids, mask)
        after = model(input_ids=ids, attention_mask=mask).logits
    experts = projections(decoder_layers(model)[0])["moe"].experts
    assert not getattr(experts, moe.TAPS_ATTR, ()) and model.config._experts_implementation != moe.EXPERTS_NAME
    assert torch.equal(before, after)


def test_nested_taps_on_different_layers_keep_the_experts_implementation():
    """Hooks on layer 0 inside hooks on layer 1: leaving the inner block must not switch layer 1's experts back to
    the model's own implementation (its taps would silently stop acting)."""
    model = tiny_model("olmoe")
    geom = Geometry.from_config(model.config)
    outer, inner = empty_set(geom), empty_set(geom)
    outer["fwd_down"][1, :30] = True
    inner["fwd_down"][0, :30] = True
    ids, mask = batch()
    with torch.no_grad():
        with ablation_hooks(model, outer):
            before = model(input_ids=ids, attention_mask=mask).logits
            with ablation_hooks(model, inner):
                pass
            after = model(input_ids=ids, attention_mask=mask).logits
        plain = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after) and (before - plain).abs().max() > 1e-4
    assert model.config._experts_implementation != moe.EXPERTS_NAME and not moe._SWITCHED
