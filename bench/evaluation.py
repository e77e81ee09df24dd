"""Benchmark: questions per second of evaluate.py's MMMLU scoring (`metrics.score_choices`: batches of
similar length, one forward pass per batch, the four letters read from one distribution) against a simple
loop that scores one question at a time (one forward pass per question), on the same model and questions.
Also checks that both pick the same letters.

    python bench/evaluation.py                          # the embedded gemma-3-270m, dataset/test/mmlu
    python bench/evaluation.py --model DIR --langs en,zh --batch-size 16 --repeats 3
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from langneurons.cli import EMBEDDED_MODEL  # noqa: E402
from langneurons.data import read_mmlu  # noqa: E402
from langneurons.metrics import CHOICES, mmlu_prompt, score_choices  # noqa: E402
from langneurons.model import cache_root, load_model  # noqa: E402


@torch.no_grad()
def one_at_a_time(model, tok, prompts: list[str]) -> list[str]:
    """The simple way: one forward pass per question, letter = argmax over the next-token logits."""
    device = next(model.parameters()).device
    letters = [tok(f" {c}", add_special_tokens=False)["input_ids"][-1] for c in CHOICES]
    prefix = tok(" ", add_special_tokens=False)["input_ids"] if len(tok(" A", add_special_tokens=False)["input_ids"]) > 1 else []
    out = []
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"] + prefix], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, -1]
        out.append(CHOICES[int(logits[letters].argmax())])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--dataset", default=str(REPO / "dataset"))
    p.add_argument("--langs", default="en,zh,th,sw,fr,de")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="timed repetitions (best is reported)")
    args = p.parse_args()

    if args.model == EMBEDDED_MODEL:  # another process may still be converting it: wait for config.json
        cfg = cache_root() / EMBEDDED_MODEL / "config.json"
        for _ in range(120):
            if cfg.is_file():
                break
            print(f"waiting for {cfg} ...")
            time.sleep(5)
    dataset = Path(args.dataset)
    langs = args.langs.split(",")
    if not (dataset / "test" / "mmlu").is_dir():
        from tiny import tiny_dataset
        dataset = tiny_dataset(Path(tempfile.mkdtemp()) / "dataset")
        langs = ["en", "fr", "de"]
    prompts, gold = [], []
    for l in langs:
        rows = read_mmlu(dataset, l)
        prompts += [mmlu_prompt(r) for r in rows]
        gold += [r["Answer"] for r in rows]

    model, tok = load_model(args.model, args.device, "auto")
    print(f"model {args.model} on {next(model.parameters()).device}, {len(prompts)} questions "
          f"({', '.join(langs)}), batch size {args.batch_size}, torch threads {torch.get_num_threads()}")
    score_choices(model, tok, prompts[:2], batch_size=2)  # warm-up

    def timed(fn):
        best, res = float("inf"), None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = fn()
            best = min(best, time.perf_counter() - t0)
        return best, res

    t_batch, scores = timed(lambda: score_choices(model, tok, prompts, batch_size=args.batch_size))
    t_single, single = timed(lambda: one_at_a_time(model, tok, prompts))
    batched = [CHOICES[i] for i in scores.argmax(1).tolist()]
    agree = sum(a == b for a, b in zip(batched, single))
    acc = sum(a == g for a, g in zip(batched, gold)) / len(gold)
    print(f"batched (score_choices): {len(prompts) / t_batch:8.2f} questions/s ({t_batch:.2f} s)")
    print(f"one at a time:           {len(prompts) / t_single:8.2f} questions/s ({t_single:.2f} s)")
    print(f"speed-up: {t_single / t_batch:.2f}x; same letter for {agree}/{len(prompts)} questions; "
          f"accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
