"""Stage 4, evaluation (METHOD.md section 7): MGSM accuracy, MMMLU accuracy and perplexity per language of
any model: the base model, a deactivated variant, a trained model, a hub id or a .gguf file.

    python evaluate.py --model gemma-3-270m --tasks ppl,mgsm,mmmlu --limit 0

Writes <out>/<tag>/eval/<name>.json, where <tag> is the base model's tag (variants and trained models
carry it in their langneurons.json) and <name> the model's own name (--name).

MGSM: zero-shot, no chat template, greedy decoding of the prompt "Question: <question>\\nAnswer:";
generation stops at EOS, at "Question:", at a blank line or after --max-new-tokens; the score is whether the
last number of the answer equals the gold number. MMMLU: "<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:";
the prediction is the letter " A".." D" with the highest log-likelihood as the next token. Perplexity:
every line of <dataset>/val/<lang>.txt scored on its own (METHOD.md section 7).

Results of earlier runs on the same model files are kept: evaluating one task at a time fills one file,
and a task already evaluated with the same arguments is skipped (--force recomputes)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from langneurons.cli import InputError, choice_list, common_parser, int_at_least, parse_langs, run, split_list
from langneurons.files import json_safe, safe_name, write_json
from langneurons.runinfo import run_meta, seed_everything
from langneurons import metrics, reuse
from langneurons.data import lang_file, mgsm_file, mmlu_file, read_mgsm, read_mmlu, val_texts
from langneurons.model import check_model, load_model
from langneurons.layout import model_name, model_tag, provenance
from langneurons.reuse import check_writable

TASKS = ("ppl", "mgsm", "mmmlu")
# arguments that do not change a task's numbers (so they do not stop reuse)
NOT_RESULT_ARGS = {"tasks", "force", "name", "out", "batch_size"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=choice_list(TASKS), default=",".join(TASKS), help="comma list of ppl, mgsm, mmmlu")
    p.add_argument("--limit", type=int_at_least(0), default=0, help="first N items per language and task (0 = all)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="sequences per forward pass / generate call")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=256,
                   help="MGSM: generated tokens per answer at most")
    p.add_argument("--max-length", type=int_at_least(8), default=512,
                   help="tokens per text (perplexity: truncated at the end; MMMLU/MGSM prompts: cut at the start)")
    p.add_argument("--name", default=None, help="model name for the results file <out>/<tag>/eval/<name>.json "
                   "(default: the basename of --model, or the embedded model's name)")
    return p.parse_args(argv)


def ignored_args(task: str) -> set[str]:
    return NOT_RESULT_ARGS | ({"max_new_tokens"} if task != "mgsm" else set())


def result_args(args: argparse.Namespace, task: str) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ignored_args(task)}


def mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def main() -> None:
    # ---------------------------------------------------------------- arguments and data (checked before loading)
    args = parse_args()
    langs = parse_langs(args.langs)
    tasks = split_list(args.tasks)
    seed_everything(args.seed)
    tag = model_tag(args.model)
    name = safe_name(args.name) if args.name else model_name(args.model)
    if not name:
        raise InputError(f"--name {args.name}: not usable as a file name")

    def cut(items: list) -> list:
        return items[:args.limit] if args.limit else items

    data = {}  # task -> lang -> items; every file is read (and checked) before any model is loaded
    for task in tasks:
        read = {"ppl": val_texts, "mgsm": read_mgsm, "mmmlu": read_mmlu}[task]
        data[task] = {l: cut(read(args.dataset, l)) for l in langs}

    # ---------------------------------------------------------------- what is already there
    out_file = Path(args.out) / tag / "eval" / f"{name}.json"
    check_writable(out_file, f"--out {args.out}", folder=False)
    task_file = {"ppl": lambda d, l: lang_file(d, "val", l, ".txt"), "mgsm": mgsm_file, "mmmlu": mmlu_file}
    fps = {t: reuse.fingerprint(args, __file__, ignore=ignored_args(t), models=[args.model],
                                files=[task_file[t](args.dataset, l) for l in langs]) for t in tasks}
    model_fp = fps[tasks[0]]["model"]

    def stored() -> tuple[dict, dict]:
        """Results and per-task metadata in the results file, the tasks not asked for only when measured on
        the same model files (with --force a damaged file counts as empty)."""
        try:
            old = reuse.read_stored(out_file) or {}
        except InputError:
            if args.force:
                return {}, {}
            raise
        res, meta = old.get("results"), (old.get("meta") or {}).get("tasks")
        if not isinstance(res, dict) or not isinstance(meta, dict):
            return {}, {}
        keep = [t for t in TASKS if t in res and isinstance(meta.get(t), dict)
                and (t in tasks or (meta[t].get("fingerprint") or {}).get("model") == model_fp)]
        return {t: res[t] for t in keep}, {t: meta[t] for t in keep}

    results, task_meta = stored()
    todo = []
    for t in tasks:
        if args.force or t not in results or not isinstance(task_meta.get(t), dict):
            todo.append(t)
        elif diffs := reuse.changes(task_meta[t].get("fingerprint"), fps[t]):
            print(reuse.recompute_line(diffs, f"{t} in {out_file}"))
            todo.append(t)
        else:
            print(f"Reusing {t} from {out_file} (nothing it was computed from changed; --force recomputes)")

    # ---------------------------------------------------------------- evaluate
    if todo:
        check_model(args.model)  # config, tokenizer, weight headers: seconds, before loading
        model, tok = load_model(args.model, args.device, args.dtype, device_map_auto=True)
        for task in todo:
            res = {}
            for l in langs:
                items = data[task][l]
                if task == "ppl":
                    r = metrics.perplexity(model, tok, items, args.max_length, args.batch_size, desc=f"ppl/{l}")
                    res[l] = {"ppl": json_safe(r["ppl"]), "tokens": r["tokens"]}
                elif task == "mgsm":
                    outputs = metrics.generate_greedy(
                        model, tok, [metrics.MGSM_PROMPT.format(question=q) for q, _ in items],
                        args.max_new_tokens, args.batch_size, args.max_length, desc=f"mgsm/{l}")
                    preds = [metrics.extract_answer(o, l) for o in outputs]  # numbers as language l writes them
                    correct = [metrics.answer_correct(p, gold) for p, (_, gold) in zip(preds, items)]
                    res[l] = {"accuracy": sum(correct) / len(items), "n": len(items),
                              "examples": [{"question": q, "gold": gold, "output": o, "pred": p}
                                           for (q, gold), o, p in list(zip(items, outputs, preds))[:3]]}
                else:
                    scores = metrics.score_choices(model, tok, [metrics.mmlu_prompt(r) for r in items],
                                                   batch_size=args.batch_size, max_length=args.max_length,
                                                   desc=f"mmmlu/{l}")
                    preds = [metrics.CHOICES[i] for i in scores.argmax(1).tolist()]
                    res[l] = {"accuracy": sum(p == r["Answer"] for p, r in zip(preds, items)) / len(items),
                              "n": len(items)}
            results[task] = res
            task_meta[task] = {"args": result_args(args, task), "fingerprint": fps[task]}

    # ---------------------------------------------------------------- write and print
    if todo:
        # read-modify-write under the file's lock: a run evaluating other tasks of this model at the same
        # time keeps its results. Its other tasks stay when measured on the same model files.
        with reuse.locked(out_file):
            now, now_meta = stored()
            for t in tasks:
                now[t], now_meta[t] = results[t], task_meta[t]
            results, task_meta = now, now_meta
            ordered = {t: results[t] for t in TASKS if t in results}
            meta = {**run_meta(args), "tag": tag, "name": name, "provenance": provenance(args.model),
                    "prompts": {"mgsm": metrics.MGSM_PROMPT, "mgsm_scoring": "zero-shot, greedy, last number",
                                "mmmlu": metrics.mmlu_prompt({"Question": "{question}",
                                                              **{c: "{" + c + "}" for c in "ABCD"}}),
                                "mmmlu_scoring": "highest next-token log-likelihood of ' A'..' D'"},
                    "tasks": {t: task_meta[t] for t in ordered}}
            write_json(out_file, {"model": args.model, "meta": meta, "results": ordered})
    ordered = {t: results[t] for t in TASKS if t in results}

    print(f"\n{name} ({args.model})")
    print(f"{'task':<8}" + "".join(f"{l:>10}" for l in langs) + f"{'mean':>10}")
    for task, res in ordered.items():
        key = "ppl" if task == "ppl" else "accuracy"
        vals = [res.get(l, {}).get(key) for l in langs]
        cells = [f"{v:>10.3f}" if v is not None else f"{'-':>10}" for v in vals]
        m = mean(vals)
        print(f"{task:<8}" + "".join(cells) + (f"{m:>10.3f}" if m is not None else f"{'-':>10}"))
    if todo:
        print(f"Wrote {out_file}")


if __name__ == "__main__":
    run(main)
