"""Tiny randomly initialised decoders built from configs, a byte-level tokenizer and a tiny dataset
in the paper's layout, so that every stage can be tested in seconds without downloading anything."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ARCHS = ["llama", "qwen2", "qwen3", "gemma2", "gemma3"]
# mixture-of-experts decoders (tests/test_moe.py): 4 routed experts of 24 channels, 2 per token
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
# fused and Conv1D projections (tests/test_architectures.py): GPT-NeoX interleaves q/k/v per head, Phi-3
# concatenates q/k/v and gate/up, GPT-2's Conv1D stores weights [in, out], Falcon in its multi-query and grouped
# (new_decoder_architecture) layouts, BLOOM (alibi, q/k/v per head)
FUSED_ARCHS = ["gpt_neox", "phi3", "gpt2", "falcon", "falcon_grouped", "bloom"]
VOCAB = 256 + 3  # bytes + <pad>, <bos>, <eos>

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_EXTRA = {
    "llama": dict(model_type="llama", attention_bias=False),
    # Qwen2 has q/k/v biases and grouped-query attention
    "qwen2": dict(model_type="qwen2"),
    # Qwen3 normalises q and k per head
    "qwen3": dict(model_type="qwen3"),
    # Gemma2: logit soft-capping in attention and at the head, sliding window on alternate layers
    "gemma2": dict(model_type="gemma2", attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   sliding_window=6, query_pre_attn_scalar=16),
    # Gemma3: q/k norms, sliding window, different scaling
    "gemma3": dict(model_type="gemma3_text", sliding_window=6, query_pre_attn_scalar=16,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # StableLM (not in ARCHS, for the tests of partial rotary): rotary on the first quarter of each head's
    # channels only, LayerNorm, q/k/v biases
    "stablelm": dict(model_type="stablelm", partial_rotary_factor=0.25, use_qkv_bias=True),
    "mixtral": dict(model_type="mixtral", intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    # routed experts plus one shared expert weighted by sigmoid(shared_expert_gate(x))
    "qwen2_moe": dict(model_type="qwen2_moe", moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                      shared_expert_intermediate_size=32, norm_topk_prob=True),
    "qwen3_moe": dict(model_type="qwen3_moe", moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2),
    "olmoe": dict(model_type="olmoe", intermediate_size=24, num_experts=4, num_experts_per_tok=2),
}
# the fused families spell their sizes in their own configs' names; hidden 64, 4 heads of 16 as above
_FUSED = {
    # partial rotary as in Pythia (rotary_pct 0.25), q/k/v biases, parallel residual
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, rotary_pct=0.25, attention_bias=True),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2),
    # n_inner None: 4 * n_embd = 256 FFN channels
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=3, n_head=4, n_inner=None, n_positions=256),
    "falcon": dict(model_type="falcon", hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                   multi_query=True, new_decoder_architecture=False, ffn_hidden_size=96, bias=True,
                   parallel_attn=True, alibi=False),
    "falcon_grouped": dict(model_type="falcon", hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                           new_decoder_architecture=True, num_kv_heads=2, ffn_hidden_size=96, alibi=False),
    "bloom": dict(model_type="bloom", hidden_size=64, n_layer=3, n_head=4),
}


def tiny_config(arch: str, **overrides):
    """`overrides` replace config values (another number of layers, another rope_theta)."""
    if arch in _FUSED:
        kw = {**_FUSED[arch], "vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
              "tie_word_embeddings": False, **overrides}
        if arch not in ("gpt2", "bloom"):
            kw.setdefault("max_position_embeddings", 256)
        return AutoConfig.for_model(kw.pop("model_type"), **kw)
    kw = {**_COMMON, **_EXTRA[arch], **overrides}
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def tiny_model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, and non-zero biases
        for name, p in model.named_parameters():
            if p.dim() in (2, 3):  # 3D: the fused experts of an MoE layer
                p.normal_(0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def tiny_tokenizer(pad_token: str | None = "<pad>", eos_token: str | None = "<eos>") -> PreTrainedTokenizerFast:
    """Byte-level, BOS first; `pad_token`/`eos_token` None leaves the tokenizer without that special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    special = {k: v for k, v in (("pad_token", pad_token), ("eos_token", eos_token)) if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", **special)


def save_tiny(arch: str, path: str | Path, seed: int = 0, **overrides) -> Path:
    path = Path(path)
    model = tiny_model(arch, seed, **overrides)
    model.config._attn_implementation = "sdpa" if arch not in ("gemma2",) else "eager"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


SENTENCES = {
    "en": ["The cat sleeps on the warm mat.", "We walked to the market early.",
           "Rain fell all night over the hills.", "She reads a book every evening before bed.",
           "The train to the city leaves at nine.", "My brother cooks rice with beans."],
    "fr": ["Le chat dort sur le tapis chaud.", "Nous sommes allés au marché tôt.",
           "La pluie est tombée toute la nuit sur les collines.", "Elle lit un livre chaque soir avant de dormir.",
           "Le train pour la ville part à neuf heures.", "Mon frère cuisine du riz avec des haricots."],
    "de": ["Die Katze schläft auf der warmen Matte.", "Wir sind früh zum Markt gegangen.",
           "Die ganze Nacht fiel Regen über den Hügeln.", "Sie liest jeden Abend vor dem Schlafen ein Buch.",
           "Der Zug in die Stadt fährt um neun.", "Mein Bruder kocht Reis mit Bohnen."],
}


def tiny_dataset(root: str | Path, langs=("en", "fr", "de")) -> Path:
    """A dataset in the paper's layout with a handful of items per language."""
    root = Path(root)
    locales = {"en": "EN-EN", "fr": "FR-FR", "de": "DE-DE"}
    for lang in langs:
        s = SENTENCES[lang]
        for sub, lines in (("detect", s), ("val", s[::-1])):
            (root / sub).mkdir(parents=True, exist_ok=True)
            (root / sub / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (root / "train").mkdir(parents=True, exist_ok=True)
        (root / "train" / f"{lang}.jsonl").write_text(
            "".join(json.dumps({"text": a + " " + b}, ensure_ascii=False) + "\n" for a, b in zip(s, s[1:] + s[:1])),
            encoding="utf-8")
        (root / "test" / "mgsm").mkdir(parents=True, exist_ok=True)
        (root / "test" / "mgsm" / f"mgsm_{lang}.tsv").write_text(
            "".join(f"{a} + {b} = ?\t{a + b}\n" for a, b in [(2, 3), (10, 7), (40, 2)]), encoding="utf-8")
        (root / "test" / "mmlu").mkdir(parents=True, exist_ok=True)
        with open(root / "test" / "mmlu" / f"mmlu_{locales[lang]}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["", "Question", "A", "B", "C", "D", "Answer", "Subject"])
            for i, (q, ans) in enumerate([("2+2?", "B"), ("Capital of France?", "A"), ("Color of sky?", "C")]):
                w.writerow([i, q, "Paris", "4", "blue", "green", ans, "misc"])
    return root
