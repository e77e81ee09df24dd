"""Switching neurons off (docs/method.md section 1): in the weights, in place or reversibly, with forward
hooks, or directly in the safetensors shards of a model directory without building the model.

Every path goes through one plan: parameter name -> (dimension, indices) to zero, derived from the
model's own modules (`decoder_layers`, `projections`), so all paths zero exactly the same entries."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch

from .cli import InputError
from .model import GROUPS, Geometry, bias_entries, decoder_layers, neuron_slots, projections, weight_dim
from .layout import PROVENANCE_FILE
from .neurons import NeuronSet
from . import moe

# which entries a group's neurons are in which tensors: model.neuron_slots (docs/method.md section 1). A slot on
# a projection's output side (rows of an nn.Linear, columns of a Conv1D) includes the bias entry: zeroing the
# weight alone leaves a constant output. An input-side slot (columns of down/o) owns no bias entry: the output
# bias belongs to no single input channel and stays.

# weight files that a streamed variant must not carry over unzeroed from the source directory
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")

# parameter name -> (dim, sorted unique indices): an int dim with 1-D indices (rows or columns), or, for the fused
# 3D expert parameters of an MoE layer (langneurons/moe.py), a pair of dims with [n, 2] indices: (0, 1) = (expert,
# row) of gate_up_proj, (0, 2) = (expert, column) of down_proj
Plan = dict[str, tuple[int | tuple[int, int], torch.Tensor]]


def fill_(p: torch.Tensor, dim, idx: torch.Tensor) -> None:
    """Zero the entries (dim, idx) of a plan in `p`, in place."""
    if isinstance(dim, int):
        p.index_fill_(dim, idx.to(p.device), 0)
    else:
        p[moe.index_of(dim, idx.to(p.device), p.dim())] = 0


def take(p: torch.Tensor, dim, idx: torch.Tensor) -> torch.Tensor:
    """A copy of the entries (dim, idx) of `p`."""
    if isinstance(dim, int):
        return p.index_select(dim, idx.to(p.device))
    return p[moe.index_of(dim, idx.to(p.device), p.dim())]


def put_(p: torch.Tensor, dim, idx: torch.Tensor, values: torch.Tensor) -> None:
    """Write `values` (as `take` returned them) back into the entries (dim, idx) of `p`."""
    if isinstance(dim, int):
        p.index_copy_(dim, idx.to(p.device), values.to(p.device))
    else:
        p[moe.index_of(dim, idx.to(p.device), p.dim())] = values.to(p.device)


def _check_fits(model, nset: NeuronSet) -> None:
    geom = Geometry.from_config(model.config)
    for g in GROUPS:
        if g in nset and tuple(nset[g].shape) != geom.shape(g):
            raise InputError(f"neuron set group {g} has shape {tuple(nset[g].shape)}, the model needs "
                             f"{geom.shape(g)} (layers x neurons)")


def selected_entries(model, nset: NeuronSet) -> Iterator[tuple[torch.nn.Module, str, torch.Tensor]]:
    """(projection, side, positions) for every projection that `nset` reaches: side 'out' = output channels,
    'in' = input channels, positions on the last dimension of that side (a fused tensor's rows of the selected
    logical neurons, model.neuron_slots). The one place that maps groups to parameters; a projection reached
    through several groups (a fused q/k/v tensor) comes once per group. The FFN of an MoE layer has no slots:
    its expert channels are `moe_entries`."""
    _check_fits(model, nset)
    geom = Geometry.from_config(model.config)
    for li, layer in enumerate(decoder_layers(model)):
        slots = neuron_slots(layer, geom, model.config)
        for group in GROUPS:
            if group not in nset:
                continue
            idx = torch.nonzero(nset[group][li]).flatten()
            if idx.numel() == 0:
                continue
            for slot in slots[group]:
                yield slot.module, slot.side, slot.index[idx]


def moe_entries(model, nset: NeuronSet) -> Iterator[tuple[torch.nn.Module, str, object, torch.Tensor]]:
    """(module, parameter leaf, dim, indices) of the fwd_up/fwd_down neurons of `nset` in the MoE layers
    (moe.expert_entries: fused expert slices, and the shared expert's rows and columns)."""
    geom = Geometry.from_config(model.config)
    if geom.moe is None:
        return
    _check_fits(model, nset)
    for li, layer in enumerate(decoder_layers(model)):
        proj = projections(layer)
        if "moe" not in proj:
            continue
        up, down = (torch.nonzero(nset[g][li]).flatten() if g in nset else None for g in ("fwd_up", "fwd_down"))
        yield from moe.expert_entries(proj["moe"], geom.moe, up, down)


def zero_plan(model, nset: NeuronSet) -> Plan:
    """Which entries of which parameters to zero for `nset`: {param name: (dim, indices)}.
    Works on a model skeleton on the meta device too (only names and shapes are used)."""
    names = {id(m): n for n, m in model.named_modules()}
    plan: Plan = {}
    entries = [(mod, "weight", weight_dim(mod, side), idx, bias_entries(mod, side) is not None)
               for mod, side, idx in selected_entries(model, nset)]
    # MoE layers: fused 3D expert slices (a pair of dims) and the shared expert's rows (with bias) and columns
    entries += [(mod, leaf, dim, idx, leaf == "weight" and dim == 0 and getattr(mod, "bias", None) is not None)
                for mod, leaf, dim, idx in moe_entries(model, nset)]
    for mod, leaf, dim, idx, bias in entries:
        params = [(leaf, dim)] + ([("bias", 0)] if bias else [])
        for pname, d in params:
            full = f"{names[id(mod)]}.{pname}"
            if full in plan:  # the same projection reached through two groups (or a fused tensor): union
                idx = torch.unique(torch.cat([plan[full][1], idx]), dim=0)
            plan[full] = (d, idx)
    return plan


def _params(model) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


@torch.no_grad()
def zero_neurons(model, nset: NeuronSet) -> Plan:
    """Zero the neurons of `nset` in place (weights and their bias entries). Returns the plan used."""
    plan = zero_plan(model, nset)
    params = _params(model)
    for name, (dim, idx) in plan.items():
        fill_(params[name], dim, idx)
    return plan


@contextlib.contextmanager
def zeroed(model, nset: NeuronSet) -> Iterator[Plan]:
    """Zero `nset` in place for the duration of the block, then restore the original values exactly.

    Only the affected rows/columns are kept (on the CPU), so measuring many sets costs neither a
    model copy nor a save/reload per set."""
    plan = zero_plan(model, nset)
    params = _params(model)
    saved = {}
    with torch.no_grad():
        for name, (dim, idx) in plan.items():
            saved[name] = take(params[name], dim, idx).to("cpu", copy=True)
    try:
        with torch.no_grad():
            for name, (dim, idx) in plan.items():
                fill_(params[name], dim, idx)
        yield plan
    finally:
        with torch.no_grad():
            for name, (dim, idx) in plan.items():
                put_(params[name], dim, idx, saved[name])


def register_rewrite(module: torch.nn.Module, where: str, rewrite: Callable[[torch.Tensor], torch.Tensor]):
    """Hook `module` so that its input ('in': the first argument, a forward pre-hook) or its output ('out': a
    forward hook) passes through `rewrite`; returns the handle. Shared by ablation_hooks and
    interventions.intervened."""
    if where == "in":
        return module.register_forward_pre_hook(lambda m, args: (rewrite(args[0]),) + tuple(args[1:]))
    return module.register_forward_hook(lambda m, args, output: rewrite(output))


@contextlib.contextmanager
def ablation_hooks(model, nset: NeuronSet) -> Iterator[None]:
    """Switch the same neurons off with hooks instead of weights (an independent check of `zero_neurons`).

    Output-side neurons (up/gate/q/k/v) become zeroed output channels of those projections (a zero weight row
    plus its zero bias entry gives exactly a zero output channel; zeroing up's channel k gives H[:,k] = 0).
    Input-side neurons (down/o) become zeroed input channels (forward pre-hook)."""
    handles = []
    try:
        for mod, side, idx in selected_entries(model, nset):
            handles.append(register_rewrite(mod, side, lambda x, idx=idx: x.index_fill(-1, idx.to(x.device), 0)))
        # MoE layers: the values of the listed expert channels are zeroed in the experts loop
        taps = moe_value_rewrites(model, nset, lambda k, span, li: (lambda x, k=k: x.index_fill(-1, k.to(x.device), 0)),
                                  handles)
        with moe.tapped(taps):
            yield
    finally:
        for h in handles:
            h.remove()


def moe_value_rewrites(model, nset: NeuronSet, make: Callable, handles: list) -> list:
    """Rewrites of the values of `nset`'s expert channels: make(k, span, layer) gives the rewrite of channels k of
    one expert (span: where that expert's channels are in the layer's fwd_up/fwd_down index space). Returns the
    (experts module, tap) pairs for moe.tapped; the shared expert's rewrites are hooked at its down_proj input
    and their handles appended to `handles`."""
    taps = []
    for li, block, idx in moe_layer_indices(model, nset):
        tap, shared = moe.value_rewrites(block, Geometry.from_config(model.config).moe, idx,
                                         lambda k, span, li=li: make(k, span, li))
        if tap is not None:
            taps.append((block.experts, tap))
        if shared is not None:
            handles.append(register_rewrite(block.shared.down_proj, "in", shared))
    return taps


def moe_layer_indices(model, nset: NeuronSet) -> Iterator[tuple[int, "moe.MoeBlock", torch.Tensor]]:
    """(layer, MoE block, the union of the fwd_up and fwd_down indices of `nset` there) of every MoE layer the set
    reaches: both groups switch off the same channel, whose value is what hooks and interventions rewrite."""
    if Geometry.from_config(model.config).moe is None:
        return
    for li, layer in enumerate(decoder_layers(model)):
        proj = projections(layer)
        if "moe" not in proj:
            continue
        parts = [torch.nonzero(nset[g][li]).flatten() for g in ("fwd_up", "fwd_down") if g in nset]
        idx = torch.unique(torch.cat(parts)) if parts else torch.empty(0, dtype=torch.long)
        if idx.numel():
            yield li, proj["moe"], idx


def meta_skeleton(config):
    """The model built on the meta device from its config: module names and shapes, no memory."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _shard_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [src / f for f in sorted(set(weight_map.values()))]
    if (src / "model.safetensors").is_file():  # not e.g. a consolidated.safetensors lying beside it
        return [src / "model.safetensors"]
    return sorted(src.glob("*.safetensors"))


# safetensors dtype names -> torch dtypes (the formats a transformers checkpoint uses)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """(start of the data section, header) of a safetensors file: u64 little-endian length, JSON."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def zero_neurons_streaming(src_dir: str | Path, dst_dir: str | Path, nset: NeuronSet, geom: Geometry) -> Plan:
    """Write a copy of the model directory `src_dir` to `dst_dir` with `nset` zeroed, without building
    the model or loading its shards: each shard is copied as a file, then only the affected projection
    tensors are read, zeroed and written back at their offsets. Memory is bounded by the largest
    affected tensor (one projection), not by a shard or the model.

    Parameter names come from a skeleton on the meta device; tensors keep their stored dtype and the
    shard headers (metadata included) are kept verbatim, so the tensors are byte for byte those that
    `zero_neurons` + `save_pretrained` produce from a model in the same dtype."""
    from transformers import AutoConfig

    src, dst = Path(src_dir), Path(dst_dir)
    shards = _shard_files(src)
    if not shards:
        raise InputError(f"--streaming: {src} has no .safetensors weights")
    config = AutoConfig.from_pretrained(src)
    if Geometry.from_config(config) != geom:
        raise InputError(f"--streaming: {src} does not have the geometry {geom}")
    plan = zero_plan(meta_skeleton(config), nset)

    headers = {f: _safetensors_header(f) for f in shards}
    keys = {k: f for f, (_, h) in headers.items() for k in h if k != "__metadata__"}
    # checkpoint keys may carry a different prefix than the module names (e.g. saved from the base model)
    key_plan = {}
    for name, entry in plan.items():
        hits = [name] if name in keys else [k for k in keys if k.endswith("." + name) or name.endswith("." + k)]
        if not hits and not isinstance(entry[0], int):
            # fused expert slices of a checkpoint that stores one 2D tensor per expert (moe.checkpoint_entries)
            for k, e in moe.checkpoint_entries(name, *entry, set(keys), geom.expert_size).items():
                if k in key_plan:
                    e = (e[0], torch.unique(torch.cat([key_plan[k][1], e[1]])))
                key_plan[k] = e
            continue
        if len(hits) != 1:
            raise InputError(f"--streaming: parameter {name} not found (or ambiguous) in the shards of {src}")
        key_plan[hits[0]] = entry

    dst.mkdir(parents=True, exist_ok=True)
    for f, (start, header) in headers.items():
        shutil.copyfile(f, dst / f.name)  # a plain file copy: the kernel moves the bytes, not Python
        todo = [k for k in header if k in key_plan]
        if not todo:
            continue
        with open(dst / f.name, "r+b") as out:
            for k in todo:
                info = header[k]
                if info["dtype"] not in _ST_DTYPES:
                    raise InputError(f"--streaming: tensor {k} in {f} has unsupported dtype {info['dtype']}")
                lo, hi = info["data_offsets"]
                out.seek(start + lo)
                buf = bytearray(out.read(hi - lo))
                t = torch.frombuffer(buf, dtype=_ST_DTYPES[info["dtype"]]).view(info["shape"])  # shares buf
                dim, idx = key_plan[k]
                fill_(t, dim, idx)
                out.seek(start + lo)
                out.write(buf)
    # config, tokenizer, index, generation config, licence files: copied unchanged; other weight
    # formats are left out (they would carry the neurons still switched on)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name != PROVENANCE_FILE:
            shutil.copy2(f, dst / f.name)
    return key_plan
