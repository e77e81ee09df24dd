"""Closed-form importance (docs/method.md section 2) against brute-force ablation, padding, and probing."""
import pytest
import torch

from langneurons.importance import ImportanceProbe, _eager_attention, qk_importance, qk_importance_reference
from langneurons.data import pad_batch
from langneurons.model import projections, decoder_layers
from tiny import ARCHS, SENTENCES, tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()


def encode(texts, left=False):
    return pad_batch([TOK(t)["input_ids"] for t in texts], TOK.pad_token_id, "cpu", left=left)


def probe_scores(model, texts, left=False, **kw):
    ids, mask = encode(texts, left)
    with ImportanceProbe(model, **kw) as probe:
        return probe(ids, mask)


@pytest.mark.parametrize("arch", ARCHS)
def test_probing_leaves_logits_unchanged(arch):
    model = tiny_model(arch)
    ids, mask = encode(SENTENCES["en"][:3])
    before = model(input_ids=ids, attention_mask=mask).logits
    with ImportanceProbe(model) as probe:
        assert model.config._attn_implementation == "langneurons_probe"
        during = model(input_ids=ids, attention_mask=mask).logits
        probe(ids, mask)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(before, during)
    if arch != "gemma2":  # sdpa cannot soft-cap
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, during, atol=1e-4, rtol=1e-4)


def capture_call(module, model, ids):
    """(args, kwargs) of module's forward during one model forward, to replay it alone."""
    seen = {}
    h = module.register_forward_pre_hook(lambda m, a, k: seen.update(a=a, k=k), with_kwargs=True)
    model(input_ids=ids, use_cache=False)
    h.remove()
    return seen["a"], seen["k"]


def output_of(target, module, args, kwargs, pre=False):
    """What `target` receives (pre) or returns when `module` is replayed."""
    got = {}
    if pre:
        h = target.register_forward_pre_hook(lambda m, a: got.update(x=a[0].detach().clone()))
    else:
        h = target.register_forward_hook(lambda m, a, o: got.update(x=o.detach().clone()))
    with torch.no_grad():
        module(*args, **kwargs)
    h.remove()
    return got["x"]


@torch.no_grad()
def zeroed(params_and_index, fn):
    """Run fn with the given (tensor, dim, index) entries zeroed, then restore them."""
    saved = [(t, dim, i, t.select(dim, i).clone()) for t, dim, i in params_and_index]
    for t, dim, i, _ in saved:
        t.select(dim, i).zero_()
    try:
        return fn()
    finally:
        for t, dim, i, v in saved:
            t.select(dim, i).copy_(v)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_ffn_importance_equals_ablation(arch):
    model = tiny_model(arch)
    ids, mask = encode(SENTENCES["fr"][:1])
    scores = probe_scores(model, SENTENCES["fr"][:1])
    for layer_idx, layer in enumerate(decoder_layers(model)):
        p = projections(layer)
        args, kwargs = capture_call(p["mlp"], model, ids)
        base = output_of(p["mlp"], p["mlp"], args, kwargs)
        for k in range(p["down"].in_features):
            down = zeroed([(p["down"].weight, 1, k)], lambda: output_of(p["mlp"], p["mlp"], args, kwargs))
            up = zeroed([(p["up"].weight, 0, k), (p["gate"].weight, 0, k)],
                        lambda: output_of(p["mlp"], p["mlp"], args, kwargs))
            torch.testing.assert_close((base - down).norm(), scores["fwd_down"][0, layer_idx, k], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close((base - up).norm(), scores["fwd_up"][0, layer_idx, k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_value_and_output_importance_equal_ablation(arch):
    """Value rows (with their bias) change the attention output O; o_proj columns change o_proj's output."""
    model = tiny_model(arch)
    ids, mask = encode(SENTENCES["de"][:1])
    scores = probe_scores(model, SENTENCES["de"][:1])
    for layer_idx, layer in enumerate(decoder_layers(model)):
        p = projections(layer)
        args, kwargs = capture_call(p["attn"], model, ids)
        base_o = output_of(p["o"], p["attn"], args, kwargs, pre=True)
        base_y = output_of(p["o"], p["attn"], args, kwargs)
        v = p["v"]
        for r in range(v.out_features):
            entries = [(v.weight, 0, r)] + ([(v.bias, 0, r)] if v.bias is not None else [])
            o = zeroed(entries, lambda: output_of(p["o"], p["attn"], args, kwargs, pre=True))
            torch.testing.assert_close((base_o - o).norm(), scores["attn_v"][0, layer_idx, r], rtol=1e-4, atol=1e-6)
        for k in range(p["o"].in_features):
            y = zeroed([(p["o"].weight, 1, k)], lambda: output_of(p["o"], p["attn"], args, kwargs))
            torch.testing.assert_close((base_y - y).norm(), scores["attn_o"][0, layer_idx, k], rtol=1e-4, atol=1e-6)


class RecordingProbe(ImportanceProbe):
    def query_key_importance(self, module, query, key, value, attention_mask, scaling, softcap):
        self.calls = getattr(self, "calls", []) + [(module, query, key, value, attention_mask, scaling, softcap)]
        super().query_key_importance(module, query, key, value, attention_mask, scaling, softcap)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "gemma3"])
def test_query_key_importance_equals_brute_force(arch):
    """Remove query channel d of head h (key channel d of kv head g) from the Q/K the attention
    function sees, rerun the model's own eager attention, and measure the change of its output."""
    model = tiny_model(arch)
    texts = SENTENCES["en"][3:5]
    ids, mask = encode(texts)
    with RecordingProbe(model) as probe:
        scores = probe(ids, mask)
    for layer_idx, (module, q, k, v, am, scaling, softcap) in enumerate(probe.calls):
        attend = lambda q, k: _eager_attention(module)(module, q, k, v, am, scaling=scaling, softcap=softcap)[0]
        base = attend(q, k)  # [B, T, H, D]
        rep = q.shape[1] // k.shape[1]
        valid = mask.bool()[:, :, None, None]
        for h in range(q.shape[1]):
            for d in range(q.shape[3]):
                q2 = q.clone()
                q2[:, h, :, d] = 0
                change = ((base - attend(q2, k))[:, :, h] * valid[:, :, 0]).flatten(1).norm(dim=1)
                torch.testing.assert_close(change, scores["attn_q"][:, layer_idx, h * q.shape[3] + d], rtol=1e-3, atol=1e-6)
        for g in range(k.shape[1]):
            for d in range(k.shape[3]):
                k2 = k.clone()
                k2[:, g, :, d] = 0
                heads = slice(g * rep, (g + 1) * rep)
                change = ((base - attend(q, k2))[:, :, heads] * valid).flatten(1).norm(dim=1)
                torch.testing.assert_close(change, scores["attn_k"][:, layer_idx, g * k.shape[3] + d], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_batched_equals_unbatched(arch, left):
    model = tiny_model(arch)
    texts = SENTENCES["de"]  # lengths differ, so the batch is padded
    batched = probe_scores(model, texts, left=left)
    for i, t in enumerate(texts):
        alone = probe_scores(model, [t])
        for g, s in alone.items():
            torch.testing.assert_close(batched[g][i], s[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_blocks_and_chunks_equal_the_reference_formula(softcap):
    """40 tokens, grouped-query attention (4 heads, 2 kv heads), causal: several query-row blocks (keys cut
    at each block's last row) and channel chunks, with a left- and a right-padded sequence, against the
    formula written plainly (importance.qk_importance_reference)."""
    torch.manual_seed(0)
    B, T = 3, 40
    q, k, v = torch.randn(B, 4, T, 8), torch.randn(B, 2, T, 8), torch.randn(B, 2, T, 8)
    keep = torch.ones(T, T, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
    valid = torch.ones(B, T, dtype=torch.bool)
    keep[1, :, :, :5], valid[1, :5] = False, False  # left padding
    keep[2, :, :, 30:], valid[2, 30:] = False, False  # right padding
    ref = qk_importance_reference(q, k, v, keep, valid, 0.3, softcap)
    for chunk_bytes in (1, 1 << 12, 1 << 30):
        got = qk_importance(q, k, v, keep, valid, 0.3, softcap=softcap, chunk_bytes=chunk_bytes)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_activation_probe_counts_positive_activations():
    model = tiny_model("llama")
    ids, mask = encode(SENTENCES["en"][:2])
    acts = {}
    layer = projections(decoder_layers(model)[1])
    h = layer["mlp"].act_fn.register_forward_hook(lambda m, a, o: acts.update(x=o))
    model(input_ids=ids, attention_mask=mask)
    h.remove()
    with ImportanceProbe(model, method="activation") as probe:
        out = probe(ids, mask)
    expected = ((acts["x"] > 0) & mask.bool()[..., None]).sum(1).float()
    assert torch.equal(out["active"][:, 1], expected)
    assert out["tokens"].tolist() == mask.sum(1).tolist()


def attention_keep(am, S):
    """The bool visibility mask ImportanceProbe.query_key_importance derives from the model's mask."""
    return am[..., :S] if am.dtype == torch.bool else am[..., :S] > torch.finfo(am.dtype).min / 2


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gemma3"])
@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_qk_importance_equals_the_reference_formula_in_tiny_models(arch, left):
    """On the q/k/v and masks the attention function really receives: grouped-query attention (qwen2),
    soft-capping and sliding windows (gemma2), q/k norms and sliding windows (gemma3), padded batches;
    blocks, channel chunks and the triangular value factor against importance.qk_importance_reference."""
    model = tiny_model(arch)
    ids, mask = encode(SENTENCES["fr"][:3], left=left)  # 32-51 tokens: windows of 6 cut the key ranges
    with RecordingProbe(model) as probe:
        probe(ids, mask)
    valid = mask.bool()
    for module, q, k, v, am, scaling, softcap in probe.calls:
        keep = attention_keep(am, k.shape[2])
        ref = qk_importance_reference(q, k, v, keep, valid, scaling, softcap)
        for chunk_bytes in (1, 1 << 14, None):
            got = qk_importance(q, k, v, keep, valid, scaling, softcap=softcap, chunk_bytes=chunk_bytes)
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_large_scores_take_the_stabilised_path(softcap):
    """Scores whose change reaches hundreds (beyond the direct-exponent bound) are shifted by each
    perturbed row's maximum: still equal to the reference formula, finite, with short keys and queries."""
    torch.manual_seed(1)
    B, T = 2, 24
    q, k, v = torch.randn(B, 2, T, 8) * 30, torch.randn(B, 1, T, 8) * 30, torch.randn(B, 1, T, 8)
    keep = torch.ones(T, T, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
    valid = torch.ones(B, T, dtype=torch.bool)
    keep[1, :, :, :3], valid[1, :3] = False, False
    assert float((q.abs().amax() * k.abs().amax() * 0.5)) > 40  # the bound qk_importance checks
    ref = qk_importance_reference(q, k, v, keep, valid, 0.5, softcap)
    got = qk_importance(q, k, v, keep, valid, 0.5, softcap=softcap, chunk_bytes=1 << 12)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
