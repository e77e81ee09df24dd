"""Benchmark: the training data path of train.py, the Python-list path against `datasets`, at the paper's
scale (100k documents). Time from the start of the data path to the end of the first training step, and the
peak memory (RSS) of the data path, for: the list path train.py had before (reproduced below), the
`datasets` path on its first run (load + tokenize into the cache), and its cached rerun.
Targets: the cached rerun reaches the first step >= 10x sooner than the list path; data-path peak memory
<= half of the list path's.

    python bench/data.py                      # 100k documents, embedded gemma-3-270m tokenizer
    python bench/data.py --docs 2000          # quick

The corpus is made on the fly (seeded, no network): each document is 1 to --max-parts documents of
dataset/train/<lang>.jsonl joined, so lengths vary like web documents. Every path runs in a fresh process
(so no path inherits another's memory or caches), with a tiny model of the tokenizer's vocabulary for the
training step: the step is the same for every path, the data path is what differs."""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m", help="whose tokenizer tokenizes the corpus")
    p.add_argument("--dataset", default=str(REPO / "dataset"))
    p.add_argument("--lang", default="sw")
    p.add_argument("--docs", type=int, default=100_000, help="documents in the made-up corpus")
    p.add_argument("--max-parts", type=int, default=7, help="embedded documents joined into one, at most")
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--num-proc", type=int, default=1, help="tokenizing processes of the datasets path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--child", choices=["lists", "datasets"], help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_corpus(args: argparse.Namespace, path: Path) -> None:
    from langneurons.data import train_texts
    docs = train_texts(args.dataset, args.lang)
    rng = random.Random(args.seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(args.docs):
            text = "\n".join(rng.choice(docs) for _ in range(rng.randint(1, args.max_parts)))
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def _status(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def lists_path(corpus: Path, tok, cutoff: int) -> list[dict]:
    """train.py before `datasets`: data.train_texts (every line parsed into a list), then one tokenizer
    call per document into a list of dicts (--limit 0: all documents)."""
    from langneurons.data import json_lines_texts
    texts = [t for t in json_lines_texts(corpus, "training file") if t.strip()]
    eos = tok.eos_token_id
    train_set = []
    for text in texts:
        ids = tok(text)["input_ids"] + ([eos] if eos is not None else [])
        ids = ids[:cutoff]
        if len(ids) >= 2:
            train_set.append({"input_ids": ids})
    return train_set


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from langneurons.model import load_tokenizer
    from langneurons.data import PadCollator
    tok = load_tokenizer(args.model)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                         max_position_embeddings=args.cutoff_len))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    if args.child == "lists":
        train_set = lists_path(Path(args.corpus), tok, args.cutoff_len)
    else:
        from langneurons.data import tokenize_documents, training_documents
        docs = training_documents(args.corpus, "training file")
        train_set = tokenize_documents(docs, tok, args.cutoff_len,
                                       num_proc=args.num_proc if args.num_proc > 1 else None)
    t_data = time.perf_counter() - t0
    peak = _status("VmHWM") - rss0
    held = _status("VmRSS") - rss0

    class FirstStep(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            self.t = time.perf_counter() - t0
            control.should_training_stop = True

    first = FirstStep()
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=1, max_steps=1, use_cpu=True,
                                  report_to="none", save_strategy="no", remove_unused_columns=False,
                                  disable_tqdm=True, seed=args.seed, data_seed=args.seed)
        Trainer(model=model, args=targs, train_dataset=train_set, data_collator=PadCollator(tok.pad_token_id),
                callbacks=[first]).train()
    print(json.dumps({"data_s": t_data, "first_step_s": first.t, "peak_bytes": peak, "held_bytes": held,
                      "sequences": len(train_set)}))


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        corpus = Path(tmp) / f"{args.lang}.jsonl"
        t = time.perf_counter()
        make_corpus(args, corpus)
        print(f"corpus: {args.docs:,} documents, {corpus.stat().st_size / 2**20:.1f} MiB "
              f"({time.perf_counter() - t:.1f} s to write)")
        env = {**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / "hf_datasets"), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
        rows = {}
        for name, path in (("Python lists", "lists"), ("datasets, first run", "datasets"),
                           ("datasets, cached rerun", "datasets")):
            cmd = [sys.executable, __file__, "--child", path, "--corpus", str(corpus), "--model", args.model,
                   "--cutoff-len", str(args.cutoff_len), "--num-proc", str(args.num_proc), "--seed", str(args.seed)]
            t = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
            rows[name] = {**json.loads(r.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t}
            print(f"{name}: {rows[name]}")
    ref = rows["Python lists"]
    assert len({r["sequences"] for r in rows.values()}) == 1, "the paths disagree on the training set"
    print(f"\n{args.docs:,} documents ({args.lang}), cutoff {args.cutoff_len}, tokenizer of {args.model}, "
          f"num_proc {args.num_proc}\n")
    print("| path | data ready (s) | first step done (s) | vs lists | data-path peak RSS (MiB) | vs lists |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['data_s']:.2f} | {r['first_step_s']:.2f} | "
              f"{ref['first_step_s'] / r['first_step_s']:.1f}x sooner | {r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / ref['peak_bytes']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
