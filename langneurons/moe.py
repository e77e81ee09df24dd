"""Mixture-of-experts FFNs (docs/method.md section 1, "Mixture-of-experts layers"): Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE and any decoder whose sparse block has the same shape.

An MoE layer's FFN neurons are (expert, channel) pairs. In the fwd_up/fwd_down index space of a layer, routed
expert e's channel k is `e * I_e + k`, followed by the shared expert's channels `E * I_e + k` where the model
has one (Qwen2-MoE). Transformers stores the routed experts fused, as 3D parameters gate_up_proj [E, 2 I_e, H]
(gate rows first, then up rows) and down_proj [E, H, I_e]; the shared expert is an ordinary gated MLP.

Everything that needs to see inside the routed experts (importance, LAPE counts, the share of tokens each
expert receives, interventions on expert channels, training of expert slices) runs through one experts
implementation registered in transformers' ExpertsInterface (`EXPERTS_NAME`): the eager loop of the modeling
files, op for op, with two kinds of attachments on an experts module: taps, which see (and may rewrite) each
expert's channel values h = act(x W_gate^T) * (x W_up^T) of the tokens routed to it, and a delta
(`ExpertDelta`, training). The router is never touched: it reads the layer input, which none of this changes."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from .cli import InputError

EXPERTS_NAME = "langneurons_experts"
TAPS_ATTR = "_langneurons_taps"
DELTA_ATTR = "expert_delta"


# ---------------------------------------------------------------- sizes from the config

@dataclasses.dataclass(frozen=True)
class MoeSizes:
    num_experts: int   # E routed experts per layer
    expert_size: int   # I_e channels per routed expert
    top_k: int         # experts per token
    shared_size: int   # I_s channels of the shared expert (0: none)

    @property
    def routed(self) -> int:
        return self.num_experts * self.expert_size

    @property
    def intermediate_size(self) -> int:
        return self.routed + self.shared_size


def moe_sizes(config) -> MoeSizes | None:
    """The MoE sizes of a (text) config, None for a dense model. Refused with one line: layers that mix dense and
    MoE FFNs, and shared experts counted as n_shared_experts (DeepSeek-style), which this layout does not cover."""
    experts = next((getattr(config, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if getattr(config, k, None)), None)
    if not experts:
        return None
    mt = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "mlp_only_layers", None) or (getattr(config, "decoder_sparse_step", 1) or 1) != 1 \
            or getattr(config, "first_k_dense_replace", 0):
        raise InputError(f"model type {mt}: layers that mix dense and mixture-of-experts FFNs "
                         "(mlp_only_layers / decoder_sparse_step) are not supported")
    if getattr(config, "n_shared_experts", None):
        raise InputError(f"model type {mt}: shared experts given as n_shared_experts are not supported "
                         "(only one shared expert of shared_expert_intermediate_size)")
    size = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
    return MoeSizes(int(experts), int(size), int(config.num_experts_per_tok), shared)


# ---------------------------------------------------------------- module lookup

@dataclasses.dataclass
class MoeBlock:
    """The parts of one sparse MoE block: the routed experts (3D parameters), the router, and the shared expert
    (a gated MLP with gate_proj/up_proj/down_proj) with its sigmoid gate where the model has them."""
    block: nn.Module
    experts: nn.Module
    router: nn.Module
    shared: nn.Module | None
    shared_gate: nn.Module | None


def moe_block(mlp: nn.Module) -> MoeBlock | None:
    """The MoE block `mlp`, None when it is a dense FFN; an experts layout this module cannot read is refused."""
    experts = getattr(mlp, "experts", None)
    if experts is None:
        return None
    name = type(experts).__name__
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == 3 and down.dim() == 3):
        raise InputError(f"{name}: experts not stored as fused 3D gate_up_proj/down_proj parameters are not supported")
    if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False) \
            or not getattr(experts, "is_concatenated", True) or not getattr(experts, "has_gate", True):
        raise InputError(f"{name}: experts with biases, transposed or interleaved gate/up weights are not supported")
    router = getattr(mlp, "gate", None) or getattr(mlp, "router", None)
    shared = getattr(mlp, "shared_expert", None)
    if shared is not None and not all(isinstance(getattr(shared, n, None), nn.Linear)
                                      for n in ("gate_proj", "up_proj", "down_proj")):
        raise InputError(f"{type(shared).__name__}: a shared expert without gate_proj/up_proj/down_proj")
    return MoeBlock(mlp, experts, router, shared, getattr(mlp, "shared_expert_gate", None))


def split(idx: torch.Tensor, sizes: MoeSizes) -> tuple[torch.Tensor, torch.Tensor]:
    """fwd_up/fwd_down indices of one layer -> ((expert, channel) pairs [n, 2] of the routed experts, channels of
    the shared expert)."""
    idx = idx.long()
    routed = idx[idx < sizes.routed]
    pairs = torch.stack([routed // sizes.expert_size, routed % sizes.expert_size], 1)
    return pairs, idx[idx >= sizes.routed] - sizes.routed


# ---------------------------------------------------------------- the experts implementation

def _experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """The modeling files' eager experts loop, op for op (so, with nothing attached, the same numbers), with the
    taps and the delta of the module applied where the channel values and the two projections are."""
    taps = getattr(self, TAPS_ATTR, ())
    delta = getattr(self, DELTA_ATTR, None)
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        e = int(expert_idx[0])
        if e == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[e])
        current_state = hidden_states[token_idx]
        gate_up = F.linear(current_state, self.gate_up_proj[e])
        if delta is not None:
            gate_up = delta.rows(e, current_state, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        act = self.act_fn(gate)
        h = act * up
        weights = top_k_weights[token_idx, top_k_pos]
        for tap in taps:
            h = tap(e, token_idx, weights, act, h)
        out = F.linear(h, self.down_proj[e])
        if delta is not None:
            out = delta.columns(e, h, out)
        out = out * weights[:, None]
        final_hidden_states.index_add_(0, token_idx, out.to(final_hidden_states.dtype))
    return final_hidden_states


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_NAME, _experts_forward)


# config id -> (the experts implementation it had, ids of its experts modules carrying a tap or a delta); an entry
# lives only while something is attached, so nothing is kept between calls
_SWITCHED: dict[int, tuple[str | None, set[int]]] = {}


def _refresh(experts: nn.Module) -> None:
    """Route the experts modules of a config through EXPERTS_NAME while any of them carries a tap or a delta, and
    back to the implementation the config had once none does (the config is shared by all layers)."""
    busy = bool(getattr(experts, TAPS_ATTR, ())) or getattr(experts, DELTA_ATTR, None) is not None
    cfg = experts.config
    entry = _SWITCHED.get(id(cfg))
    if busy:
        if entry is None:
            _register()
            entry = _SWITCHED[id(cfg)] = (cfg._experts_implementation, set())
            cfg._experts_implementation = EXPERTS_NAME
        entry[1].add(id(experts))
    elif entry is not None:
        entry[1].discard(id(experts))
        if not entry[1]:
            cfg._experts_implementation = entry[0]
            del _SWITCHED[id(cfg)]


Tap = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def tapped(pairs: list[tuple[nn.Module, Tap]]) -> Iterator[None]:
    """Attach each tap to its experts module for the duration of the block. A tap is called per routed expert e
    as tap(e, token_idx, routing_weights, act(gate), h) and returns h (or a rewritten copy)."""
    try:
        for experts, tap in pairs:
            setattr(experts, TAPS_ATTR, (*getattr(experts, TAPS_ATTR, ()), tap))
            _refresh(experts)
        yield
    finally:
        for experts, tap in pairs:
            taps = getattr(experts, TAPS_ATTR, ())
            setattr(experts, TAPS_ATTR, tuple(t for t in taps if t is not tap))
            _refresh(experts)


# ---------------------------------------------------------------- importance, LAPE counts, routed tokens

class LayerProbe:
    """Per sentence of a batch, for one MoE layer: channel importance [B, I] (routed channels e*I_e + k, then the
    shared expert's), LAPE counts [B, I] of tokens with act(gate) > 0 (routed experts: over the tokens routed to
    them), and routed tokens [B, E] (real tokens sent to each expert). Padding never counts.

    Importance of routed channel (e, k): || w_{t,e} h_e[t,k] over the real tokens t routed to e || * || W_down_e[:, k] ||,
    the Frobenius norm of what removing the channel subtracts from the layer output (the routing weight scales
    the expert's whole output; the router reads the layer input, so removing a channel leaves routing alone).
    Shared expert channel k: the same with its weight sigmoid(shared_expert_gate(x)) (1 when ungated)."""

    def __init__(self, block: MoeBlock, sizes: MoeSizes, method: str):
        self.block, self.sizes, self.method = block, sizes, method
        self.valid: torch.Tensor | None = None  # [B, T] of the running batch
        self._shared_h: torch.Tensor | None = None

    def begin(self, valid: torch.Tensor) -> None:
        B, dev = valid.shape[0], self.block.experts.down_proj.device
        self.valid = valid
        self._flat = valid.reshape(-1).to(dev)
        self._T = valid.shape[1]
        s = self.sizes
        self.n2 = torch.zeros(B, s.num_experts, s.expert_size, device=dev)
        self.active = torch.zeros(B, s.num_experts, s.expert_size, device=dev)
        self.routed = torch.zeros(B, s.num_experts, device=dev)
        self.shared_n2 = torch.zeros(B, s.shared_size, device=dev)
        self.shared_active = torch.zeros(B, s.shared_size, device=dev)

    def tap(self, e: int, token_idx: torch.Tensor, weights: torch.Tensor, act: torch.Tensor,
            h: torch.Tensor) -> torch.Tensor:
        if self.valid is None:
            return h
        real = self._flat[token_idx].float()
        row = token_idx // self._T  # the sentence of each routed token
        self.routed[:, e].index_add_(0, row, real)
        if self.method == "activation":
            self.active[:, e].index_add_(0, row, (act > 0).float() * real[:, None])
        else:
            contrib = (h.float() * weights.float()[:, None]).square() * real[:, None]
            self.n2[:, e].index_add_(0, row, contrib)
        return h

    def _shared_down(self, module, args) -> None:
        if self.valid is not None:
            self._shared_h = args[0]

    def _shared_act(self, module, args, output) -> None:
        if self.valid is not None and self.method == "activation":
            real = self._flat.to(output.device).float()
            self.shared_active += ((output > 0).float() * real[:, None]).view(*self.valid.shape, -1).sum(1)

    def _shared_weight(self, module, args, output) -> None:
        if self.valid is not None and self.method != "activation":
            self._add_shared(torch.sigmoid(output.float()))

    def _add_shared(self, weight: torch.Tensor | None) -> None:
        h = self._shared_h.float()
        if weight is not None:
            h = h * weight
        real = self._flat.to(h.device).float()
        self.shared_n2 += (h.square() * real[:, None]).view(*self.valid.shape, -1).sum(1)
        self._shared_h = None

    def _block_done(self, module, args, output) -> None:
        # an ungated shared expert: its values are weighted 1, added once the block has run
        if self.valid is not None and self._shared_h is not None and self.method != "activation":
            self._add_shared(None)

    def hooks(self) -> list:
        """Forward hooks on the shared expert (its down_proj input, its act_fn, its gate); the routed experts are
        tapped (`tapped`)."""
        b, out = self.block, []
        if b.shared is not None:
            out.append(b.shared.down_proj.register_forward_pre_hook(self._shared_down))
            out.append(b.shared.act_fn.register_forward_hook(self._shared_act))
            if b.shared_gate is not None:
                out.append(b.shared_gate.register_forward_hook(self._shared_weight))
            out.append(b.block.register_forward_hook(self._block_done))
        return out

    def result(self) -> dict[str, torch.Tensor]:
        """{"importance" or "active": [B, I], "routed": [B, E]} on the CPU; ends the batch."""
        b = self.block
        if self.method == "activation":
            scores = torch.cat([self.active.flatten(1), self.shared_active], 1)
        else:
            down = b.experts.down_proj.detach().float().norm(dim=1)  # [E, I_e]: ||W_down_e[:, k]||
            routed = self.n2.sqrt() * down[None]
            parts = [routed.flatten(1)]
            if b.shared is not None:
                parts.append(self.shared_n2.sqrt() * b.shared.down_proj.weight.detach().float().norm(dim=0))
            scores = torch.cat(parts, 1)
        self.valid = None
        return {"scores": scores.cpu(), "routed": self.routed.cpu()}


# ---------------------------------------------------------------- switching channels off, rewriting their values

def expert_entries(block: MoeBlock, sizes: MoeSizes, up_idx: torch.Tensor | None,
                   down_idx: torch.Tensor | None) -> Iterator[tuple[nn.Module, str, object, torch.Tensor]]:
    """(module, parameter leaf name, dim, indices) of one MoE layer for the fwd_up and fwd_down indices given.
    Routed experts: gate_up_proj entries at dims (0, 1) = (expert, row): rows k and I_e + k of expert e (gate and
    up); down_proj entries at dims (0, 2) = (expert, column k); indices [n, 2]. The shared expert: rows of its
    gate_proj/up_proj (dim 0, with their bias entries) and columns of its down_proj (dim 1), as a dense FFN."""
    I = sizes.expert_size
    for idx, ffn_side in ((up_idx, "up"), (down_idx, "down")):
        if idx is None or idx.numel() == 0:
            continue
        pairs, shared = split(idx, sizes)
        if pairs.numel():
            if ffn_side == "up":
                rows = torch.cat([pairs, torch.stack([pairs[:, 0], pairs[:, 1] + I], 1)])
                yield block.experts, "gate_up_proj", (0, 1), unique_pairs(rows)
            else:
                yield block.experts, "down_proj", (0, 2), unique_pairs(pairs)
        if shared.numel():
            if block.shared is None:
                raise InputError(f"fwd_{ffn_side} index {int(shared.max()) + sizes.routed} is beyond the routed "
                                 "experts of a model without a shared expert")
            if ffn_side == "up":
                yield block.shared.up_proj, "weight", 0, shared
                yield block.shared.gate_proj, "weight", 0, shared
            else:
                yield block.shared.down_proj, "weight", 1, shared


def unique_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """Sorted unique rows of an [n, 2] index tensor."""
    return torch.unique(pairs.long(), dim=0)


def index_of(dim, idx: torch.Tensor, ndim: int) -> tuple:
    """The advanced index that selects entries (dim, idx) of a tensor of `ndim` dimensions: an int dim with 1-D
    indices (rows or columns), or a pair of dims with [n, 2] indices (3D expert slices: the result is [n, rest])."""
    if isinstance(dim, int):
        return (slice(None),) * dim + (idx,)
    ix: list = [slice(None)] * ndim
    ix[dim[0]], ix[dim[1]] = idx[:, 0], idx[:, 1]
    return tuple(ix)


def value_rewrites(block: MoeBlock, sizes: MoeSizes, idx: torch.Tensor,
                   make: Callable[[torch.Tensor, slice], Callable[[torch.Tensor], torch.Tensor]]
                   ) -> tuple[Tap | None, Callable[[torch.Tensor], torch.Tensor] | None]:
    """(a tap for the routed experts, a rewrite of the shared expert's down_proj input) that apply
    make(channel indices, where in the layer's index space they are) to the channel values of `idx` (fwd_up /
    fwd_down indices of one layer). `make(k, span)` returns a rewrite of the last dimension of the values."""
    pairs, shared = split(idx, sizes)
    per_expert = {}
    for e in pairs[:, 0].unique().tolist():
        k = pairs[pairs[:, 0] == e, 1]
        per_expert[e] = make(k, slice(e * sizes.expert_size, (e + 1) * sizes.expert_size))

    def tap(e: int, token_idx, weights, act, h):
        return per_expert[e](h) if e in per_expert else h

    shared_rw = make(shared, slice(sizes.routed, sizes.intermediate_size)) if shared.numel() else None
    return (tap if per_expert else None), shared_rw


class MeanTap:
    """Sums for the per-language means of one MoE layer's channel values (interventions mean=L, shift=A:B): a routed
    channel's value averaged over the real tokens routed to its expert (0 for an expert none reached), a shared
    expert channel's over every real token."""

    def __init__(self, block: MoeBlock, sizes: MoeSizes):
        dev = block.experts.down_proj.device
        self.block, self.sizes = block, sizes
        self.sums = torch.zeros(sizes.num_experts, sizes.expert_size, dtype=torch.float64, device=dev)
        self.counts = torch.zeros(sizes.num_experts, dtype=torch.float64, device=dev)
        self.shared = torch.zeros(sizes.shared_size, dtype=torch.float64, device=dev)
        self.flat: torch.Tensor | None = None  # the running batch's real tokens, flattened as the block sees them

    def begin(self, mask: torch.Tensor) -> None:
        self.flat = mask.reshape(-1).to(self.sums.device).double()

    def tap(self, e: int, token_idx: torch.Tensor, weights: torch.Tensor, act: torch.Tensor,
            h: torch.Tensor) -> torch.Tensor:
        real = self.flat[token_idx]
        self.sums[e] += (h.double() * real[:, None]).sum(0)
        self.counts[e] += real.sum()
        return h

    def shared_value(self, x: torch.Tensor) -> torch.Tensor:
        """A rewrite of the shared expert's down_proj input that only observes it."""
        self.shared += (x.double() * self.flat.to(x.device)[:, None]).sum(0).to(self.shared.device)
        return x

    def means(self, tokens: int) -> torch.Tensor:
        """[I] float32: the layer's channel means, in the fwd_up/fwd_down index space."""
        routed = self.sums / self.counts.clamp(min=1)[:, None]
        return torch.cat([routed.flatten(), self.shared / max(tokens, 1)]).float().cpu()


# ---------------------------------------------------------------- training expert slices

class ExpertDelta(nn.Module):
    """Trainable offsets of selected expert slices of one fused experts module: rows (e, r) of gate_up_proj and
    columns (e, k) of down_proj, float32, zero at the start. The fused weights are never written while training:
    expert e's gate/up output gains x @ D_rows^T in its selected rows, its down output h[:, k] @ D_cols^T, exactly
    x @ (W + scatter(D))^T as sparse.NeuronDelta does for a linear layer."""

    def __init__(self, experts: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None):
        super().__init__()
        dev = experts.down_proj.device
        hidden = experts.down_proj.shape[1]
        empty = torch.zeros(0, 2, dtype=torch.long)
        self.register_buffer("row_idx", (rows if rows is not None else empty).to(dev, torch.long).clone())
        self.register_buffer("col_idx", (cols if cols is not None else empty).to(dev, torch.long).clone())
        self.rows_weight = nn.Parameter(torch.zeros(len(self.row_idx), experts.gate_up_proj.shape[2],
                                                    dtype=torch.float32, device=dev))
        self.cols_weight = nn.Parameter(torch.zeros(len(self.col_idx), hidden, dtype=torch.float32, device=dev))
        self._of: dict = {}

    def _select(self, idx: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (idx.data_ptr(), idx.device, e)  # the buffers move with the model: a new pointer, a new entry
        if key not in self._of:
            where = torch.nonzero(idx[:, 0] == e).flatten()
            self._of[key] = (where, idx[where, 1])
        return self._of[key]

    def rows(self, e: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        where, r = self._select(self.row_idx, e)
        if where.numel() == 0:
            return y
        part = x @ self.rows_weight[where].to(y.dtype).T
        return y.index_add(-1, r, part.to(y.dtype))

    def columns(self, e: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        where, k = self._select(self.col_idx, e)
        if where.numel() == 0:
            return y
        return y + (h.index_select(-1, k) @ self.cols_weight[where].to(y.dtype)).to(y.dtype)

    @torch.no_grad()
    def merge_into(self, experts: nn.Module, out: dict[str, torch.Tensor] | None = None) -> None:
        """W[selected] + delta into the selected slices (one rounding), nothing else; with `out`, into copies
        stored there as out["gate_up_proj"] / out["down_proj"], leaving `experts` as it is."""
        for name, idx, d, dims in (("gate_up_proj", self.row_idx, self.rows_weight, (0, 1)),
                                   ("down_proj", self.col_idx, self.cols_weight, (0, 2))):
            if len(idx):
                p = getattr(experts, name)
                if out is not None:
                    p = out.setdefault(name, p.detach().clone())
                ix = index_of(dims, idx.to(p.device), 3)
                p[ix] = (p[ix].float() + d.to(p.device)).to(p.dtype)


def attach_delta(experts: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> ExpertDelta:
    if getattr(experts, DELTA_ATTR, None) is not None:
        raise ValueError(f"{type(experts).__name__} already carries an expert delta")
    delta = ExpertDelta(experts, rows, cols)
    setattr(experts, DELTA_ATTR, delta)
    _refresh(experts)
    return delta


def merge_delta(experts: nn.Module) -> None:
    getattr(experts, DELTA_ATTR).merge_into(experts)
    delattr(experts, DELTA_ATTR)
    _refresh(experts)


# ---------------------------------------------------------------- the checkpoint's own layout (streamed variants)

# per-expert names a checkpoint may store instead of the fused tensors: (gate, up, down) and the block's name
_PER_EXPERT = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_BLOCK_NAMES = ("mlp", "block_sparse_moe")


def checkpoint_entries(name: str, dims, idx: torch.Tensor, keys: set[str], expert_size: int
                       ) -> dict[str, tuple[int, torch.Tensor]]:
    """Where the fused entries (dims, idx) of parameter `name` (`...experts.gate_up_proj` or `...down_proj`) are
    in a checkpoint holding per-expert 2D tensors (what save_pretrained writes and the hub's Mixtral, Qwen-MoE
    and OLMoE checkpoints hold): {checkpoint key: (dim, indices)}. Keys are matched by suffix, as the caller matches
    every other parameter; an entry found nowhere is refused."""
    prefix, _, leaf = name.rpartition(".")
    module, _, _ = prefix.rpartition(".")  # ...layers.N.mlp
    layer_prefix, _, block = module.rpartition(".")
    out: dict[str, list] = {}

    def find(e: int, which: int) -> str:
        for names in _PER_EXPERT:
            for b in dict.fromkeys((block, *_BLOCK_NAMES)):
                want = f"{layer_prefix}.{b}.experts.{e}.{names[which]}.weight"
                hits = [k for k in keys if k == want or k.endswith("." + want) or want.endswith("." + k)]
                if len(hits) == 1:
                    return hits[0]
        raise InputError(f"--streaming: no checkpoint tensor holds expert {e} of {name}")

    for e, r in idx.tolist():
        if leaf == "gate_up_proj":
            key, dim, i = find(e, 0 if r < expert_size else 1), 0, r % expert_size
        else:
            key, dim, i = find(e, 2), 1, r
        out.setdefault(key, [dim, []])[1].append(i)
    return {k: (d, torch.tensor(sorted(set(v)), dtype=torch.long)) for k, (d, v) in out.items()}


# ---------------------------------------------------------------- experts as units (detection)

def expert_shares(routed: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Share of a language's real tokens routed to each expert: routed [langs, layers, E] / tokens [langs]. Each
    token visits top_k experts, so the shares of a layer sum to top_k and the uniform share is top_k / E."""
    return routed.double() / tokens.double().clamp(min=1)[:, None, None]


def expert_sets(shares: torch.Tensor, langs: list[str], top_k: int, factor: float = 1.0) -> dict:
    """Experts related to each language (share >= factor * top_k / E, the uniform share), and the shared and
    exclusive experts by the set algebra of the neurons (docs/method.md section 4), as {layer: [experts]}."""
    L, layers, E = shares.shape
    related = shares >= factor * top_k / E - 1e-12
    shared = related.all(0)

    def lists(mask: torch.Tensor) -> dict[str, list[int]]:
        return {str(li): torch.nonzero(mask[li]).flatten().tolist() for li in range(layers)}

    out = {"related": {l: lists(related[i]) for i, l in enumerate(langs)}, "shared": lists(shared),
           "exclusive": {l: lists(related[i] & ~shared) for i, l in enumerate(langs)}}
    others = [related[[j for j in range(L) if j != i]].any(0) if L > 1 else torch.zeros_like(shared)
              for i in range(L)]
    out["unique"] = {l: lists(related[i] & ~others[i]) for i, l in enumerate(langs)}
    return out
