"""Stage 1: find the language-related neurons of a model, and sort them into shared and exclusive.

For every sentence of every language, every neuron's importance (docs/method.md section 2) is computed
from one ordinary forward pass; the top --ratio of each layer and group are 'activated' by that
sentence. Firing counts per language are stored, and the sets of docs/method.md section 4 are derived
from them at --threshold. A later run that differs only in --threshold re-derives the sets from the
stored counts without loading the model. Each text's own selection is kept too (per_text.safetensors):
--resamples measures from it how stable every set is under a redraw of the texts (stability.json), again
without the model (langneurons/stability.py).

    python detection.py --model gemma-3-270m --langs en,zh,th,sw,fr,de --ratio 0.01
    accelerate launch detection.py ...   # sentences split over processes, counts summed
"""
import abc
import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from langneurons import authors, cli, files, langid, moe, reuse, runinfo, stability
from langneurons.data import batches_by_length, corpus_file, detection_corpus, external_corpus, pad_batch, pad_id
from langneurons.importance import ImportanceProbe
from langneurons.model import GROUPS, Geometry, check_model, load_model, model_record
from langneurons.layout import (EXPERTS, FIRING, META, PER_TEXT, SCHEMA_VERSION, STABILITY, STABILITY_FREQUENCIES,
                                STATS, model_tag, outputs)
from langneurons.neurons import derived_sets, language_sets, stats, write_neuron_file

FFN_GROUPS = ("fwd_up", "fwd_down")
# firing.safetensors of an MoE model: real tokens routed to each (layer, expert) [langs, layers, E], tokens [langs]
EXPERT_ROUTED, EXPERT_TOKENS = "experts.routed", "experts.tokens"


def parse_args() -> argparse.Namespace:
    p = cli.common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=["importance", "activation", "authors"], default="importance",
                   help="importance: the paper's parallel neuron detection; activation: LAPE (FFN only); "
                        "authors: what the authors' released code computes (docs/method.md section 10: their score "
                        "proxies, swapped per-text top counts, first --max-length tokens, their MGSM prompt); "
                        "its attn_k/attn_v files stay in their query-head index space")
    p.add_argument("--ratio", type=cli.float_in(0, 1, lo_open=True), default=0.01,
                   help="importance: fraction of each layer's group activated per sentence; "
                        "activation: fraction of FFN neurons kept by lowest entropy")
    p.add_argument("--threshold", type=cli.float_in(0, 1, lo_open=True), default=1.0,
                   help="a neuron is related to a language when firing count / sentences >= threshold")
    p.add_argument("--sample-size", type=cli.int_at_least(0), default=0, help="sentences per language drawn at random with --seed (0 = all)")
    p.add_argument("--corpus", default="detect", metavar="detect|mgsm|PATH|ID",
                   help="detect/<lang>.txt, the MGSM questions of test/mgsm/ (the authors' own runs), or a text/json/"
                        "jsonl/parquet/arrow file, folder or hub dataset id with {lang} for the language (column "
                        "'text', split 'train')")
    p.add_argument("--mgsm-format", choices=["auto", "question", "authors"], default="auto",
                   help="--corpus mgsm texts: the question alone, or the authors' 'Question: <q>\\nAnswer: <gold "
                        "answer as written>'; auto = authors with --method authors, question otherwise")
    p.add_argument("--authors-attention", choices=["causal", "bidirectional"], default="causal",
                   help="--method authors: causal attention, or bidirectional (every token attends to every "
                        "non-padding token in every layer), which is what their Llama/Qwen2 runs did as shipped")
    p.add_argument("--authors-undo", default="", metavar="PIECE,...",
                   help="--method authors: replace these of its differences by the paper's definition (as "
                        "--method importance computes it), for ablations. " + authors.UNDO_HELP)
    p.add_argument("--groups", type=cli.choice_list(GROUPS), default=",".join(GROUPS),
                   help="neuron groups to score (importance, authors)")
    p.add_argument("--qk-score", choices=["channel", "row"], default="channel",
                   help="query/key importance of the channel attention sees (after rotary and q/k norms; the "
                        "paper), or of the q_proj/k_proj row that deactivation zeroes (exact; not with q/k norms)")
    p.add_argument("--batch-size", type=cli.int_at_least(1), default=8, help="sentences per forward pass")
    p.add_argument("--max-length", type=cli.int_at_least(2), default=256,
                   help="tokens per sentence (longer ones are cut)")
    p.add_argument("--drop-other-language", action="store_true",
                   help="leave out the corpus texts that language identification assigns to another language "
                        "(they are counted in meta.json and named on stderr either way)")
    add_stability_args(p)
    return p.parse_args()


def add_stability_args(p: argparse.ArgumentParser) -> None:
    """The set-stability flags (docs/stability.md)."""
    p.add_argument("--resamples", type=cli.int_at_least(0), default=200,
                   help="split halves and bootstrap resamples of each language's texts, drawn with --seed, for "
                        "stability.json (set stability from the stored per-text selections, no model run); 0 = none")
    p.add_argument("--stable-core", type=cli.float_in(0, 1, lo_open=True), default=None, metavar="F",
                   help="also write core_<set>.json beside each set: the neurons selected in at least a fraction F "
                        "of the bootstrap resamples (needs --resamples > 0)")


def main() -> None:
    args = parse_args()
    groups, langs, undo, mgsm_format = validate(args)
    corpora = read_corpora(args, langs, mgsm_format)
    corpora, language_record = language_check(args, corpora)
    check_stability_corpora(args, corpora)
    out_dir = outputs(args.out, args.model).neurons
    # a second run on the same --out waits for this one, then reuses its outputs
    with reuse.unit(out_dir, f"--out {args.out}", force=args.force, record=out_dir / META,
                    enabled=reuse.main_process()) as unit:
        fp = fingerprint(args, langs, corpora)
        runinfo.seed_everything(args.seed)

        # ---- firing counts: from an earlier run that differs only in --threshold, else from the model
        earlier = earlier_counts(args, unit, fp)
        if earlier.up_to_date:
            return
        # config, tokenizer, weight headers: seconds, before the model run; every neuron file records the config
        config = check_model(args.model)
        if Geometry.from_config(config).moe is not None and args.method == "authors":
            raise cli.InputError(f"--method authors: the authors' scores are defined for dense FFNs only; "
                                 f"{config.model_type} is a mixture-of-experts model (use importance or activation)")
        record = model_record(args.model, config)
        counts = earlier.counts or count_firing(args, corpora, groups)
        if counts is None:  # not the main process of a multi-process run
            return
        firing, sentences, geom, config = counts.firing, counts.sentences, counts.geom, counts.config

        # ---- sets (docs/method.md section 4) and statistics, from the per-text selections of all texts
        related = stability.full_data_related(counts.per_text, geom, args.threshold, args.ratio)
        sets = language_sets(related, geom, args.seed)
        resampled = measure_stability(args, counts.per_text, geom, related, sets)
        summary = stats(sets, langs, geom)
        meta = run_record(args, langs, groups, corpora, mgsm_format, geom, config, record, fp)
        meta["corpus"]["language_check"] = language_record
        kv_space = "kv_rows"
        if args.method == "authors":
            meta["authors"] = authors_record(args, undo, geom)
            kv_space = summary["kv_index_space"] = meta["authors"]["kv_index_space"]

        if resampled is not None:
            meta["stability"] = {"resamples": args.resamples, "stable_core": args.stable_core,
                                 "files": [STABILITY, STABILITY_FREQUENCIES]}
        if counts.experts is not None:
            meta["experts"] = EXPERTS
        write_outputs(out_dir, args, langs, firing, sentences, geom, sets, summary, meta, record, kv_space,
                      counts.per_text, resampled, counts.experts)
    print_summary(args, langs, geom, summary, out_dir)


def validate(args) -> tuple[tuple[str, ...], list[str], tuple[str, ...], str]:
    """Flags that only make sense together, checked before anything is read: groups, languages, the
    authors' undone pieces and the MGSM prompt format the corpus uses."""
    groups = tuple(cli.split_list(args.groups))
    langs = cli.parse_langs(args.langs)
    if args.corpus not in ("detect", "mgsm") and len(langs) > 1 and "{lang}" not in args.corpus:
        raise cli.InputError(f"--corpus {args.corpus}: every language would read the same text; put {{lang}} where "
                             "the language goes (e.g. corpus/{lang}.jsonl)")
    if args.qk_score != "channel" and args.method != "importance":
        raise cli.InputError(f"--qk-score {args.qk_score}: only with --method importance")
    undo = authors.parse_undo(args.authors_undo)
    if args.method != "authors" and (undo or args.authors_attention != "causal"):
        raise cli.InputError("--authors-undo/--authors-attention: only with --method authors")
    if "prompt" in undo and args.corpus != "mgsm":
        raise cli.InputError("--authors-undo prompt: the prompt format exists only with --corpus mgsm")
    if "prompt" in undo and args.mgsm_format == "authors":
        raise cli.InputError("--authors-undo prompt contradicts --mgsm-format authors")
    if args.stable_core is not None and args.resamples == 0:
        raise cli.InputError(f"--stable-core {args.stable_core}: needs --resamples > 0 (the core is counted over "
                             "the bootstrap resamples)")
    mgsm_format = args.mgsm_format
    if mgsm_format == "auto":
        mgsm_format = "authors" if args.method == "authors" and "prompt" not in undo else "question"
    return groups, langs, undo, mgsm_format


def builtin_corpus(args) -> bool:
    """detect/ or mgsm/ of the dataset layout; else a file, folder or dataset id outside it."""
    return args.corpus in ("detect", "mgsm")


def read_corpora(args, langs: list[str], mgsm_format: str) -> dict[str, list[str]]:
    """The detection sentences of every language (--sample-size of them drawn with the seed)."""
    if builtin_corpus(args):
        return {l: detection_corpus(args.dataset, l, args.sample_size, args.seed, args.corpus, mgsm_format)
                for l in langs}
    return {l: external_corpus(args.corpus, l, args.sample_size, args.seed) for l in langs}


def fingerprint(args, langs: list[str], corpora: dict[str, list[str]]) -> dict:
    """What the outputs are computed from; a corpus outside the dataset layout may be a folder or a dataset id,
    so there its text is what counts. --drop-other-language enters it only when given (with the identifier's
    version, which decides what is dropped), so that runs without it keep their fingerprint."""
    ignore, context = (), {}
    if args.drop_other_language:
        context["language_identifier"] = langid.library_version()
    else:
        ignore = ("drop_other_language",)
    if builtin_corpus(args):
        return reuse.fingerprint(args, __file__, "detection", models=[args.model], ignore=ignore, context=context or None,
                                 files=[corpus_file(args.dataset, l, args.corpus) for l in langs])
    return reuse.fingerprint(args, __file__, "detection", models=[args.model], ignore=ignore,
                             context={**context, "corpus_sha256": {l: reuse.text_digest(corpora[l]) for l in langs}})


def language_check(args, corpora: dict[str, list[str]]) -> tuple[dict[str, list[str]], dict]:
    """Per language, the share of its texts that language identification assigns to another language: a
    warning on stderr, a record for meta.json, and with --drop-other-language the corpora without them
    (a language left with no text is an error)."""
    report = langid.corpus_check(corpora)
    main = reuse.main_process()  # every process of a launch checks its corpora; the first one says so
    if main:
        langid.warn_other_language(report, "detection corpus", args.drop_other_language)
    record = {"identifier": langid.library_version(), "dropped": bool(args.drop_other_language),
              "langs": {l: {k: v for k, v in r.items() if k != "indices"} for l, r in report.items()}}
    if not args.drop_other_language:
        return corpora, record
    kept = {}
    for lang, texts in corpora.items():
        gone = set(report[lang]["indices"])
        kept[lang] = [t for i, t in enumerate(texts) if i not in gone]
        if not kept[lang]:
            raise cli.InputError(f"--drop-other-language: no text of {lang} is identified as {lang} "
                                 f"({len(texts)} dropped); check the corpus")
        if gone and main:
            print(f"--drop-other-language: {lang}: dropped {len(gone)} of {len(texts)} texts, {len(kept[lang])} left")
    return kept, record


@dataclass
class FiringCounts:
    """Per group {group: int64 [langs, layers, n]} how often each neuron fired, the sentences (activation:
    tokens) counted per language [langs], the model's geometry and config, and what each text selected (the
    counts are its sum over the texts)."""
    firing: dict[str, torch.Tensor]
    sentences: torch.Tensor
    geom: Geometry
    config: dict
    per_text: stability.PerText
    experts: tuple[torch.Tensor, torch.Tensor] | None = None  # MoE: routed tokens [langs, layers, E], tokens [langs]


@dataclass
class Earlier:
    """What an earlier run in the output folder leaves to this one: everything (up_to_date), its firing
    counts (only --threshold, --resamples or --stable-core changed), or nothing (counts None: the model must run)."""
    up_to_date: bool = False
    counts: FiringCounts | None = None


# flags whose outputs come from the stored per-text selections alone
REDERIVED = ("threshold", "resamples", "stable_core")


def earlier_counts(args, unit: reuse.Unit, fp: dict) -> Earlier:
    """Whether the stored outputs were computed from exactly this, else the stored firing counts and per-text
    selections when only flags of REDERIVED changed (no model run)."""
    out_dir, stored = unit.path, unit.stored()
    if stored is None:
        return Earlier()
    diffs = reuse.changes(stored.get("fingerprint"), fp)
    if not diffs:
        stored_counts(out_dir, stored)  # a damaged firing file is an error, not a silent reuse
        print(reuse.reuse_line(stored["fingerprint"], fp, out_dir))
        return Earlier(up_to_date=True)
    if not reuse.changes(stored.get("fingerprint"), fp, ignore_args=REDERIVED):
        print(f"Re-deriving the sets at --threshold {args.threshold} from the stored firing counts in "
              f"{out_dir / FIRING} and {PER_TEXT} (only --threshold, --resamples or --stable-core changed; no "
              "model run)")
        return Earlier(counts=stored_counts(out_dir, stored))
    print(reuse.recompute_line(diffs, out_dir))
    return Earlier()


def run_record(args, langs, groups, corpora, mgsm_format, geom: Geometry, config: dict, record: dict,
               fp: dict) -> dict:
    """meta.json: how the counts were made, the model's geometry and config, the run and its fingerprint."""
    return {"schema_version": SCHEMA_VERSION, "model": args.model, "tag": model_tag(args.model),
            "config_sha256": record["config_sha256"],
            "method": args.method, "ratio": args.ratio, "threshold": args.threshold, "langs": langs,
            "groups": list(groups), "qk_score": args.qk_score,
            "corpus": {"name": args.corpus, "sentences": {l: len(corpora[l]) for l in langs},
                       **({"mgsm_format": mgsm_format} if args.corpus == "mgsm" else {})},
            "geometry": geom.record(), "config": config,
            "unit": "tokens" if args.method == "activation" else "sentences",
            "run": runinfo.run_meta(args), "fingerprint": fp}


def authors_record(args, undo: tuple[str, ...], geom: Geometry) -> dict:
    """--method authors: which definition each group used, and the per-text top counts."""
    defs = authors.definitions(undo)
    return {"definitions": "the authors' released detect.py (docs/method.md section 10), not the paper's formulas, "
                           "except for the pieces undone",
            "undo": list(undo), "attention": args.authors_attention, "group_definitions": defs,
            "top_counts": authors.top_counts(geom, args.ratio, authors.score_sizes(geom, defs), "top_counts" not in undo),
            "kv_index_space": authors.kv_index_space(defs)}


def write_outputs(out_dir: Path, args, langs, firing, sentences, geom, sets, summary, meta, record: dict,
                  kv_space, per_text: stability.PerText, resampled: tuple[dict, dict] | None,
                  experts: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Everything into a fresh folder, then swapped in whole: a reader never sees a mix of two runs. Every neuron
    file records the model (model.model_record), so that a stage given another model refuses it."""
    with files.atomic_dir(out_dir) as tmp:
        tensors = {f"{g}.{layer}": firing[g][:, layer].to(torch.int32).contiguous()
                   for g in firing for layer in range(geom.num_layers)}
        tensors["sentences"] = sentences.to(torch.int32)
        if experts is not None:  # MoE: what experts_record is derived from, kept for a re-derivation
            tensors[EXPERT_ROUTED] = experts[0].to(torch.int64).contiguous()
            tensors[EXPERT_TOKENS] = experts[1].to(torch.int64).contiguous()
            files.write_json(tmp / EXPERTS, experts_record(langs, geom, *experts, record))
        # one metadata key: safetensors writes several in hash order, and files must be reproducible
        save_file(tensors, tmp / FIRING, metadata={"langneurons": json.dumps(
            {"langs": langs, "method": args.method, "ratio": args.ratio, "unit": meta["unit"],
             **({"kv_index_space": kv_space} if args.method == "authors" else {})}, sort_keys=True)})
        provenance = {"model": record, "method": args.method, "ratio": args.ratio,
                      "threshold": args.threshold, "langs": langs}
        for name, s in sets.items():
            write_neuron_file(tmp / f"{name}.json", s, {**provenance, "set": name}, kv_space)
        stability.save_per_text(tmp / PER_TEXT, per_text)
        if resampled is not None:
            write_stability(tmp, args, resampled, provenance, kv_space)
        files.write_json(tmp / STATS, summary)
        files.write_json(tmp / META, meta)


def experts_record(langs: list[str], geom: Geometry, routed: torch.Tensor, tokens: torch.Tensor,
                   record: dict) -> dict:
    """experts.json of an MoE model (docs/outputs.md): per language the share of its real tokens routed to each
    (layer, expert), and the experts related to it (share >= the uniform share top_k / E) with the shared,
    exclusive and unique experts by the set algebra of docs/method.md section 4."""
    shares = moe.expert_shares(routed, tokens)
    return {"model": record, "langs": langs, "num_layers": geom.num_layers, "num_experts": geom.num_experts,
            "top_k": geom.top_k, "uniform_share": geom.top_k / geom.num_experts,
            "rule": "related: share of the language's tokens routed to the expert >= top_k / num_experts",
            "tokens": {l: int(tokens[i]) for i, l in enumerate(langs)},
            "routed": {l: routed[i].tolist() for i, l in enumerate(langs)},
            "share": {l: [[round(float(x), 6) for x in row] for row in shares[i]] for i, l in enumerate(langs)},
            **moe.expert_sets(shares, langs, geom.top_k)}


def check_stability_corpora(args, corpora: dict[str, list[str]]) -> None:
    """Before the model runs: split halves need two texts per language."""
    if args.resamples and (few := {l: len(t) for l, t in corpora.items() if len(t) < 2}):
        raise cli.InputError(f"--resamples {args.resamples}: split halves need at least 2 texts per language "
                             f"({', '.join(f'{l}: {n}' for l, n in few.items())}); --resamples 0 turns them off")


def measure_stability(args, per_text: stability.PerText, geom: Geometry, related: dict,
                      sets: dict) -> tuple[dict, dict] | None:
    """stability.json's content and the selection frequencies (None with --resamples 0): every set but the
    random controls, over --resamples split halves and bootstrap resamples of each language's texts."""
    if args.resamples == 0:
        return None
    import time
    start = time.perf_counter()
    full = {name: sets[name] for name in derived_sets(related)}
    per_set, freq = stability.measure(per_text, geom, args.threshold, args.ratio, args.resamples, args.seed, full)
    print(f"Set stability over {args.resamples} split halves and bootstrap resamples: "
          f"{time.perf_counter() - start:.1f} s")
    texts = dict(zip(per_text.langs, per_text.texts()))
    doc = {"resamples": args.resamples, "seed": args.seed, "level": stability.LEVEL, "method": args.method,
           "threshold": args.threshold, "ratio": args.ratio, "texts": texts,
           "half_texts": {l: n // 2 for l, n in texts.items()}, "empty_jaccard": stability.EMPTY_JACCARD,
           "stable_core": args.stable_core, "frequencies": STABILITY_FREQUENCIES, "sets": per_set}
    return doc, freq


def write_stability(folder: Path, args, resampled: tuple[dict, dict], provenance: dict, kv_space) -> None:
    """stability.json, stability.safetensors and, with --stable-core F, core_<set>.json (ordinary neuron files)."""
    doc, freq = resampled
    stability.save_frequencies(folder / STABILITY_FREQUENCIES, freq, args.resamples)
    if args.stable_core is not None:
        for name in doc["sets"]:
            core = stability.stable_core(freq[name], args.stable_core, args.resamples)
            doc["sets"][name]["core_size"] = int(sum(int(core[g].sum()) for g in core))
            write_neuron_file(folder / f"core_{name}.json", core,
                              {**provenance, "set": f"core_{name}", "core_of": name,
                               "stable_core": args.stable_core, "resamples": args.resamples,
                               "what": f"the neurons in {name} in at least a fraction {args.stable_core} of "
                                       f"{args.resamples} bootstrap resamples of the texts"}, kv_space)
    files.write_json(folder / STABILITY, doc)


def print_summary(args, langs: list[str], geom: Geometry, summary: dict, out_dir: Path) -> None:
    print(f"\nLanguage neurons of {args.model} ({args.method}, ratio {args.ratio}, threshold {args.threshold}),"
          f" {geom.total_neurons:,} neurons in all:")
    print(f"{'set':<22}{'size':>9}{'% of all':>10}   QK / VO / FFN")
    for name in ["shared", "related_all"] + [f"{k}_{l}" for k in ("exclusive", "unique") for l in langs]:
        st = summary["sets"][name]
        c = st["components"]
        print(f"{name:<22}{st['size']:>9}{100 * st['fraction']:>9.3f}%   {c['QK']} / {c['VO']} / {c['FFN']}")
    print(f"shared ratio |shared| / mean |exclusive|: {summary['shared_ratio']}")
    print(f"\nNeuron files and stats: {out_dir}/ ({STATS}, {FIRING}, shared.json, exclusive_<lang>.json, ...)")


def stored_counts(out_dir: Path, meta: dict) -> FiringCounts:
    """The counts stored by an earlier run (its meta.json is `meta`)."""
    firing_file = out_dir / FIRING
    try:
        t = load_file(firing_file)
        geom = Geometry(**meta["geometry"])
        firing = {g: torch.stack([t[f"{g}.{layer}"] for layer in range(geom.num_layers)], 1).long()
                  for g in GROUPS if f"{g}.0" in t}
        per_text = stability.load_per_text(out_dir / PER_TEXT)
        experts = (t[EXPERT_ROUTED].long(), t[EXPERT_TOKENS].long()) if EXPERT_ROUTED in t else None
        return FiringCounts(firing, t["sentences"].long(), geom, meta["config"], per_text, experts)
    except (OSError, SafetensorError, KeyError, TypeError, RuntimeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise cli.InputError(f"stored output {firing_file} (or its meta.json) is unreadable ({why}); "
                             "--force recomputes it") from None


class DetectionMethod(abc.ABC):
    """What a --method counts, behind one interface: `probe` (a context manager over the model), `sizes`
    (neurons per counted group), `encode` (a text's token ids) and `selected` (what each text of a batch
    selects, stability.PerText's keys: per group the top indices [batch, layers, k], or for activation the
    active-token counts [batch, layers, n] and the token counts [batch])."""
    probe: Any
    sizes: dict[str, int]

    routed: torch.Tensor | None = None  # MoE: the last batch's real tokens per (layer, expert) [batch, layers, E]

    def encode(self, tok, text: str, max_length: int) -> list[int]:
        return tok(text, truncation=True, max_length=max_length)["input_ids"]

    @abc.abstractmethod
    def selected(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        ...


class TopImportance(DetectionMethod):
    """--method importance: per sentence, the top --ratio of each layer's group by importance fires."""

    def __init__(self, args, model, geom: Geometry, groups: tuple[str, ...]):
        self.sizes = {g: geom.group_size(g) for g in groups}
        self.top_k = {g: max(1, int(args.ratio * geom.group_size(g))) for g in groups}
        # the probe is told k: query/key channels that cannot enter a top list are not scored exactly
        # (the lists, and so every file, are those of exhaustive scoring; docs/detection.md, pruned top-k)
        self.probe = ImportanceProbe(model, groups=groups, method="importance", qk_score=args.qk_score,
                                     top_k=self.top_k)

    def scores(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.probe(ids, mask)
        self.routed = out.get("experts")
        return out

    def selected(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = self.scores(ids, mask)
        # sorted: the order within a top list means nothing, and sorted lists make the file canonical
        return {g: scores[g].topk(self.top_k[g], dim=-1).indices.sort(-1).values.cpu() for g in self.sizes}


class AuthorsTop(TopImportance):
    """--method authors: their score proxies (or the paper's, for the pieces undone), their swapped per-text
    top counts, and their cut: the tokenizer's defaults, then the first --max-length ids."""

    def __init__(self, args, model, geom: Geometry, groups: tuple[str, ...]):
        undo = authors.parse_undo(args.authors_undo)
        defs = authors.definitions(undo)
        sizes = authors.score_sizes(geom, defs)
        self.sizes = {g: sizes[g] for g in groups}
        self.top_k = authors.top_counts(geom, args.ratio, sizes, swapped="top_counts" not in undo)
        self.probe = authors.AuthorsProbe(model, authors_groups=tuple(g for g in groups if defs[g] == "authors"),
                                          paper_groups=tuple(g for g in groups if defs[g] == "paper"),
                                          attention=args.authors_attention)

    def encode(self, tok, text: str, max_length: int) -> list[int]:
        return tok(text)["input_ids"][:max_length]

    def scores(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        theirs, paper = self.probe(ids, mask)
        return {**theirs, **paper}  # each group has one definition


class LapeActivation(DetectionMethod):
    """--method activation (LAPE): per FFN channel, the tokens on which its activation is positive; both FFN
    groups get the same counts, and the unit counted is the token."""

    def __init__(self, args, model, geom: Geometry, groups: tuple[str, ...]):
        self.sizes = {g: geom.group_size(g) for g in FFN_GROUPS}
        self.probe = ImportanceProbe(model, groups=groups, method="activation", qk_score=args.qk_score)

    def selected(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = self.probe(ids, mask)
        self.routed = scores.get("experts")
        return {"active": scores["active"].long().cpu(), "tokens": scores["tokens"].long().cpu()}


METHODS = {"importance": TopImportance, "authors": AuthorsTop, "activation": LapeActivation}


def detection_model(args: argparse.Namespace, state) -> tuple[Any, Any]:
    """The model and tokenizer, on this process's device."""
    if state.num_processes > 1:  # data parallel: one model per process, on that process's device
        if state.is_main_process:
            print(f"Detection split over {state.num_processes} processes")
        device = args.device if args.device == "cpu" else str(state.device)
        return load_model(args.model, device, args.dtype)
    # one process: --device auto spreads a model too large for one GPU over all of them
    return load_model(args.model, args.device, args.dtype, device_map_auto=True)


def count_firing(args, corpora: dict[str, list[str]], groups: tuple[str, ...]) -> FiringCounts | None:
    """How often each neuron fired per language (docs/method.md section 3), with the --method's probe;
    None on processes other than the main one."""
    from accelerate import PartialState
    # without cpu=True, processes launched on CPU (gloo) each believe they are alone and all do all the work
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    model, tok = detection_model(args, state)
    geom = Geometry.from_config(model.config)
    device = model.get_input_embeddings().weight.device
    method = METHODS[args.method](args, model, geom, groups)
    keys = list(method.sizes) if args.method != "activation" else ["active", "tokens"]
    mine_per_lang = []  # per language {key: this process's per-text tensors, in its text order}
    # MoE: real tokens routed to each (layer, expert) and real tokens, per language, summed over this process's texts
    routed = torch.zeros(len(corpora), geom.num_layers, geom.num_experts, dtype=torch.int64)
    tokens = torch.zeros(len(corpora), dtype=torch.int64)
    with method.probe:
        for li, lang in enumerate(corpora):
            mine = corpora[lang][state.process_index::state.num_processes]
            seqs = [method.encode(tok, s, args.max_length) for s in mine]
            rows: dict[str, list] = {k: [None] * len(seqs) for k in keys}
            for idx in tqdm(batches_by_length([len(s) for s in seqs], args.batch_size), desc=f"detect {lang}",
                            disable=not state.is_main_process):
                ids, mask = pad_batch([seqs[i] for i in idx], pad_id(tok), device)
                for key, t in method.selected(ids, mask).items():
                    for i, row in zip(idx, t):
                        rows[key][i] = row
                if method.routed is not None:
                    routed[li] += method.routed.sum(0).round().long()
                    tokens[li] += int(mask.sum())
            mine_per_lang.append({k: torch.stack(v) if v else torch.zeros(0, dtype=torch.int64)
                                  for k, v in rows.items()})
    if state.num_processes > 1:
        mine_per_lang = gather_per_text(mine_per_lang, state)
        if geom.moe is not None:
            from accelerate.utils import gather_object
            every = gather_object([(routed, tokens)])
            routed, tokens = sum(r for r, _ in every), sum(t for _, t in every)
        # gloo aborts a process that exits with its group alive ("terminate called without an active exception")
        state.destroy_process_group()
        if not state.is_main_process:
            return None
    per_text = stability.PerText(args.method, list(corpora), geom.num_layers, dict(method.sizes),
                                 {k: [d[k] for d in mine_per_lang] for k in keys})
    # the firing counts are the per-text selections summed over all texts (stability.weighted_counts)
    firing, seen = stability.weighted_counts(per_text, stability.full_weights(per_text))
    return FiringCounts({g: c[0] for g, c in firing.items()}, seen[0], geom, model.config.to_dict(), per_text,
                        (routed, tokens) if int(tokens.sum()) > 0 else None)


def gather_per_text(mine: list[dict[str, torch.Tensor]], state) -> list[dict[str, torch.Tensor]]:
    """Every process's per-text tensors, back in corpus order (process p held texts p, p + P, p + 2P, ...)."""
    from accelerate.utils import gather_object
    every = gather_object([mine])  # one entry per process
    P = len(every)
    out = []
    for li in range(len(mine)):
        merged = {}
        for key in mine[li]:
            parts = [every[p][li][key] for p in range(P)]
            n = sum(len(t) for t in parts)
            shape = next((t.shape[1:] for t in parts if len(t)), ())
            full = torch.zeros((n, *shape), dtype=torch.int64)
            for p, t in enumerate(parts):
                if len(t):
                    full[p::P] = t
            merged[key] = full
        out.append(merged)
    return out


if __name__ == "__main__":
    cli.run(main)
