"""Stage 4, evaluation (docs/method.md section 7): MGSM accuracy, MMMLU accuracy and perplexity per language of
any model: the base model, a deactivated variant, a trained model, a hub id or a .gguf file.

    python evaluate.py --model gemma-3-270m --tasks ppl,mgsm,mmmlu --limit 0

Writes <out>/<tag>/eval/<name>.json, where <tag> is the base model's tag (variants and trained models
carry it in their langneurons.json) and <name> the model's own name (--name).

MGSM: zero-shot, no chat template, greedy decoding of the prompt "Question: <question>\\nAnswer:";
generation stops at EOS, at "Question:", at a blank line or after --max-new-tokens; the score is whether the
last number of the answer equals the gold number. MMMLU: "<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:";
the prediction is the letter " A".." D" with the highest log-likelihood as the next token. Perplexity:
every line of <dataset>/val/<lang>.txt scored on its own (docs/method.md section 7).

With --neurons [NAME=]FILE every task runs under --intervention SPEC (default zero; docs/interventions.md) on
that set, through hooks on the loaded model (no model is written); the results file records the set and the
intervention, and its default name says both: <model>+<set>@<intervention>.

Results of earlier runs on the same model files are kept: evaluating one task at a time fills one file,
and a task already evaluated with the same arguments is skipped (--force recomputes)."""
from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from langneurons import interventions, layout, reuse
from langneurons.cli import InputError, choice_list, common_parser, int_at_least, parse_langs, run, split_list
from langneurons.files import safe_name, write_json
from langneurons.layout import SCHEMA_VERSION
from langneurons.model import Geometry, check_model, load_model, model_record
from langneurons.neurons import NeuronSet, load_neuron_set
from langneurons.runinfo import run_meta, seed_everything
from langneurons.tasks import TASKS, prompts

# arguments that do not change a task's numbers (so they do not stop reuse)
NOT_RESULT_ARGS = {"tasks", "force", "name", "out", "batch_size"}
# arguments of an evaluation under an intervention: a base evaluation ignores them (its fingerprint stays as it is)
INTERVENTION_ARGS = {"neurons", "allow_other_model", "intervention", "mean_corpus", "mean_max_length"}
MEAN_ARGS = {"mean_corpus", "mean_max_length"}  # only mean=L and shift=A:B read the means
# arguments that change one task's numbers only (MGSM's answer length): the other tasks ignore them
TASK_ONLY_ARGS = set().union(*(t.own_args for t in TASKS.values()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=choice_list(tuple(TASKS)), default=",".join(TASKS),
                   help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--limit", type=int_at_least(0), default=0, help="first N items per language and task (0 = all)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="sequences per forward pass / generate call")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=256,
                   help="MGSM: generated tokens per answer at most")
    p.add_argument("--max-length", type=int_at_least(8), default=512,
                   help="tokens per text (perplexity: truncated at the end; MMMLU/MGSM prompts: cut at the start)")
    p.add_argument("--name", default=None, help="model name for the results file <out>/<tag>/eval/<name>.json "
                   "(when not given: the basename of --model, or the embedded model's name; with --neurons "
                   "<model>+<set>@<intervention>)")
    p.add_argument("--neurons", default=None, metavar="[NAME=]FILE",
                   help="evaluate under --intervention on this neuron set (named after the file stem, or NAME), "
                        "on the loaded model; no model is written")
    p.add_argument("--allow-other-model", action="store_true",
                   help="use a neuron file whose model record names another model than --model (refused "
                        "otherwise: its indices may fit and still mean nothing here); the results record it")
    interventions.add_arguments(p, default=None)
    return p.parse_args(argv)


def ignored_args(task: str, iv: interventions.Intervention | None = None) -> set[str]:
    """The arguments that cannot change `task`'s numbers (under intervention `iv`, None: the base model)."""
    unused = INTERVENTION_ARGS if iv is None else MEAN_ARGS if not iv.mean_langs() else set()
    return NOT_RESULT_ARGS | (TASK_ONLY_ARGS - TASKS[task].own_args) | unused


def result_args(args: argparse.Namespace, task: str, iv: interventions.Intervention | None = None) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ignored_args(task, iv)}


def mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


# ---------------------------------------------------------------- inputs and what is already there

def results_name(args: argparse.Namespace, set_name: str | None = None,
                 iv: interventions.Intervention | None = None) -> str:
    """<name> of eval/<name>.json: --name made file-safe, else the model's own name, and under an intervention
    <model>+<set>@<intervention> (e.g. gemma-3-270m+shared@scale-4)."""
    if args.name:
        name = safe_name(args.name)
    elif iv is not None:
        name = f"{layout.model_name(args.model)}+{safe_name(set_name, 'set')}@{iv.safe_spec}"
    else:
        name = layout.model_name(args.model)
    if not name:
        raise InputError(f"--name {args.name}: not usable as a file name")
    return name


def intervention_args(args: argparse.Namespace) -> tuple[interventions.Intervention | None, tuple[str, Path] | None]:
    """The intervention and (set name, neuron file) of --neurons/--intervention; (None, None) for the base model."""
    if args.neurons is None:
        if args.intervention is not None:
            raise InputError(f"--intervention {args.intervention}: needs --neurons FILE (the set it acts on)")
        if args.allow_other_model:
            raise InputError("--allow-other-model: only with --neurons")
        return None, None
    iv = interventions.parse_intervention(args.intervention or "zero")
    return iv, interventions.neuron_spec(args.neurons)


@dataclass
class Under:
    """What an evaluation under an intervention reads before any model run: the set (checked against the model),
    the means' texts, the extra inputs of the fingerprint, and the results' record of set and intervention."""
    nset: NeuronSet | None = None
    mean_texts: dict[str, list[str]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    context: dict = field(default_factory=dict)
    record: dict | None = None


def read_intervention(args: argparse.Namespace, out: layout.Outputs, iv: interventions.Intervention,
                      nspec: tuple[str, Path]) -> Under:
    """The neuron file checked against the model as deactivation checks it (model record, geometry;
    --allow-other-model) and the means' texts read: bad input fails here, before any model run."""
    config = check_model(args.model)
    nset, nfile = load_neuron_set(nspec[1], Geometry.from_config(config), model=model_record(args.model, config),
                                  allow_other_model=args.allow_other_model)
    nfile["name"] = nspec[0]
    langs = iv.mean_langs()
    texts = {l: interventions.mean_texts(args.dataset, args.mean_corpus, l) for l in langs}
    files, context = interventions.mean_inputs(args.dataset, args.mean_corpus, texts)
    means = {"mean_corpus": args.mean_corpus, "mean_max_length": args.mean_max_length,
             "means": {l: str(interventions.means_dir(out, args.model, args.mean_corpus, l)) for l in langs}}
    return Under(nset, texts, [nspec[1], *files], context,
                 {"neuron_set": nfile, **iv.record(), **(means if langs else {})})


def read_tasks(args: argparse.Namespace, tasks: list[str], langs: list[str]) -> dict[str, dict[str, list]]:
    """task -> lang -> the first --limit items; every file is read (and checked) before any model is loaded."""
    return {t: {l: TASKS[t].read(args.dataset, l)[:args.limit or None] for l in langs} for t in tasks}


def stored(out_file: Path, tasks: list[str], model_fp: dict, force: bool) -> tuple[dict, dict]:
    """Results and per-task metadata in the results file, the tasks not asked for only when measured on
    the same model files (with --force a damaged file counts as empty)."""
    try:
        old = reuse.read_stored(out_file) or {}
    except InputError:
        if force:
            return {}, {}
        raise
    res, meta = old.get("results"), (old.get("meta") or {}).get("tasks")
    if not isinstance(res, dict) or not isinstance(meta, dict):
        return {}, {}
    keep = [t for t in TASKS if t in res and isinstance(meta.get(t), dict)
            and (t in tasks or (meta[t].get("fingerprint") or {}).get("model") == model_fp)]
    return {t: res[t] for t in keep}, {t: meta[t] for t in keep}


def to_compute(tasks: list[str], results: dict, task_meta: dict, fps: dict, force: bool, out_file: Path) -> list[str]:
    """The tasks asked for whose stored result is missing or was computed from other arguments, files or code."""
    todo = []
    for t in tasks:
        if force or t not in results or not isinstance(task_meta.get(t), dict):
            todo.append(t)
        elif diffs := reuse.changes(task_meta[t].get("fingerprint"), fps[t]):
            print(reuse.recompute_line(diffs, f"{t} in {out_file}"))
            todo.append(t)
        else:
            print(reuse.reuse_line(task_meta[t]["fingerprint"], fps[t], f"{t} from {out_file}"))
    return todo


# ---------------------------------------------------------------- outputs

def write_merged(out_file: Path, args: argparse.Namespace, name: str, tasks: list[str], results: dict,
                 task_meta: dict, model_fp: dict, under: dict | None = None) -> dict:
    """Read-modify-write under the file's lock: a run evaluating other tasks of this model at the same time
    keeps its results, and its other tasks stay when measured on the same model files (each task's reuse was
    decided per task before the model ran: the lock is held only here). Returns all results."""
    with reuse.unit(out_file, f"--out {args.out}", force=args.force, folder=False):
        now, now_meta = stored(out_file, tasks, model_fp, args.force)
        for t in tasks:
            now[t], now_meta[t] = results[t], task_meta[t]
        ordered = {t: now[t] for t in TASKS if t in now}
        prov = layout.provenance(args.model)
        meta = {**run_meta(args), "schema_version": SCHEMA_VERSION, "tag": out_file.parent.parent.name,
                "name": name, "role": layout.provenance_role(prov), "provenance": prov,
                "prompts": prompts(), "intervention": under,
                "tasks": {t: now_meta[t] for t in ordered}}
        write_json(out_file, {"model": args.model, "meta": meta, "results": ordered})
    return ordered


def print_table(name: str, model: str, results: dict, langs: list[str]) -> None:
    """One row per task: PPL or accuracy per language and their mean."""
    print(f"\n{name} ({model})")
    print(f"{'task':<8}" + "".join(f"{l:>10}" for l in langs) + f"{'mean':>10}")
    for task in (t for t in TASKS if t in results):
        vals = [results[task].get(l, {}).get(TASKS[task].metric) for l in langs]
        cells = [f"{v:>10.3f}" if v is not None else f"{'-':>10}" for v in vals]
        m = mean(vals)
        print(f"{task:<8}" + "".join(cells) + (f"{m:>10.3f}" if m is not None else f"{'-':>10}"))


def main() -> None:
    args = parse_args()
    langs = parse_langs(args.langs)
    tasks = split_list(args.tasks)
    seed_everything(args.seed)
    iv, nspec = intervention_args(args)
    name = results_name(args, nspec and nspec[0], iv)
    data = read_tasks(args, tasks, langs)
    out = layout.outputs(args.out, args.model)
    under = read_intervention(args, out, iv, nspec) if iv is not None else Under()

    out_file = out.evaluation(name)
    reuse.check_writable(out_file, f"--out {args.out}", folder=False)
    fps = {t: reuse.fingerprint(args, __file__, f"evaluate.{t}", ignore=ignored_args(t, iv), models=[args.model],
                                files=[*(TASKS[t].file(args.dataset, l) for l in langs), *under.files],
                                context=under.context) for t in tasks}
    model_fp = fps[tasks[0]]["model"]
    results, task_meta = stored(out_file, tasks, model_fp, args.force)
    todo = to_compute(tasks, results, task_meta, fps, args.force, out_file)

    if todo:
        check_model(args.model)  # config, tokenizer, weight headers: seconds, before loading
        model, tok = load_model(args.model, args.device, args.dtype, device_map_auto=True)
        means = (interventions.stored_means(out, args.model, model, tok, args.dataset, args.mean_corpus,
                                            iv.mean_langs(), args.mean_max_length, args.batch_size, args.force,
                                            under.mean_texts)
                 if iv is not None and iv.mean_langs() else None)
        with interventions.intervened(model, under.nset, iv, means) if iv is not None else contextlib.nullcontext():
            for task in todo:
                results[task] = TASKS[task].evaluate(model, tok, data[task], args)
                task_meta[task] = {"args": result_args(args, task, iv), "fingerprint": fps[task]}
        results = write_merged(out_file, args, name, tasks, results, task_meta, model_fp, under.record)

    print_table(name, args.model, results, langs)
    if todo:
        print(f"Wrote {out_file}")


if __name__ == "__main__":
    run(main)
