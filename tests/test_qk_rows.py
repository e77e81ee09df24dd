"""Row-level query/key importance (`--qk-score row`) against zeroing the q_proj/k_proj row itself."""
import json

import pytest
import torch

from conftest import run_script
from langneurons.cli import InputError
from langneurons.importance import ImportanceProbe, rotary_partner
from langneurons.masking import ablation_hooks, zeroed
from langneurons.data import pad_batch
from langneurons.model import Geometry, decoder_layers, projections
from langneurons.neurons import empty_set
from tiny import SENTENCES, save_tiny, tiny_dataset, tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()


def encode(texts, left=False):
    return pad_batch([TOK(t)["input_ids"] for t in texts], TOK.pad_token_id, "cpu", left=left)


def scores_and_calls(model, ids, mask, qk_score, **kw):
    """Probe scores, and each attention module's (args, kwargs) of that same forward, to replay it."""
    calls = {}
    handles = [projections(layer)["attn"].register_forward_pre_hook(
        lambda m, a, k, i=i: calls.__setitem__(i, (a, k)), with_kwargs=True)
        for i, layer in enumerate(decoder_layers(model))]
    try:
        with ImportanceProbe(model, qk_score=qk_score, **kw) as probe:
            scores = probe(ids, mask)
    finally:
        for h in handles:
            h.remove()
    return scores, calls


@torch.no_grad()
def attention_output(p, args, kwargs):
    """O, the input of o_proj, when the attention module is replayed alone."""
    got = {}
    h = p["o"].register_forward_pre_hook(lambda m, a: got.update(x=a[0].clone()))
    p["attn"](*args, **kwargs)
    h.remove()
    return got["x"]


def brute_force(model, mask, calls, group, layer, row):
    """||change of O|| over the real tokens of every sentence when one q_proj/k_proj row (and its bias
    entry) is switched off: attn_q through the weights (masking.zeroed), attn_k through hooks."""
    p = projections(decoder_layers(model)[layer])
    args, kwargs = calls[layer]
    base = attention_output(p, args, kwargs)
    nset = empty_set(Geometry.from_config(model.config))
    nset[group][layer, row] = True
    with zeroed(model, nset) if group == "attn_q" else ablation_hooks(model, nset):
        off = attention_output(p, args, kwargs)
    return ((base - off) * mask[..., None]).flatten(1).norm(dim=1)


# plain, q/k biases, soft-capping, partial rotary; all GQA
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "stablelm"])
@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_row_score_equals_zeroing_the_row(arch, left):
    model = tiny_model(arch)
    ids, mask = encode(SENTENCES["de"][:3], left)  # lengths differ: padded
    assert not mask.all()
    row, calls = scores_and_calls(model, ids, mask, "row")
    channel, _ = scores_and_calls(model, ids, mask, "channel")
    geom = Geometry.from_config(model.config)
    channel_error = 0.0
    for layer in range(geom.num_layers):
        for group in ("attn_q", "attn_k"):
            for r in range(geom.group_size(group)):
                truth = brute_force(model, mask, calls, group, layer, r)
                torch.testing.assert_close(row[group][:, layer, r], truth, rtol=1e-3, atol=1e-6)
                channel_error = max(channel_error, float(((channel[group][:, layer, r] - truth).abs()
                                                          / truth.clamp(min=1e-6)).max()))
    # the channel score measures something else: rotary mixes each row into two channels
    assert channel_error > 0.1


def test_rotary_pairs_are_the_rotate_half_partners():
    model = tiny_model("llama")
    ids, mask = encode(SENTENCES["en"][:1])
    _, calls = scores_and_calls(model, ids, mask, "channel")
    args, kwargs = calls[0]
    D = model.config.head_dim
    partner = rotary_partner(projections(decoder_layers(model)[0])["attn"], kwargs["position_embeddings"], D)
    assert partner.tolist() == [(d + D // 2) % D for d in range(D)]


def test_partial_rotary_leaves_the_other_channels_their_own_partners():
    model = tiny_model("stablelm")
    ids, mask = encode(SENTENCES["en"][:1])
    _, calls = scores_and_calls(model, ids, mask, "channel")
    attn = projections(decoder_layers(model)[0])["attn"]
    D, r = Geometry.from_config(model.config).head_dim, attn.rotary_ndims
    assert 0 < r < D
    partner = rotary_partner(attn, calls[0][1]["position_embeddings"], D)
    assert partner.tolist() == [(d + r // 2) % r for d in range(r)] + list(range(r, D))


def test_row_and_channel_agree_only_where_rotary_is_the_identity():
    """At position 0 rotary rotates nothing, so the row is the channel; later positions mix pairs,
    and the two scores then rank the rows differently."""
    model = tiny_model("qwen2")
    one = torch.tensor([[TOK.bos_token_id]])
    ones = torch.ones_like(one)
    row, _ = scores_and_calls(model, one, ones, "row")
    channel, _ = scores_and_calls(model, one, ones, "channel")
    for g in ("attn_q", "attn_k"):
        torch.testing.assert_close(row[g], channel[g], rtol=1e-4, atol=1e-6)
    ids, mask = encode(SENTENCES["fr"][2:3])
    row, _ = scores_and_calls(model, ids, mask, "row")
    channel, _ = scores_and_calls(model, ids, mask, "channel")
    for g in ("attn_q", "attn_k"):
        assert not torch.equal(row[g].argsort(-1), channel[g].argsort(-1))


def test_row_score_chunks_do_not_change_it():
    model = tiny_model("llama")
    ids, mask = encode(SENTENCES["en"][2:5], left=True)
    whole, _ = scores_and_calls(model, ids, mask, "row")
    pieces, _ = scores_and_calls(model, ids, mask, "row", chunk_bytes=1)
    for g in ("attn_q", "attn_k"):
        torch.testing.assert_close(pieces[g], whole[g], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_row_score_refused_with_qk_norms(arch):
    model = tiny_model(arch)
    ids, mask = encode(SENTENCES["en"][:2])
    with pytest.raises(InputError, match="q/k normalisation"):
        scores_and_calls(model, ids, mask, "row")


def test_detection_records_and_refuses_the_row_score(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    llama, qwen3 = save_tiny("llama", tmp_path / "llama"), save_tiny("qwen3", tmp_path / "qwen3")
    common = ["--dataset", data, "--langs", "en,fr", "--ratio", "0.1", "--device", "cpu", "--dtype", "float32"]
    r = run_script("detection.py", "--model", llama, "--out", tmp_path / "out", "--qk-score", "row", *common)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "out" / "llama" / "neurons" / "meta.json").read_text())
    assert meta["qk_score"] == "row"
    r = run_script("detection.py", "--model", qwen3, "--out", tmp_path / "out", "--qk-score", "row", *common)
    assert r.returncode == 2 and "q/k normalisation" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "qwen3").exists()


def test_detection_row_score_with_partial_rotary(tmp_path):
    stablelm = save_tiny("stablelm", tmp_path / "stablelm")
    r = run_script("detection.py", "--model", stablelm, "--out", tmp_path / "out", "--qk-score", "row", "--method",
                   "importance", "--dataset", tiny_dataset(tmp_path / "data"), "--langs", "en,fr", "--ratio", "0.1",
                   "--device", "cpu", "--dtype", "float32", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "out" / "stablelm" / "neurons" / "meta.json").read_text())
    assert meta["qk_score"] == "row"
