"""Training only selected neurons (docs/method.md section 6): every other parameter entry stays bit-for-bit.

The whole model is frozen. Every projection that holds selected rows or columns (the same plan that
deactivation zeroes, `masking.zero_plan`) gets a small trainable `NeuronDelta` submodule, initialised
to zero, and a forward hook that adds its contribution to the projection's output:

    output channels k (up/gate/q/k/v):   y[..., k] += x @ delta_w.T + delta_b      delta_w: (len(k), in)
    input channels k (down/o):           y         += x[..., k] @ delta_w.T          delta_w: (out, len(k))

which is exactly `x @ (W + scatter(delta)).T` (k are positions in a fused tensor where the projection is
fused, model.neuron_slots; a Conv1D's transposed weight gets the delta transposed at merge). The original weights never receive a gradient, never
reach the optimizer, and are never written, so entries outside the selection cannot change under any
optimizer, weight decay, mixed precision or number of processes. `merge_deltas` folds the deltas into
the weights at the end (selected rows/columns only) and leaves an ordinary model. The fused experts of a
mixture-of-experts layer get one `moe.ExpertDelta` each (the same additive form per expert, applied inside the
experts loop); the router is never touched.

Why hooks rather than a `torch.nn.utils.parametrize` reparametrisation W' = W.index_add(delta): with a
parametrisation autograd builds the full (out x in) weight gradient of every touched projection and then
throws all but k rows away; with the additive form the backward pass only computes the k-row/column
product, so a sparse run costs no more than the forward/backward through the activations. The deltas are
kept in float32 even when the model is bfloat16 (master copies of the trained entries), and merged with a
single rounding: W[k] = (W[k].float() + delta).to(W.dtype)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from . import moe
from .masking import zero_plan
from .model import in_features, is_conv1d, out_features, weight_dim
from .neurons import NeuronSet

DELTA_ATTR = "neuron_delta"     # name of the submodule added to each touched projection
DELTA_FILE = "neuron_deltas.safetensors"  # what a training checkpoint stores instead of the model


class NeuronDelta(nn.Module):
    """Trainable offsets of the selected output channels (rows of an nn.Linear, columns of a Conv1D) or input
    channels of one projection. `dim` is the weight dimension the indices are on (model.weight_dim); the delta
    is held in nn.Linear's orientation either way ((k, in) for output channels, (out, k) for input channels)."""

    def __init__(self, linear: nn.Module, dim: int, idx: torch.Tensor, bias: bool):
        super().__init__()
        self.dim = dim
        self.side = "out" if dim == weight_dim(linear, "out") else "in"
        self.conv1d = is_conv1d(linear)  # weight stored [in, out]: merged transposed
        dev = linear.weight.device
        self.register_buffer("idx", idx.to(dev, torch.long).clone(), persistent=True)
        k = int(idx.numel())
        shape = (k, in_features(linear)) if self.side == "out" else (out_features(linear), k)
        self.weight = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=dev))
        # a bias entry belongs to an output channel; input channels have no bias entry of their own
        self.bias = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=dev)) if bias and self.side == "out" else None

    def contribution(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + the delta's part of the layer output for input x."""
        w = self.weight.to(y.dtype)
        if self.side == "out":
            part = x @ w.T
            if self.bias is not None:
                part = part + self.bias.to(y.dtype)
            return y.index_add(-1, self.idx, part.to(y.dtype))
        return y + (x.index_select(-1, self.idx) @ w.T).to(y.dtype)

    @torch.no_grad()
    def merge_into(self, linear: nn.Module, out: dict[str, torch.Tensor] | None = None) -> None:
        """Write W[sel] + delta into the selected entries of `linear` (one rounding), nothing else; with `out`,
        into copies stored there as out["weight"] / out["bias"] instead, leaving `linear` as it is (a
        checkpoint saved while training goes on)."""
        w = linear.weight if out is None else out.setdefault("weight", linear.weight.detach().clone())
        delta = self.weight.to(w.device)
        if self.conv1d:  # [in, out] storage: the (k, in) / (out, k) delta transposed onto it
            delta = delta.T
        rows = w.index_select(self.dim, self.idx).float() + delta
        w.index_copy_(self.dim, self.idx.to(w.device), rows.to(w.dtype))
        if self.bias is not None:
            b = linear.bias if out is None else out.setdefault("bias", linear.bias.detach().clone())
            b.index_copy_(0, self.idx.to(b.device), (b.index_select(0, self.idx.to(b.device)).float()
                                                     + self.bias.to(b.device)).to(b.dtype))


def _hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, DELTA_ATTR).contribution(args[0], output)


def attach_deltas(model: nn.Module, nset: NeuronSet) -> dict[str, tuple[int, int]]:
    """Freeze every parameter of `model` and add a zero-initialised trainable delta for the neurons of
    `nset` (raises InputError when the set does not fit the model). Returns {projection name: (dim,
    number of selected rows/columns)}; an empty dict means the set selects nothing."""
    plan = zero_plan(model, nset)  # {"...q_proj.weight": (dim, idx), "...q_proj.bias": (0, idx)}
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    touched = {}
    experts: dict[str, dict[str, torch.Tensor]] = {}  # fused expert slices, one moe.ExpertDelta per module
    for pname, (dim, idx) in plan.items():
        mod_name, _, leaf = pname.rpartition(".")
        if not isinstance(dim, int):
            experts.setdefault(mod_name, {})[leaf] = idx
            continue
        if leaf != "weight":
            continue
        linear = modules[mod_name]
        if hasattr(linear, DELTA_ATTR):
            raise ValueError(f"{mod_name} already carries a neuron delta")
        setattr(linear, DELTA_ATTR, NeuronDelta(linear, dim, idx, bias=f"{mod_name}.bias" in plan))
        linear._neuron_delta_hook = linear.register_forward_hook(_hook)
        touched[mod_name] = (dim, int(idx.numel()))
    for mod_name, parts in experts.items():
        rows, cols = parts.get("gate_up_proj"), parts.get("down_proj")
        moe.attach_delta(modules[mod_name], rows, cols)
        touched[mod_name] = ("experts", sum(len(x) for x in (rows, cols) if x is not None))
    return touched


def delta_modules(model: nn.Module) -> dict[str, tuple[nn.Module, NeuronDelta]]:
    """{projection name: (projection, its delta)} of a model prepared by `attach_deltas`."""
    return {name: (m, getattr(m, DELTA_ATTR)) for name, m in model.named_modules()
            if isinstance(getattr(m, DELTA_ATTR, None), NeuronDelta)}


@torch.no_grad()
def merge_deltas(model: nn.Module) -> int:
    """Fold every delta into its projection's selected entries and remove deltas and hooks, leaving an
    ordinary model that saves with `save_pretrained`. Returns the number of projections merged."""
    found = delta_modules(model)
    for _, (linear, delta) in found.items():
        delta.merge_into(linear)
        linear._neuron_delta_hook.remove()
        del linear._neuron_delta_hook
        delattr(linear, DELTA_ATTR)
    fused = [m for m in model.modules() if isinstance(getattr(m, moe.DELTA_ATTR, None), moe.ExpertDelta)]
    for experts in fused:
        moe.merge_delta(experts)
    return len(found) + len(fused)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict `merge_deltas` would leave, without touching `model`: the deltas' projections get merged
    copies, every other tensor is the model's own (not copied), the deltas themselves are left out."""
    state = {k: v for k, v in model.state_dict().items()
             if f".{DELTA_ATTR}." not in f".{k}" and f".{moe.DELTA_ATTR}." not in f".{k}"}
    merges = [(name, linear, delta) for name, (linear, delta) in delta_modules(model).items()]
    merges += [(name, m, getattr(m, moe.DELTA_ATTR)) for name, m in model.named_modules()
               if isinstance(getattr(m, moe.DELTA_ATTR, None), moe.ExpertDelta)]
    for name, module, delta in merges:
        merged: dict[str, torch.Tensor] = {}
        delta.merge_into(module, merged)
        for leaf, tensor in merged.items():
            state[f"{name}.{leaf}" if name else leaf] = tensor
    return state


def delta_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors only (what a checkpoint needs to restore a sparse run)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_delta_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"checkpoint deltas do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for n, p in params.items():
        if tuple(state[n].shape) != tuple(p.shape):
            raise ValueError(f"checkpoint delta {n} has shape {tuple(state[n].shape)}, expected {tuple(p.shape)}")
        p.copy_(state[n].to(p.device, p.dtype))


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state (exp_avg, exp_avg_sq, step, ...)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def sparse_trainer_class():
    """A transformers Trainer whose checkpoints hold only the deltas (plus the usual optimizer, scheduler,
    RNG and trainer state), so resuming a sparse run neither writes nor reads a whole model per save."""
    from safetensors.torch import load_file, save_file
    from transformers import Trainer

    class SparseTrainer(Trainer):
        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            output_dir = output_dir or self.args.output_dir
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            save_file(delta_state_dict(self.model), os.path.join(output_dir, DELTA_FILE), metadata={"format": "pt"})

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
            f = Path(resume_from_checkpoint) / DELTA_FILE
            if not f.is_file():
                raise ValueError(f"{resume_from_checkpoint} has no {DELTA_FILE}: not a checkpoint of a neuron run")
            load_delta_state_dict(model if model is not None else self.model, load_file(f, device="cpu"))

    return SparseTrainer
