"""Steering: does an intervention on a language's neurons make the model write that language? (docs/steering.md)

    python steering.py --model gemma-3-270m --langs en --target sw --intervention mean=sw --limit 32
    python steering.py --langs en --target fr --intervention scale=1 --alphas 1,2,4,8   # a dose-response curve

For every source language of --langs, prompts in that language (by default the first --prompt-words words of
each validation line) are continued greedily for --max-new-tokens tokens, once per condition: no intervention
(`none`), the intervention on the neuron set (--neurons, by default exclusive_<target> of detection), and on
--random-controls K random sets with the set's number of neurons in every layer and group (`random-1` ..
`random-K`). The prompt is cut off, the language of the continuation identified (langneurons/langid.py), and
per condition and source language written: the rate identified as --target with its 95% Wilson interval, the
rate still in the source language, and fluency (perplexity of the continuation on its own under the unmodified
model; the share of repeated token n-grams). Output: <out>/<tag>/steering/<name>.json."""
from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

from langneurons import interventions, langid, layout, reuse
from langneurons.cli import DEFAULT_LANGS, InputError, common_parser, int_at_least, parse_langs, run, split_list
from langneurons.data import mgsm_file, mgsm_texts, read_lines, val_file, val_texts
from langneurons.files import json_safe, safe_name, write_json
from langneurons.layout import SCHEMA_VERSION
from langneurons.metrics import MGSM_PROMPT, generate_greedy, perplexity, repeated_ngram_share
from langneurons.model import Geometry, check_model, load_model, model_record
from langneurons.neurons import NeuronSet, load_neuron_set, random_like
from langneurons.runinfo import run_meta, seed_everything

# arguments that cannot change the numbers (batching only pads; the name picks the file)
NOT_RESULT_ARGS = ("name", "batch_size")
# repeated n-grams are counted over token n-grams of this length (docs/steering.md#fluency)
REPEAT_N = 3
NONE = "none"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_parser(__doc__.split("\n\n")[0])
    p.set_defaults(langs=None)
    p.add_argument("--target", required=True, metavar="LANG",
                   help="the language the intervention should make the model write (an ISO 639-1 code)")
    p.add_argument("--neurons", default=None, metavar="[NAME=]FILE",
                   help="the neuron set to intervene on, named after the file stem or NAME (default: "
                        "exclusive_<target> from <out>/<tag>/neurons/)")
    interventions.add_arguments(p, default=None)
    p.add_argument("--alphas", default=None, metavar="A,...",
                   help="with --intervention scale=A: the whole table for each of these factors too (positive "
                        "numbers; a dose-response curve), under 'strengths' in the output")
    p.add_argument("--prompts", default="val", metavar="val|mgsm|PATH",
                   help="val: the first --prompt-words words of <dataset>/val/<lang>.txt lines; mgsm: 'Question: "
                        "<q>\\nAnswer:' of the MGSM questions; PATH: a text file, one prompt a line, with {lang} "
                        "for the language")
    p.add_argument("--prompt-words", type=int_at_least(1), default=6,
                   help="--prompts val: words per prompt (for text without spaces between words: twice as many "
                        "characters)")
    p.add_argument("--limit", type=int_at_least(0), default=32, help="first N prompts per language (0 = all)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=32, help="generated tokens per prompt")
    p.add_argument("--random-controls", type=int_at_least(0), default=5, metavar="K",
                   help="random sets matched to the set per layer and group, each a condition of its own")
    p.add_argument("--allow-other-model", action="store_true",
                   help="use a neuron file whose model record names another model than --model")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="prompts per generate call")
    p.add_argument("--max-length", type=int_at_least(8), default=512,
                   help="tokens per prompt (and per continuation for its perplexity)")
    p.add_argument("--name", default=None,
                   help="results file <out>/<tag>/steering/<name>.json (default: <set>.<intervention>.to-<target>)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- inputs (all checked before the model loads)

def check_target(target: str) -> str:
    if target not in langid.known_codes():
        raise InputError(f"--target {target}: not a language code the identifier knows ({langid.LIBRARY}; "
                         "ISO 639-1, e.g. sw)")
    return target


def parse_alphas(text: str | None, iv: interventions.Intervention) -> list[float]:
    """The scale factors of the dose-response table; the SPEC's own factor is among them."""
    if text is None:
        return []
    if iv.kind != "scale":
        raise InputError(f"--alphas: only with --intervention scale=A (not {iv.spec})")
    alphas = []
    for item in split_list(text, "--alphas"):
        try:
            a = float(item)
        except ValueError:
            raise InputError(f"--alphas: '{item}' is not a number") from None
        if not math.isfinite(a) or a <= 0:
            raise InputError(f"--alphas: '{item}' is not a positive number")
        alphas.append(a)
    if not alphas:
        raise InputError("--alphas: no factor given")
    return sorted(set(alphas) | {iv.alpha})


SPACELESS_CHARS = 12  # English, Swahili, French, German average 5-7 characters per word


def first_words(line: str, words: int) -> str:
    """The start of a line as a prompt, never the whole line: its first `words` words (at most half of a short
    line's words), or, in a script without spaces between words (Chinese, Thai: more than
    SPACELESS_CHARS characters per space-separated chunk), its first 2 * `words` characters (at most half)."""
    parts = line.split()
    if len(line) > SPACELESS_CHARS * max(len(parts), 1):
        return line[:max(1, min(2 * words, len(line) // 2))]
    return " ".join(parts[:max(1, min(words, len(parts) // 2))])


def prompt_files(args: argparse.Namespace, langs: list[str]) -> list[Path]:
    if args.prompts == "val":
        return [val_file(args.dataset, l) for l in langs]
    if args.prompts == "mgsm":
        return [mgsm_file(args.dataset, l) for l in langs]
    return [Path(args.prompts.replace("{lang}", l)) for l in langs]


def read_prompts(args: argparse.Namespace, langs: list[str]) -> dict[str, list[str]]:
    """lang -> the first --limit prompts of that language."""
    if args.prompts not in ("val", "mgsm") and len(langs) > 1 and "{lang}" not in args.prompts:
        raise InputError(f"--prompts {args.prompts}: every language would read the same prompts; put {{lang}} "
                         "where the language goes")
    out = {}
    for lang, f in zip(langs, prompt_files(args, langs)):
        if args.prompts == "val":
            lines = [first_words(s, args.prompt_words) for s in val_texts(args.dataset, lang)]
        elif args.prompts == "mgsm":
            lines = [MGSM_PROMPT.format(question=q) for q in mgsm_texts(args.dataset, lang)]
        else:
            lines = read_lines(f, "--prompts file")
        out[lang] = lines[:args.limit or None]
    return out


def neuron_spec(args: argparse.Namespace, out: layout.Outputs, target: str) -> tuple[str, Path]:
    """(set name, file) of --neurons, else detection's exclusive_<target>."""
    if args.neurons is None:
        name, file = f"exclusive_{target}", out.neuron_set(f"exclusive_{target}")
        if not file.is_file():
            raise InputError(f"--neurons: no {file} (run detection.py first, or pass --neurons FILE)")
        return name, file
    name, file = interventions.neuron_spec(args.neurons)  # the one NAME=FILE rule of every stage
    if name == NONE or name.startswith("random-"):
        raise InputError(f"--neurons {args.neurons}: '{name}' cannot name a condition; use NAME=FILE")
    return name, file


def results_name(args: argparse.Namespace, set_name: str, iv: interventions.Intervention,
                 alphas: list[float], target: str) -> str:
    if args.name:
        name = safe_name(args.name)
        if not name:
            raise InputError(f"--name {args.name}: not usable as a file name")
        return name
    tail = ".alphas-" + "-".join(f"{a:g}" for a in alphas) if alphas else ""
    # the target is part of the name: one set and intervention (the source's set zeroed) serve every target
    return safe_name(f"{set_name}.{iv.safe_spec}{tail}.to-{target}")


# ---------------------------------------------------------------- the measurement

def rate_row(got: list[str], source: str, target: str) -> dict:
    """Counts, rates and 95% Wilson intervals of the identified languages of one source's continuations."""
    from langneurons.uncertainty import wilson
    n = len(got)
    t, s = got.count(target), got.count(source)
    return {"n": n, "target": t, "target_rate": t / n if n else None, "target_rate_ci": list(wilson(t, n)),
            "source": s, "source_rate": s / n if n else None, "source_rate_ci": list(wilson(s, n)),
            "identified": dict(Counter(got).most_common())}


def fluency(model, tok, texts: list[str], max_length: int, batch_size: int) -> dict:
    """Perplexity of the continuations on their own under the model as it is (call it without an
    intervention), and the share of repeated token n-grams in them."""
    nonempty = [t for t in texts if t.strip()]
    ppl = perplexity(model, tok, nonempty, max_length, batch_size, desc="fluency") if nonempty else \
        {"ppl": float("nan"), "tokens": 0}
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return {"ppl": json_safe(ppl["ppl"]), "ppl_tokens": ppl["tokens"],
            "repeated_ngrams": repeated_ngram_share(seqs, REPEAT_N), "ngram": REPEAT_N,
            "empty": len(texts) - len(nonempty)}


def measure(model, tok, args, prompts: dict[str, list[str]], target: str, nset: NeuronSet | None,
            iv: interventions.Intervention | None, means) -> tuple[dict, dict]:
    """({source: rate_row + fluency}, {source: [{prompt, text, lang}]}) of one condition: generation under
    the intervention (none when `nset` is None), identification and fluency without it."""
    import contextlib
    rows, gens = {}, {}
    for src, ps in prompts.items():
        ctx = interventions.intervened(model, nset, iv, means) if nset is not None else contextlib.nullcontext()
        with ctx:
            texts = generate_greedy(model, tok, ps, args.max_new_tokens, args.batch_size, args.max_length,
                                    stop=None, desc=f"generate {src}")
        got = langid.identify(texts)
        rows[src] = {**rate_row(got, src, target), "fluency": fluency(model, tok, texts, args.max_length,
                                                                      args.batch_size)}
        gens[src] = [{"prompt": p, "text": t, "lang": g} for p, t, g in zip(ps, texts, got)]
    return rows, gens


def conditions(set_name: str, nset: NeuronSet, k: int, seed: int) -> dict[str, NeuronSet]:
    """The set and its K random controls (random_like: the set's counts per layer and group, each its own
    draw: the seed is mixed with the set's and the control's names)."""
    return {set_name: nset, **{f"random-{i}": random_like(nset, seed, f"{set_name}/random-{i}")
                               for i in range(1, k + 1)}}


def table(model, tok, args, prompts, target, sets: dict[str, NeuronSet], iv, means, none: tuple) -> tuple[dict, dict]:
    results, gens = {NONE: none[0]}, {NONE: none[1]}
    for cname, s in sets.items():
        results[cname], gens[cname] = measure(model, tok, args, prompts, target, s, iv, means)
    return results, gens


def print_table(title: str, results: dict, target: str) -> None:
    print(f"\n{title}")
    print(f"{'condition':<22}{'source':>7}{'n':>5}{'-> ' + target:>10}{'95% CI':>16}{'source':>8}{'ppl':>9}"
          f"{'rep' + str(REPEAT_N):>7}")
    for cname, by_src in results.items():
        for src, r in by_src.items():
            lo, hi = r["target_rate_ci"]
            f = r["fluency"]
            ppl = f"{f['ppl']:.1f}" if f["ppl"] is not None else "-"
            rep = f"{f['repeated_ngrams']:.2f}" if f["repeated_ngrams"] is not None else "-"
            print(f"{cname:<22}{src:>7}{r['n']:>5}{r['target_rate']:>10.2f}{f'[{lo:.2f}, {hi:.2f}]':>16}"
                  f"{r['source_rate']:>8.2f}{ppl:>9}{rep:>7}")


def main() -> None:
    args = parse_args()
    target = check_target(args.target)
    # by default every language of the common default but the target: steering a language into itself is moot
    langs = parse_langs(args.langs) if args.langs is not None else \
        [l for l in parse_langs(DEFAULT_LANGS) if l != target]
    spec = args.intervention if args.intervention is not None else f"mean={target}"
    iv = interventions.parse_intervention(spec)
    alphas = parse_alphas(args.alphas, iv)
    seed_everything(args.seed)
    out = layout.outputs(args.out, args.model)
    set_name, set_file = neuron_spec(args, out, target)
    prompts = read_prompts(args, langs)
    mean_texts = {l: interventions.mean_texts(args.dataset, args.mean_corpus, l) for l in iv.mean_langs()}
    name = results_name(args, set_name, iv, alphas, target)
    out_file = out.steering_file(name)

    mean_files, mean_context = interventions.mean_inputs(args.dataset, args.mean_corpus, mean_texts)
    fp = reuse.fingerprint(args, __file__, "steering", ignore=NOT_RESULT_ARGS, models=[args.model],
                           files=[set_file, *prompt_files(args, langs), *mean_files],
                           context={**mean_context, "language_identifier": langid.library_version()})
    with reuse.unit(out_file, f"--out {args.out}", force=args.force, folder=False) as unit:
        if unit.up_to_date(fp):
            print_table(f"{name} ({args.model}): {iv.spec} on {set_name}", unit.stored()["results"], target)
            return
        record = model_record(args.model, check_model(args.model))  # seconds, before loading
        model, tok = load_model(args.model, args.device, args.dtype)
        geom = Geometry.from_config(model.config)
        nset, set_record = load_neuron_set(set_file, geom, model=record, allow_other_model=args.allow_other_model)
        means = interventions.stored_means(out, args.model, model, tok, args.dataset, args.mean_corpus,
                                           iv.mean_langs(), args.mean_max_length, args.batch_size,
                                           texts=mean_texts) if iv.mean_langs() else None
        sets = conditions(set_name, nset, args.random_controls, args.seed)
        none = measure(model, tok, args, prompts, target, None, None, None)
        results, gens = table(model, tok, args, prompts, target, sets, iv, means, none)
        strengths = {}
        for a in alphas:
            siv = interventions.Intervention("scale", alpha=a)
            strengths[siv.spec] = results if siv.spec == iv.spec else \
                table(model, tok, args, prompts, target, sets, siv, means, none)[0]
        meta = {**run_meta(args), "schema_version": SCHEMA_VERSION, "tag": out.tag, "name": name,
                "target": target, "langs": langs, "set": {**set_record, "name": set_name},
                "intervention": iv.record(), "alphas": alphas or None,
                "conditions": list(results), "random_controls": args.random_controls,
                "prompts": {"source": args.prompts, "words": args.prompt_words if args.prompts == "val" else None,
                            "n": {l: len(p) for l, p in prompts.items()}},
                "identifier": langid.library_version(), "repeated_ngram_n": REPEAT_N,
                "fingerprint": fp}
        obj = {"model": args.model, "meta": meta, "results": results, "generations": gens}
        if alphas:
            obj["strengths"] = strengths
        write_json(out_file, obj)
    print_table(f"{name} ({args.model}): {iv.spec} on {set_name}", results, target)
    print(f"Wrote {out_file}")


if __name__ == "__main__":
    run(main)
