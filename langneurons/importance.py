"""Per-sentence neuron importance (docs/method.md section 2) from the model's own forward pass.

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

Those are channels after rotary embedding (and q/k norms); the neuron deactivation zeroes is the
q_proj/k_proj row before them. Without q/k norms rotary spreads a row over two channels, so its
removal is a rank-two change of S_h, scored exactly by `qk_row_importance` (qk_score="row").

The LAPE detector (Tang et al., 2024) only needs the FFN activation sign, read at the FFN's activation module (`act_fn`, `act`, ...)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
import inspect
import sys

import torch

from . import moe
from .cli import InputError
from .model import GROUPS, Geometry, decoder_layers, neuron_slots, projections, weight_dim

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
_MIN_PRODUCT_ROWS = 512  # rows of each matrix product in qk_importance's inner step (CPU: smaller ones run slowly)


def visible_keys(attention_mask: torch.Tensor | None, T: int, S: int, device) -> torch.Tensor:
    """Bool [B|1, 1, T, S]: key s visible from query t, from the mask the attention function receives
    (None: causal; boolean, or additive with large negative values)."""
    if attention_mask is None:
        return torch.ones(1, 1, T, S, dtype=torch.bool, device=device).tril(S - T)
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :S]
    return attention_mask[..., :S] > torch.finfo(attention_mask.dtype).min / 2


def qk_importance_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                            valid: torch.Tensor, scaling: float,
                            softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's query/key importance as written (docs/method.md section 2), one head h and channel d at a
    time: || (softmax(S_h) - softmax(S_h - Q_h[:,d] K_g[:,d]^T * scale)) V_g || over the real query rows,
    g the kv head h reads; key channel d of g sums the squares over the heads reading g. Arguments and
    results as `qk_importance`; slow (a full softmax per channel), for tests and for reading."""
    B, H, T, D = query.shape
    KV = key.shape[1]
    rep = H // KV
    q, k, v = query.float(), key.float(), value.float()
    keep = keep.expand(B, H, T, key.shape[2])

    def attention_output(s: torch.Tensor, h: int) -> torch.Tensor:
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        return torch.softmax(s.masked_fill(~keep[:, h], float("-inf")), -1) @ v[:, h // rep]

    n2 = torch.zeros(B, H, D, device=query.device)  # squared norm of the change, per head and channel
    for h in range(H):
        g = h // rep
        s = q[:, h] @ k[:, g].transpose(-1, -2) * scaling  # S_h [B, T, S]
        for d in range(D):
            ds = q[:, h, :, d, None] * k[:, g, None, :, d] * scaling  # Q_h[:,d] K_g[:,d]^T * scale
            change = attention_output(s, h) - attention_output(s - ds, h)  # [B, T, D]
            # padding rows may see no key (NaN): they never count
            n2[:, h, d] = torch.where(valid[:, :, None], change, 0).square().sum((1, 2))
    return n2.sqrt().reshape(B, H * D), n2.view(B, KV, rep, D).sum(2).sqrt().reshape(B, KV * D)


def block_key_ranges(keep: torch.Tensor, valid: torch.Tensor) -> tuple[list[int], list[int]]:
    """Per query row t, the first and last key any text and head of the batch sees (padding rows see
    only their own key), as Python lists: the key range of each block of rows. It depends on the mask
    only, so a probe computes it once per mask and forward (one host synchronisation, not one per layer)."""
    B, T, S = keep.shape[0], keep.shape[-2], keep.shape[-1]
    own_key = torch.arange(T, device=keep.device)[:, None] + (S - T) == torch.arange(S, device=keep.device)
    keep = torch.where(valid[:, None, :, None], keep, own_key)
    pos = torch.arange(S, device=keep.device)
    first = torch.where(keep, pos, S).amin(-1).amin(1).amin(0)
    last = torch.where(keep, pos, -1).amax(-1).amax(1).amax(0)
    both = torch.stack((first, last)).tolist()
    return both[0], both[1]


def qk_importance(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                  valid: torch.Tensor, scaling: float, softcap: float | None = None,
                  chunk_bytes: int | None = None, top_k: tuple[int, int] | None = None,
                  key_ranges: tuple[list[int], list[int]] | None = None,
                  stats: dict | None = None, product: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """Query importance [B, H*D] and key importance [B, KV*D] of one attention layer.

    query [B,H,T,D] and key/value [B,KV,S,D] as the attention function sees them (after rotary
    embedding and q/k norms); keep [B,1|H,T,S] bool: key s visible from query t; valid [B,T] bool:
    real (non-padding) query tokens.

    It computes `qk_importance_reference`, reorganised (equal to float32 rounding; tests compare the two
    with grouped-query attention, soft-capping, causal, sliding-window and padding masks): the query heads
    reading one kv head are handled together, the values are replaced by their triangular factor (same
    norms), the softmax is never normalised per channel, and each block of query rows only visits the keys
    it can see. Query rows are processed in blocks, each over the keys its rows
    see, and channels in chunks so that the [B,H,c,rows,keys] temporaries stay near `chunk_bytes`
    (default: 4 MiB on the CPU, a few large matrix products rather than many small ones, 256 MiB on a
    GPU).

    Per block and chunk the work is three passes over the perturbed scores (one fused multiply-add,
    one exp2, one sum) and one matrix product: removing channel d multiplies row t of the
    unnormalised softmax by exp(-scale * Q[t,d] * K[:,d]), so no per-row maximum or normalisation
    pass is needed (the product is divided by the row sums instead), and the product is with the
    triangular factor of the values, which for a row seeing keys < s has only min(s, D) columns.
    The products cost about H * D * sum_t sum_s min(s, D) multiply-adds per layer (s over the keys row t
    sees; key s has min(s, D) entries in the triangular factor, `_trapezoidal_product`; docs/detection.md,
    the detection cost).

    top_k = (k_query, k_key): only each text's top k_query query channels and top k_key key channels are
    needed (detection's top lists). Channels whose upper bound (`qk_upper_bounds`) stays below the k-th
    exact score of every text of the batch are then not scored exactly, and hold -inf; the top lists are
    those of exhaustive scoring (docs/detection.md, pruned top-k). key_ranges: `block_key_ranges` of this
    mask, when the caller has it; stats: counts "scored" (channels scored exactly, padding included) and
    "channels" are added to it. product "bfloat16" or "tf32": the product with the values in that
    precision, of float32-formed probability differences (`_ExactScores._low_precision`; for GPU checks)."""
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
    first, last = key_ranges if key_ranges is not None else block_key_ranges(keep.flatten(1, 2), valid)

    def capped(x: torch.Tensor) -> torch.Tensor:
        return x if softcap is None else torch.tanh(x / softcap).mul_(softcap)

    pre = (q.reshape(B, KV, rep * T, D) @ k.transpose(-1, -2)).view(B, KV, rep, T, S) * scaling
    scores = capped(pre).masked_fill_(~keep, float("-inf"))
    top = scores.amax(-1, keepdim=True)  # [B,KV,rep,T,1]
    probs = torch.softmax(scores, -1)
    out = (probs.view(B, KV, rep * T, S) @ rt).view(B, KV, rep, T, r)
    # removing channel d changes a score by at most |scale * q[t,d] * k[s,d]| (soft-capping only shrinks
    # changes); beyond the bound, each perturbed row is shifted by its own maximum (one more pass). On a
    # GPU the check would stop the device for the host, so there every row is shifted
    if dev.type == "cpu":
        bound = scaling * q.abs().amax(3).flatten(1, 2).amax(1) * k.abs().amax(2).amax(1)  # [B, D]
        stable = bool((bound < _EXP_SAFE).all())
    else:
        stable = False
    # base-2 exponents: without soft-capping, scores and channel terms are scaled by log2 e up front
    if softcap is None:
        scores = scores.sub_(top).mul_(_LOG2E)
    qa = (q * (-scaling if softcap is not None else -scaling * _LOG2E)).transpose(-1, -2)  # [B,KV,rep,D,T]
    kt = k.transpose(-1, -2)[:, :, None]  # [B,KV,1,D,S]
    if product not in ("float32", "bfloat16", "tf32"):
        raise ValueError(f"product must be float32, bfloat16 or tf32, not {product!r}")
    exact = _ExactScores(scores if softcap is None else pre, keep, top * _LOG2E, rt, out, valid, softcap, stable,
                         first, last, chunk_bytes, probs=probs, product=product)
    kq, kk = top_k if top_k is not None else (0, 0)
    if not (kq or kk) or (kq >= H * D and kk >= KV * D):
        n2 = exact(qa, kt)
        if stats is not None:
            stats["scored"] = stats.get("scored", 0) + B * H * D
            stats["channels"] = stats.get("channels", 0) + B * H * D
        return n2.sqrt().reshape(B, H * D), n2.sum(2).sqrt().reshape(B, KV * D)
    # every _SAMPLE_STEP-th query row's terms of the bound: a lower bound of the bound, at a fraction of its cost.
    # Channels it already puts at or above a text's k-th exact score must be scored whatever the full bound says,
    # so where they are most of a head the full bound would prune nothing, and it is not computed (random
    # weights: channels are alike and none can be pruned)
    every, keys = slice(None, None, _SAMPLE_STEP), _key_terms(k, value, softcap)
    sample = qk_upper_bounds(q[:, :, :, every], k, value, probs[:, :, :, every], out[:, :, :, every],
                             valid[:, every], last[every], scaling, softcap, keys)
    full = lambda: qk_upper_bounds(q, k, value, probs, out, valid, last, scaling, softcap, keys)
    return _pruned(exact, qa, kt, sample, full, min(kq, H * D), min(kk, KV * D), stats)


_KEY_CHUNK = 64  # keys per product where the values' factor is triangular (smaller ones run slowly)


def _trapezoidal_product(x: torch.Tensor, rt: torch.Tensor, s0: int, out: torch.Tensor) -> torch.Tensor:
    """x [G,M,K] @ rt [G,K,N] into out, for rt lower trapezoidal in absolute key order (key s0 + i has nonzeros
    in columns <= s0 + i only): keys whose row reaches every column in one product, the earlier ones in
    chunks of _KEY_CHUNK keys into just the columns they reach, which saves up to half the products of the
    triangle (the keys before the head_dim-th)."""
    K, N = rt.shape[-2:]
    full = min(K, max(0, N - 1 - s0))  # keys before this one reach fewer than N columns
    starts = list(range(0, full, _KEY_CHUNK))
    if len(starts) <= 1:  # at most one chunk of the triangle: one product
        return torch.matmul(x, rt, out=out)
    torch.matmul(x[..., starts[-1]:], rt[:, starts[-1]:], out=out)  # the last chunk reaches every column
    for k0 in reversed(starts[:-1]):
        k1 = k0 + _KEY_CHUNK
        w = min(N, s0 + k1)
        out[..., :w].baddbmm_(x[..., k0:k1], rt[:, k0:k1, :w])
    return out


class _ExactScores:
    """The exact squared query/key scores of `qk_importance` for a set of channels per head: called with
    qa [B,KV,rep,m,T] (the query channels, times -scale) and kt [B,KV,1|rep,m,S] (the key channels),
    it returns n2 [B,KV,rep,m], the squared norm of each channel's change of the attention output over
    the real query rows. Blocks of query rows over their key ranges, chunks of channels (as documented
    there); the same code for every channel whichever channels are asked for, so a channel's score does
    not depend on which others are scored with it."""

    def __init__(self, base, keep, top2, rt, out, valid, softcap, stable, first, last, chunk_bytes,
                 probs=None, product: str = "float32"):
        self.base, self.keep, self.top2, self.rt, self.out = base, keep, top2, rt, out
        self.probs, self.product = probs, product
        self.softcap, self.stable, self.first, self.last, self.chunk_bytes = softcap, stable, first, last, chunk_bytes
        B, T = valid.shape
        self.rowmask = valid.view(B, 1, 1, 1, T).float()

    def __call__(self, qa: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
        B, KV, rep, D, T = qa.shape
        H, r, dev, softcap = KV * rep, self.rt.shape[-1], qa.device, self.softcap
        n2 = torch.zeros(B, KV, rep, D, device=dev)
        # blocks of query rows: under a causal mask a block sees only the keys up to its last row (and
        # under a sliding window only those from its first row's window on)
        rows_per_block = max(16, -(-T // 16))
        blocks = []
        for t0 in range(0, T, rows_per_block):
            t1 = min(T, t0 + rows_per_block)
            s0, s1 = min(self.first[t0:t1]), max(self.last[t0:t1]) + 1
            # channels per chunk: temporaries near chunk_bytes, but at least ~512 rows per matrix product (many
            # heads with long rows, Llama-3.1-8B's shape at 256 tokens, would otherwise give one channel per chunk
            # and small, slow products)
            per_channel = 4 * B * H * (t1 - t0) * (s1 - s0)
            blocks.append((t0, t1, s0, s1, max(1, min(D, max(self.chunk_bytes // per_channel,
                                                              -(-_MIN_PRODUCT_ROWS // (rep * (t1 - t0))))))))
        # one pair of buffers for all blocks: on the CPU a fresh large allocation is a fresh mapping, whose
        # pages the first pass over it would fault in
        buf = torch.empty(max(B * H * c * (t1 - t0) * (s1 - s0) for t0, t1, s0, s1, c in blocks), device=dev)
        ybuf = torch.empty(max(B * H * c * (t1 - t0) * min(s1, r) for t0, t1, s0, s1, c in blocks), device=dev)
        for t0, t1, s0, s1, c in blocks:
            Tb, Sb, r1 = t1 - t0, s1 - s0, min(s1, r)
            base_b = self.base[..., None, t0:t1, s0:s1].contiguous()
            keep_b, top_b = self.keep[..., None, t0:t1, s0:s1], self.top2[..., None, t0:t1, :]
            rt_b, out_b = self.rt[:, :, s0:s1, :r1].contiguous(), self.out[..., None, t0:t1, :r1]
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
                if not self.stable:
                    x = x.sub_(x.amax(-1, keepdim=True))
                x = x.exp2_()
                z = x.sum(-1, keepdim=True)  # the softmax denominators (a pass: cheaper than a 1+r1 wide product)
                if self.product != "float32":
                    dist = self._low_precision(x.div_(z), t0, t1, s0, s1, rt_b, (B, KV, rep, d1 - d0, Tb))
                    n2[..., d0:d1] += (dist.square_() * self.rowmask[..., t0:t1]).sum(-1)
                    continue
                y = _trapezoidal_product(x.view(B * KV, -1, Sb), rt_b.view(B * KV, Sb, r1), s0,
                                         ybuf[:n * r1].view(B * KV, -1, r1)).view(B, KV, rep, d1 - d0, Tb, r1)
                # Z * (perturbed output - output) in place, then its norm over Z
                dist = torch.linalg.vector_norm(y.addcmul_(z, out_b, value=-1), dim=-1).div_(z[..., 0])
                n2[..., d0:d1] += (dist.square_() * self.rowmask[..., t0:t1]).sum(-1)
        return n2

    def _low_precision(self, perturbed, t0, t1, s0, s1, rt_b, shape) -> torch.Tensor:
        """The change's norm per row with one bf16 or TF32 product: the difference of the perturbed and the
        unperturbed probabilities is formed in float32 first (the nearly equal rows cancel there, not in
        the product), then multiplied by the values' factor with float32 accumulation (for the GPU;
        accepted only where every top list agrees with float32 scoring, bench/qk_precision.py)."""
        B, KV, rep, c, Tb = shape
        diff = perturbed.sub_(self.probs[..., None, t0:t1, s0:s1]).view(B, KV, -1, s1 - s0)
        if self.product == "bfloat16":
            y = torch.matmul(diff.bfloat16(), rt_b.bfloat16()).float()
        else:  # tf32: float32 storage, reduced-precision multiplies on the tensor cores
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                y = torch.matmul(diff, rt_b)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
        return torch.linalg.vector_norm(y.view(B, KV, rep, c, Tb, -1), dim=-1)


# float rounding allowances of the pruning test: the bound is inflated by a relative margin, and by an
# absolute one per query row, a multiple of float32's epsilon times the scale of the vectors the exact
# score subtracts (its rounding error cannot exceed that), so no channel whose exactly computed score
# could reach a top list is left out
_PRUNE_RELATIVE = 1e-3
_PRUNE_ABSOLUTE = 1e-4
_SAMPLE_STEP = 8  # query rows of the sampled bound: every 8th


def _key_terms(k: torch.Tensor, value: torch.Tensor, softcap: float | None) -> dict[str, torch.Tensor]:
    """What `qk_upper_bounds` needs of the keys and values alone (not of the query rows), so that the sampled
    and the full bound compute it once: K centred (no soft-capping) or |K| (soft-capping), their prefix maxima
    over the keys, ||v||^2 and the prefix maxima of ||v||."""
    vn2 = value.float().square().sum(-1)  # [B,KV,S]
    terms = {"vn2": vn2, "vmax": _running_max(vn2.sqrt())}
    if softcap is None:
        kc = k - k.mean(2, keepdim=True)  # the bound is invariant under a shift of K: centred for accuracy
        terms.update(kc=kc, kmax=_running_max(kc), kmin=-_running_max(-kc))
    else:
        terms.update(kabs=_running_max(k.abs()))
    return terms


def qk_upper_bounds(q: torch.Tensor, k: torch.Tensor, value: torch.Tensor, probs: torch.Tensor, out: torch.Tensor,
                    valid: torch.Tensor, last, scaling: float, softcap: float | None,
                    keys: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """An upper bound [B,KV,rep,D] of every query channel's exact score (the norm, not its square), from
    products of the probabilities with K, K*K and ||v||^2 (docs/detection.md, pruned top-k: derivation).

    Per query row t, with p the row's probabilities, w_s = exp(X_s) the factor removing the channel puts on
    key s (X_s = -scale q_t k_s; with soft-capping the change of the capped score) and o = E_p[v]:
    ||change|| = ||E_p[(w - E_p w)(v - o)]|| / E_p[w] <= sqrt(Var_p(w)) / E_p[w] * sigma_t (Cauchy-Schwarz),
    sigma_t^2 = E_p||v||^2 - ||o||^2; Var_p(w) <= e^{2M} Var_p(X) with M the largest X_s - E_p X over the
    keys up to the row's last key, and E_p[w] >= e^{E_p X} (Jensen). It is also at most
    max_s ||v_s|| + ||o||. Inflated by the float rounding allowances above. q [B,KV,rep,T,D], k [B,KV,S,D];
    keys: `_key_terms` of k and value, when the caller has them."""
    B, KV, rep, T, D = q.shape
    S = k.shape[2]
    keys = keys if keys is not None else _key_terms(k, value, softcap)
    last = torch.as_tensor(last, device=q.device)
    p = probs.reshape(B, KV, rep * T, S)
    a = q * scaling
    if softcap is None:
        kc = keys["kc"]
        m1 = (p @ kc).view(B, KV, rep, T, D)
        m2 = (p @ kc.square()).view(B, KV, rep, T, D)
        var = (m2 - m1.square()).clamp_(min=0).add_(m2 * 1e-6)
        kmax = keys["kmax"].index_select(2, last)[:, :, None]  # [B,KV,1,T,D]: max over keys <= last_t
        kmin = keys["kmin"].index_select(2, last)[:, :, None]
        spread = torch.where(a > 0, a * (m1 - kmin), -a * (kmax - m1))  # M - E_p X >= 0
        xvar = a.square() * var
        ratio = torch.where(xvar > 0, xvar * torch.exp(2 * spread), 0)
    else:
        # soft-capping is 1-Lipschitz: |X_s| <= |a k_s|, so Var_p(w) <= e^{2|a| kabs} a^2 E_p[k^2] and
        # E_p[w] >= e^{-|a| kabs}, kabs the largest |k_s| up to the row's last key
        m2 = (p @ k.square()).view(B, KV, rep, T, D) * (1 + 1e-6)
        kabs = keys["kabs"].index_select(2, last)[:, :, None]
        xvar = a.square() * m2
        ratio = torch.where(xvar > 0, xvar * torch.exp(4 * a.abs() * kabs), 0)
    ev2 = (p @ keys["vn2"][..., None]).view(B, KV, rep, T, 1)
    on2 = out.square().sum(-1, keepdim=True)  # ||o||^2: the triangular factor keeps norms
    sigma2 = (ev2 - on2).clamp_(min=0).add_(ev2 * 1e-6)
    vmax = keys["vmax"].index_select(2, last)[:, :, None, :, None]  # [B,KV,1,T,1]
    cap = vmax + on2.sqrt()
    row = torch.minimum((ratio * sigma2).sqrt(), cap)  # [B,KV,rep,T,D]
    rowmask = valid.view(B, 1, 1, T, 1).float()
    total = (row.square() * rowmask).sum(3).sqrt()
    noise = (_PRUNE_ABSOLUTE * cap).square().mul(rowmask).sum(3).sqrt()  # [B,KV,rep,1]
    return total * (1 + _PRUNE_RELATIVE) + noise


def _running_max(x: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """x.cummax(dim).values, as log2(n) vectorised maxima of shifted copies (torch's cummax along an inner
    dimension runs element by element, slower than the rest of the bound together)."""
    n, x = x.shape[dim], x.clone(memory_format=torch.contiguous_format)  # the scan overwrites both buffers
    other, step = torch.empty_like(x), 1
    while step < n:
        other.narrow(dim, 0, step).copy_(x.narrow(dim, 0, step))
        torch.maximum(x.narrow(dim, step, n - step), x.narrow(dim, 0, n - step), out=other.narrow(dim, step, n - step))
        x, other, step = other, x, 2 * step
    return x


def _kth(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of each row of x [B, n] (-inf counts as a value)."""
    return x.topk(k, dim=-1).values[:, -1]


def _pruned(exact: _ExactScores, qa: torch.Tensor, kt: torch.Tensor, sample: torch.Tensor,
            full: Callable[[], torch.Tensor], kq: int, kk: int, stats: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact scores for the channels that can enter a text's top-kq query or top-kk key list, -inf for the
    others. Channels are scored batch-wide per head (the same channels for every text: one product shape):
    first each text's top channels by the sampled bound (`sample`, at most the full bound), then, until none
    is left, every channel whose bound reaches the k-th exact score of some text (for keys: the bound summed
    over the heads reading the kv head). The sampled bound decides while it can: a channel it puts at the k-th
    exact score must be scored in any case; the full bound (`full()`) is computed only when the sampled one
    asks for no more channels while some are unscored. A round's heads are padded to one size with their not
    yet scored channels of highest bound, which are kept, so no channel is scored twice."""
    B, KV, rep, D, T = qa.shape
    dev = qa.device
    n2 = torch.zeros(B, KV, rep, D, device=dev)
    scored = torch.zeros(KV, rep, D, dtype=torch.bool, device=dev)
    bound = sample

    def wanted_by(bound: torch.Tensor) -> torch.Tensor:
        """Channels whose bound reaches a text's k-th exact score (k-th by bound while none is scored)."""
        wanted = torch.zeros(KV, rep, D, dtype=torch.bool, device=dev)
        kbound = bound.square().sum(2).sqrt()  # [B,KV,D]
        if not scored.any():
            if kq:
                first = torch.zeros(B, KV * rep * D, dtype=torch.bool, device=dev)
                wanted |= first.scatter_(1, bound.flatten(1).topk(kq, dim=-1).indices, True).view(B, KV, rep, D).any(0)
            if kk:
                first = torch.zeros(B, KV * D, dtype=torch.bool, device=dev)
                wanted |= first.scatter_(1, kbound.flatten(1).topk(kk, dim=-1).indices, True).view(B, KV, 1, D).any(0)
            return wanted
        if kq:
            tau = _kth(torch.where(scored, n2.sqrt(), float("-inf")).flatten(1), kq)  # [B]
            wanted |= (bound >= tau[:, None, None, None]).any(0)
        if kk:
            heads_done = scored.all(1)  # [KV, D]: every head reading g scored
            tau_k = _kth(torch.where(heads_done, n2.sum(2).sqrt(), float("-inf")).flatten(1), kk)
            wanted |= ((kbound >= tau_k[:, None, None]) & ~heads_done).any(0)[:, None, :]
        return wanted & ~scored

    computed = 0
    while not scored.all():
        new = wanted_by(bound)
        m = int(new.sum(-1).max())
        if m == 0 and bound is sample and scored.any():  # the sampled bound needs no more: ask the full one
            bound = full()
            continue
        if m == 0:
            break
        if m >= D // 2:  # most of a head anyway: score every channel left, once, rather than in rounds
            new = ~scored
            m = int(new.sum(-1).max())
        # per head: its new channels, then its other unscored channels by bound (kept too), then scored ones
        # (recomputed, dropped) to fill the round's size
        rank = torch.where(new, 0, torch.where(scored, 2, 1)).to(torch.int8)
        by_bound = torch.argsort(bound.amax(0), dim=-1, descending=True, stable=True)
        idx = by_bound.gather(-1, torch.argsort(rank.gather(-1, by_bound), dim=-1, stable=True))[..., :m]
        keep = ~scored.gather(-1, idx)
        qi = qa.gather(3, idx[None, ..., None].expand(B, KV, rep, m, T))
        ki = kt.expand(B, KV, rep, D, kt.shape[-1]).gather(3, idx[None, ..., None].expand(B, KV, rep, m, kt.shape[-1]))
        got = exact(qi, ki)
        at = idx[None].expand(B, KV, rep, m)
        n2.scatter_(3, at, torch.where(keep, got, n2.gather(3, at)))
        scored.scatter_(-1, idx, True)
        computed += KV * rep * m
    if stats is not None:
        stats["scored"] = stats.get("scored", 0) + B * computed
        stats["channels"] = stats.get("channels", 0) + B * KV * rep * D
    q_imp = torch.where(scored, n2.sqrt(), float("-inf")).expand(B, KV, rep, D).reshape(B, KV * rep * D)
    heads_done = scored.all(1)
    k_imp = torch.where(heads_done, n2.sum(2).sqrt(), float("-inf")).reshape(B, KV * D)
    return q_imp, k_imp


def rotary_partner(module, position_embeddings, head_dim: int) -> torch.Tensor:
    """partner[d]: the other channel into which the module's rotary embedding moves channel d (d
    itself where rotary leaves it alone: partial rotary, or no rotary at all). Read by rotating the
    basis vectors at one token with the module's own `apply_rotary_pos_emb`, so the layout
    (rotate_half, interleaved, partial) comes from the model, not from us."""
    eye = torch.eye(head_dim)
    if position_embeddings is None:
        return torch.arange(head_dim)
    cos, sin = position_embeddings
    # the token whose rotation is furthest from the identity (position 0 rotates nothing)
    flat_cos, flat_sin = cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])
    t = int(flat_sin.float().abs().sum(-1).argmax())
    basis = eye.to(cos.device, cos.dtype)[None, :, None, :]  # [1, D inputs as heads, 1 token, D]
    rotated = _rotate(module, basis, (flat_cos[t][None, None], flat_sin[t][None, None]))[0, :, 0]  # [in, out]
    moved = (rotated != 0).cpu() & ~eye.bool()
    if (moved.sum(1) > 1).any():
        raise InputError(f"--qk-score row: the rotary embedding of {type(module).__name__} mixes a channel "
                         "into more than two channels; use --qk-score channel")
    partner = torch.where(moved.any(1), moved.float().argmax(1), torch.arange(head_dim))
    if not torch.equal(partner[partner], torch.arange(head_dim)):
        raise InputError(f"--qk-score row: the rotary embedding of {type(module).__name__} does not rotate "
                         "channels in pairs; use --qk-score channel")
    return partner


def _rotate(module, x: torch.Tensor, position_embeddings) -> torch.Tensor:
    """x [B, heads, T, D] rotated as `module` rotates its queries and keys."""
    if position_embeddings is None:
        return x
    fn = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise InputError(f"--qk-score row: {type(module).__name__} has no apply_rotary_pos_emb; "
                         "use --qk-score channel")
    cos, sin = position_embeddings
    r = cos.shape[-1]
    if r < x.shape[-1]:  # partial rotary (StableLM): the first r channels rotate, the others pass unchanged
        return torch.cat((fn(x[..., :r], x[..., :r], cos, sin)[0], x[..., r:]), -1)
    return fn(x, x, cos, sin)[0]


def row_contributions(module, pre: torch.Tensor, rotated: torch.Tensor, position_embeddings,
                      partner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What zeroing row d of q_proj (k_proj) removes from the rotated queries (keys): (its part of
    channel d, its part of channel partner[d]), both [B, heads, T, D] indexed by the row's channel d.

    pre [B, heads, T, D] is the projection's output (bias included), `rotated` what the attention
    function received. Rotary is linear per token, so rotating `pre` restricted to one channel of
    every pair gives each row's two parts without any cross terms. Anything else between the
    projection and attention (q/k normalisation) makes a row's effect reach every channel: refused."""
    if not torch.allclose(_rotate(module, pre, position_embeddings).float(), rotated.float(), rtol=1e-3, atol=1e-5):
        raise InputError(f"--qk-score row: {type(module).__name__} changes q_proj/k_proj outputs by more than "
                         "a rotary embedding (q/k normalisation), so zeroing a row is not a rank-two change "
                         "of the scores; use --qk-score channel")
    D = pre.shape[-1]
    channels = torch.arange(D, device=pre.device)
    partner = partner.to(pre.device)
    first = channels <= partner  # one channel of every pair (and every unpaired channel)
    from_first = _rotate(module, pre * first, position_embeddings)
    from_second = _rotate(module, pre * ~first, position_embeddings)
    own = torch.where(first, from_first, from_second)
    other = torch.where(first, from_first[..., partner], from_second[..., partner])
    return own, other * (partner != channels)


def _removal_norms(pre: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor]], scaling: float,
                   softcap: float | None, chunk_bytes: int) -> torch.Tensor:
    """Squared change of the attention output [B, H, D] when, for each channel d, the scores lose
    scale * sum over terms of a[:, :, d, :, None] * b[:, :, d, None, :] (a [B,H,D,T], b [B,H,D,S]).

    pre [B,H,T,S] are the scores (-inf where masked unless soft-capped), keep [B,H,T,S] the mask,
    v [B,H,S,r] the values, out [B,H,T,r] the attention output. Blocks of query rows and chunks of
    channels as in `qk_importance`."""
    B, H, T, S = pre.shape
    D = terms[0][0].shape[2]

    def scores(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if softcap is not None:
            return (torch.tanh(x / softcap) * softcap).masked_fill_(~keep, float("-inf"))
        return x

    rowmask = valid[:, None, None, :].float()
    n2 = torch.zeros(B, H, D, device=pre.device)
    rows_per_block = max(16, -(-T // 8))
    for t0 in range(0, T, rows_per_block):
        t1 = min(T, t0 + rows_per_block)
        s1 = int(torch.nonzero(keep[:, :, t0:t1].any(0).any(0).any(0)).flatten().max()) + 1
        Tb = t1 - t0
        c = max(1, min(D, chunk_bytes // (4 * B * H * Tb * s1)))
        buffer = torch.empty(B * H * c * Tb * s1, device=pre.device)
        pre_b, keep_b = pre[:, :, t0:t1, :s1].contiguous(), keep[:, :, None, t0:t1, :s1].contiguous()
        v_b, out_b = v[:, :, :s1].contiguous(), out[:, :, None, t0:t1].contiguous()
        terms_b = [(a[..., t0:t1].contiguous(), b[..., :s1].contiguous()) for a, b in terms]
        for d0 in range(0, D, c):
            d1 = min(D, d0 + c)
            perturbed = buffer[:B * H * (d1 - d0) * Tb * s1].view(B, H, d1 - d0, Tb, s1)
            perturbed.copy_(pre_b[:, :, None].expand_as(perturbed))
            for a, b in terms_b:
                perturbed.addcmul_(a[:, :, d0:d1, :, None], b[:, :, d0:d1, None, :], value=-scaling)
            probs = torch.softmax(scores(perturbed, keep_b), -1, out=perturbed)
            changed = (probs.view(B, H, -1, s1) @ v_b).view(B, H, d1 - d0, Tb, -1)
            rows = torch.linalg.vector_norm(changed.sub_(out_b), dim=-1)
            n2[:, :, d0:d1] += (rows.square_() * rowmask[..., t0:t1]).sum(-1)
    return n2


def qk_row_importance(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                      valid: torch.Tensor, scaling: float, softcap: float | None,
                      q_rows: tuple[torch.Tensor, torch.Tensor], k_rows: tuple[torch.Tensor, torch.Tensor],
                      partner: torch.Tensor, chunk_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance of the q_proj rows [B, H*D] and k_proj rows [B, KV*D] themselves: the neurons that
    deactivation and training switch off, before rotary embedding.

    Without q/k normalisation, zeroing q_proj row (h, d) removes from the rotated query its two parts
    q_rows = (own [B,H,T,D], other [B,H,T,D]) in channels d and partner[d] (`row_contributions`), so
    S_h loses scale * (own[:,d] K_g[:,d]^T + other[:,d] K_g[:,partner[d]]^T): a rank-two change,
    and the score is || (softmax(S_h) - softmax(S_h - that)) V_g ||, exactly. A k_proj row (g, d)
    changes every head h reading g by scale * (Q_h[:,d] own_k[:,d]^T + Q_h[:,partner[d]] other_k[:,d]^T).
    Arguments otherwise as `qk_importance`."""
    B, H, T, D = query.shape
    KV, S = key.shape[1], key.shape[2]
    if chunk_bytes is None:
        chunk_bytes = 1 << 20 if query.device.type == "cpu" else 1 << 28
    rep = H // KV
    q, k, v = query.float(), key.float().repeat_interleave(rep, 1), value.float()
    if S < D:  # as in qk_importance: fewer value columns, same norms
        v = torch.linalg.qr(v.transpose(-1, -2), mode="r").R.transpose(-1, -2)
    v = v.repeat_interleave(rep, 1)
    first_key = torch.zeros(S, dtype=torch.bool, device=q.device)
    first_key[0] = True
    keep = torch.where(valid[:, None, :, None], keep, first_key).expand(B, H, T, S)
    pre = (q @ k.transpose(-1, -2)) * scaling
    if softcap is None:
        pre = pre.masked_fill(~keep, float("-inf"))
        out = torch.softmax(pre, -1) @ v
    else:
        out = torch.softmax((torch.tanh(pre / softcap) * softcap).masked_fill(~keep, float("-inf")), -1) @ v
    partner = partner.to(q.device)
    t = lambda x: x.float().transpose(-1, -2)  # [.., T, D] -> [.., D, T]
    kt = t(k)
    q_terms = [(t(q_rows[0]), kt), (t(q_rows[1]), kt[:, :, partner])]
    k_own, k_other = (x.float().repeat_interleave(rep, 1) for x in k_rows)
    k_terms = [(t(q), t(k_own)), (t(q)[:, :, partner], t(k_other))]
    n2q = _removal_norms(pre, keep, valid, v, out, q_terms, scaling, softcap, chunk_bytes)
    n2k = _removal_norms(pre, keep, valid, v, out, k_terms, scaling, softcap, chunk_bytes)
    return n2q.sqrt().reshape(B, H * D), n2k.reshape(B, KV, rep, D).sum(2).sqrt().reshape(B, KV * D)


def uses_attention_registry(model) -> bool:
    """Whether the model's attention runs through transformers' AttentionInterface (where the probe reads Q, K
    and V inside the attention function); Falcon and BLOOM compute attention inline instead. Read from the
    attention module's own forward (the `_supports_attention_backend` flag is missing on some models that do,
    StableLM)."""
    if getattr(model, "_supports_attention_backend", False):
        return True
    attn = projections(decoder_layers(model)[0])["attn"]
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(type(attn).forward)
    except (OSError, TypeError):  # no source to read: assume the registry, as transformers' models use it
        return True


def alibi_in_mask(config) -> bool:
    """Whether the model adds an alibi bias to its attention scores (Falcon with alibi, BLOOM): on the attention
    registry's path that bias arrives inside the additive mask (transformers >= 5.25 for Falcon)."""
    return bool(getattr(config, "alibi", False)) or getattr(config, "model_type", None) == "bloom"


def _falcon_attention(module, fused: torch.Tensor, bound: dict):
    """(query [B,H,T,D], key [B,KV,S,D], value [B,KV,S,D], mask, scaling, bias) exactly as FalconAttention.forward
    computes them from its fused q/k/v output (rotary applied), the grouped layout's keys and values once per
    kv head (the model broadcasts them to every query head)."""
    q, k, v = module._split_heads(fused)
    B, T = q.shape[:2]
    D = module.head_dim
    q, k, v = (x.transpose(1, 2).reshape(B, -1, T, D) for x in (q, k, v))
    if module.new_decoder_architecture:  # broadcast copies: one per kv head
        rep = module.num_heads // module.num_kv_heads
        k, v = k[:, ::rep], v[:, ::rep]
    cos, sin = bound["position_embeddings"]
    q, k = sys.modules[type(module).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v, bound.get("attention_mask"), module.inv_norm_factor, None


def _bloom_attention(module, fused: torch.Tensor, bound: dict):
    """As `_falcon_attention` for BloomAttention.forward: no rotary; the scores are alibi + scale * Q K^T, the alibi
    bias [B, H, S] returned apart (beta is 1 in BLOOM)."""
    q, k, v = module._reshape(fused)
    B, H, T, _ = q.shape
    if float(module.beta) != 1.0:
        raise InputError(f"groups attn_q/attn_k: BLOOM with beta {module.beta} is not supported")
    return q, k, v, bound.get("attention_mask"), module.inv_norm_factor, bound["alibi"].view(B, H, -1)


# model types whose attention does not go through the registry: how to recompute its inputs from the fused
# q/k/v output and the attention module's arguments
_INLINE_ATTENTION = {"falcon": _falcon_attention, "bloom": _bloom_attention}


def qk_importance_with_bias(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                            valid: torch.Tensor, scaling: float, bias: torch.Tensor,
                            chunk_bytes: int | None = None, reference: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """`qk_importance` for scores scale * Q K^T + bias with a per-head, per-key bias [B, H, S] (alibi): the bias
    is one more channel (query 1, key bias / scale) that no removal touches, so every real channel's score is
    exact; the kv heads are spread to the query heads first (the bias is per query head) and key importance
    summed back over the heads reading each kv head. `reference` computes `qk_importance_reference` instead."""
    B, H, T, D = query.shape
    KV = key.shape[1]
    rep = H // KV
    k, v = key.float().repeat_interleave(rep, 1), value.float().repeat_interleave(rep, 1)
    q1 = torch.cat([query.float(), torch.ones(B, H, T, 1, device=query.device)], -1)
    k1 = torch.cat([k, (bias.float() / scaling)[..., None]], -1)
    if reference:
        q_imp, k_imp = qk_importance_reference(q1, k1, v, keep, valid, scaling)
    else:
        q_imp, k_imp = qk_importance(q1, k1, v, keep, valid, scaling, chunk_bytes=chunk_bytes)
    q_imp = q_imp.view(B, H, D + 1)[..., :D].reshape(B, H * D)
    k_imp = k_imp.view(B, KV, rep, D + 1)[..., :D].square().sum(2).sqrt().reshape(B, KV * D)
    return q_imp, k_imp


class ImportanceProbe:
    """Importance of every neuron for every sentence of a batch, from one forward pass.

    Use as a context manager, then call with (input_ids, attention_mask); returns
    {group: float32 tensor [batch, num_layers, group_size]} on the CPU. With method="activation",
    returns {"active": [batch, layers, intermediate] counts of tokens with FFN activation > 0,
    "tokens": [batch] token counts} instead. qk_score="row" scores query/key neurons as the q_proj/k_proj
    rows themselves (`qk_row_importance`) instead of the channels attention sees.

    In an MoE layer (langneurons/moe.py) the FFN groups are expert channels, scored inside the experts loop
    (moe.LayerProbe), and the result also holds "experts": [batch, layers, num_experts] real tokens routed to each
    expert."""

    def __init__(self, model, groups: tuple[str, ...] = GROUPS, method: str = "importance",
                 chunk_bytes: int | None = None, qk_score: str = "channel", top_k: dict[str, int] | None = None):
        if qk_score not in ("channel", "row"):
            raise ValueError(f"qk_score must be 'channel' or 'row', not {qk_score!r}")
        self.model, self.method, self.chunk_bytes, self.qk_score = model, method, chunk_bytes, qk_score
        self.groups = tuple(groups) if method == "importance" else ()
        self.geom = Geometry.from_config(model.config)
        self.layers = [projections(layer) for layer in decoder_layers(model)]
        self.slots = [neuron_slots(layer, self.geom, model.config) for layer in decoder_layers(model)]
        self.layer_of = {id(p["attn"]): i for i, p in enumerate(self.layers)}
        self.wants_qk = bool({"attn_q", "attn_k"} & set(self.groups))
        wants_ffn = method == "activation" or bool({"fwd_up", "fwd_down"} & set(self.groups))
        self.moe = {i: moe.LayerProbe(p["moe"], self.geom.moe, method) for i, p in enumerate(self.layers)
                    if "moe" in p and wants_ffn}
        self._taps = contextlib.ExitStack()
        # attention computed inline (not through the registry): Q, K, V recomputed from the fused projection
        self.inline = None
        mt = getattr(model.config, "model_type", None)
        registry = uses_attention_registry(model)
        if self.wants_qk and alibi_in_mask(model.config) and (registry or mt == "falcon"):
            # on the registry path the bias reaches the attention function inside an additive mask, which the
            # score reads as visibility only; Falcon adds it differently between transformers versions and
            # paths: refused rather than scored without it (BLOOM's inline alibi is scored with the bias)
            what = "Falcon with alibi" if mt == "falcon" else f"model type '{mt}'"
            raise InputError(f"groups attn_q/attn_k: {what} adds an alibi bias to the attention scores, which the "
                             "query/key score does not model on this path; use --groups without attn_q,attn_k")
        if self.wants_qk and not registry:
            if mt not in _INLINE_ATTENTION or "qkv" not in self.layers[0]:
                raise InputError(f"groups attn_q/attn_k: model type '{mt}' does not compute attention through "
                                 "transformers' attention functions, and its query/key inputs cannot be read; "
                                 "use --groups without attn_q,attn_k")
            self.inline = _INLINE_ATTENTION[mt]
        self._handles: list = []
        self._scores: dict[str, list] = {}
        self._valid: torch.Tensor | None = None
        self._col_norms: dict[int, torch.Tensor] = {}
        self._rows: dict = {}  # row score: the current layer's q_proj/k_proj outputs and rotary tables
        # top_k {group: k}: only each text's top k of attn_q/attn_k are needed (detection), so query/key
        # channels that provably cannot enter them are not scored exactly (-inf; qk_importance)
        self.top_k = top_k or {}
        self.qk_stats = {"scored": 0, "channels": 0}  # query/key channels scored exactly, of all
        self._ranges: dict = {}  # per attention mask of the running forward: its blocks' key ranges

    # ------------------------------------------------------------ hooks
    # (they measure only inside __call__: other forwards of the model under the probe are untouched)
    @property
    def measuring(self) -> bool:
        return self._valid is not None

    def _norms(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C] L2 norms over real tokens of x [B, T, C]."""
        valid = self._valid.to(x.device)
        return (x.float().square() * valid[..., None]).sum(1).sqrt()

    def _column_norms(self, linear: torch.nn.Module) -> torch.Tensor:
        """||W[:, k]|| of an input channel (the norm over the output dimension, model.weight_dim: a Conv1D
        stores W transposed): fixed while probing, so computed once per module."""
        if id(linear) not in self._col_norms:
            self._col_norms[id(linear)] = linear.weight.float().norm(dim=weight_dim(linear, "out"))
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

    def query_key_importance(self, module, query, key, value, attention_mask, scaling, softcap,
                             bias: torch.Tensor | None = None) -> None:
        """Query and key importance of one layer from what its attention computes with; `bias` [B, H, S] an
        additive per-key score bias (BLOOM's alibi, inline attention only)."""
        valid = self._valid.to(query.device)
        keep = visible_keys(attention_mask, query.shape[2], key.shape[2], query.device)
        if bias is not None:
            # alibi models have no rotary: a q/k row is its channel, so row and channel scores are one
            q_imp, k_imp = qk_importance_with_bias(query, key, value, keep, valid, scaling, bias, self.chunk_bytes)
        elif self.qk_score == "row":
            rotary = self._rows.get("rotary")
            partner = rotary_partner(module, rotary, query.shape[-1])
            heads = lambda x: x.view(*x.shape[:2], -1, query.shape[-1]).transpose(1, 2)  # as attention reshapes
            q_rows = row_contributions(module, heads(self._rows["q"]), query, rotary, partner)
            k_rows = row_contributions(module, heads(self._rows["k"]), key, rotary, partner)
            q_imp, k_imp = qk_row_importance(query, key, value, keep, valid, scaling, softcap, q_rows, k_rows,
                                             partner, self.chunk_bytes)
        else:
            cached = self._ranges.get(id(attention_mask))
            if cached is None:  # the same mask for every layer of a kind: computed once per forward
                cached = self._ranges[id(attention_mask)] = (attention_mask, block_key_ranges(keep, valid))
            top_k = tuple(self.top_k.get(g, 0) if g in self.groups else 0 for g in ("attn_q", "attn_k"))
            q_imp, k_imp = qk_importance(query, key, value, keep, valid, scaling, softcap, self.chunk_bytes,
                                         top_k=top_k if any(top_k) else None, key_ranges=cached[1],
                                         stats=self.qk_stats)
        layer = self.layer_of[id(module)]
        if "attn_q" in self.groups:
            self._scores["attn_q"][layer] = q_imp
        if "attn_k" in self.groups:
            self._scores["attn_k"][layer] = k_imp

    def _projection_hook(self, key: str, output: torch.Tensor, positions: torch.Tensor | None) -> None:
        if self.measuring:  # a fused q/k/v output: the rows of q (k) only, in their logical order
            self._rows[key] = output if positions is None else output.index_select(-1, positions.to(output.device))

    def _attention_args_hook(self, module, args, kwargs) -> None:
        """Inline attention (Falcon, BLOOM): the attention module's arguments, read by `_inline_attention_hook`."""
        if self.measuring:
            self._rows["args"] = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
            self._rows["rotary"] = self._rows["args"].get("position_embeddings")

    def _inline_attention_hook(self, attn, fused: torch.Tensor) -> None:
        """Inline attention: Q, K, V recomputed from the fused projection's output as the module computes them,
        then scored as the attention function's would be."""
        if not self.measuring:
            return
        query, key, value, mask, scaling, bias = self.inline(attn, fused, self._rows["args"])
        self.query_key_importance(attn, query, key, value, mask, scaling, None, bias=bias)

    def _rotary_hook(self, module, args, kwargs) -> None:
        if self.measuring:
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
            self._rows["rotary"] = bound.get("position_embeddings")

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "ImportanceProbe":
        for i, lp in self.moe.items():
            self._handles += lp.hooks()
        self._taps.enter_context(moe.tapped([(lp.block.experts, lp.tap) for lp in self.moe.values()]))
        for i, p in enumerate(self.layers):
            if self.method == "activation":
                if i in self.moe:  # an MoE layer's experts: moe.LayerProbe
                    continue
                if "act" not in p:
                    raise InputError(f"--method activation: {type(p['mlp']).__name__} has no activation module "
                                     "to read the FFN activation sign at")
                self._handles.append(p["act"].register_forward_hook(
                    lambda m, a, o, i=i: self._act_hook(i, m, a, o)))
                continue
            if {"fwd_up", "fwd_down"} & set(self.groups) and i not in self.moe:
                self._handles.append(p["down"].register_forward_pre_hook(lambda m, a, i=i: self._down_hook(i, m, a)))
            if {"attn_o", "attn_v"} & set(self.groups):
                self._handles.append(p["o"].register_forward_pre_hook(lambda m, a, i=i: self._o_hook(i, m, a)))
            if self.wants_qk and self.qk_score == "row":
                for key in ("q", "k"):
                    slot = self.slots[i][f"attn_{key}"][0]
                    pos = None if key in p else slot.index
                    self._handles.append(slot.module.register_forward_hook(
                        lambda m, a, o, key=key, pos=pos: self._projection_hook(key, o, pos)))
                if self.inline is None:  # inline attention: _attention_args_hook reads the rotary tables
                    self._handles.append(p["attn"].register_forward_pre_hook(self._rotary_hook, with_kwargs=True))
        self._old_impl = self.model.config._attn_implementation
        if self.wants_qk and self.inline is not None:
            for i, p in enumerate(self.layers):
                self._handles.append(p["attn"].register_forward_pre_hook(self._attention_args_hook, with_kwargs=True))
                self._handles.append(p["qkv"].register_forward_hook(
                    lambda m, a, o, attn=p["attn"]: self._inline_attention_hook(attn, o)))
        elif self.wants_qk:
            _register()
            self.model.set_attn_implementation(PROBE_NAME)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        self._col_norms.clear()
        self._rows.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._taps.close()
        if self.wants_qk and self.inline is None:
            self.model.set_attn_implementation(self._old_impl)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(self.layers)
        keys = ("active",) if self.method == "activation" else self.groups
        self._scores = {g: [None] * n for g in keys}
        self._valid = attention_mask.bool()
        for lp in self.moe.values():
            lp.begin(self._valid)
        self._ranges.clear()
        try:
            # the decoder alone: detection needs no logits, and the LM head is a large share of a
            # small model's forward (Gemma 3 270M: 262k x 640)
            # positions count real tokens only, so left padding does not shift the rotary phases
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=positions, use_cache=False)
            routed = []
            for i, lp in self.moe.items():
                r = lp.result()
                routed.append(r["routed"])
                for g in (("active",) if self.method == "activation" else ("fwd_up", "fwd_down")):
                    if g in self._scores:
                        self._scores[g][i] = r["scores"]
        finally:
            self._valid = None
            for lp in self.moe.values():
                lp.valid = None
        for g, v in self._scores.items():
            if any(x is None for x in v):  # a hook point the forward never reached: no partial scores
                raise InputError(f"group {g}: the model's forward did not pass the point where it is measured "
                                 f"({type(self.model).__name__}); use --groups without {g}")
            self._ranges.clear()
        out = {g: torch.stack([s.cpu() for s in v], 1) for g, v in self._scores.items()}
        if routed:
            out["experts"] = torch.stack(routed, 1)
        if self.method == "activation":
            out["tokens"] = attention_mask.sum(1).cpu()
        return out

