"""Per-sentence neuron importance (METHOD.md section 2) from the model's own forward pass.

FFN and output-projection importance are read by forward pre-hooks on `down_proj` and `o_proj`:
removing channel k subtracts the rank-one term H[:,k] W[:,k]^T, whose Frobenius norm is
||H[:,k]|| * ||W[:,k]||. Value importance is the norm of the attention output channels the value
row feeds (O_h[:,d] = A_h V_g[:,d]), read at the same o_proj input. Query/key importance needs what
happens inside attention, so the probe registers an attention function (transformers' registry,
with a matching mask function, or causal masking would silently disappear) that returns the model's
own eager attention output unchanged and, beside it, measures for every head h and channel d
|| (softmax(S_h) - softmax(S_h - Q_h[:,d] K_g[:,d]^T * scale)) V_g ||. Removing query channel d
of head h and key channel d of kv head g perturb S_h by the same rank-one term, so one computation
serves both: key importance sums it over the query heads that read g.

The LAPE detector (Tang et al., 2024) only needs the FFN activation sign, read at `act_fn`."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch

from .model import GROUPS, Geometry, decoder_layers, projections

PROBE_NAME = "langneurons_probe"
_ACTIVE: list["ImportanceProbe"] = []  # the probe whose forward is running (attention functions are global)


def _eager_attention(module):
    """The model's own eager attention (it knows the architecture's soft-capping, sinks, ...)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    out = _eager_attention(module)(module, query, key, value, attention_mask, scaling=scaling,
                                   dropout=dropout, **kwargs)
    if _ACTIVE and _ACTIVE[-1].measuring and _ACTIVE[-1].wants_qk:
        _ACTIVE[-1].query_key_importance(module, query, key, value, attention_mask,
                                         module.scaling if scaling is None else scaling, kwargs.get("softcap"))
    return out


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(PROBE_NAME, _probe_attention)
    AttentionMaskInterface.register(PROBE_NAME, eager_mask)


# Below this bound on |scale * q[t,d] * k[s,d]| a softmax row shifted by its unperturbed maximum can be
# exponentiated directly: its largest term lies in [e^-40, e^40], far from float32 under- and overflow
_EXP_SAFE = 40.0
_LOG2E = 1.4426950408889634  # exp(x) = 2^(x log2 e); torch's exp2 runs ~3x faster than exp on the CPU


def qk_importance(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                  valid: torch.Tensor, scaling: float, softcap: float | None = None,
                  chunk_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query importance [B, H*D] and key importance [B, KV*D] of one attention layer.

    query [B,H,T,D] and key/value [B,KV,S,D] as the attention function sees them (after rotary
    embedding and q/k norms); keep [B,1|H,T,S] bool: key s visible from query t; valid [B,T] bool:
    real (non-padding) query tokens. Query rows are processed in blocks, each over the keys its rows
    see, and channels in chunks so that the [B,H,c,rows,keys] temporaries stay near `chunk_bytes`
    (default: 4 MiB on the CPU, a few large matrix products rather than many small ones, 256 MiB on a
    GPU).

    Per block and chunk the work is three passes over the perturbed scores (one fused multiply-add,
    one exp2, one sum) and one matrix product: removing channel d multiplies row t of the
    unnormalised softmax by exp(-scale * Q[t,d] * K[:,d]), so no per-row maximum or normalisation
    pass is needed (the product is divided by the row sums instead), and the product is with the
    triangular factor of the values, which for a row seeing keys < s has only min(s, D) columns.
    The cost is bounded by the formula itself: H * D * sum_t keys_t * min(keys_t, D) multiply-adds
    per layer (README: about 4x a decoder forward at 256 tokens on the embedded model)."""
    B, H, T, D = query.shape
    KV, S = key.shape[1], key.shape[2]
    rep = H // KV
    if chunk_bytes is None:
        chunk_bytes = 1 << 22 if query.device.type == "cpu" else 1 << 28
    dev = query.device
    q, k = query.float().reshape(B, KV, rep, T, D), key.float()  # query heads grouped by the kv head they read
    # ||x V|| = ||x R^T|| for V^T = Q R (Q with orthonormal columns): R^T is lower trapezoidal, so a
    # row x that weighs only keys < s has x R^T in the first min(s, r) columns
    rt = torch.linalg.qr(value.float().transpose(-1, -2), mode="r").R.transpose(-1, -2)  # [B,KV,S,r]
    r = rt.shape[-1]
    # padding queries are discarded; letting each see one key (its diagonal) keeps its softmax finite
    # and leaves the blocks' key ranges as the real rows make them
    own_key = torch.arange(T, device=dev)[:, None] + (S - T) == torch.arange(S, device=dev)
    keep = torch.where(valid[:, None, :, None], keep, own_key)
    keep = keep.view(B, 1, 1, T, S) if keep.shape[1] == 1 else keep.view(B, KV, rep, T, S)
    pos = torch.arange(S, device=dev)
    first = torch.where(keep, pos, S).amin(-1).flatten(0, 2).amin(0)  # [T] first and last key each row sees
    last = torch.where(keep, pos, -1).amax(-1).flatten(0, 2).amax(0)

    def capped(x: torch.Tensor) -> torch.Tensor:
        return x if softcap is None else torch.tanh(x / softcap).mul_(softcap)

    pre = (q.reshape(B, KV, rep * T, D) @ k.transpose(-1, -2)).view(B, KV, rep, T, S) * scaling
    scores = capped(pre).masked_fill_(~keep, float("-inf"))
    top = scores.amax(-1, keepdim=True)  # [B,KV,rep,T,1]
    out = (torch.softmax(scores, -1).view(B, KV, rep * T, S) @ rt).view(B, KV, rep, T, r)
    # removing channel d changes a score by at most |scale * q[t,d] * k[s,d]| (soft-capping only shrinks
    # changes); beyond the bound, each perturbed row is shifted by its own maximum (one more pass)
    bound = scaling * q.abs().amax(3).flatten(1, 2).amax(1) * k.abs().amax(2).amax(1)  # [B, D]
    stable = bool((bound < _EXP_SAFE).all())
    # base-2 exponents: without soft-capping, scores and channel terms are scaled by log2 e up front
    if softcap is None:
        scores = scores.sub_(top).mul_(_LOG2E)
    top2 = top * _LOG2E
    qa = (q * (-scaling if softcap is not None else -scaling * _LOG2E)).transpose(-1, -2)  # [B,KV,rep,D,T]
    kt = k.transpose(-1, -2)[:, :, None]  # [B,KV,1,D,S]
    rowmask = valid.view(B, 1, 1, 1, T).float()
    n2 = torch.zeros(B, KV, rep, D, device=dev)
    # blocks of query rows: under a causal mask a block sees only the keys up to its last row (and
    # under a sliding window only those from its first row's window on)
    rows_per_block = max(16, -(-T // 16))
    first, last = first.tolist(), last.tolist()
    for t0 in range(0, T, rows_per_block):
        t1 = min(T, t0 + rows_per_block)
        s0, s1 = min(first[t0:t1]), max(last[t0:t1]) + 1
        Tb, Sb, r1 = t1 - t0, s1 - s0, min(s1, r)
        c = max(1, min(D, chunk_bytes // (4 * B * H * Tb * Sb)))
        # reused buffers: allocation costs on the CPU
        buf, ybuf = torch.empty(B * H * c * Tb * Sb, device=dev), torch.empty(B * H * c * Tb * r1, device=dev)
        base_b = (scores if softcap is None else pre)[..., None, t0:t1, s0:s1].contiguous()
        keep_b, top_b = keep[..., None, t0:t1, s0:s1], top2[..., None, t0:t1, :]
        rt_b, out_b = rt[:, :, s0:s1, :r1].contiguous(), out[..., None, t0:t1, :r1]
        qa_b, kt_b = qa[..., t0:t1].contiguous(), kt[..., s0:s1].contiguous()
        for d0 in range(0, D, c):
            d1 = min(D, d0 + c)
            n = B * H * (d1 - d0) * Tb
            # scores minus Q[:,d] K[:,d]^T * scale for every channel d of the chunk, in one fused pass
            x = torch.addcmul(base_b, qa_b[..., d0:d1, :, None], kt_b[..., d0:d1, None, :],
                              out=buf[:n * Sb].view(B, KV, rep, d1 - d0, Tb, Sb))
            if softcap is not None:
                x = torch.tanh(x.div_(softcap), out=x).mul_(softcap * _LOG2E).sub_(top_b)
                x = x.masked_fill_(~keep_b, float("-inf"))
            if not stable:
                x = x.sub_(x.amax(-1, keepdim=True))
            x = x.exp2_()
            z = x.sum(-1, keepdim=True)  # the softmax denominators (a pass: cheaper than a 1+r1 wide product)
            y = torch.matmul(x.view(B, KV, -1, Sb), rt_b, out=ybuf[:n * r1].view(B, KV, -1, r1))
            y = y.view(B, KV, rep, d1 - d0, Tb, r1)
            # Z * (perturbed output - output) in place, then its norm over Z
            dist = torch.linalg.vector_norm(y.addcmul_(z, out_b, value=-1), dim=-1).div_(z[..., 0])
            n2[..., d0:d1] += (dist.square_() * rowmask[..., t0:t1]).sum(-1)
    q_imp = n2.sqrt().reshape(B, H * D)
    k_imp = n2.sum(2).sqrt().reshape(B, KV * D)
    return q_imp, k_imp


class ImportanceProbe:
    """Importance of every neuron for every sentence of a batch, from one forward pass.

    Use as a context manager, then call with (input_ids, attention_mask); returns
    {group: float32 tensor [batch, num_layers, group_size]} on the CPU. With method="activation",
    returns {"active": [batch, layers, intermediate] counts of tokens with FFN activation > 0,
    "tokens": [batch] token counts} instead."""

    def __init__(self, model, groups: tuple[str, ...] = GROUPS, method: str = "importance",
                 chunk_bytes: int | None = None):
        self.model, self.method, self.chunk_bytes = model, method, chunk_bytes
        self.groups = tuple(groups) if method == "importance" else ()
        self.geom = Geometry.from_config(model.config)
        self.layers = [projections(layer) for layer in decoder_layers(model)]
        self.layer_of = {id(p["attn"]): i for i, p in enumerate(self.layers)}
        self.wants_qk = bool({"attn_q", "attn_k"} & set(self.groups))
        self._handles: list = []
        self._scores: dict[str, list] = {}
        self._valid: torch.Tensor | None = None
        self._col_norms: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------ hooks
    # (they measure only inside __call__: other forwards of the model under the probe are untouched)
    @property
    def measuring(self) -> bool:
        return self._valid is not None

    def _norms(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C] L2 norms over real tokens of x [B, T, C]."""
        valid = self._valid.to(x.device)
        return (x.float().square() * valid[..., None]).sum(1).sqrt()

    def _column_norms(self, linear: torch.nn.Linear) -> torch.Tensor:
        """||W[:, k]|| of an input channel: fixed while probing, so computed once per module."""
        if id(linear) not in self._col_norms:
            self._col_norms[id(linear)] = linear.weight.float().norm(dim=0)
        return self._col_norms[id(linear)]

    def _down_hook(self, layer: int, module, args) -> None:
        if not self.measuring:
            return
        imp = self._norms(args[0]) * self._column_norms(module)
        for g in ("fwd_up", "fwd_down"):
            if g in self.groups:
                self._scores[g][layer] = imp

    def _o_hook(self, layer: int, module, args) -> None:
        if not self.measuring:
            return
        x = args[0]
        if "attn_o" in self.groups:
            self._scores["attn_o"][layer] = self._norms(x) * self._column_norms(module)
        if "attn_v" in self.groups:
            g = self.geom
            per_channel = self._norms(x).square().reshape(-1, g.num_kv_heads, g.n_rep, g.head_dim)
            self._scores["attn_v"][layer] = per_channel.sum(2).sqrt().reshape(-1, g.num_kv_heads * g.head_dim)

    def _act_hook(self, layer: int, module, args, output) -> None:
        if not self.measuring:
            return
        valid = self._valid.to(output.device)
        self._scores["active"][layer] = ((output > 0) & valid[..., None]).sum(1).float()

    def query_key_importance(self, module, query, key, value, attention_mask, scaling, softcap) -> None:
        valid = self._valid.to(query.device)
        S = key.shape[2]
        if attention_mask is None:
            keep = torch.ones(1, 1, query.shape[2], S, dtype=torch.bool, device=query.device).tril(S - query.shape[2])
        elif attention_mask.dtype == torch.bool:
            keep = attention_mask[..., :S]
        else:
            keep = attention_mask[..., :S] > torch.finfo(attention_mask.dtype).min / 2
        q_imp, k_imp = qk_importance(query, key, value, keep, valid, scaling, softcap, self.chunk_bytes)
        layer = self.layer_of[id(module)]
        if "attn_q" in self.groups:
            self._scores["attn_q"][layer] = q_imp
        if "attn_k" in self.groups:
            self._scores["attn_k"][layer] = k_imp

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "ImportanceProbe":
        for i, p in enumerate(self.layers):
            if self.method == "activation":
                self._handles.append(p["mlp"].act_fn.register_forward_hook(
                    lambda m, a, o, i=i: self._act_hook(i, m, a, o)))
                continue
            if {"fwd_up", "fwd_down"} & set(self.groups):
                self._handles.append(p["down"].register_forward_pre_hook(lambda m, a, i=i: self._down_hook(i, m, a)))
            if {"attn_o", "attn_v"} & set(self.groups):
                self._handles.append(p["o"].register_forward_pre_hook(lambda m, a, i=i: self._o_hook(i, m, a)))
        self._old_impl = self.model.config._attn_implementation
        if self.wants_qk:
            _register()
            self.model.set_attn_implementation(PROBE_NAME)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        self._col_norms.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.wants_qk:
            self.model.set_attn_implementation(self._old_impl)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(self.layers)
        keys = ("active",) if self.method == "activation" else self.groups
        self._scores = {g: [None] * n for g in keys}
        self._valid = attention_mask.bool()
        try:
            # the decoder alone: detection needs no logits, and the LM head is a large share of a
            # small model's forward (Gemma 3 270M: 262k x 640)
            # positions count real tokens only, so left padding does not shift the rotary phases
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=positions, use_cache=False)
        finally:
            self._valid = None
        out = {g: torch.stack([s.cpu() for s in v], 1) for g, v in self._scores.items()}
        if self.method == "activation":
            out["tokens"] = attention_mask.sum(1).cpu()
        return out


@contextlib.contextmanager
def probing(model, **kwargs) -> Iterator[ImportanceProbe]:
    with ImportanceProbe(model, **kwargs) as probe:
        yield probe
