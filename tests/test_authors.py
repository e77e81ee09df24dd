"""The authors' detection mode (docs/method.md section 10) against the outputs of their own code, on every
architecture, batched against one text at a time, and through deactivation."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED_DATA, run_script
from langneurons import authors
from langneurons.data import mgsm_texts
from langneurons.importance import ImportanceProbe
from langneurons.data import pad_batch
from langneurons.model import GROUPS, Geometry, load_model
from langneurons.neurons import read_neuron_file
from tiny import ARCHS, SENTENCES, save_tiny, tiny_dataset, tiny_model, tiny_tokenizer

REF = SHARED_DATA / "authors_reference"
MODES = {"shipped_nomask": "bidirectional", "eager_causal": "causal"}
TOK = tiny_tokenizer()
needs_ref = pytest.mark.skipif(not REF.is_dir(), reason=f"{REF} absent")


def as_sets(obj):
    """{group: {layer: set}} of a neuron file's raw indices (no index mapping)."""
    return {g: {str(l): set(v) for l, v in obj[g].items()} for g in GROUPS}


# ---------------------------------------------------------------- against the authors' own outputs

@pytest.fixture(scope="module")
def reference():
    model, tok = load_model(str(REF / "tiny-llama-gqa"), "cpu", "float32")
    return model, tok, json.loads((REF / "input_ids.json").read_text())["input_ids"]


@needs_ref
def test_their_prompt_format_and_cut_give_their_token_ids(reference):
    _, tok, ids = reference
    texts = json.loads((REF / "texts.json").read_text())
    for lang in ids:
        ours = mgsm_texts(REF / "dataset", lang, "authors")
        assert ours == texts[lang]
        assert [tok(t)["input_ids"][:256] for t in ours] == ids[lang]


@needs_ref
@pytest.mark.parametrize("mode", MODES)
def test_scores_and_per_text_top_lists_equal_theirs(reference, mode):
    model, tok, ids = reference
    ref = load_file(REF / mode / "scores.safetensors")
    tops = {r: json.loads((REF / mode / f"topk_ratio{r}.json").read_text()) for r in ("0.1", "0.05")}
    geom = Geometry.from_config(model.config)
    sizes = authors.score_sizes(geom, authors.definitions())
    with authors.AuthorsProbe(model, attention=MODES[mode]) as probe:
        for lang, seqs in ids.items():
            # all six texts of a language in one padded batch: padding must not count
            scores, paper = probe(*pad_batch(seqs, tok.pad_token_id, "cpu"))
            assert paper == {}
            for i in range(len(seqs)):
                for g in GROUPS:
                    for layer in range(geom.num_layers):
                        torch.testing.assert_close(scores[g][i, layer], ref[f"{lang}.{i}.{g}.{layer}"],
                                                   rtol=1e-5, atol=0)
                for r, top in tops.items():
                    k = authors.top_counts(geom, float(r), sizes)
                    assert k == top["k"]
                    for g in GROUPS:
                        for layer in range(geom.num_layers):
                            ours = set(scores[g][i, layer].topk(k[g]).indices.tolist())
                            assert ours == set(top["topk"][lang][i][g][str(layer)]), (lang, i, g, layer, r)


@needs_ref
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ratio", ["0.1", "0.05"])
def test_detection_sets_equal_theirs(tmp_path, mode, ratio):
    r = run_script("detection.py", "--method", "authors", "--model", REF / "tiny-llama-gqa",
                   "--dataset", REF / "dataset", "--corpus", "mgsm", "--langs", "en,zh,sw", "--ratio", ratio,
                   "--out", tmp_path, "--authors-attention", MODES[mode], "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    nd = tmp_path / "tiny-llama-gqa" / "neurons"
    meta = json.loads((nd / "meta.json").read_text())
    assert meta["method"] == "authors" and meta["authors"]["kv_index_space"] == "query_heads"
    assert meta["corpus"]["mgsm_format"] == "authors"
    prefix = "tiny-llama-gqa_gsm"
    for lang in ("en", "zh", "sw"):
        ours = json.loads((nd / f"related_{lang}.json").read_text())
        assert ours["meta"]["kv_index_space"] == "query_heads"
        theirs = json.loads((REF / mode / "detect_out" / f"{prefix}_{lang}_atten{ratio}_ffn{ratio}.json").read_text())
        assert as_sets(ours) == as_sets(theirs), lang
        theirs = json.loads((REF / mode / "stats" / f"{prefix}_exclusive_{lang}_neuron_{ratio}.json").read_text())
        assert as_sets(json.loads((nd / f"exclusive_{lang}.json").read_text())) == as_sets(theirs), lang
    theirs = json.loads((REF / mode / "stats" / f"{prefix}_shared_neurons_{ratio}.json").read_text())
    assert as_sets(json.loads((nd / "shared.json").read_text())) == as_sets(theirs)
    st = json.loads((nd / "stats.json").read_text())
    qh = 3 * 4 * 16  # layers x query-head space: attn_k/attn_v are counted there
    assert st["neurons_per_group"]["attn_k"] == qh and st["sets"]["random_shared"]["size"] == st["sets"]["shared"]["size"]


# ---------------------------------------------------------------- the query/key score, chunked vs naive

def naive_qk(q, k, keep, valid, scaling, softcap):
    B, H, T, D = q.shape
    k = k.repeat_interleave(H // k.shape[1], 1).double()
    q = q.double()
    cap = (lambda x: torch.tanh(x / softcap) * softcap) if softcap else (lambda x: x)
    s = (q @ k.transpose(-1, -2)) * scaling
    base = torch.softmax(cap(s).masked_fill(~keep, float("-inf")), -1)
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for d in range(D):
        p = torch.softmax(cap(s - scaling * q[..., d:d + 1] * k[..., d][:, :, None, :]).masked_fill(~keep, float("-inf")), -1)
        out[:, :, d] = (((p - base) ** 2).sum(-1) * valid[:, None, :]).nan_to_num().sum(-1)
    return out.reshape(B, H * D)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 12, 1 << 30])
def test_blocked_query_key_score_equals_the_naive_formula(softcap, chunk_bytes):
    torch.manual_seed(0)
    B, H, KV, T, D = 2, 4, 2, 37, 8
    q, k = torch.randn(B, H, T, D), torch.randn(B, KV, T, D)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 30:] = False  # right padding in the second text
    pos = torch.arange(T)
    keep = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < 9)  # causal sliding window
    keep = (keep[None, None] & valid[:, None, None, :])
    got = authors.authors_qk_scores(q, k, keep, valid, 0.35, softcap, chunk_bytes)
    want = naive_qk(q, k, keep.expand(B, H, T, T), valid.double(), 0.35, softcap)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------- every architecture

def encode(texts, left=False):
    return pad_batch([TOK(t)["input_ids"] for t in texts], TOK.pad_token_id, "cpu", left=left)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_every_architecture_batched_equals_one_at_a_time(arch, attention):
    model = tiny_model(arch)
    texts = SENTENCES["fr"][:3]
    with authors.AuthorsProbe(model, paper_groups=GROUPS, attention=attention) as probe:
        assert model.config._attn_implementation == authors.AUTHORS_ATTENTION
        right, paper_right = probe(*encode(texts))
        left, _ = probe(*encode(texts, left=True))
        for i, t in enumerate(texts):
            one, paper_one = probe(*encode([t]))
            for g in GROUPS:
                torch.testing.assert_close(right[g][i], one[g][0], rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(left[g][i], one[g][0], rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(paper_right[g][i], paper_one[g][0], rtol=1e-4, atol=1e-6)
    assert model.config._attn_implementation == "eager"
    geom = Geometry.from_config(model.config)
    assert right["attn_k"].shape[-1] == geom.num_heads * geom.head_dim  # query-head space
    assert torch.equal(right["attn_q"], right["attn_k"]) and torch.equal(right["attn_v"], right["attn_o"])
    assert torch.equal(right["fwd_up"], right["fwd_down"])
    if attention == "causal":  # an undone piece is exactly what --method importance computes
        with ImportanceProbe(model) as probe:
            want = probe(*encode(texts))
        for g in GROUPS:
            torch.testing.assert_close(paper_right[g], want[g], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_bidirectional_lets_early_tokens_see_later_ones(arch):
    """Causal: the first token's scores ignore the last token; bidirectional: they depend on it, and the
    probe leaves the model's causal forward (outside the probe call) unchanged."""
    model = tiny_model(arch)
    a, b = TOK("The cat sleeps.")["input_ids"], TOK("The cat sleeps!")["input_ids"]
    mask = torch.ones(1, len(a), dtype=torch.long)
    first = {}
    layer0 = model.get_decoder().layers[0].mlp.up_proj
    for attention in ("causal", "bidirectional"):
        outs = []
        with authors.AuthorsProbe(model, authors_groups=("fwd_up",), attention=attention) as probe:
            for ids in (a, b):
                seen = {}
                h = layer0.register_forward_hook(lambda m, i, o: seen.update(x=o[0, 0].clone()))
                probe(torch.tensor([ids]), mask)
                h.remove()
                outs.append(seen["x"])
            before = model(input_ids=torch.tensor([a])).logits
        first[attention] = outs
        torch.testing.assert_close(model(input_ids=torch.tensor([a])).logits, before, rtol=0, atol=0)
    torch.testing.assert_close(*first["causal"], rtol=0, atol=0)
    # layer 0's MLP input at token 0 mixes only token 0 in causal attention; bidirectionally it sees the '!'
    assert not torch.allclose(*first["bidirectional"])


# ---------------------------------------------------------------- the detection script and deactivation

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny("qwen2", root / "model"), tiny_dataset(root / "data")


def test_neuron_files_map_to_kv_rows_and_deactivate(tiny, tmp_path):
    model, data = tiny
    common = ["--method", "authors", "--model", model, "--dataset", data, "--corpus", "mgsm", "--langs", "en,fr,de",
              "--ratio", "0.3"]
    r = run_script("detection.py", *common, "--out", tmp_path / "a", "--authors-undo", "qk")
    assert r.returncode == 0, r.stderr[-3000:]
    nd = tmp_path / "a" / "model" / "neurons"
    meta = json.loads((nd / "meta.json").read_text())
    geom = Geometry(**meta["geometry"])
    assert meta["authors"]["group_definitions"]["attn_k"] == "paper"
    # attn_k is on k_proj rows (the paper's qk), attn_v in query-head space (the authors' vo)
    assert meta["authors"]["kv_index_space"] == {"attn_k": "kv_rows", "attn_v": "query_heads"}
    raw = json.loads((nd / "related_all.json").read_text())
    nset, _ = read_neuron_file(nd / "related_all.json", geom)
    D, rep = geom.head_dim, geom.n_rep
    for layer in range(geom.num_layers):
        assert torch.nonzero(nset["attn_k"][layer]).flatten().tolist() == raw["attn_k"][str(layer)]
        mapped = sorted({(i // D // rep) * D + i % D for i in raw["attn_v"][str(layer)]})
        assert torch.nonzero(nset["attn_v"][layer]).flatten().tolist() == mapped
    assert sum(len(v) for v in raw["attn_v"].values()) > 0
    # every set deactivates through deactivation.py
    r = run_script("detection.py", *common, "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr[-3000:]
    nd = tmp_path / "b" / "model" / "neurons"
    r = run_script("deactivation.py", "--model", model, "--dataset", data, "--langs", "en,fr", "--out", tmp_path / "b",
                   "--neurons", nd / "related_all.json", "--neurons", nd / "random_shared.json", "--measure-ppl",
                   "--save-variants", "none", "--limit", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "b" / "model" / "deactivation.json").read_text())
    related, _ = read_neuron_file(nd / "related_all.json", geom)
    assert result["sets"]["related_all"]["size"] == sum(int(related[g].sum()) for g in GROUPS)
    assert result["sets"]["related_all"]["dppl"]["en"] != 0


def test_authors_top_counts_are_swapped(tiny, tmp_path):
    model, data = tiny
    r = run_script("detection.py", "--method", "authors", "--model", model, "--dataset", data, "--langs", "en,fr",
                   "--ratio", "0.1", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    nd = tmp_path / "model" / "neurons"
    firing = load_file(nd / "firing.safetensors")
    # 6 sentences; attention groups keep int(0.1 * 96) = 9 of 64, FFN groups int(0.1 * 64) = 6 of 96
    for g, k, n in [("attn_q", 9, 64), ("attn_k", 9, 64), ("attn_v", 9, 64), ("attn_o", 9, 64),
                    ("fwd_up", 6, 96), ("fwd_down", 6, 96)]:
        assert firing[f"{g}.0"].shape == (2, n) and firing[f"{g}.0"].sum(1).tolist() == [6 * k] * 2, g
    assert torch.equal(firing["attn_q.1"], firing["attn_k.1"]) and torch.equal(firing["fwd_up.2"], firing["fwd_down.2"])


@pytest.mark.parametrize("extra,message", [
    (["--method", "authors", "--authors-undo", "qk,bogus"], "--authors-undo: unknown piece 'bogus'"),
    (["--authors-undo", "qk"], "only with --method authors"),
    (["--authors-attention", "bidirectional"], "only with --method authors"),
    (["--method", "authors", "--authors-undo", "prompt"], "only with --corpus mgsm"),
    (["--method", "authors", "--corpus", "mgsm", "--authors-undo", "prompt", "--mgsm-format", "authors"],
     "contradicts"),
])
def test_bad_authors_flags_are_one_line_exit_2(tiny, tmp_path, extra, message):
    model, data = tiny
    r = run_script("detection.py", "--model", model, "--dataset", data, "--langs", "en,fr", "--out", tmp_path / "out",
                   *extra)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
