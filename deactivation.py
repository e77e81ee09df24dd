"""Stage 2, deactivation (docs/method.md section 5): switch neuron sets off, save each deactivated model as
an ordinary transformers model directory, and measure what it costs in perplexity per language.

    python deactivation.py --model gemma-3-270m --langs en,zh,th,sw,fr,de --measure-ppl

Reads neuron files in our format and the authors' (outputs/<tag>/neurons/ by default), writes
outputs/<tag>/variants/<set>/ and, with --measure-ppl, outputs/<tag>/deactivation.json with
PPL, dPPL per set, the shared-neuron importance Imp_l and the language-agnostic score LAS, each with a 95%
interval from a paired bootstrap over the validation lines, and K random controls per set."""
from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from langneurons import interventions, layout, reuse
from langneurons.cli import InputError, common_parser, int_at_least, parse_langs, run, split_list
from langneurons.data import val_file, val_texts
from langneurons.files import atomic_dir, json_safe, safe_name, write_json
from langneurons.layout import NEURON_FILE_COPY, PROVENANCE_FILE, SCHEMA_VERSION, Outputs
from langneurons.masking import zero_neurons_streaming, zeroed
from langneurons.metrics import language_agnostic, perplexity_by_lang
from langneurons.model import (Geometry, check_model, load_model, local_dir, model_record, resolve_model,
                               save_model_dir)
from langneurons.neurons import NeuronSet, load_neuron_set, random_like, size
from langneurons.interventions import neuron_spec
from langneurons.runinfo import run_meta, seed_everything
from langneurons.uncertainty import LEVEL, derived_seed, interval_or_none, resample_indices, resampled_ppl

# arguments that cannot change the PPL table (they pick which variants are written, and how)
PPL_IGNORED = ("save_variants", "streaming")
# arguments that cannot change a variant: the measurement's, and which sets (its own file is fingerprinted)
VARIANT_IGNORED = ("measure_ppl", "save_variants", "batch_size", "max_length", "limit", "dataset", "langs", "neurons",
                   "random_controls", "resamples", *interventions.INTERVENTION_FLAGS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--neurons", action="append", metavar="[NAME=]FILE",
                   help="neuron file to deactivate (repeatable); the set is named after the file stem, or NAME "
                        "when given as NAME=FILE (e.g. shared=Llama-3.1-8B_shared_neurons_0.05.json, so the "
                        "authors' files count for Imp/LAS). When not given: shared, exclusive_<lang>, "
                        "random_shared and random_exclusive_<lang> from <out>/<tag>/neurons/")
    p.add_argument("--legacy-kv-mapping", action="store_true",
                   help="map the authors' query-head attn_k/attn_v indices with their code's i // n_rep instead "
                        "of the correct (i // head_dim // n_rep) * head_dim + i %% head_dim")
    p.add_argument("--allow-other-model", action="store_true",
                   help="use a neuron file whose model record names another model than --model (refused "
                        "otherwise: its indices may fit and still mean nothing here); the outputs record it")
    p.add_argument("--measure-ppl", action="store_true",
                   help="perplexity per language on <dataset>/val/<lang>.txt for the base model and every set; "
                        "writes <out>/<tag>/deactivation.json")
    p.add_argument("--save-variants", default="all",
                   help="which deactivated models to write to <out>/<tag>/variants/: all, none, or a comma "
                        "list of set names (each is a full model copy on disk)")
    p.add_argument("--streaming", action="store_true",
                   help="write variants without building the model: copy each safetensors shard and zero only "
                        "the affected tensors in it (needs a local safetensors model directory; memory stays at "
                        "one projection matrix; tensors keep their stored dtype)")
    interventions.add_arguments(p)  # --measure-ppl under an intervention (variants are always zeroed)
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="sequences per forward pass (perplexity)")
    p.add_argument("--max-length", type=int_at_least(2), default=512,
                   help="tokens per text for perplexity (truncated; one token is predicted from another)")
    p.add_argument("--limit", type=int_at_least(0), default=0,
                   help="first N lines of val/<lang>.txt per language (0 = all)")
    p.add_argument("--random-controls", type=int_at_least(0), default=5, metavar="K",
                   help="with --measure-ppl: K random sets per set (detection's own random_* sets excepted), each "
                        "with the set's number of neurons in every layer and group and a seed of its own, measured "
                        "like the set (0: none). Costs K perplexity passes per set; controls are never saved")
    p.add_argument("--resamples", type=int_at_least(1), default=1000,
                   help="bootstrap resamples of the validation lines for the 95%% intervals of dPPL, Imp and LAS "
                        "(paired: the same lines for the base model and every set; seeded by --seed)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- inputs (all checked before any output)

def neuron_specs(args: argparse.Namespace, out: Outputs, langs: list[str]) -> list[tuple[str, Path]]:
    """(set name, file) for every set to deactivate: --neurons, else detection's sets of this model."""
    if args.neurons:
        specs = [neuron_spec(spec) for spec in args.neurons]
    else:
        names = (["shared"] + [f"exclusive_{l}" for l in langs] + ["random_shared"]
                 + [f"random_exclusive_{l}" for l in langs])
        specs = [(n, out.neuron_set(n)) for n in names if out.neuron_set(n).is_file()]
        if not specs:
            raise InputError(f"no neuron files found in {out.neurons} (run detection.py first, or pass --neurons FILE)")
        missing = [n for n in names if not out.neuron_set(n).is_file()]
        if missing:
            print(f"warning: {out.neurons} has no {', '.join(missing)}; deactivating the other sets", file=sys.stderr)
    for name, file in specs:
        if safe_name(name) != name:  # the set name becomes a directory name
            raise InputError(f"--neurons {file}: set name '{name}' is not a safe directory name; use NAME=FILE")
    seen = [n for n, _ in specs]
    if dup := sorted({n for n in seen if seen.count(n) > 1}):
        raise InputError(f"--neurons: set name {dup[0]} given twice; use NAME=FILE to tell them apart")
    return specs


def read_sets(specs: list[tuple[str, Path]], geom: Geometry, legacy_kv: bool, record: dict,
              allow_other_model: bool) -> tuple[dict[str, NeuronSet], dict[str, dict]]:
    """Every set, checked against the model (its record and geometry), and what the outputs record about its file."""
    sets, files = {}, {}
    for name, file in specs:
        sets[name], files[name] = load_neuron_set(file, geom, legacy_kv=legacy_kv, model=record,
                                                  allow_other_model=allow_other_model)
    return sets, files


def variants_to_save(args: argparse.Namespace, sets: dict[str, NeuronSet]) -> list[str]:
    """The sets whose deactivated model --save-variants asks for."""
    if args.save_variants in ("all", "none"):
        to_save = list(sets) if args.save_variants == "all" else []
    else:
        to_save = split_list(args.save_variants, "--save-variants")
        if unknown := [s for s in to_save if s not in sets]:
            raise InputError(f"--save-variants: no set named {unknown[0]} (sets: {', '.join(sets)})")
    if not to_save and not args.measure_ppl:
        raise InputError("--save-variants none without --measure-ppl: nothing to do")
    return to_save


def local_safetensors_dir(path: str, gguf: str | None, model: str) -> Path:
    """The directory whose shards --streaming rewrites."""
    not_safetensors = InputError(f"--streaming: --model {model} is not a local directory with .safetensors weights")
    if gguf is not None:
        raise not_safetensors
    d = local_dir(path)
    if d is None:
        raise InputError(f"--streaming: --model {model} is not in the local cache as a model directory")
    if not any(d.glob("*.safetensors")):
        raise not_safetensors
    return d


# ---------------------------------------------------------------- what is up to date

@dataclass
class RecomputePlan:
    """What this run (re)computes, and the fingerprint each output records."""
    measure: bool
    variants: list[str]
    ppl_fp: dict | None
    variant_fp: dict[str, dict]


def plan(args: argparse.Namespace, out: Outputs, specs: list[tuple[str, Path]], to_save: list[str],
         langs: list[str], held: contextlib.ExitStack) -> RecomputePlan:
    """Lock every output this run may write (until `held` closes), then keep only those whose inputs changed
    since they were written: the PPL table depends on every set, each variant on its own set only."""
    # a second run on the same outputs waits for this one, then reuses them (sorted: no deadlock)
    paths = sorted([out.deactivation] * args.measure_ppl + [out.variants / n for n in to_save])
    units = {p: held.enter_context(reuse.unit(p, f"--out {args.out}", force=args.force,
                                              folder=p != out.deactivation,
                                              record=p if p == out.deactivation else p / PROVENANCE_FILE))
             for p in paths}
    _, unused, mean_files, context = interventions.fingerprint_inputs(args)
    ppl_fp = reuse.fingerprint(args, __file__, "deactivation.ppl", ignore=PPL_IGNORED + unused, models=[args.model],
                               files=[*(file for _, file in specs), *(val_file(args.dataset, l) for l in langs),
                                      *mean_files], context=context) \
        if args.measure_ppl else None
    variant_fp = {n: reuse.fingerprint(args, __file__, "deactivation.variant", ignore=VARIANT_IGNORED,
                                       models=[args.model], files=[dict(specs)[n]]) for n in to_save}
    measure = args.measure_ppl and not units[out.deactivation].up_to_date(ppl_fp)
    todo = [n for n in to_save if not units[out.variants / n].up_to_date(variant_fp[n])]
    return RecomputePlan(measure, todo, ppl_fp, variant_fp)


# ---------------------------------------------------------------- perplexity

def controlled_sets(args: argparse.Namespace, sets: dict[str, NeuronSet], langs: list[str]) -> list[str]:
    """The sets that get random controls: every set but detection's own random controls (random_shared,
    random_exclusive_<lang>) when the sets come from its folder; every --neurons set."""
    if args.neurons:
        return list(sets)
    own = {"random_shared", *(f"random_exclusive_{l}" for l in langs)}
    return [n for n in sets if n not in own]


def control_name(name: str, i: int) -> str:
    """The name random_like mixes into the seed of control i (1-based) of set `name`."""
    return f"{name}/random-{i}"


def switched_off(model, nset: NeuronSet | None, iv: interventions.Intervention,
                 means: dict | None) -> contextlib.AbstractContextManager:
    """For a with-block: the model with `nset` under --intervention (hooks, removed on exit); the model
    itself for the base condition (None)."""
    return interventions.intervened(model, nset, iv, means) if nset is not None else contextlib.nullcontext()


def measure(model, tok, sets: dict[str, NeuronSet], texts: dict[str, list[str]], args: argparse.Namespace,
            controlled: list[str], means: dict | None = None) -> tuple[dict, dict[str, dict], dict[str, dict[str, dict]]]:
    """Perplexity per language (with each line's NLL) of the base model, of every set switched off and of
    --random-controls K random sets like each set in `controlled`: (base, {set: ppl}, {set: {control: ppl}}).
    Each condition is applied through hooks under --intervention and removed afterwards: no model copy, no
    save/reload; `means`: interventions.stored_means of its languages."""
    iv = interventions.parse_intervention(args.intervention)
    # (set name, control number or 0 for the set itself); the base model (None) first. A control is drawn
    # when it is measured: one is held at a time
    conditions: list[tuple[str | None, int]] = [(None, 0)] + [(name, 0) for name in sets] + \
        [(name, i) for name in controlled for i in range(1, args.random_controls + 1)]
    base, ppl, controls = {}, {}, {name: {} for name in controlled}
    for name, i in tqdm(conditions, desc="conditions (ppl)"):
        nset = None if name is None else random_like(sets[name], args.seed, control_name(name, i)) if i else sets[name]
        label = "base" if name is None else control_name(name, i) if i else name
        with switched_off(model, nset, iv, means):
            r = perplexity_by_lang(model, tok, texts, args.max_length, args.batch_size, label, per_line=True)
        if name is None:
            base = r
        elif i == 0:
            ppl[name] = r
        else:
            controls[name][control_name(name, i)] = r
    return base, ppl, controls


def _dppl(ppl: float | None, base: float | None) -> float | None:
    return ppl - base if ppl is not None and base is not None else None


def summarize(base: dict, ppl: dict[str, dict], controls: dict[str, dict[str, dict]], sets: dict[str, NeuronSet],
              langs: list[str]) -> dict[str, dict]:
    """deactivation.json's "sets": per set its size, PPL (with the lines' NLL) and dPPL per language, and for
    a controlled set its controls' dPPL, their mean and range, and the set's dPPL over their mean."""
    results = {}
    for name, r in ppl.items():
        res = {"size": size(sets[name]), "ppl": r, "dppl": {l: _dppl(r[l]["ppl"], base[l]["ppl"]) for l in langs}}
        if controls.get(name):
            each = {c.rsplit("/", 1)[1]: {"seed_name": c, "ppl": {l: cr[l]["ppl"] for l in langs},
                        "dppl": {l: _dppl(cr[l]["ppl"], base[l]["ppl"]) for l in langs}}
                    for c, cr in controls[name].items()}
            mean, spread, ratio = {}, {}, {}
            for l in langs:
                vals = [c["dppl"][l] for c in each.values() if c["dppl"][l] is not None]
                mean[l] = float(np.mean(vals)) if vals else None
                spread[l] = [min(vals), max(vals)] if vals else None
                # a ratio to a change that is not an increase says nothing about the set
                ratio[l] = (json_safe(res["dppl"][l] / mean[l])
                            if res["dppl"][l] is not None and mean[l] is not None and mean[l] > 0 else None)
            res["controls"] = {"k": len(each), "sets": each, "dppl_mean": mean, "dppl_range": spread,
                               "dppl_ratio": ratio}
        results[name] = res
    return results


def intervals(base: dict, results: dict[str, dict], langs: list[str], resamples: int,
              seed: int) -> tuple[dict[str, dict], dict[str, list | None], list | None]:
    """95% intervals from a paired bootstrap over each language's validation lines: the same resampled lines
    for the base model and every set (each language resampled on its own, seeded by `seed` and the
    language). dPPL per set and language; Imp_l and LAS recomputed from each resample's dPPLs (resample b of
    every language together). Resamples where a statistic is undefined (e.g. a zero dPPL under Imp's
    division) are left out of its interval; an undefined estimate has none. Returns ({set: {lang: [lo, hi] or None}}, {lang: [lo, hi] or None}, LAS's)."""
    samples: dict[str, dict[str, np.ndarray]] = {name: {} for name in results}
    for l in langs:
        lines = base[l]["line_tokens"]
        idx = resample_indices(len(lines), resamples, derived_seed(seed, "deactivation-lines", l))
        base_b = resampled_ppl(base[l]["line_nll"], lines, idx)
        for name, r in results.items():
            samples[name][l] = resampled_ppl(r["ppl"][l]["line_nll"], r["ppl"][l]["line_tokens"], idx) - base_b
    # an estimate that is not defined gets no interval, though some resamples may define it
    dppl_ci = {name: {l: interval_or_none(samples[name][l]) if results[name]["dppl"][l] is not None else None
                      for l in langs} for name in results}
    # Imp and LAS of every resample, by the same function as the estimate (metrics.language_agnostic)
    ratio_sets = [n for n in results if n == "shared" or n.startswith("exclusive_")]
    imp_b: dict[str, list[float]] = {}
    las_b: list[float] = []
    for b in range(resamples):
        view = {n: {"size": results[n]["size"],
                    "dppl": {l: (float(samples[n][l][b]) if math.isfinite(samples[n][l][b]) else None) for l in langs}}
                for n in ratio_sets}
        imp, las = language_agnostic(view, langs)
        for l, v in imp.items():
            imp_b.setdefault(l, []).append(float("nan") if v is None else v)
        las_b.append(float("nan") if las is None else las)
    importance, las = language_agnostic(results, langs)
    imp_ci = {l: interval_or_none(imp_b[l]) if v is not None else None for l, v in importance.items()}
    las_ci = interval_or_none(las_b) if las is not None else None
    return dppl_ci, imp_ci, las_ci


def _g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _ci(ci: list | None) -> str:
    return "" if ci is None else f" [{ci[0]:.3g}, {ci[1]:.3g}]"


def print_table(base: dict, results: dict, importance: dict, las: float | None, langs: list[str],
                importance_ci: dict | None = None, las_ci: list | None = None) -> None:
    """PPL per language, dPPL with its 95% interval in brackets; under a set with controls, their mean dPPL,
    range and the set's ratio to their mean; then Imp and LAS with their intervals."""
    rows = [["base", ""] + [_g(base[l]["ppl"]) for l in langs]]
    for name, r in results.items():
        cis = r.get("dppl_ci") or {}
        rows.append([name, str(r["size"])] + [
            f"{_g(r['ppl'][l]['ppl'])} ({'n/a' if r['dppl'][l] is None else format(r['dppl'][l], '+.4g')}"
            f"{_ci(cis.get(l))})" for l in langs])
        if c := r.get("controls"):
            rows.append([f"  {c['k']} random", ""] + [
                f"{'n/a' if c['dppl_mean'][l] is None else format(c['dppl_mean'][l], '+.3g')}"
                f"{_ci(c['dppl_range'][l])} x{_g(c['dppl_ratio'][l])}" for l in langs])
    widths = [max(len(row[i]) for row in rows + [["set", "size", *langs]]) for i in range(len(langs) + 2)]
    print()
    for row in [["set", "size", *langs]] + rows:
        print(" ".join(f"{c:<{widths[0]}}" if i == 0 else f"{c:>{widths[i]}}" for i, c in enumerate(row)))
    print("(set: PPL (dPPL [95% interval]); random: controls' mean dPPL [min, max] x set dPPL / controls' mean)")
    if importance:
        print("Imp: " + ", ".join(f"{l} {_g(v)}{_ci((importance_ci or {}).get(l))}" for l, v in importance.items()))
    print(f"LAS: {las:.4f}{_ci(las_ci)}" if las is not None else "LAS: n/a (needs the shared and exclusive_<lang> sets)")


# ---------------------------------------------------------------- outputs

def write_deactivation(out: Outputs, args: argparse.Namespace, langs: list[str], geom: Geometry, files: dict,
                       base: dict, results: dict, fp: dict) -> None:
    """deactivation.json: PPL of the base model and of every set, dPPL, Imp_l and LAS, their 95% intervals,
    and the random controls."""
    path, gguf = resolve_model(args.model)
    importance, las = language_agnostic(results, langs)
    dppl_ci, importance_ci, las_ci = intervals(base, results, langs, args.resamples, args.seed)
    for name, r in results.items():
        r["dppl_ci"] = dppl_ci[name]
    write_json(out.deactivation, {
        "model": args.model,
        "meta": {"schema_version": SCHEMA_VERSION, "tag": out.tag, "base_model": path, "gguf_file": gguf,
                 "geometry": vars(geom), "langs": langs, "dataset": str(args.dataset),
                 "batch_size": args.batch_size, "max_length": args.max_length,
                 "legacy_kv_mapping": args.legacy_kv_mapping, "allow_other_model": args.allow_other_model,
                 "intervention": interventions.parse_intervention(args.intervention).record(),
                 "neuron_files": files,
                 "neuron_sha256": {n: f["sha256"] for n, f in files.items()},
                 "intervals": {"level": LEVEL, "resamples": args.resamples, "method": "paired percentile bootstrap "
                               "over validation lines"},
                 "random_controls": {"k": args.random_controls,
                                     "sets": [n for n, r in results.items() if "controls" in r]},
                 "run": run_meta(args), "fingerprint": fp},
        "results": {"ppl": base},
        "sets": results,
        "importance": importance,
        "importance_ci": importance_ci,
        "language_agnostic_score": las,
        "language_agnostic_score_ci": las_ci})
    print_table(base, results, importance, las, langs, importance_ci, las_ci)
    print(f"Wrote {out.deactivation}")


def write_variants(out: Outputs, args: argparse.Namespace, model, tok, config, geom: Geometry,
                   sets: dict[str, NeuronSet], files: dict, todo: RecomputePlan, src_dir: Path | None) -> None:
    """One model folder per set: the base model's files (--streaming: the shards in src_dir) with the set
    zeroed, a copy of the neuron file and the provenance that gives the variant its base's tag."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if not args.streaming and stored is not None and str(stored).replace("torch.", "") != \
            str(model.dtype).replace("torch.", ""):
        # then every weight of the variant differs from the base, not only the zeroed neurons
        print(f"warning: saving variants in {model.dtype} while the model is stored in {stored}; "
              "--dtype or --streaming keeps the stored precision", file=sys.stderr)
    # what one variant takes on disk, for the message of a full disk
    needed = (sum(f.stat().st_size for f in src_dir.iterdir() if f.is_file()) if args.streaming
              else model.get_memory_footprint())
    for name in tqdm(todo.variants, desc="variants"):
        file = Path(files[name]["file"])
        with atomic_dir(out.variants / name, needed) as tmp:
            if args.streaming:
                zero_neurons_streaming(src_dir, tmp, sets[name], geom)
            else:
                with zeroed(model, sets[name]):
                    save_model_dir(model, tok, args.model, tmp)
            shutil.copy2(file, tmp / NEURON_FILE_COPY)
            write_json(tmp / PROVENANCE_FILE, {
                "schema_version": SCHEMA_VERSION, "tag": out.tag, "base_model": args.model, "neuron_set": name,
                "neuron_file": str(file), "size": size(sets[name]),
                "neuron_sha256": {name: files[name]["sha256"]}, "neuron_model": files[name]["model"],
                "other_model": files[name]["other_model"], "streaming": args.streaming,
                "run": run_meta(args), "fingerprint": todo.variant_fp[name]})
        print(f"Wrote {out.variants / name}")


def main() -> None:
    args = parse_args()
    langs = parse_langs(args.langs)
    seed_everything(args.seed)
    out = layout.outputs(args.out, args.model)
    # the config is enough to check every neuron file against the model before loading it; the tokenizer and
    # the weight headers are checked too, so that a broken model folder fails here and not after the first set
    config = check_model(args.model)
    geom = Geometry.from_config(config)
    src_dir = local_safetensors_dir(*resolve_model(args.model), args.model) if args.streaming else None

    specs = neuron_specs(args, out, langs)
    sets, files = read_sets(specs, geom, args.legacy_kv_mapping, model_record(args.model, config),
                            args.allow_other_model)
    to_save = variants_to_save(args, sets)
    interventions.fingerprint_inputs(args)  # a bad --intervention or a missing mean corpus: before any output
    texts = {l: val_texts(args.dataset, l)[:args.limit or None] for l in langs} if args.measure_ppl else {}

    with contextlib.ExitStack() as held:
        todo = plan(args, out, specs, to_save, langs, held)
        if not todo.measure and not todo.variants:
            print("Nothing to recompute")
            return
        model = tok = None
        if todo.measure or (todo.variants and not args.streaming):
            # --device auto spreads a model too large for one GPU over all of them
            model, tok = load_model(args.model, args.device, args.dtype, device_map_auto=True)
        if todo.measure:
            iv = interventions.parse_intervention(args.intervention)
            means = interventions.stored_means(out, args.model, model, tok, args.dataset, args.mean_corpus,
                                               iv.mean_langs(), args.mean_max_length, args.batch_size, args.force)
            base, ppl, controls = measure(model, tok, sets, texts, args, controlled_sets(args, sets, langs), means)
            results = summarize(base, ppl, controls, sets, langs)
            write_deactivation(out, args, langs, geom, files, base, results, todo.ppl_fp)
        if todo.variants:
            write_variants(out, args, model, tok, config, geom, sets, files, todo, src_dir)


if __name__ == "__main__":
    run(main)
