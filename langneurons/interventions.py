"""Interventions on neuron values at run time (docs/interventions.md): zero, scale=A, mean=L, shift=A:B.

A neuron's value is the quantity that zeroing sets to 0 (docs/method.md section 1): FFN channel k at the input
of down_proj (for fwd_up and fwd_down alike), attn_o channel k at the input of o_proj, attn_q/attn_k/attn_v
row k at the output of q_proj/k_proj/v_proj (after their bias, before rotary or q/k norms). An intervention
rewrites those values through hooks (forward pre-hooks on down_proj/o_proj, forward hooks on q/k/v_proj), at
every position of every sequence: no weight is copied or changed, so every stage can run any number of sets
on one loaded model.

Per-language means (mean=L, shift=A:B) are the mean of each value over every non-padding token of L's
detection texts, tokenized as detection tokenizes them; they are computed once per model, corpus and
language and stored under <out>/<tag>/means/<model>/<corpus>/<lang>/ with a fingerprint (stored_means)."""
from __future__ import annotations

import argparse
import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .cli import InputError, int_at_least
from .data import (batches_by_length, corpus_file, detection_corpus, external_corpus, pad_batch, pad_id,
                   tokenize)
from .files import atomic_dir, safe_name, write_json
from .layout import META, Outputs, SCHEMA_VERSION
from . import moe
from .masking import _check_fits, moe_value_rewrites, register_rewrite
from .model import GROUPS, Geometry, decoder_layers, neuron_slots, projections, value_slot
from .neurons import NeuronSet

KINDS = ("zero", "scale", "mean", "shift")
MEANS_FILE = "means.safetensors"
# detection's default --max-length: means are taken over the tokens detection reads
MEAN_MAX_LENGTH = 256

# where each group's value lives: (logical projection, "in" = input channel of it, "out" = output channel of it);
# the physical tensor and positions come from model.value_slot (a fused q/k/v projection holds three points).
# fwd_up and fwd_down share one point: the channel both deactivations switch off is down_proj's input.
POINTS = (("down", "in", ("fwd_up", "fwd_down")), ("o", "in", ("attn_o",)),
          ("q", "out", ("attn_q",)), ("k", "out", ("attn_k",)), ("v", "out", ("attn_v",)))

_LANG = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")

Means = dict[str, dict[str, torch.Tensor]]  # lang -> group -> float32 [layers, group size]


@dataclass(frozen=True)
class Intervention:
    """What is done to the values of a set's neurons, parsed from SPEC (parse_intervention)."""
    kind: str                   # "zero" | "scale" | "mean" | "shift"
    alpha: float | None = None  # scale=A
    lang: str | None = None     # mean=L
    source: str | None = None   # shift=A:B -> source A
    target: str | None = None   # shift=A:B -> target B

    @property
    def spec(self) -> str:
        """The canonical SPEC: 'zero', 'scale=4', 'scale=0.5', 'mean=sw', 'shift=en:sw'."""
        if self.kind == "scale":
            a = float(self.alpha)
            return f"scale={int(a) if a.is_integer() else repr(a)}"
        if self.kind == "mean":
            return f"mean={self.lang}"
        if self.kind == "shift":
            return f"shift={self.source}:{self.target}"
        return "zero"

    @property
    def safe_spec(self) -> str:
        """The SPEC as a file-name component: 'scale-4', 'shift-en-sw'."""
        return safe_name(self.spec.replace("=", "-").replace(":", "-"), "intervention")

    def mean_langs(self) -> list[str]:
        """The languages whose means the intervention needs (none for zero, scale and shift=L:L)."""
        if self.kind == "mean":
            return [self.lang]
        if self.kind == "shift" and self.source != self.target:
            return [self.source, self.target]
        return []

    @property
    def identity(self) -> bool:
        """scale=1 and shift=L:L change nothing: no hook is installed, results are bit for bit the model's."""
        return (self.kind == "scale" and self.alpha == 1.0) or (self.kind == "shift" and self.source == self.target)

    def record(self) -> dict:
        """What an output records about the intervention."""
        return {"spec": self.spec, "kind": self.kind, "alpha": self.alpha, "lang": self.lang,
                "source": self.source, "target": self.target}


def _check_lang(lang: str, spec: str, langs: list[str] | None) -> str:
    if not _LANG.fullmatch(lang):
        raise InputError(f"--intervention {spec}: '{lang}' is not a language code")
    if langs is not None and lang not in langs:
        raise InputError(f"--intervention {spec}: unknown language '{lang}' (known: {', '.join(langs)})")
    return lang


def parse_intervention(spec: str, langs: list[str] | None = None) -> Intervention:
    """SPEC: zero | scale=A (a finite number) | mean=L | shift=A:B. With `langs`, every language named must be
    one of them (otherwise only its spelling is checked; a missing corpus is found when means are read)."""
    text = spec.strip()
    kind, sep, value = text.partition("=")
    if kind not in KINDS:
        raise InputError(f"--intervention {spec}: unknown kind '{kind}' (zero, scale=A, mean=L or shift=A:B)")
    if kind == "zero":
        if sep:
            raise InputError(f"--intervention {spec}: zero takes no value")
        return Intervention("zero")
    if not sep or not value:
        raise InputError(f"--intervention {spec}: {kind} needs a value ({kind}="
                         f"{ {'scale': 'A', 'mean': 'L', 'shift': 'A:B'}[kind]})")
    if kind == "scale":
        try:
            alpha = float(value)
        except ValueError:
            raise InputError(f"--intervention {spec}: '{value}' is not a number") from None
        if not math.isfinite(alpha):
            raise InputError(f"--intervention {spec}: the factor must be finite")
        return Intervention("scale", alpha=alpha)
    if kind == "mean":
        return Intervention("mean", lang=_check_lang(value, spec, langs))
    source, colon, target = value.partition(":")
    if not colon or not source or not target or ":" in target:
        raise InputError(f"--intervention {spec}: shift needs two languages, shift=A:B")
    return Intervention("shift", source=_check_lang(source, spec, langs), target=_check_lang(target, spec, langs))


def add_arguments(parser: argparse.ArgumentParser, default: str | None = "zero") -> None:
    """--intervention SPEC, --mean-corpus, --mean-max-length (the means of mean=L and shift=A:B).
    `default` None: the stage applies an intervention only when the flag (or a neuron set) asks for one."""
    parser.add_argument("--intervention", default=default, metavar="SPEC",
                        help="what is done to the set's neurons: zero, scale=A (multiply; A=1 changes nothing), "
                             "mean=L (set to their mean on language L), shift=A:B (add mean_B - mean_A); "
                             "docs/interventions.md" + ("" if default else "; zero when a set is given"))
    parser.add_argument("--mean-corpus", default="detect", metavar="detect|mgsm|PATH|ID",
                        help="the texts whose tokens the means of mean=L / shift=A:B average over, in the forms "
                             "of detection's --corpus (detect: <dataset>/detect/<lang>.txt)")
    parser.add_argument("--mean-max-length", type=int_at_least(2), default=MEAN_MAX_LENGTH, metavar="N",
                        help="tokens per text for the means (longer texts are cut, as detection cuts them)")


# ---------------------------------------------------------------- hook points

def value_points(model) -> Iterator[tuple[int, torch.nn.Module, str, tuple[str, ...], torch.Tensor | None]]:
    """(layer, module, "in" | "out", groups, positions) of every place a neuron value lives (POINTS), from the
    package's module lookup (model.neuron_slots): neuron k of the groups is position positions[k] on the last
    dimension of the module's input or output, positions None when that is k itself (a separate projection).
    The expert channels of an MoE layer live inside its experts loop: `intervened` rewrites them through a tap."""
    geom = Geometry.from_config(model.config)
    for li, layer in enumerate(decoder_layers(model)):
        slots = neuron_slots(layer, geom, model.config)
        for _, where, groups in POINTS:
            if groups[0] == "fwd_up" and not slots["fwd_down"]:  # an MoE layer
                continue
            slot = value_slot(slots, groups[0])
            assert slot.side == where, (slot, where)
            width = slot.module.weight.shape[slot.weight_dim()]
            identity = len(slot.index) == width and torch.equal(slot.index, torch.arange(width))
            yield li, slot.module, where, groups, None if identity else slot.index


def _point_indices(nset: NeuronSet, li: int, groups: tuple[str, ...]) -> tuple[torch.Tensor, str | None]:
    """The sorted indices of `nset` at one point of layer `li` (the union over the groups that share it) and
    one of those groups (their means are equal: the same value)."""
    parts = [(g, torch.nonzero(nset[g][li]).flatten()) for g in groups if g in nset]
    parts = [(g, i) for g, i in parts if i.numel()]
    if not parts:
        return torch.empty(0, dtype=torch.long), None
    return torch.unique(torch.cat([i for _, i in parts])), parts[0][0]


class _Rewrite:
    """x[..., idx] replaced by op(x[..., idx]) on the last dimension; the per-device copies of the index and
    the values are made once."""

    def __init__(self, idx: torch.Tensor, op: str, values: torch.Tensor | None = None, alpha: float = 1.0):
        self.idx, self.op, self.values, self.alpha = idx, op, values, alpha
        self._cache: dict = {}

    def _on(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (x.device, x.dtype)
        if key not in self._cache:
            vals = None if self.values is None else self.values.to(x.device, x.dtype)
            self._cache[key] = (self.idx.to(x.device), vals)
        return self._cache[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        idx, vals = self._on(x)
        if self.op == "zero":
            return x.index_fill(-1, idx, 0)
        y = x.clone()
        if self.op == "scale":
            y[..., idx] = x[..., idx] * self.alpha
        elif self.op == "set":
            y[..., idx] = vals.expand(*x.shape[:-1], idx.numel())
        else:  # add
            y[..., idx] = x[..., idx] + vals
        return y


def _rewrite_for(intervention: Intervention, idx: torch.Tensor, group: str, li: int, means: Means | None) -> _Rewrite:
    iv = intervention
    if iv.kind == "zero" or (iv.kind == "scale" and iv.alpha == 0.0):
        return _Rewrite(idx, "zero")  # scale=0 is exactly zero (no -0.0 or 0 * inf)
    if iv.kind == "scale":
        return _Rewrite(idx, "scale", alpha=iv.alpha)
    missing = [l for l in iv.mean_langs() if means is None or l not in means]
    if missing:
        raise InputError(f"--intervention {iv.spec}: no means of language '{missing[0]}' were given")
    if iv.kind == "mean":
        return _Rewrite(idx, "set", means[iv.lang][group][li][idx].float())
    delta = means[iv.target][group][li].double() - means[iv.source][group][li].double()
    return _Rewrite(idx, "add", delta[idx].float())


@contextlib.contextmanager
def intervened(model, nset: NeuronSet, intervention: Intervention, means: Means | None = None) -> Iterator[None]:
    """Apply `intervention` to the neurons of `nset` for the duration of the block (hooks, removed after).

    `means` (stored_means or neuron_means) must hold the languages of intervention.mean_langs(). An empty
    set, scale=1 and shift=L:L install no hook: the model computes exactly what it computes without one."""
    _check_fits(model, nset)
    handles, taps = [], []
    try:
        if not intervention.identity:
            for li, mod, where, groups, positions in value_points(model):
                idx, group = _point_indices(nset, li, groups)
                if group is None:
                    continue
                rewrite = _rewrite_for(intervention, idx, group, li, means)
                if positions is not None:  # a fused tensor: the neurons' positions in it
                    rewrite.idx = positions[idx]
                handles.append(register_rewrite(mod, where, rewrite))

            # MoE layers: channels k of one expert (or the shared expert), with the values (means) of their places
            # span.start + k in the layer's index space
            def make(k: torch.Tensor, span: slice, li: int) -> _Rewrite:
                rewrite = _rewrite_for(intervention, span.start + k, "fwd_up", li, means)
                rewrite.idx = k
                return rewrite
            taps = moe_value_rewrites(model, nset, make, handles)
        with moe.tapped(taps):
            yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- means

class _MeanProbe:
    """Sums of every neuron value over the non-padding tokens of the batches run while it is installed."""

    def __init__(self, model):
        self.model = model
        self.mask: torch.Tensor | None = None
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.tokens = 0
        self.handles = []
        # MoE layers: expert channel values are summed inside the experts loop (moe.MeanTap)
        sizes = Geometry.from_config(model.config).moe
        self.moe = {li: moe.MeanTap(p["moe"], sizes) for li, p in
                    enumerate(projections(layer) for layer in decoder_layers(model)) if "moe" in p}
        self._taps = contextlib.ExitStack()

    def begin(self, mask: torch.Tensor) -> None:
        """The next batch's attention mask (its non-padding tokens are the ones summed)."""
        self.mask = mask
        for t in self.moe.values():
            t.begin(mask)

    def _add(self, li: int, point: str, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Adds the batch's values at one point to its sums; returns `x` unchanged (an observing hook)."""
        m = self.mask.to(x.device)
        full = x
        if positions is not None:  # the point's neurons within a fused tensor
            x = x.index_select(-1, positions.to(x.device))
        if tuple(x.shape[:2]) != tuple(m.shape):
            raise RuntimeError(f"neuron value of shape {tuple(x.shape)} does not match the batch {tuple(m.shape)}")
        # float64 sums: hundreds of thousands of tokens lose no precision before the float32 mean
        s = (x.double() * m[..., None].double()).sum((0, 1))
        key = (li, point)
        self.sums[key] = self.sums[key] + s if key in self.sums else s
        return full

    def __enter__(self):
        for li, mod, where, groups, positions in value_points(self.model):
            self.handles.append(register_rewrite(
                mod, where, lambda x, li=li, p=groups[0], pos=positions: self._add(li, p, x, pos)))
        for t in self.moe.values():
            if t.block.shared is not None:
                self.handles.append(register_rewrite(t.block.shared.down_proj, "in", t.shared_value))
        self._taps.enter_context(moe.tapped([(t.block.experts, t.tap) for t in self.moe.values()]))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        self._taps.close()


@torch.no_grad()
def neuron_means_and_tokens(model, tok, texts: list[str], max_length: int, batch_size: int,
                            desc: str = "means") -> tuple[dict[str, torch.Tensor], int]:
    """({group: float32 [layers, size]} mean value of every neuron over every non-padding token of `texts`,
    the number of tokens). Texts are tokenized as detection tokenizes them (data.tokenize: the tokenizer's
    special tokens included, cut at `max_length`); batches are padded on the right and padding is masked."""
    seqs = [s for s in tokenize(tok, texts, max_length) if s]
    if not seqs:
        raise InputError(f"{desc}: no tokens to average over")
    device = model.get_input_embeddings().weight.device
    layers = len(decoder_layers(model))
    with _MeanProbe(model) as probe:
        for idx in tqdm(batches_by_length([len(s) for s in seqs], batch_size), desc=desc, leave=False):
            ids, mask = pad_batch([seqs[i] for i in idx], pad_id(tok), device)
            probe.begin(mask)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            probe.tokens += int(mask.sum())
    out = {}
    for key, where, groups in POINTS:
        mean = torch.stack([probe.moe[li].means(probe.tokens).double() if groups[0] == "fwd_up" and li in probe.moe
                            else probe.sums[(li, groups[0])].cpu() / probe.tokens for li in range(layers)])
        for g in groups:
            out[g] = mean.float().contiguous()
    return {g: out[g] for g in GROUPS}, probe.tokens


def neuron_means(model, tok, texts: dict[str, list[str]], max_length: int, batch_size: int) -> Means:
    """{lang: {group: float32 [layers, size]}}: each language's mean neuron values over its texts
    (neuron_means_and_tokens). Not stored; stored_means stores and reuses them."""
    return {l: neuron_means_and_tokens(model, tok, t, max_length, batch_size, f"means {l}")[0]
            for l, t in texts.items()}


def builtin_corpus(corpus: str) -> bool:
    return corpus in ("detect", "mgsm")


def mean_texts(dataset: str | Path, corpus: str, lang: str) -> list[str]:
    """Every text of `lang` in the corpus (detection's --corpus forms: detect, mgsm, a file, folder or
    dataset id with {lang}); a missing one is an InputError naming the intervention's language."""
    try:
        if builtin_corpus(corpus):
            return detection_corpus(dataset, lang, 0, 0, corpus)
        return external_corpus(corpus, lang, 0, 0)
    except InputError as e:
        raise InputError(f"means of language '{lang}': {e}") from None


def mean_inputs(dataset: str | Path, corpus: str, texts: dict[str, list[str]]) -> tuple[list[Path], dict]:
    """(files, context) for reuse.fingerprint of an output computed with the means of `texts` (lang -> texts):
    the corpus files of the dataset layout, else the digest of the texts themselves."""
    from .reuse import text_digest
    if builtin_corpus(corpus):
        return [corpus_file(dataset, l, corpus) for l in texts], {}
    return [], {"mean_corpus_sha256": {l: text_digest(t) for l, t in texts.items()}}


def means_dir(out: Outputs, model_name: str, corpus: str, lang: str) -> Path:
    """<out>/<tag>/means/<model>/<corpus>/<lang>/: one unit per model (a variant or trained model of the tag
    has its own means), corpus and language."""
    return out.means(model_name, corpus, lang)


def neuron_spec(spec: str) -> tuple[str, Path]:
    """(set name, file) of a --neurons [NAME=]FILE: the file's stem unless NAME is given (a path that exists
    as written is a file, even with '=' in it); the name must be usable as a file name."""
    name, sep, file = spec.partition("=")
    if not sep or Path(spec).exists():
        name, file = Path(spec).stem, spec
    if not Path(file).is_file():
        raise InputError(f"--neurons {file}: no such file")
    if safe_name(name) != name:  # the set name becomes a directory or file name
        raise InputError(f"--neurons {file}: set name '{name}' is not a safe file name; use NAME=FILE")
    return name, Path(file)


def _fingerprint(model_name: str, corpus: str, lang: str, max_length: int, dtype: str, dataset: str | Path,
                 texts: list[str]) -> dict:
    from . import reuse
    args = argparse.Namespace(model=model_name, mean_corpus=corpus, lang=lang, mean_max_length=max_length,
                              dtype=dtype)
    files, context = mean_inputs(dataset, corpus, {lang: texts})
    return reuse.fingerprint(args, __file__, "means", files=files, models=[model_name], context=context)


def _read_means(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        t = load_file(path / MEANS_FILE)
        return {g: t[g] for g in GROUPS}
    except (OSError, SafetensorError, KeyError) as e:
        raise InputError(f"stored means {path / MEANS_FILE} are unreadable ({type(e).__name__}); "
                         "--force recomputes them") from None


def stored_means(out: Outputs, model_name: str, model, tok, dataset: str | Path, corpus: str, langs: list[str],
                 max_length: int = MEAN_MAX_LENGTH, batch_size: int = 8, force: bool = False,
                 texts: dict[str, list[str]] | None = None) -> Means:
    """The means of `langs` (neuron_means) for `model_name` (--model as given, whose files are fingerprinted)
    on `corpus` of `dataset`: read from <out>/<tag>/means/<corpus>/<lang>/ when that was computed from the
    same model files, texts, --mean-max-length, dtype and code version; else computed on `model` / `tok` and
    stored there (means.safetensors, meta.json with the fingerprint; written whole under reuse.unit).
    `texts` (lang -> texts from mean_texts) saves reading the corpus again; `force` recomputes."""
    from safetensors.torch import save_file
    from . import reuse
    from .runinfo import run_meta
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    result = {}
    for lang in langs:
        lines = (texts or {}).get(lang) or mean_texts(dataset, corpus, lang)
        path = means_dir(out, model_name, corpus, lang)
        fp = _fingerprint(model_name, corpus, lang, max_length, dtype, dataset, lines)
        with reuse.unit(path, f"--out {out.root.parent}", force=force, record=path / META) as unit:
            if unit.up_to_date(fp):
                result[lang] = _read_means(path)
                continue
            means, tokens = neuron_means_and_tokens(model, tok, lines, max_length, batch_size, f"means {lang}")
            with atomic_dir(path) as tmp:
                save_file(means, tmp / MEANS_FILE, metadata={"lang": lang})
                args = argparse.Namespace(model=model_name, mean_corpus=corpus, lang=lang,
                                          mean_max_length=max_length, dtype=dtype, batch_size=batch_size)
                write_json(tmp / META, {"schema_version": SCHEMA_VERSION, "model": model_name, "tag": out.tag,
                                        "lang": lang, "corpus": corpus, "texts": len(lines), "tokens": tokens,
                                        "max_length": max_length, "dtype": dtype, "run": run_meta(args),
                                        "fingerprint": fp})
            result[lang] = means
    return result


# ---------------------------------------------------------------- what a stage's fingerprint takes from the flags

INTERVENTION_FLAGS = ("intervention", "mean_corpus", "mean_max_length")


def unused_args(iv: Intervention | None) -> tuple[str, ...]:
    """The add_arguments flags that cannot change an output computed under `iv`: all of them for zero (an
    output under zero is the one computed before the flag existed, and is reused) and None, the mean flags
    for scale. A stage passes them to reuse.fingerprint's `ignore`."""
    if iv is None or iv.kind == "zero" or (iv.kind == "scale" and iv.alpha == 0.0):
        return INTERVENTION_FLAGS
    return INTERVENTION_FLAGS[1:] if not iv.mean_langs() else ()


def fingerprint_inputs(args: argparse.Namespace) -> tuple[Intervention, tuple[str, ...], list[Path], dict]:
    """(the intervention of args.intervention, the flags to ignore, the mean corpus files, the fingerprint
    context) for a stage with add_arguments' flags and --dataset; reads (and so checks) the means' texts."""
    iv = parse_intervention(args.intervention or "zero")
    texts = {l: mean_texts(args.dataset, args.mean_corpus, l) for l in iv.mean_langs()}
    files, context = mean_inputs(args.dataset, args.mean_corpus, texts)
    return iv, unused_args(iv), files, context
