"""The authors' detection (docs/method.md section 10), as an exact compatibility mode.

Their released code does not compute the paper's formulas (section 2); it computes, per text and layer:
  fwd_up = fwd_down = sum_t |X W_up|[t,k]            (the up projection alone, read at up_proj's output)
  attn_q = attn_k   = sum_{t,s} (softmax(S_h - scale*Q_h[:,d] K_h[:,d]^T) - softmax(S_h))[t,s]^2
                      in query-head space (index h*head_dim + d, keys repeated per query head), no V
  attn_v = attn_o   = sum_t |O[t,k]|                  (O = the attention output entering o_proj)
and keeps per text int(ratio * intermediate_size) neurons of every attention group and
int(ratio * num_heads * head_dim) of every FFN group: the two counts are swapped.

`AuthorsProbe` computes these from the model's own forward pass (a forward hook on up_proj, a
pre-hook on o_proj, and a registered attention function with a matching mask function), so every
architecture works without forked model code. Each piece can be replaced by the paper's definition
(`undo`), which then comes from the project's own `ImportanceProbe`, run in the same forward pass.

`attention="bidirectional"` reproduces their Llama/Qwen2 runs as shipped: under transformers 4.51.3
no causal mask reached their attention, so every token attended to every token in every layer. Here
the attention function replaces the mask by a padding-only mask for the whole forward."""
from __future__ import annotations

import torch

from .cli import InputError
from .importance import ImportanceProbe, _eager_attention, alibi_in_mask, uses_attention_registry, visible_keys
from .model import GROUPS, Geometry, decoder_layers, neuron_slots, projections

AUTHORS_ATTENTION = "langneurons_authors"
_ACTIVE: list["AuthorsProbe"] = []  # attention functions are global: the probe whose forward runs

# the differences from the paper's method that can be undone one at a time (--authors-undo)
PIECES = {"top_counts": (), "ffn": ("fwd_up", "fwd_down"), "qk": ("attn_q", "attn_k"),
          "vo": ("attn_v", "attn_o"), "prompt": ()}
UNDO_HELP = ("top_counts: each group keeps max(1, int(ratio * its own size)) per text instead of the swapped "
             "counts; ffn: fwd_up/fwd_down = ||H[:,k]||*||W_down[:,k]|| instead of sum_t |X W_up|; "
             "qk: attn_q/attn_k = the paper's ||(softmax(S') - softmax(S)) V|| (attn_k on k_proj rows) instead "
             "of the squared softmax difference in query-head space; vo: attn_v = sqrt(sum_h ||A_h V[:,d]||^2) "
             "on v_proj rows and attn_o = ||O[:,k]||*||W_o[:,k]|| instead of sum_t |O|; prompt: MGSM "
             "texts are the question alone instead of 'Question: q\\nAnswer: a'")


def parse_undo(spec: str) -> tuple[str, ...]:
    undo = tuple(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    if unknown := [u for u in undo if u not in PIECES]:
        raise InputError(f"--authors-undo: unknown piece '{unknown[0]}' (known: {', '.join(PIECES)})")
    return undo


def definitions(undo: tuple[str, ...] = ()) -> dict[str, str]:
    """group -> 'authors' or 'paper' (the paper's formula, where its piece is undone)."""
    paper = {g for piece in undo for g in PIECES[piece]}
    return {g: "paper" if g in paper else "authors" for g in GROUPS}


def score_sizes(geom: Geometry, defs: dict[str, str]) -> dict[str, int]:
    """Length of each group's score vector: the authors' attn_k/attn_v live in query-head space."""
    qh = geom.num_heads * geom.head_dim
    return {g: qh if g in ("attn_k", "attn_v") and defs[g] == "authors" else geom.group_size(g) for g in GROUPS}


def kv_index_space(defs: dict[str, str]) -> str | dict[str, str]:
    """The neuron files' kv_index_space: one word when attn_k and attn_v agree, else per group."""
    space = {g: "query_heads" if defs[g] == "authors" else "kv_rows" for g in ("attn_k", "attn_v")}
    return space["attn_k"] if space["attn_k"] == space["attn_v"] else space


def top_counts(geom: Geometry, ratio: float, sizes: dict[str, int], swapped: bool = True) -> dict[str, int]:
    """Neurons activated per text and layer. The authors' counts are swapped between the families and
    use int() alone (0 activates nothing); the paper's are max(1, int(ratio * the group's size))."""
    if not swapped:
        return {g: max(1, int(ratio * sizes[g])) for g in GROUPS}
    attn, ffn = int(ratio * geom.intermediate_size), int(ratio * geom.num_heads * geom.head_dim)
    return {g: min(sizes[g], ffn if g.startswith("fwd") else attn) for g in GROUPS}


def authors_qk_scores(query: torch.Tensor, key: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor,
                      scaling: float, softcap: float | None = None, chunk_bytes: int | None = None) -> torch.Tensor:
    """The authors' query/key score [B, H*D]: for head h and channel d,
    sum over real queries t and keys s of (softmax(S_h - scale*Q_h[:,d] K_h[:,d]^T) - softmax(S_h))[t,s]^2.

    query [B,H,T,D], key [B,KV,S,D] as the attention function sees them (after rotary embedding and q/k
    norms); keep [B,1|H,T,S] bool: key s visible from query t; valid [B,T] bool: real query tokens.
    With soft-capping the channel is removed before the cap, as the model's attention would see it."""
    B, H, T, D = query.shape
    S = key.shape[2]
    if chunk_bytes is None:
        chunk_bytes = 1 << 20 if query.device.type == "cpu" else 1 << 28
    q, k = query.float(), key.float().repeat_interleave(H // key.shape[1], 1)
    # padding queries are discarded; letting them see key 0 keeps their softmax finite
    first_key = torch.zeros(S, dtype=torch.bool, device=q.device)
    first_key[0] = True
    keep = torch.where(valid[:, None, :, None], keep, first_key).expand(B, H, T, S)

    def capped(pre: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """In place: soft-capped and masked scores (without a cap, masked entries are already -inf)."""
        if softcap is None:
            return pre
        return pre.div_(softcap).tanh_().mul_(softcap).masked_fill_(~keep, float("-inf"))

    pre = (q @ k.transpose(-1, -2)) * scaling  # [B,H,T,S]
    if softcap is None:  # -inf minus a finite change stays -inf
        pre = pre.masked_fill(~keep, float("-inf"))
    base = torch.softmax(capped(pre.clone(), keep), -1)
    qt, kt = q.transpose(-1, -2), k.transpose(-1, -2)  # [B,H,D,T], [B,H,D,S]
    rowmask = valid.float()
    total = torch.zeros(B, H, D, device=q.device)
    # blocks of query rows: under a causal mask a block sees only the keys up to its last row; channels in
    # chunks whose temporaries stay near chunk_bytes, worked on in place in one reused buffer
    rows_per_block = max(16, -(-T // 8))
    for t0 in range(0, T, rows_per_block):
        t1 = min(T, t0 + rows_per_block)
        Tb, s1 = t1 - t0, int(torch.nonzero(keep[:, :, t0:t1].any(0).any(0).any(0)).max()) + 1
        c = max(1, min(D, chunk_bytes // (4 * B * H * Tb * s1)))
        buffer = torch.empty(B * H * c * Tb * s1, device=q.device)
        pre_b, keep_b = pre[:, :, None, t0:t1, :s1].contiguous(), keep[:, :, None, t0:t1, :s1].contiguous()
        base_b = base[:, :, None, t0:t1, :s1].contiguous()
        qt_b, kt_b = qt[..., t0:t1].contiguous(), kt[..., :s1].contiguous()
        for d0 in range(0, D, c):
            d1 = min(D, d0 + c)
            perturbed = torch.addcmul(pre_b, qt_b[:, :, d0:d1, :, None], kt_b[:, :, d0:d1, None, :], value=-scaling,
                                      out=buffer[:B * H * (d1 - d0) * Tb * s1].view(B, H, d1 - d0, Tb, s1))
            probs = torch.softmax(capped(perturbed, keep_b), -1, out=perturbed)
            diff = probs.sub_(base_b).square_()  # [B,H,c,rows,keys]
            total[:, :, d0:d1] += (diff.sum(-1) * rowmask[:, None, None, t0:t1]).sum(-1)
    return total.reshape(B, H * D)


def _authors_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    probe = _ACTIVE[-1] if _ACTIVE and _ACTIVE[-1].measuring else None
    if probe is not None:
        attention_mask = probe.attention_mask(attention_mask, query, key)
    out = _eager_attention(module)(module, query, key, value, attention_mask, scaling=scaling,
                                   dropout=dropout, **kwargs)
    if probe is not None:
        probe.attention_scores(module, query, key, value, attention_mask,
                               module.scaling if scaling is None else scaling, kwargs.get("softcap"))
    return out


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(AUTHORS_ATTENTION, _authors_attention)
    # without a mask function registered under the same name, causal masking silently disappears
    AttentionMaskInterface.register(AUTHORS_ATTENTION, eager_mask)


class AuthorsProbe:
    """Scores of the authors' detection for every text of a batch, from one forward pass.

    Use as a context manager, then call with (input_ids, attention_mask); returns (authors, paper):
    {group: float32 [batch, num_layers, n]} on the CPU, the authors' definitions for `authors_groups`
    and the paper's (`ImportanceProbe`, same forward) for `paper_groups`. Padding never counts and
    positions come from the attention mask, so a batch gives the scores of one-text runs."""

    def __init__(self, model, authors_groups: tuple[str, ...] = GROUPS, paper_groups: tuple[str, ...] = (),
                 attention: str = "causal", chunk_bytes: int | None = None):
        if attention not in ("causal", "bidirectional"):
            raise InputError(f"--authors-attention: unknown setting '{attention}' (causal or bidirectional)")
        self.model, self.attention, self.chunk_bytes = model, attention, chunk_bytes
        self.groups = tuple(authors_groups)
        self.paper = ImportanceProbe(model, groups=tuple(paper_groups), chunk_bytes=chunk_bytes)
        self.geom = Geometry.from_config(model.config)
        self.layers = [projections(layer) for layer in decoder_layers(model)]
        self.layer_of = {id(p["attn"]): i for i, p in enumerate(self.layers)}
        self.paper_qk = bool({"attn_q", "attn_k"} & set(paper_groups))
        self.authors_qk = bool({"attn_q", "attn_k"} & set(self.groups))
        # attention computed inline (Falcon, BLOOM): no attention function to read Q/K in or to change the mask of
        self.registry = uses_attention_registry(model)
        if not self.registry and (self.authors_qk or self.paper_qk or attention != "causal"):
            raise InputError(f"--method authors: model type '{getattr(model.config, 'model_type', '?')}' does not "
                             "compute attention through transformers' attention functions: attn_q/attn_k and "
                             "--authors-attention bidirectional are not supported for it")
        if alibi_in_mask(model.config) and (self.authors_qk or self.paper_qk or attention != "causal"):
            # an alibi bias rides in the additive mask: re-masking would drop it, the q/k scores would ignore it
            raise InputError(f"--method authors: model type '{getattr(model.config, 'model_type', '?')}' adds an "
                             "alibi bias to its attention: attn_q/attn_k and --authors-attention bidirectional are "
                             "not supported for it")
        self._handles: list = []
        self._scores: dict[str, list] = {}
        self._valid: torch.Tensor | None = None

    @property
    def measuring(self) -> bool:
        return self._valid is not None

    def _abs_sum(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C] sums of |x| over real tokens of x [B, T, C]."""
        return (x.float().abs() * self._valid.to(x.device)[..., None]).sum(1)

    def _up_hook(self, layer: int, module, args, output, positions: torch.Tensor | None = None) -> None:
        if self.measuring:
            if positions is not None:  # a fused gate_up output: the up part
                output = output.index_select(-1, positions.to(output.device))
            score = self._abs_sum(output)
            for g in ("fwd_up", "fwd_down"):
                if g in self.groups:
                    self._scores[g][layer] = score

    def _o_hook(self, layer: int, module, args) -> None:
        if self.measuring:
            score = self._abs_sum(args[0])
            for g in ("attn_v", "attn_o"):
                if g in self.groups:
                    self._scores[g][layer] = score

    def attention_mask(self, attention_mask, query: torch.Tensor, key: torch.Tensor):
        """The mask the forward runs with: the model's own, or (bidirectional) padding only."""
        if self.attention == "causal":
            return attention_mask
        valid = self._valid.to(query.device)[:, None, None, :key.shape[2]]
        mask = torch.zeros(valid.shape[0], 1, query.shape[2], key.shape[2], dtype=query.dtype, device=query.device)
        return mask.masked_fill_(~valid, torch.finfo(query.dtype).min)

    def attention_scores(self, module, query, key, value, attention_mask, scaling: float, softcap) -> None:
        if self.paper_qk:
            self.paper.query_key_importance(module, query, key, value, attention_mask, scaling, softcap)
        if self.authors_qk:
            keep = visible_keys(attention_mask, query.shape[2], key.shape[2], query.device)
            score = authors_qk_scores(query, key, keep, self._valid.to(query.device), scaling, softcap,
                                      self.chunk_bytes)
            layer = self.layer_of[id(module)]
            for g in ("attn_q", "attn_k"):
                if g in self.groups:
                    self._scores[g][layer] = score

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "AuthorsProbe":
        self.paper.__enter__()  # its hooks give the paper's groups; the attention function is ours
        for i, p in enumerate(self.layers):
            if {"fwd_up", "fwd_down"} & set(self.groups):
                up = next(s for s in neuron_slots(decoder_layers(self.model)[i], self.geom, self.model.config)["fwd_up"]
                          if s.role == "up")
                pos = None if "up" in p else up.index
                self._handles.append(up.module.register_forward_hook(
                    lambda m, a, o, i=i, pos=pos: self._up_hook(i, m, a, o, pos)))
            if {"attn_v", "attn_o"} & set(self.groups):
                self._handles.append(p["o"].register_forward_pre_hook(lambda m, a, i=i: self._o_hook(i, m, a)))
        self._old_impl = self.model.config._attn_implementation
        if self.registry:
            _register()
            self.model.set_attn_implementation(AUTHORS_ATTENTION)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.registry:
            self.model.set_attn_implementation(self._old_impl)
        self.paper.__exit__(*exc)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        self._scores = {g: [None] * len(self.layers) for g in self.groups}
        self._valid = attention_mask.bool()
        try:
            paper = self.paper(input_ids, attention_mask)  # runs the decoder once, for both probes
        finally:
            self._valid = None
        return {g: torch.stack([s.cpu() for s in v], 1) for g, v in self._scores.items()}, paper
