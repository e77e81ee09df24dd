"""The evaluation tasks (docs/method.md section 7): one entry per task, so that evaluate.py (flags, inputs,
scoring, results) and figures.py (which tasks are accuracies, their labels) read the same list; a new task is
one more `Task` in TASKS."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import metrics
from .reuse import text_digest
from .uncertainty import accuracy_summary
from .data import mgsm_file, mmlu_file, read_mgsm, read_mmlu, val_file, val_texts


def items_sha256(texts: list[str]) -> str:
    """Digest of the scored items' text in order: two results files are compared question by question (a paired
    test) only when they scored the same questions."""
    return text_digest(texts)


def scored(correct: list[bool], texts: list[str]) -> dict:
    """accuracy, n, its 95% Wilson interval `accuracy_ci`, the per-item outcomes `correct` (0/1, item order)
    and `items_sha256`: what figures.py needs to pair two models on the same questions."""
    outcomes = [int(bool(c)) for c in correct]
    return {**accuracy_summary(outcomes), "correct": outcomes, "items_sha256": items_sha256(texts)}


def eval_ppl(model, tok, data: dict[str, list[str]], args: argparse.Namespace) -> dict[str, dict]:
    """Perplexity of every validation line scored on its own, with each line's NLL (intervals over lines)."""
    return metrics.perplexity_by_lang(model, tok, data, args.max_length, args.batch_size, "ppl", per_line=True)


def eval_mgsm(model, tok, data: dict[str, list[tuple[str, float]]], args: argparse.Namespace) -> dict[str, dict]:
    """Zero-shot greedy answers; correct when the last number equals the gold number."""
    res = {}
    for l, items in data.items():
        outputs = metrics.generate_greedy(model, tok, [metrics.MGSM_PROMPT.format(question=q) for q, _ in items],
                                          args.max_new_tokens, args.batch_size, args.max_length, desc=f"mgsm/{l}")
        preds = [metrics.extract_answer(o, l) for o in outputs]  # numbers as language l writes them
        correct = [metrics.answer_correct(p, gold) for p, (_, gold) in zip(preds, items)]
        res[l] = {**scored(correct, [f"{q}\t{gold!r}" for q, gold in items]),
                  "examples": [{"question": q, "gold": gold, "output": o, "pred": p}
                               for (q, gold), o, p in list(zip(items, outputs, preds))[:3]]}
    return res


def eval_mmmlu(model, tok, data: dict[str, list[dict]], args: argparse.Namespace) -> dict[str, dict]:
    """The option letter with the highest next-token log-likelihood."""
    res = {}
    for l, items in data.items():
        scores = metrics.score_choices(model, tok, [metrics.mmlu_prompt(r) for r in items],
                                       batch_size=args.batch_size, max_length=args.max_length, desc=f"mmmlu/{l}")
        preds = [metrics.CHOICES[i] for i in scores.argmax(1).tolist()]
        res[l] = scored([p == r["Answer"] for p, r in zip(preds, items)],
                        ["\t".join(str(r[k]) for k in ("Question", *metrics.CHOICES, "Answer")) for r in items])
    return res


@dataclass(frozen=True)
class Task:
    """One evaluation task: its input file and reader per language, how a model is scored on it, and the key of
    the number it reports per language in the results file."""
    name: str                                      # the --tasks item and the key under "results"
    label: str                                     # in tables and figure axes
    metric: str                                    # results[name][lang][metric]: "ppl" or "accuracy"
    file: Callable[[str | Path, str], Path]        # (dataset, lang) -> the input file (fingerprinted)
    read: Callable[[str | Path, str], list]        # (dataset, lang) -> the items, read and checked
    evaluate: Callable[..., dict[str, dict]]       # (model, tok, lang -> items, args) -> lang -> results
    own_args: frozenset[str] = frozenset()         # evaluate.py arguments that change only this task's numbers
    prompt: str | None = None                      # the prompt template, recorded in the results' metadata
    scoring: str | None = None                     # how an answer is scored, in words (metadata)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("ppl", "PPL", "ppl", val_file, val_texts, eval_ppl),
    Task("mgsm", "MGSM", "accuracy", mgsm_file, read_mgsm, eval_mgsm, frozenset({"max_new_tokens"}),
         metrics.MGSM_PROMPT, "zero-shot, greedy, last number"),
    Task("mmmlu", "MMMLU", "accuracy", mmlu_file, read_mmlu, eval_mmmlu, frozenset(),
         metrics.mmlu_prompt({"Question": "{question}", **{c: "{" + c + "}" for c in "ABCD"}}),
         "highest next-token log-likelihood of ' A'..' D'"),
)}
ACCURACY_TASKS = tuple(n for n, t in TASKS.items() if t.metric == "accuracy")  # figures.py: the before/after changes


def prompts() -> dict[str, Any]:
    """Every task's prompt template and scoring rule, for the results' metadata."""
    return {k: v for n, t in TASKS.items() if t.prompt is not None
            for k, v in ((n, t.prompt), (f"{n}_scoring", t.scoring))}
