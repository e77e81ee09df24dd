"""How stable the neuron sets are under a redraw of the detection texts, without running the model again.

Detection keeps, per text, what that text selects (`PerText`): for `importance` and `authors` each text's top
list per layer and group, for `activation` each text's count of active tokens per FFN channel and its token
count. A subset of texts, or a resample with repeats, is a weight vector over a language's texts; the firing
counts of any such draw are one weighted sum, and `related_sets` turns them into the language-related sets
exactly as detection does for all its texts (detection itself calls it with every weight 1). From there
`neurons.derived_sets` gives shared, exclusive and unique sets, in a batch of resamples at once.

`measure` draws, per language and independently, `resamples` split halves (two disjoint random halves of
floor(n/2) texts) and `resamples` bootstrap resamples (n texts with replacement); it reports split-half and
bootstrap-vs-full Jaccard and the set sizes (mean, median and percentile interval, uncertainty.py), per
bootstrap resample also each group's and each component's (QK, VO, FFN) count and the components' shares of
the set, and each neuron's selection frequency over the bootstrap resamples. The Jaccard of two empty sets is 1.0 (they agree)."""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .cli import InputError
from .model import GROUPS, Geometry
from .neurons import COMPONENTS, NeuronSet, derived_sets, lape_related, related_from_counts
from .uncertainty import LEVEL, percentile_interval, resample_indices, split_halves

# every set detection writes but the random controls
EMPTY_JACCARD = 1.0
# bytes one chunk of resamples may hold: boolean masks of every set of three batches, int32 counts per language
CHUNK_BYTES = 1 << 27


@dataclass
class PerText:
    """What every text selected. `data`: for importance/authors {group: [per language int64 [texts, layers, k]
    top indices, sorted]}; for activation {"active": [per language [texts, layers, n] active-token counts],
    "tokens": [per language [texts] token counts]}. `sizes`: index-space length of each counted group."""
    method: str
    langs: list[str]
    num_layers: int
    sizes: dict[str, int]
    data: dict[str, list[torch.Tensor]]

    @property
    def counted(self) -> bool:
        """True when a unit is a text (importance, authors); False when it is a token (activation)."""
        return self.method != "activation"

    def texts(self) -> list[int]:
        key = next(iter(self.data))
        return [int(t.shape[0]) for t in self.data[key]]


# ---------------------------------------------------------------- file

def _index_dtype(limit: int) -> torch.dtype:
    # the smallest signed type that holds every value (safetensors and torch handle int16/int32 everywhere)
    return torch.int16 if limit <= torch.iinfo(torch.int16).max else torch.int32


def save_per_text(path: str | Path, pt: PerText) -> None:
    """per_text.safetensors: tensors "<lang>.<key>" (key a group, or "active"/"tokens" for activation), the
    smallest integer type that holds the values; one metadata key (files are byte-reproducible)."""
    tensors = {}
    for key, per_lang in pt.data.items():
        for lang, t in zip(pt.langs, per_lang):
            limit = int(t.max()) if t.numel() else 0
            dtype = torch.int32 if key == "tokens" else _index_dtype(limit)
            tensors[f"{lang}.{key}"] = t.to(dtype).contiguous()
    meta = {"method": pt.method, "langs": pt.langs, "num_layers": pt.num_layers, "sizes": pt.sizes,
            "keys": list(pt.data), "texts": dict(zip(pt.langs, pt.texts()))}
    save_file(tensors, str(path), metadata={"langneurons": json.dumps(meta, sort_keys=True)})


def load_per_text(path: str | Path) -> PerText:
    """The per-text selections stored by detection (bad or missing file: InputError naming it)."""
    path = Path(path)
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["langneurons"])
        t = load_file(path)
        data = {k: [t[f"{l}.{k}"].long() for l in meta["langs"]] for k in meta["keys"]}
        return PerText(meta["method"], list(meta["langs"]), int(meta["num_layers"]),
                       {g: int(n) for g, n in meta["sizes"].items()}, data)
    except (OSError, SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"per-text file {path} is unreadable ({why}); --force recomputes it") from None


# ---------------------------------------------------------------- firing counts of any draw of texts

class _Counter:
    """Weighted firing counts of one language. Only the neurons some text selects can count above 0, so the
    counts live on those candidates: `X` [texts, candidates] holds each text's contribution (sparse 0/1 for top
    lists, dense active-token counts for activation), and a batch of draws is one matrix product."""

    def __init__(self, pt: PerText, li: int):
        self.pt, self.keys = pt, list(pt.sizes)
        self.cols, self.X = {}, {}
        n = pt.texts()[li]
        if pt.counted:
            for g in self.keys:
                top = pt.data[g][li]  # [texts, layers, k]
                flat = (top + torch.arange(pt.num_layers)[None, :, None] * pt.sizes[g]).reshape(n, -1)
                cols, inv = torch.unique(flat, return_inverse=True)
                rows = torch.arange(n)[:, None].expand_as(inv)
                # transposed, [candidates, texts]: sparse.mm(X^T, w^T) costs one multiply-add per selection
                self.cols[g] = cols
                self.X[g] = torch.sparse_coo_tensor(torch.stack([inv.flatten(), rows.flatten()]),
                                                    torch.ones(inv.numel()), (cols.numel(), n),
                                                    check_invariants=False).coalesce()
            units, peak = torch.ones(n), 1
        else:
            active = pt.data["active"][li].reshape(n, -1)
            cols = torch.nonzero(active.any(0)).flatten()
            for g in self.keys:  # both FFN groups get the same counts
                self.cols[g], self.X[g] = cols, active[:, cols].T.contiguous()
            units = pt.data["tokens"][li]
            peak = int(max(int(active.max()) if active.numel() else 0, int(units.max()) if n else 0))
        # float32 sums integers exactly below 2**24; a draw of n texts sums at most n * peak
        self.dtype = torch.float32 if n * max(peak, 1) < 2 ** 24 else torch.float64
        self.X = {g: x.to(self.dtype) for g, x in self.X.items()}
        self.units = units.to(self.dtype)

    def compact(self, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """w [R, texts] (repeat counts) -> ({group: int64 [R, candidates]}, units int64 [R])."""
        wt = w.to(self.dtype).T.contiguous()  # [texts, R]
        out, done = {}, {}
        for g in self.keys:
            key = id(self.X[g])
            if key not in done:
                x = self.X[g]
                prod = torch.sparse.mm(x, wt) if x.is_sparse else x @ wt  # [candidates, R]
                done[key] = torch.round(prod.T).long()
            out[g] = done[key]
        return out, torch.round(w.to(self.dtype) @ self.units).long()

    def dense_batch(self, g: str, rows: torch.Tensor) -> torch.Tensor:
        """A batch's candidate counts [R, candidates] -> int32 [R, layers, n]."""
        full = torch.zeros(rows.shape[0], self.pt.num_layers * self.pt.sizes[g], dtype=torch.int32)
        full[:, self.cols[g]] = rows.to(torch.int32)
        return full.reshape(rows.shape[0], self.pt.num_layers, self.pt.sizes[g])

    def dense(self, g: str, row: torch.Tensor) -> torch.Tensor:
        """One draw's candidate counts -> int64 [layers, n]."""
        full = torch.zeros(self.pt.num_layers * self.pt.sizes[g], dtype=torch.int64)
        full[self.cols[g]] = row
        return full.reshape(self.pt.num_layers, self.pt.sizes[g])


def _counters(pt: PerText) -> list[_Counter]:
    return [_Counter(pt, li) for li in range(len(pt.langs))]


def weighted_counts(pt: PerText, weights: Sequence[torch.Tensor],
                    counters: list[_Counter] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The firing counts of R draws: `weights[l]` [R, texts of l] says how often each text is drawn.
    Returns ({group: int64 [R, langs, layers, n]}, units int64 [R, langs]): sentences, or tokens for activation."""
    counters = counters or _counters(pt)
    per_lang = [c.compact(w) for c, w in zip(counters, weights)]
    R = int(weights[0].shape[0])
    firing = {g: torch.stack([torch.stack([c.dense(g, comp[g][r]) for c, (comp, _) in zip(counters, per_lang)])
                              for r in range(R)]) for g in pt.sizes}
    return firing, torch.stack([u for _, u in per_lang], 1)


def full_weights(pt: PerText) -> list[torch.Tensor]:
    """Every text once: the draw detection itself uses."""
    return [torch.ones(1, n, dtype=torch.int64) for n in pt.texts()]


def related_sets(pt: PerText, weights: Sequence[torch.Tensor], geom: Geometry, threshold: float, ratio: float,
                 counters: list[_Counter] | None = None) -> dict[str, NeuronSet]:
    """The language-related sets N_l of R draws of texts (`weights`, as in weighted_counts), {lang: {group: bool
    [R, layers, n]}}: per draw the firing counts, then exactly detection's rule (neurons.related_from_counts at
    `threshold`, or LAPE's neurons.lape_related at `ratio` for activation). With full_weights this is what
    detection writes."""
    counters = counters or _counters(pt)
    per_lang = [c.compact(w) for c, w in zip(counters, weights)]
    units = torch.stack([u for _, u in per_lang], 1)  # [R, langs]
    # dense counts of the whole batch, [langs, R, layers, n] per group (int32: at most texts x tokens)
    batch = {g: torch.stack([c.dense_batch(g, comp[g]) for c, (comp, _) in zip(counters, per_lang)])
             for g in pt.sizes}
    per_draw = []
    for r in range(units.shape[0]):
        counts = {g: batch[g][:, r] for g in pt.sizes}
        if pt.counted:
            per_draw.append(related_from_counts(counts, units[r], pt.langs, threshold, geom))
        else:
            per_draw.append(lape_related(counts["fwd_up"], units[r], pt.langs, geom, ratio))
    return {l: {g: torch.stack([d[l][g] for d in per_draw]) for g in GROUPS} for l in pt.langs}


def unbatch(sets: dict[str, NeuronSet], r: int = 0) -> dict[str, NeuronSet]:
    """Draw `r` of a batch of sets: ordinary sets {group: bool [layers, n]}."""
    return {name: {g: s[g][r] for g in GROUPS} for name, s in sets.items()}


def full_data_related(pt: PerText, geom: Geometry, threshold: float, ratio: float) -> dict[str, NeuronSet]:
    """The language-related sets of all texts: what detection derives its files from."""
    return unbatch(related_sets(pt, full_weights(pt), geom, threshold, ratio))


# ---------------------------------------------------------------- resampling

def lang_seed(seed: int, li: int, kind: str) -> int:
    """A seed per language and kind of draw, so that languages are drawn independently and reproducibly."""
    return int(np.random.SeedSequence([seed, li, zlib.crc32(kind.encode())]).generate_state(1)[0])


def bootstrap_weights(n: int, resamples: int, seed: int) -> torch.Tensor:
    """[resamples, n] repeat counts of n texts drawn with replacement."""
    idx = resample_indices(n, resamples, seed)
    return torch.from_numpy(np.stack([np.bincount(row, minlength=n) for row in idx])).long()


def subset_weights(idx: np.ndarray, n: int) -> torch.Tensor:
    """[R, m] drawn text indices (no repeats) -> [R, n] 0/1 weights."""
    w = torch.zeros(idx.shape[0], n, dtype=torch.int64)
    w.scatter_(1, torch.from_numpy(idx).long(), 1)
    return w


def sizes(sets: NeuronSet) -> torch.Tensor:
    """[R] neurons in each draw of a batched set."""
    return sum(group_sizes(sets).values())


def group_sizes(sets: NeuronSet) -> dict[str, torch.Tensor]:
    """{group: [R]} neurons of each group in each draw of a batched set."""
    return {g: torch.count_nonzero(sets[g].flatten(1), dim=1) for g in GROUPS}


def component_sizes(groups: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{component: [R]} of group_sizes: QK, VO and FFN counts (neurons.COMPONENTS) in each draw."""
    return {c: sum(groups[g] for g in gs) for c, gs in COMPONENTS.items()}


def shares(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{part: [R]} each part's fraction of the draw's set (0.0 for an empty draw, as neurons.set_stats)."""
    total = sum(parts.values()).double()
    return {k: torch.where(total > 0, v.double() / total.clamp(min=1), torch.tensor(0.0)) for k, v in parts.items()}


def jaccard(a: NeuronSet, b: NeuronSet) -> np.ndarray:
    """[R] Jaccard |a & b| / |a | b| per draw (b may be one set broadcast to every draw); two empty sets: 1.0."""
    inter = sum(torch.count_nonzero((a[g] & b[g]).flatten(1), dim=1) for g in GROUPS).double()
    union = sum(torch.count_nonzero((a[g] | b[g]).flatten(1), dim=1) for g in GROUPS).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.tensor(EMPTY_JACCARD)).numpy()


def summary(x: Sequence[float]) -> dict[str, Any]:
    """Mean, median and 95% percentile interval of per-resample values (the interval always holds the median)."""
    x = np.asarray(x, dtype=float)
    lo, hi = percentile_interval(x)
    return {"mean": float(x.mean()), "median": float(np.median(x)), "ci": [lo, hi]}


def _chunk(pt: PerText, geom_total: int) -> int:
    """Resamples per chunk: the boolean masks of every set of a chunk stay within CHUNK_BYTES."""
    per_neuron = 3 * (3 * len(pt.langs) + 2) + 4 * len(pt.langs)
    return max(1, CHUNK_BYTES // max(1, geom_total * per_neuron))


def measure(pt: PerText, geom: Geometry, threshold: float, ratio: float, resamples: int, seed: int,
            full: dict[str, NeuronSet]) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """stability.json's "sets" part and the selection frequencies {set: {group: float32 [layers, n]}} of every
    set in `full` (the full-data sets, neurons.derived_sets), over `resamples` split halves and bootstrap
    resamples of every language's texts, drawn with `seed`."""
    texts = pt.texts()
    if min(texts) < 2:
        raise InputError(f"--resamples {resamples}: split halves need at least 2 texts per language "
                         f"({dict(zip(pt.langs, texts))})")
    halves = [split_halves(n, resamples, lang_seed(seed, li, "split-half")) for li, n in enumerate(texts)]
    boots = [bootstrap_weights(n, resamples, lang_seed(seed, li, "bootstrap")) for li, n in enumerate(texts)]
    counters = _counters(pt)
    total = sum(full[next(iter(full))][g].numel() for g in GROUPS)
    step = _chunk(pt, total)
    names = list(full)
    vals = {name: {k: [] for k in ("split_half", "bootstrap", "size_split_half", "size_bootstrap")} for name in names}
    # per bootstrap resample: each group's and component's count and each component's share of the set
    parts = {name: {"groups": {g: [] for g in GROUPS}, "components": {c: [] for c in COMPONENTS},
                    "component_shares": {c: [] for c in COMPONENTS}} for name in names}
    freq = {name: {g: torch.zeros(full[name][g].shape, dtype=torch.int64) for g in GROUPS} for name in names}
    batched_full = {name: {g: s[g][None] for g in GROUPS} for name, s in full.items()}
    build: Callable[[list[torch.Tensor]], dict[str, NeuronSet]] = \
        lambda w: derived_sets(related_sets(pt, w, geom, threshold, ratio, counters))
    for start in range(0, resamples, step):
        stop = min(resamples, start + step)
        a = build([subset_weights(h[0][start:stop], n) for h, n in zip(halves, texts)])
        b = build([subset_weights(h[1][start:stop], n) for h, n in zip(halves, texts)])
        boot = build([w[start:stop] for w in boots])
        for name in names:
            v = vals[name]
            v["split_half"] += jaccard(a[name], b[name]).tolist()
            v["bootstrap"] += jaccard(boot[name], batched_full[name]).tolist()
            v["size_split_half"] += ((sizes(a[name]) + sizes(b[name])) / 2).tolist()
            groups = group_sizes(boot[name])
            comps = component_sizes(groups)
            v["size_bootstrap"] += sum(groups.values()).tolist()
            for key, got in (("groups", groups), ("components", comps), ("component_shares", shares(comps))):
                for k, x in got.items():
                    parts[name][key][k] += x.tolist()
            for g in GROUPS:
                freq[name][g] += boot[name][g].sum(0)
    out = {}
    for name in names:
        # the full-data counts beside each bootstrap summary (the figures draw the interval at the set itself)
        groups = {g: int(full[name][g].sum()) for g in GROUPS}
        comps = {c: sum(groups[g] for g in gs) for c, gs in COMPONENTS.items()}
        n = sum(groups.values())
        out[name] = {"size": n, **{k: summary(x) for k, x in vals[name].items()},
                     "groups": {g: {"size": groups[g], **summary(x)} for g, x in parts[name]["groups"].items()},
                     "components": {c: {"size": comps[c], **summary(x)} for c, x in parts[name]["components"].items()},
                     "component_shares": {c: {"share": comps[c] / n if n else 0.0, **summary(x)}
                                          for c, x in parts[name]["component_shares"].items()}}
    return out, {name: {g: (c.double() / resamples).float() for g, c in f.items()} for name, f in freq.items()}


def stable_core(frequency: dict[str, torch.Tensor], fraction: float, resamples: int) -> NeuronSet:
    """The neurons selected in at least `fraction` of the bootstrap resamples (counted in whole resamples,
    so that 1.0 means every one of them, free of float rounding)."""
    need = int(np.ceil(fraction * resamples - 1e-9))
    return {g: torch.round(frequency[g].double() * resamples).long() >= need for g in GROUPS}


# ---------------------------------------------------------------- frequencies file

def save_frequencies(path: str | Path, freq: dict[str, dict[str, torch.Tensor]], resamples: int) -> None:
    """stability.safetensors, sparse: per set and group "<set>.<group>.index" int32 (layer * group size + k)
    and "<set>.<group>.frequency" float32 of the neurons selected at least once; metadata the shapes."""
    tensors, shapes = {}, {}
    for name, groups in freq.items():
        for g, f in groups.items():
            flat = f.flatten()
            idx = torch.nonzero(flat > 0).flatten()
            tensors[f"{name}.{g}.index"] = idx.to(torch.int32).contiguous()
            tensors[f"{name}.{g}.frequency"] = flat[idx].float().contiguous()
            shapes[g] = list(f.shape)
    meta = {"resamples": resamples, "sets": list(freq), "shapes": shapes}
    save_file(tensors, str(path), metadata={"langneurons": json.dumps(meta, sort_keys=True)})


def load_frequencies(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """The selection frequencies {set: {group: float32 [layers, n]}} and the number of bootstrap resamples."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["langneurons"])
    t = load_file(path)
    out = {}
    for name in meta["sets"]:
        out[name] = {}
        for g, shape in meta["shapes"].items():
            dense = torch.zeros(shape[0] * shape[1], dtype=torch.float32)
            dense[t[f"{name}.{g}.index"].long()] = t[f"{name}.{g}.frequency"]
            out[name][g] = dense.reshape(shape)
    return out, int(meta["resamples"])


# ---------------------------------------------------------------- how many texts are enough (bench/stability.py)

def curve(pt: PerText, geom: Geometry, threshold: float, ratio: float, n_texts: Sequence[int], resamples: int,
          seed: int, names: Sequence[str]) -> list[dict[str, Any]]:
    """Set stability against texts per language. For n with 2n <= the smallest pool: the split-half Jaccard of
    two disjoint random draws of n texts per language (drawn without replacement from the pool); for n equal to
    the smallest pool: the bootstrap Jaccard of n texts drawn with replacement against the full-data set. Other
    n are skipped. Every language draws the same n."""
    texts = pt.texts()
    pool = min(texts)
    counters = _counters(pt)
    build = lambda w: derived_sets(related_sets(pt, w, geom, threshold, ratio, counters))
    full = build(full_weights(pt))
    total = sum(full["shared"][g][0].numel() for g in GROUPS)
    step = _chunk(pt, total)
    points = []
    for n in n_texts:
        if 2 * n <= pool:
            kind = "split_half"
        elif n == pool:
            kind = "bootstrap"
        else:
            continue
        vals = {name: [] for name in names}
        sz = {name: [] for name in names}
        # per language: the first 2n of a random permutation, cut into two disjoint draws of n
        perms = [np.stack([rng.permutation(m)[:2 * n] for _ in range(resamples)])
                 for rng, m in ((np.random.default_rng(lang_seed(seed, li, f"curve-{n}")), m)
                                for li, m in enumerate(texts))] if kind == "split_half" else []
        for start in range(0, resamples, step):
            stop = min(resamples, start + step)
            if kind == "split_half":
                a = build([subset_weights(pm[start:stop, :n], m) for pm, m in zip(perms, texts)])
                b = build([subset_weights(pm[start:stop, n:], m) for pm, m in zip(perms, texts)])
                for name in names:
                    vals[name] += jaccard(a[name], b[name]).tolist()
                    sz[name] += ((sizes(a[name]) + sizes(b[name])) / 2).tolist()
            else:
                ws = [bootstrap_weights(m, resamples, lang_seed(seed, li, f"curve-{n}"))[start:stop]
                      for li, m in enumerate(texts)]
                boot = build(ws)
                for name in names:
                    vals[name] += jaccard(boot[name], full[name]).tolist()
                    sz[name] += sizes(boot[name]).tolist()
        points.append({"texts": n, "kind": kind, "sets": {name: {"jaccard": summary(vals[name]),
                                                                  "size": summary(sz[name])} for name in names}})
    return points
