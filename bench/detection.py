"""Detection cost against a plain forward pass, on the embedded model and the real MGSM questions.

Each mode runs in a fresh child process that first times a plain forward pass (logits included, as
any user would run the model) over the same batches, then the detection probe with its top-k
counting; the ratio of the two is what we report, so machine load cancels out. Peak resident memory
is read from the child process after each phase.

    python bench/detection.py                    # 100 MGSM questions per language, as the authors ran it
    python bench/detection.py --per-lang 16      # quicker
"""
import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MGSM = REPO.parent / "shared" / "data" / "mgsm"


def run_mode(groups: str, args, queue) -> None:
    import torch
    from langneurons.importance import ImportanceProbe
    from langneurons.metrics import batches_by_length, pad_batch
    from langneurons.model import Geometry, load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, "cpu", "float32")
    geom = Geometry.from_config(model.config)
    texts = []
    for lang in args.langs.split(","):
        lines = (MGSM / f"mgsm_{lang}.tsv").read_text(encoding="utf-8").splitlines()[:args.per_lang]
        texts += [line.split("\t")[0] for line in lines]
    seqs = [tok(t, truncation=True, max_length=256)["input_ids"] for t in texts]
    batches = [pad_batch([seqs[i] for i in idx], tok.pad_token_id, "cpu")
               for idx in batches_by_length([len(s) for s in seqs], args.batch_size)]
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB
    base_rss = rss()
    with torch.no_grad():
        model(input_ids=batches[0][0], attention_mask=batches[0][1])  # warm-up
        t0 = time.perf_counter()
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        forward = time.perf_counter() - t0
    forward_rss = rss()
    group_list = tuple(groups.split(","))
    top_k = {g: max(1, int(0.01 * geom.group_size(g))) for g in group_list}
    with ImportanceProbe(model, groups=group_list) as probe:
        probe(*batches[0])  # warm-up
        t0 = time.perf_counter()
        for ids, mask in batches:
            scores = probe(ids, mask)
            for g in group_list:
                scores[g].topk(top_k[g], dim=-1)
        detect = time.perf_counter() - t0
    queue.put({"groups": groups, "sentences": len(texts), "tokens": int(sum(len(s) for s in seqs)),
               "forward_s": forward, "detect_s": detect, "ratio": detect / forward,
               "rss_model_gib": base_rss, "rss_forward_gib": forward_rss, "rss_detect_gib": rss()})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--langs", default="en,zh,th,sw,fr,de")
    p.add_argument("--per-lang", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not MGSM.is_dir():
        print(f"skipped: {MGSM} is absent (the benchmark needs the real MGSM questions)")
        return
    ctx = mp.get_context("spawn")
    results = []
    for groups in ("fwd_up,fwd_down", "fwd_up,fwd_down,attn_q,attn_k,attn_v,attn_o"):
        queue = ctx.Queue()
        proc = ctx.Process(target=run_mode, args=(groups, args, queue))
        proc.start()
        results.append(queue.get())
        proc.join()
    print(json.dumps(results, indent=1))
    names = {"fwd_up,fwd_down": "FFN groups", "fwd_up,fwd_down,attn_q,attn_k,attn_v,attn_o": "all six groups"}
    print(f"\n{results[0]['sentences']} MGSM questions ({results[0]['tokens']} tokens), batch {args.batch_size}, "
          f"{args.threads} threads")
    for r in results:
        print(f"{names[r['groups']]:<16} detection {r['detect_s']:7.1f} s  forward {r['forward_s']:6.1f} s  "
              f"ratio {r['ratio']:.2f}x   peak RSS {r['rss_forward_gib']:.2f} GiB (forward) -> "
              f"{r['rss_detect_gib']:.2f} GiB (detection)")


if __name__ == "__main__":
    main()
