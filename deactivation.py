"""Stage 2, deactivation (docs/method.md section 5): switch neuron sets off, save each deactivated model as
an ordinary transformers model directory, and measure what it costs in perplexity per language.

    python deactivation.py --model gemma-3-270m --langs en,zh,th,sw,fr,de --measure-ppl

Reads neuron files in our format and the authors' (outputs/<tag>/neurons/ by default), writes
outputs/<tag>/variants/<set>/ and, with --measure-ppl, outputs/<tag>/deactivation.json with
PPL, dPPL per set, the shared-neuron importance Imp_l and the language-agnostic score LAS."""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from langneurons import interventions, layout, reuse
from langneurons.cli import InputError, common_parser, int_at_least, parse_langs, run, split_list
from langneurons.data import val_file, val_texts
from langneurons.files import atomic_dir, safe_name, write_json
from langneurons.layout import NEURON_FILE_COPY, PROVENANCE_FILE, SCHEMA_VERSION, Outputs
from langneurons.masking import zero_neurons_streaming, zeroed
from langneurons.metrics import language_agnostic, perplexity_by_lang
from langneurons.model import (Geometry, check_model, load_model, local_dir, model_record, resolve_model,
                               save_model_dir)
from langneurons.neurons import NeuronSet, load_neuron_set, size
from langneurons.interventions import neuron_spec
from langneurons.runinfo import run_meta, seed_everything

# arguments that cannot change the PPL table (they pick which variants are written, and how)
PPL_IGNORED = ("save_variants", "streaming")
# arguments that cannot change a variant: the measurement's, and which sets (its own file is fingerprinted)
VARIANT_IGNORED = ("measure_ppl", "save_variants", "batch_size", "max_length", "limit", "dataset", "langs", "neurons",
                   *interventions.INTERVENTION_FLAGS)


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

def measure(model, tok, sets: dict[str, NeuronSet], texts: dict[str, list[str]],
            args: argparse.Namespace, means: dict | None = None) -> tuple[dict, dict]:
    """Base perplexity, then each set's and its dPPL under --intervention (hooks removed after each set: no
    model copy, no save/reload per set); `means`: interventions.stored_means of its languages."""
    iv = interventions.parse_intervention(args.intervention)
    base = perplexity_by_lang(model, tok, texts, args.max_length, args.batch_size, "base")
    results = {}
    for name in tqdm(sets, desc="sets (ppl)"):
        with interventions.intervened(model, sets[name], iv, means):
            ppl = perplexity_by_lang(model, tok, texts, args.max_length, args.batch_size, name)
        dppl = {l: (ppl[l]["ppl"] - base[l]["ppl"] if ppl[l]["ppl"] is not None and base[l]["ppl"] is not None
                    else None) for l in texts}
        results[name] = {"size": size(sets[name]), "ppl": ppl, "dppl": dppl}
    return base, results


def print_table(base: dict, results: dict, importance: dict, las: float | None, langs: list[str]) -> None:
    """PPL per language, dPPL in brackets, then Imp and LAS."""
    w = max(len(n) for n in ["base", *results])
    print(f"\n{'set':<{w}} {'size':>8} " + " ".join(f"{l:>18}" for l in langs))
    print(f"{'base':<{w}} {'':>8} " + " ".join(f"{base[l]['ppl'] or float('nan'):>18.3f}" for l in langs))
    for name, r in results.items():
        cells = [f"{(r['ppl'][l]['ppl'] or float('nan')):.3f} ({(r['dppl'][l] if r['dppl'][l] is not None else float('nan')):+.3f})"
                 for l in langs]
        print(f"{name:<{w}} {r['size']:>8} " + " ".join(f"{c:>18}" for c in cells))
    if importance:
        print("Imp: " + ", ".join(f"{l} {v:.4g}" if v is not None else f"{l} n/a" for l, v in importance.items()))
    print(f"LAS: {las:.4f}" if las is not None else "LAS: n/a (needs the shared and exclusive_<lang> sets)")


# ---------------------------------------------------------------- outputs

def write_deactivation(out: Outputs, args: argparse.Namespace, langs: list[str], geom: Geometry, files: dict,
                       base: dict, results: dict, fp: dict) -> None:
    """deactivation.json: PPL of the base model and of every set, dPPL, Imp_l and LAS."""
    path, gguf = resolve_model(args.model)
    importance, las = language_agnostic(results, langs)
    write_json(out.deactivation, {
        "model": args.model,
        "meta": {"schema_version": SCHEMA_VERSION, "tag": out.tag, "base_model": path, "gguf_file": gguf,
                 "geometry": vars(geom), "langs": langs, "dataset": str(args.dataset),
                 "batch_size": args.batch_size, "max_length": args.max_length,
                 "legacy_kv_mapping": args.legacy_kv_mapping, "allow_other_model": args.allow_other_model,
                 "intervention": interventions.parse_intervention(args.intervention).record(),
                 "neuron_files": files,
                 "neuron_sha256": {n: f["sha256"] for n, f in files.items()}, "run": run_meta(args),
                 "fingerprint": fp},
        "results": {"ppl": base},
        "sets": results,
        "importance": importance,
        "language_agnostic_score": las})
    print_table(base, results, importance, las, langs)
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
            base, results = measure(model, tok, sets, texts, args, means)
            write_deactivation(out, args, langs, geom, files, base, results, todo.ppl_fp)
        if todo.variants:
            write_variants(out, args, model, tok, config, geom, sets, files, todo, src_dir)


if __name__ == "__main__":
    run(main)
