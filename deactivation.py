"""Stage 2, deactivation (METHOD.md section 5): switch neuron sets off, save each deactivated model as
an ordinary transformers model directory, and measure what it costs in perplexity per language.

    python deactivation.py --model gemma-3-270m --langs en,zh,th,sw,fr,de --measure-ppl

Reads neuron files in our format and the authors' (outputs/<tag>/neurons/ by default), writes
outputs/<tag>/variants/<set>/ and, with --measure-ppl, outputs/<tag>/deactivation.json with
PPL, dPPL per set, the shared-neuron importance Imp_l and the language-agnostic score LAS."""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from tqdm.auto import tqdm

from langneurons import reuse
from langneurons.cli import InputError, common_parser, int_at_least, parse_langs, run
from langneurons.files import atomic_dir, json_safe, read_json, write_json
from langneurons.runinfo import run_meta, seed_everything
from langneurons.data import lang_file
from langneurons.metrics import language_agnostic
from langneurons.model import Geometry, check_model, load_model, local_dir, resolve_model, save_model_dir
from langneurons.layout import PROVENANCE_FILE, model_tag
from langneurons.neurons import read_neuron_file, size

# arguments that cannot change the PPL table (they pick which variants are written, and how)
PPL_IGNORED = ("save_variants", "streaming")
# arguments that cannot change a variant: the measurement's, and which sets (its own file is fingerprinted)
VARIANT_IGNORED = ("measure_ppl", "save_variants", "batch_size", "max_length", "limit", "dataset", "langs", "neurons")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--neurons", action="append", metavar="[NAME=]FILE",
                   help="neuron file to deactivate (repeatable); the set is named after the file stem, or NAME "
                        "when given as NAME=FILE (e.g. shared=Llama-3.1-8B_shared_neurons_0.05.json, so the "
                        "authors' files count for Imp/LAS). Default: shared, exclusive_<lang>, random_shared "
                        "and random_exclusive_<lang> from <out>/<tag>/neurons/")
    p.add_argument("--legacy-kv-mapping", action="store_true",
                   help="map the authors' query-head attn_k/attn_v indices with their code's i // n_rep instead "
                        "of the correct (i // head_dim // n_rep) * head_dim + i %% head_dim")
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
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="texts per forward pass for perplexity")
    p.add_argument("--max-length", type=int_at_least(2), default=512,
                   help="tokens per text for perplexity (truncated; one token is predicted from another)")
    p.add_argument("--limit", type=int_at_least(0), default=0,
                   help="first N lines of val/<lang>.txt per language (0 = all)")
    return p.parse_args(argv)


def neuron_specs(args: argparse.Namespace, tag: str, langs: list[str]) -> list[tuple[str, Path]]:
    """(set name, file) for every set to deactivate."""
    if args.neurons:
        specs = []
        for spec in args.neurons:
            name, sep, file = spec.partition("=")
            if not sep or Path(spec).exists():
                name, file = Path(spec).stem, spec
            if not Path(file).is_file():
                raise InputError(f"--neurons {file}: no such file")
            specs.append((name, Path(file)))
    else:
        folder = Path(args.out) / tag / "neurons"
        names = (["shared"] + [f"exclusive_{l}" for l in langs] + ["random_shared"]
                 + [f"random_exclusive_{l}" for l in langs])
        specs = [(n, folder / f"{n}.json") for n in names if (folder / f"{n}.json").is_file()]
        if not specs:
            raise InputError(f"no neuron files found in {folder} (run detection.py first, or pass --neurons FILE)")
        missing = [n for n in names if not (folder / f"{n}.json").is_file()]
        if missing:
            print(f"warning: {folder} has no {', '.join(missing)}; deactivating the other sets", file=sys.stderr)
    for name, file in specs:
        # the set name becomes a directory name
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):
            raise InputError(f"--neurons {file}: set name '{name}' is not a safe directory name; use NAME=FILE")
    seen = [n for n, _ in specs]
    dup = sorted({n for n in seen if seen.count(n) > 1})
    if dup:
        raise InputError(f"--neurons: set name {dup[0]} given twice; use NAME=FILE to tell them apart")
    return specs


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


def main() -> None:
    # ---------------------------------------------------------------- arguments (all checked before any output)
    args = parse_args()
    langs = parse_langs(args.langs)
    seed_everything(args.seed)
    path, gguf = resolve_model(args.model)
    tag = model_tag(args.model)
    # the config is enough to check every neuron file against the model before loading it; the tokenizer and
    # the weight headers are checked too, so that a broken model folder fails here and not after the first set
    config = check_model(args.model)
    geom = Geometry.from_config(config)
    src_dir = local_safetensors_dir(path, gguf, args.model) if args.streaming else None

    specs = neuron_specs(args, tag, langs)
    sets, meta_sets = {}, {}
    for name, file in specs:
        nset, fmeta = read_neuron_file(file, geom, legacy_kv=args.legacy_kv_mapping)
        sets[name] = nset
        meta_sets[name] = {"file": str(file.resolve()), "sha256": reuse.file_digest(file), "size": size(nset),
                           "format": "ours" if "meta" in read_json(file, "neuron file") else "authors",
                           "kv_index_space": fmeta.get("kv_index_space", "query_heads")}
    hashes = {n: m["sha256"] for n, m in meta_sets.items()}

    if args.save_variants == "all":
        to_save = list(sets)
    elif args.save_variants == "none":
        to_save = []
    else:
        to_save = [s.strip() for s in args.save_variants.split(",") if s.strip()]
        unknown = [s for s in to_save if s not in sets]
        if unknown:
            raise InputError(f"--save-variants: no set named {unknown[0]} (sets: {', '.join(sets)})")
    if not to_save and not args.measure_ppl:
        raise InputError("--save-variants none without --measure-ppl: nothing to do")
    if args.measure_ppl:
        from langneurons.data import val_texts
        texts = {l: val_texts(args.dataset, l)[:args.limit or None] for l in langs}

    out_dir = Path(args.out) / tag
    result_file = out_dir / "deactivation.json"
    variant_dir = out_dir / "variants"
    for unit, folder in [(result_file, False)] * args.measure_ppl + [(variant_dir / n, True) for n in to_save]:
        reuse.check_writable(unit, f"--out {args.out}", folder=folder)
    # what each output is computed from: the PPL table from every set, each variant from its own set only
    if args.measure_ppl:
        ppl_fp = reuse.fingerprint(args, __file__, ignore=PPL_IGNORED, models=[args.model], files=[
            *(file for _, file in specs), *(lang_file(args.dataset, "val", l, ".txt") for l in langs)])
    variant_fp = {n: reuse.fingerprint(args, __file__, ignore=VARIANT_IGNORED, models=[args.model],
                                       files=[dict(specs)[n]]) for n in to_save}
    # a second run on the same outputs waits for this one, then reuses them (sorted: no deadlock)
    for unit in sorted([result_file] * args.measure_ppl + [variant_dir / n for n in to_save]):
        reuse.hold_lock(unit)
    do_ppl = args.measure_ppl and not reuse.up_to_date(result_file, ppl_fp, args.force, result_file)
    to_save = [n for n in to_save if not reuse.up_to_date(variant_dir / n / PROVENANCE_FILE, variant_fp[n],
                                                          args.force, variant_dir / n)]
    if not do_ppl and not to_save:
        print("Nothing to recompute")
        return

    # ---------------------------------------------------------------- load
    model = tok = None
    if do_ppl or (to_save and not args.streaming):
        # --device auto spreads a model too large for one GPU over all of them
        model, tok = load_model(args.model, args.device, args.dtype, device_map_auto=True)
    from langneurons.masking import zero_neurons_streaming, zeroed

    # ---------------------------------------------------------------- perplexity, in memory
    # Each set is zeroed in place and restored exactly afterwards: no model copy, no save/reload per set.
    if do_ppl:
        from langneurons.metrics import perplexity

        def ppl_all(label: str) -> dict[str, dict]:
            res = {}
            for l in langs:
                r = perplexity(model, tok, texts[l], args.max_length, args.batch_size, desc=f"{label}/{l}")
                res[l] = {"ppl": json_safe(r["ppl"]), "tokens": r["tokens"]}
            return res

        base = ppl_all("base")
        results = {}
        for name in tqdm(sets, desc="sets (ppl)"):
            with zeroed(model, sets[name]):
                ppl = ppl_all(name)
            dppl = {l: (ppl[l]["ppl"] - base[l]["ppl"] if ppl[l]["ppl"] is not None and base[l]["ppl"] is not None
                        else None) for l in langs}
            results[name] = {"size": size(sets[name]), "ppl": ppl, "dppl": dppl}
        importance, las = language_agnostic(results, langs)
        write_json(result_file, {
            "model": args.model,
            "meta": {"tag": tag, "base_model": path, "gguf_file": gguf, "geometry": vars(geom),
                     "langs": langs, "dataset": str(args.dataset), "batch_size": args.batch_size,
                     "max_length": args.max_length, "legacy_kv_mapping": args.legacy_kv_mapping,
                     "neuron_files": meta_sets, "neuron_sha256": hashes, "run": run_meta(args),
                     "fingerprint": ppl_fp},
            "results": {"ppl": base},
            "sets": results,
            "importance": importance,
            "language_agnostic_score": las})

        # the table: PPL per language, dPPL in brackets
        w = max(len(n) for n in ["base", *sets])
        print(f"\n{'set':<{w}} {'size':>8} " + " ".join(f"{l:>18}" for l in langs))
        print(f"{'base':<{w}} {'':>8} " + " ".join(f"{base[l]['ppl'] or float('nan'):>18.3f}" for l in langs))
        for name, r in results.items():
            cells = [f"{(r['ppl'][l]['ppl'] or float('nan')):.3f} ({(r['dppl'][l] if r['dppl'][l] is not None else float('nan')):+.3f})"
                     for l in langs]
            print(f"{name:<{w}} {r['size']:>8} " + " ".join(f"{c:>18}" for c in cells))
        if importance:
            print("Imp: " + ", ".join(f"{l} {v:.4g}" if v is not None else f"{l} n/a" for l, v in importance.items()))
        print(f"LAS: {las:.4f}" if las is not None else "LAS: n/a (needs the shared and exclusive_<lang> sets)")
        print(f"Wrote {result_file}")

    # ---------------------------------------------------------------- variants on disk
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if to_save and not args.streaming and stored is not None and str(stored).replace("torch.", "") != \
            str(model.dtype).replace("torch.", ""):
        # then every weight of the variant differs from the base, not only the zeroed neurons
        print(f"warning: saving variants in {model.dtype} while the model is stored in {stored}; "
              "--dtype or --streaming keeps the stored precision", file=sys.stderr)
    for name in tqdm(to_save, desc="variants", disable=not to_save):
        file = Path(meta_sets[name]["file"])
        with atomic_dir(variant_dir / name) as tmp:
            if args.streaming:
                zero_neurons_streaming(src_dir, tmp, sets[name], geom)
            else:
                with zeroed(model, sets[name]):
                    save_model_dir(model, tok, args.model, tmp)
            shutil.copy2(file, tmp / "neurons.json")
            write_json(tmp / PROVENANCE_FILE, {
                "tag": tag, "base_model": args.model, "neuron_set": name, "neuron_file": str(file),
                "size": size(sets[name]), "neuron_sha256": {name: hashes[name]},
                "streaming": args.streaming, "run": run_meta(args), "fingerprint": variant_fp[name]})
        print(f"Wrote {variant_dir / name}")


if __name__ == "__main__":
    run(main)
