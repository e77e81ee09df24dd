"""Pruned top-k query/key scoring (docs/detection.md, pruned top-k) gives the top lists of exhaustive scoring,
its upper bound and its sampled form hold, the triangular product and the prefix-maximum scan equal their
plain forms, and the benchmark's floor counter counts what it says."""
import argparse
import math

import pytest
import torch

import detection
from bench.detection import floor_counts, layer_macs
from langneurons import importance
from langneurons.importance import qk_importance, qk_importance_reference, qk_upper_bounds
from langneurons.data import pad_batch
from langneurons.model import GROUPS, Geometry
from tiny import ARCHS, SENTENCES, tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()


def inputs(seed: int, B=3, H=4, KV=2, T=40, D=16, scales=False, window=None):
    """Random q/k/v with a causal mask (optionally a sliding window), one left- and one right-padded text;
    with `scales`, every query and key channel multiplied by its own factor in [1/1000, 1000] (log-uniform)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, KV, T, D, generator=g), torch.randn(B, KV, T, D, generator=g)
    if scales:
        q = q * 10 ** (torch.rand(D, generator=g) * 6 - 3) * 0.05
        k = k * 10 ** (torch.rand(KV, 1, D, generator=g) * 6 - 3) * 0.05
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    if window:
        keep &= ~torch.ones(T, T, dtype=torch.bool).tril(-window)
    keep = keep[None, None].repeat(B, 1, 1, 1)
    valid = torch.ones(B, T, dtype=torch.bool)
    keep[1, :, :, :5], valid[1, :5] = False, False  # left padding
    keep[2, :, :, 30:], valid[2, 30:] = False, False  # right padding
    return q, k, v, keep, valid


def top_lists(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k, dim=-1).indices.sort(-1).values


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("scales", [False, True], ids=["plain", "scaled-1000x"])
@pytest.mark.parametrize("window", [None, 7])
def test_pruned_top_lists_equal_exhaustive(softcap, scales, window):
    """Adversarial channel scales (up to 1000x either way), soft-capping, sliding windows, padding, grouped-query
    attention: every text's top lists equal exhaustive scoring's, every channel scored carries exactly the
    exhaustive value, and the others hold -inf."""
    for seed in range(3):
        q, k, v, keep, valid = inputs(seed, scales=scales, window=window)
        full_q, full_k = qk_importance(q, k, v, keep, valid, 0.3, softcap)
        for kq, kk in ((1, 1), (3, 2), (8, 5)):
            stats = {}
            got_q, got_k = qk_importance(q, k, v, keep, valid, 0.3, softcap, top_k=(kq, kk), stats=stats)
            assert torch.equal(top_lists(got_q, kq), top_lists(full_q, kq))
            assert torch.equal(top_lists(got_k, kk), top_lists(full_k, kk))
            for got, full in ((got_q, full_q), (got_k, full_k)):
                scored = torch.isfinite(got)
                assert torch.equal(got[scored], full[scored])
                assert (got[~scored] == float("-inf")).all()
            assert 0 < stats["scored"] and stats["channels"] == 3 * 4 * 16


def test_scaled_channels_are_pruned():
    """With channel scales spread over six decades most channels are far from any top list: the bound
    must leave most of them unscored (else the pruning path does nothing), and still give the same lists."""
    q, k, v, keep, valid = inputs(0, scales=True, D=32)
    stats = {}
    got_q, _ = qk_importance(q, k, v, keep, valid, 0.3, None, top_k=(2, 1), stats=stats)
    assert stats["scored"] < 0.6 * stats["channels"]
    full_q, _ = qk_importance(q, k, v, keep, valid, 0.3, None)
    assert torch.equal(top_lists(got_q, 2), top_lists(full_q, 2))


def bound_inputs(q, k, v, keep, valid, softcap):
    """What qk_upper_bounds takes besides q, k, v, computed plainly: q grouped by kv head, the probabilities and
    outputs [B,KV,rep,T,.], and each row's last visible key (padding rows see their own key)."""
    B, H, T, D = q.shape
    KV = k.shape[1]
    own = torch.arange(T)[:, None] == torch.arange(T)
    keep2 = torch.where(valid[:, None, :, None], keep, own)
    pre = (q @ k.repeat_interleave(H // KV, 1).transpose(-1, -2)) * 0.3
    capped = pre if softcap is None else torch.tanh(pre / softcap) * softcap
    probs = torch.softmax(capped.masked_fill(~keep2, float("-inf")), -1)
    out = probs @ v.repeat_interleave(H // KV, 1)
    last = torch.where(keep2, torch.arange(T), -1).amax(-1).amax(1).amax(0)
    return (q.view(B, KV, H // KV, T, D), probs.view(B, KV, H // KV, T, T), out.view(B, KV, H // KV, T, D), last)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("scales", [False, True], ids=["plain", "scaled-1000x"])
def test_upper_bound_holds(softcap, scales):
    """qk_upper_bounds is at least the exact score (importance.qk_importance_reference, the formula written
    plainly) of every query channel of every head and text, without its rounding allowance too."""
    for seed in range(3):
        q, k, v, keep, valid = inputs(seed, scales=scales, window=None if seed < 2 else 9)
        B, H, T, D = q.shape
        ref_q, _ = qk_importance_reference(q, k, v, keep, valid, 0.3, softcap)
        qg, probs, out, last = bound_inputs(q, k, v, keep, valid, softcap)
        bound = qk_upper_bounds(qg, k, v, probs, out, valid, last, 0.3, softcap)
        assert (bound.reshape(B, H * D) >= ref_q * (1 - 1e-5)).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_detection_selections_equal_exhaustive(arch):
    """detection.TopImportance (which passes its k to the probe) selects, per text, layer and group, exactly
    what exhaustive scoring selects, on every architecture: so every file detection writes from them
    (per_text.safetensors, firing counts, sets) is byte-identical. Several ratios, padded batches."""
    model = tiny_model(arch)
    geom = Geometry.from_config(model.config)
    texts = SENTENCES["fr"][:3] + SENTENCES["de"][:2]
    for left in (False, True):
        ids, mask = pad_batch([TOK(t)["input_ids"] for t in texts], TOK.pad_token_id, "cpu", left=left)
        for ratio in (0.02, 0.1, 0.3):
            method = detection.TopImportance(argparse.Namespace(ratio=ratio, qk_score="channel"), model, geom, GROUPS)
            assert method.probe.top_k == method.top_k
            with method.probe:
                pruned = method.selected(ids, mask)
            method.probe.top_k = {}  # the same method scoring every channel
            with method.probe:
                exhaustive = method.selected(ids, mask)
            for g in GROUPS:
                assert torch.equal(pruned[g], exhaustive[g]), (arch, left, ratio, g)


def test_layer_macs_hand_counted():
    # 3 tokens, causal: the rows see keys {1}, {1,2}, {1,2,3}; key s has min(s, 2) entries in the values'
    # factor; 10 weight entries, 2 heads of width 2
    # decoder 3*10 + 2*(2*2)*(1+2+3) = 78; q/k: 2*2*(1 + (1+2) + (1+2+2)) = 4*9 = 36
    assert layer_macs(3, 10, 2, 2) == (78, 36)
    # a window of 2: the rows see keys {1}, {1,2}, {2,3}
    # decoder 30 + 8*5 = 70; q/k: 4*(1 + (1+2) + (2+2)) = 32
    assert layer_macs(3, 10, 2, 2, window=2) == (70, 32)
    # head_dim 4, 6 tokens, window 3: rows see keys {1} {1,2} {1,2,3} {2,3,4} {3,4,5} {4,5,6}, of min(s, 4)
    # entries each: 1 + 3 + 6 + 9 + 11 + 12 = 42
    assert layer_macs(6, 0, 1, 4, window=3)[1] == 4 * 42
    # one token: only its own key
    assert layer_macs(1, 7, 3, 5) == (7 + 2 * 15, 15)


def test_floor_counts_sum_layers_and_sentences():
    shapes = [{"linear_params": 10, "heads": 2, "head_dim": 2, "window": None},
              {"linear_params": 10, "heads": 2, "head_dim": 2, "window": 2}]
    got = floor_counts(shapes, [3, 1])
    # the 3-token sentence as above in each layer, the 1-token one 10 + 2*(2*2)*1 = 18 and 2*2*1*1 = 4 in each
    dec = 78 + 70 + 2 * (10 + 2 * 4 * 1)
    qk = 36 + 32 + 2 * 4
    assert got["decoder_macs"] == dec and got["qk_macs"] == qk
    assert math.isclose(got["floor"], 1 + qk / dec)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_bf16_product_of_float32_differences_is_close(softcap):
    """The GPU check's low-precision variant (the probability differences formed in float32, one bf16 product
    with the values' factor): within bf16's rounding of float32 scoring, channel for channel."""
    q, k, v, keep, valid = inputs(4)
    ref = qk_importance(q, k, v, keep, valid, 0.3, softcap)
    got = qk_importance(q, k, v, keep, valid, 0.3, softcap, product="bfloat16")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4)
    with pytest.raises(ValueError):
        qk_importance(q, k, v, keep, valid, 0.3, softcap, product="float16")


def test_pruning_scores_no_channel_twice():
    """Where channels are alike (plain random inputs: little or nothing can be pruned), pruned scoring does no
    more exact work than exhaustive scoring: a round's padding is kept, never scored again."""
    for seed in range(3):
        q, k, v, keep, valid = inputs(seed, D=32)
        for kq, kk in ((1, 1), (3, 2), (40, 10)):
            stats = {}
            qk_importance(q, k, v, keep, valid, 0.3, None, top_k=(kq, kk), stats=stats)
            assert 0 < stats["scored"] <= stats["channels"]


def test_sampled_bound_is_at_most_the_full_bound():
    """The sampled bound (the terms of every _SAMPLE_STEP-th query row) never exceeds the full bound: what it
    puts at a text's k-th exact score, the full bound does too, so deciding on it keeps the lists exact."""
    for seed, scales, softcap in ((0, False, None), (1, True, None), (2, True, 5.0)):
        q, k, v, keep, valid = inputs(seed, scales=scales)
        qg, probs, out, last = bound_inputs(q, k, v, keep, valid, softcap)
        full = qk_upper_bounds(qg, k, v, probs, out, valid, last, 0.3, softcap)
        rows = torch.arange(0, q.shape[2], importance._SAMPLE_STEP)
        sample = qk_upper_bounds(qg[:, :, :, rows], k, v, probs[:, :, :, rows], out[:, :, :, rows], valid[:, rows],
                                 last[rows], 0.3, softcap)
        assert (sample <= full * (1 + 1e-6)).all() and (sample < full).any()


@pytest.mark.parametrize("K,N,s0", [(40, 40, 0), (200, 128, 0), (256, 256, 0), (150, 128, 30), (90, 128, 100),
                                    (130, 128, 0), (64, 128, 0), (300, 256, 10)])
def test_trapezoidal_product_equals_the_full_product(K, N, s0):
    """The values' factor is lower trapezoidal in absolute key order; the product that skips its zeros (keys
    before the head_dim-th in chunks, into the columns they reach) equals the plain product."""
    g = torch.Generator().manual_seed(K + N + s0)
    x = torch.rand(3, 50, K, generator=g)
    keys = torch.arange(s0, s0 + K)
    rt = torch.randn(3, K, N, generator=g) * (torch.arange(N)[None, :] <= keys[:, None])
    got = importance._trapezoidal_product(x, rt, s0, torch.full((3, 50, N), float("nan")))
    torch.testing.assert_close(got, x @ rt, rtol=1e-5, atol=1e-5)


def test_running_max_equals_cummax_and_leaves_its_input():
    for shape in ((2, 3, 1, 4), (2, 3, 7, 4), (4, 2, 256, 5), (3, 2, 33)):
        x = torch.randn(*shape)
        before = x.clone()
        assert torch.equal(importance._running_max(x), x.cummax(2).values)
        assert torch.equal(x, before)
