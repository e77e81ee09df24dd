"""Neuron sets: files (ours and the authors'), set algebra of docs/method.md section 4, statistics.

In memory a neuron set is a dict group -> bool tensor [num_layers, group_size]; set algebra is
then elementwise logic. On disk it is the authors' JSON layout {group: {"layer": [indices]}}."""
from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cli import InputError
from .files import read_json, write_json
from .model import GROUPS, Geometry

NeuronSet = dict[str, torch.Tensor]
COMPONENTS = {"QK": ("attn_q", "attn_k"), "VO": ("attn_v", "attn_o"), "FFN": ("fwd_up", "fwd_down")}


def empty_set(geom: Geometry, sizes: dict[str, int] | None = None) -> NeuronSet:
    """`sizes` overrides a group's length (the authors' attn_k/attn_v live in query-head space)."""
    sizes = sizes or {}
    return {g: torch.zeros(geom.num_layers, sizes.get(g, geom.group_size(g)), dtype=torch.bool) for g in GROUPS}


def set_sizes(s: NeuronSet) -> dict[str, int]:
    """Length of each group's index space in a set."""
    return {g: int(s[g].shape[1]) for g in GROUPS}


def size(s: NeuronSet) -> int:
    return int(sum(int(m.sum()) for m in s.values()))


def intersection(sets: list[NeuronSet]) -> NeuronSet:
    return {g: torch.stack([s[g] for s in sets]).all(0) for g in GROUPS}


def union(sets: list[NeuronSet]) -> NeuronSet:
    return {g: torch.stack([s[g] for s in sets]).any(0) for g in GROUPS}


def difference(a: NeuronSet, b: NeuronSet) -> NeuronSet:
    return {g: a[g] & ~b[g] for g in GROUPS}


def random_set(n: int, geom: Geometry, seed: int, name: str, sizes: dict[str, int] | None = None) -> NeuronSet:
    """`n` neurons drawn uniformly over all layers and groups (in the index space of `sizes`, default the
    model's); the seed is mixed with the set's name so that every control is different but reproducible."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    shapes = {g: (geom.num_layers, (sizes or {}).get(g, geom.group_size(g))) for g in GROUPS}
    sizes = [shapes[g][0] * shapes[g][1] for g in GROUPS]
    flat = np.zeros(sum(sizes), dtype=bool)
    flat[rng.choice(flat.size, size=n, replace=False)] = True
    out, start = {}, 0
    for g, k in zip(GROUPS, sizes):
        out[g] = torch.from_numpy(flat[start:start + k].reshape(shapes[g]).copy())
        start += k
    return out


def random_like(s: NeuronSet, seed: int, name: str) -> NeuronSet:
    """A random control matched to `s`: in every layer and group, as many neurons as `s` has there, drawn
    uniformly from that layer's group (so a control never differs from its set in where its neurons sit, only
    in which). The seed is mixed with `name`: controls random-1 ... random-K of one set are all different."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    out = {}
    for g in GROUPS:
        mask = torch.zeros_like(s[g])
        for layer, k in enumerate(s[g].sum(1).tolist()):
            if k:
                mask[layer, torch.from_numpy(rng.choice(s[g].shape[1], size=int(k), replace=False))] = True
        out[g] = mask
    return out


def derived_sets(related: dict[str, NeuronSet]) -> dict[str, NeuronSet]:
    """related_<l>, related_all, shared, exclusive_<l>, unique_<l> from the language-related sets N_l
    (docs/method.md section 4). Elementwise, so sets batched over resamples ({group: bool [R, layers, n]}) work
    too (langneurons/stability.py)."""
    langs = list(related)
    shared = intersection(list(related.values()))
    sets = {f"related_{l}": related[l] for l in langs}
    sets["related_all"] = union(list(related.values()))
    sets["shared"] = shared
    for l in langs:
        sets[f"exclusive_{l}"] = difference(related[l], shared)
        others = [related[m] for m in langs if m != l]
        sets[f"unique_{l}"] = difference(related[l], union(others)) if others else related[l]
    return sets


def language_sets(related: dict[str, NeuronSet], geom: Geometry, seed: int) -> dict[str, NeuronSet]:
    """All sets of docs/outputs.md from the language-related sets N_l (docs/method.md section 4)."""
    langs = list(related)
    sizes = set_sizes(related[langs[0]])  # random controls live in the same index space as the sets
    sets = derived_sets(related)
    shared = sets["shared"]
    sets["random_shared"] = random_set(size(shared), geom, seed, "random_shared", sizes)
    for l in langs:
        sets[f"random_exclusive_{l}"] = random_set(size(sets[f"exclusive_{l}"]), geom, seed, f"random_exclusive_{l}",
                                                   sizes)
    return sets


def related_from_counts(counts: dict[str, torch.Tensor], sentences: torch.Tensor, langs: list[str],
                        threshold: float, geom: Geometry | None = None) -> dict[str, NeuronSet]:
    """N_l = neurons whose firing rate (count / sentences of l) is at least `threshold`. A group without
    counts (not scored, `--groups`) has no related neurons; its shape comes from `geom`."""
    out = {}
    for i, l in enumerate(langs):
        n = int(sentences[i])
        if n == 0:
            raise InputError(f"no sentences counted for language '{l}'")
        # integer comparison avoids float rounding at threshold 1.0
        need = int(np.ceil(threshold * n - 1e-9))
        out[l] = {g: counts[g][i] >= need if g in counts else torch.zeros(geom.shape(g), dtype=torch.bool)
                  for g in GROUPS}
    return out


def lape_related(active: torch.Tensor, tokens: torch.Tensor, langs: list[str], geom: Geometry,
                 top_rate: float, quantile: float = 0.95) -> dict[str, NeuronSet]:
    """Language-specific FFN neurons by activation-probability entropy (LAPE, Tang et al., 2024).

    active [langs, layers, intermediate]: tokens with activation > 0; tokens [langs]. Neurons whose
    probability never exceeds the `quantile` of all probabilities are dropped, the `top_rate` fraction
    with the lowest entropy across languages is kept, and each kept neuron belongs to every language
    whose probability exceeds that quantile (their filter_rate = activation_bar_ratio = 0.95)."""
    probs = active.double() / tokens.double().clamp(min=1)[:, None, None]  # [L, layers, n]
    probs = probs.permute(1, 2, 0)  # [layers, n, L]
    flat = probs.flatten()
    bar = flat.kthvalue(max(1, round(flat.numel() * quantile))).values
    normed = probs / probs.sum(-1, keepdim=True)
    normed = torch.nan_to_num(normed, nan=0.0)
    entropy = -(normed * torch.log(normed.clamp(min=1e-300))).sum(-1)
    entropy[(probs > bar).sum(-1) == 0] = float("inf")
    k = max(1, round(entropy.numel() * top_rate))
    chosen = torch.zeros(entropy.numel(), dtype=torch.bool)
    chosen[entropy.flatten().topk(k, largest=False).indices] = True
    chosen &= torch.isfinite(entropy.flatten())
    chosen = chosen.reshape(entropy.shape)
    out = {}
    for i, l in enumerate(langs):
        s = empty_set(geom)
        ffn = chosen & (probs[..., i] > bar)
        s["fwd_up"], s["fwd_down"] = ffn.clone(), ffn.clone()
        out[l] = s
    return out


# ---------------------------------------------------------------- files

def to_json(s: NeuronSet, meta: dict[str, Any] | None = None,
            kv_index_space: str | dict[str, str] = "kv_rows") -> dict[str, Any]:
    """`kv_index_space`: 'kv_rows', 'query_heads' (the authors'), or {"attn_k": ..., "attn_v": ...}."""
    obj: dict[str, Any] = {g: {str(layer): torch.nonzero(s[g][layer]).flatten().tolist()
                               for layer in range(s[g].shape[0])} for g in GROUPS}
    obj["meta"] = {**(meta or {}), "kv_index_space": kv_index_space}
    return obj


def write_neuron_file(path: str | Path, s: NeuronSet, meta: dict[str, Any] | None = None,
                      kv_index_space: str | dict[str, str] = "kv_rows") -> None:
    write_json(path, to_json(s, meta, kv_index_space))


def read_neuron_file(path: str | Path, geom: Geometry, legacy_kv: bool = False) -> tuple[NeuronSet, dict]:
    """Read our files and the authors' (no `meta`: k/v indices in query-head space).

    The authors' query-head index i = h*head_dim + d belongs to key/value row (h // n_rep)*head_dim + d.
    Their own code used i // n_rep (wrong whenever head_dim > 1); `legacy_kv` reproduces it."""
    return neuron_set_from_json(read_json(path, "neuron file"), path, geom, legacy_kv)


def neuron_set_from_json(obj: Any, path: str | Path, geom: Geometry, legacy_kv: bool = False) -> tuple[NeuronSet, dict]:
    """read_neuron_file on the file's parsed JSON `obj` (`path` names it in errors)."""
    if not isinstance(obj, dict):
        raise InputError(f"neuron file {path}: expected a JSON object of groups")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise InputError(f"neuron file {path}: 'meta' is not an object")
    space = meta.get("kv_index_space", "query_heads" if "meta" not in obj else "kv_rows")
    # one space for attn_k and attn_v, or one per group (the authors' mode with one of them undone)
    spaces = space if isinstance(space, dict) else {"attn_k": space, "attn_v": space}
    if set(spaces) != {"attn_k", "attn_v"} or any(v not in ("kv_rows", "query_heads") for v in spaces.values()):
        raise InputError(f"neuron file {path}: unknown kv_index_space '{space}'")
    out = empty_set(geom)
    for group, layers in obj.items():
        if group == "meta":
            continue
        if group not in GROUPS:
            raise InputError(f"neuron file {path}: unknown group '{group}'")
        if not isinstance(layers, dict):
            raise InputError(f"neuron file {path}: group {group} is not an object of layers")
        kv_from_q = group in ("attn_k", "attn_v") and spaces[group] == "query_heads"
        limit = geom.num_heads * geom.head_dim if kv_from_q else geom.group_size(group)
        for key, idx in layers.items():
            # ASCII digits only: str.isdigit() accepts "²", which int() then rejects
            if not (re.fullmatch(r"[0-9]+", key) and int(key) < geom.num_layers):
                raise InputError(f"neuron file {path}: group {group} layer {key} does not exist "
                                 f"(model has {geom.num_layers} layers)")
            if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
                raise InputError(f"neuron file {path}: group {group} layer {key}: indices must be a list of integers")
            # checked on the Python integers: an index beyond 64 bits would overflow torch.tensor
            if (bad := next((i for i in idx if not 0 <= i < limit), None)) is not None:
                raise InputError(f"neuron file {path}: group {group} layer {key}: index {bad} out of range "
                                 f"[0, {limit})")
            t = torch.tensor(idx, dtype=torch.long)
            if kv_from_q:
                d = geom.head_dim
                t = t // geom.n_rep if legacy_kv else (t // d // geom.n_rep) * d + t % d
            out[group][int(key)][t] = True
    return out, meta


def other_model(path: str | Path, meta: Any, model: dict[str, Any]) -> str | None:
    """Why the model record of a neuron file's `meta` names another model than `model` (model.model_record of
    the loaded model), or None when it names the same one or the file has no record (the authors' files, and
    files whose meta.model is a string: --model as given, nothing to compare)."""
    rec = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(rec, dict):
        return None
    geom = rec.get("geometry")
    if not isinstance(rec.get("config_sha256"), str) or not isinstance(geom, dict):
        raise InputError(f"neuron file {path}: meta.model is not a model record (needs config_sha256 and geometry)")
    if rec["config_sha256"] == model["config_sha256"]:
        return other_point(rec, model)
    theirs, ours = f"model '{rec.get('tag', '?')}'", f"--model {model['name']} ('{model['tag']}'"
    if field := next((f for f in model["geometry"] if geom.get(f) != model["geometry"][f]), None):
        return f"{theirs} ({field} {geom.get(field)}), not on {ours}, {field} {model['geometry'][field]})"
    why = (f"{theirs} (config sha256 {rec['config_sha256'][:12]}), not on {ours}, config sha256 "
           f"{model['config_sha256'][:12]}): same geometry, different config")
    if rec.get("transformers") not in (None, model["transformers"]):
        why += f" (the file's config was read by transformers {rec['transformers']}, this is {model['transformers']})"
    return why


def other_point(rec: dict[str, Any], model: dict[str, Any]) -> str | None:
    """Why a record of the same config names another point of development than `model`: both are hub revisions
    (model.model_revision) with different commits, or both step models (train.py --save-every) of other steps or
    runs; None otherwise (a trained model or a variant uses its base's neuron files)."""
    for key, what, fields in (("revision", "revision", ("commit",)), ("checkpoint", "step model", ("run", "step"))):
        a, b = rec.get(key), model.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and any(a.get(f) != b.get(f) for f in fields):
            def where(r: dict) -> str:
                return ", ".join(f"{f} {str(r.get(f))[:12]}" for f in (("revision", "commit") if key == "revision"
                                                                      else ("run", "step")))
            return (f"model '{rec.get('tag', '?')}' ({where(a)}), not on --model {model['name']} ('{model['tag']}', "
                    f"{where(b)}): another {what} of the same model")
    return None


def load_neuron_set(path: str | Path, geom: Geometry, legacy_kv: bool = False, model: dict[str, Any] | None = None,
                    allow_other_model: bool = False) -> tuple[NeuronSet, dict[str, Any]]:
    """A neuron file read for use (deactivation, training): the set, and what the outputs record about the
    file (its content hash, size, format, k/v index space and recorded model). A file whose model record names
    another model than `model` (model.model_record of the loaded model) is refused unless `allow_other_model`:
    its indices may fit and still mean nothing on this model."""
    from .reuse import file_digest
    path = Path(path)
    obj = read_json(path, "neuron file")
    meta = obj.get("meta") if isinstance(obj, dict) else None
    other = other_model(path, meta, model) if model is not None else None
    if other and not allow_other_model:
        raise InputError(f"neuron file {path}: detected on {other}; --allow-other-model uses it anyway")
    nset, meta = neuron_set_from_json(obj, path, geom, legacy_kv)
    ours = "meta" in obj  # the authors' files have no `meta`
    return nset, {"name": path.stem, "file": str(path.resolve()), "sha256": file_digest(path), "size": size(nset),
                  "fraction": size(nset) / geom.total_neurons, "groups": {g: int(m.sum()) for g, m in nset.items()},
                  "format": "ours" if ours else "authors",
                  "kv_index_space": meta.get("kv_index_space", "kv_rows" if ours else "query_heads"),
                  "legacy_kv_mapping": legacy_kv,
                  "model": meta["model"] if isinstance(meta.get("model"), dict) else None,
                  "other_model": other is not None}


# ---------------------------------------------------------------- statistics

def set_stats(s: NeuronSet, geom: Geometry) -> dict[str, Any]:
    # totals of the set's own index space (the model's neurons, or the authors' query-head k/v space)
    total = sum(s[g].numel() for g in GROUPS)
    n = size(s)
    groups = {g: int(s[g].sum()) for g in GROUPS}
    return {"size": n, "fraction": n / total,
            "groups": groups,
            "group_fractions": {g: groups[g] / s[g].numel() for g in GROUPS},
            "components": {c: sum(groups[g] for g in gs) for c, gs in COMPONENTS.items()},
            "component_shares": {c: (sum(groups[g] for g in gs) / n if n else 0.0) for c, gs in COMPONENTS.items()},
            "layers": [int(sum(int(s[g][layer].sum()) for g in GROUPS)) for layer in range(geom.num_layers)]}


def stats(sets: dict[str, NeuronSet], langs: list[str], geom: Geometry) -> dict[str, Any]:
    """stats.json: every set's size per group/component/layer, fractions of all neurons, shared ratio."""
    per_set = {name: set_stats(s, geom) for name, s in sets.items()}
    mean_excl = float(np.mean([per_set[f"exclusive_{l}"]["size"] for l in langs]))
    shared = sets["shared"]
    return {"total_neurons": sum(shared[g].numel() for g in GROUPS),
            "neurons_per_group": {g: shared[g].numel() for g in GROUPS},
            "shared_ratio": per_set["shared"]["size"] / mean_excl if mean_excl else None,
            "sets": per_set}
