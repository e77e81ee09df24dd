"""Mixture-of-experts decoders (langneurons/moe.py, docs/method.md section 1): expert-channel importance equals
brute-force ablation, unrouted experts score 0, deactivation and training touch only the listed expert slices
(router and everything else bit-identical), weights == hooks == intervention, streamed == in-memory, and the
stages run end to end on a tiny MoE."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import run_script
from tiny import MOE_ARCHS, save_tiny, tiny_dataset, tiny_model

from langneurons import moe
from langneurons.importance import ImportanceProbe
from langneurons.masking import ablation_hooks, meta_skeleton, zero_neurons, zero_neurons_streaming, zeroed
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
