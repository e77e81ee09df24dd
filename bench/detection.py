"""Detection cost against a forward pass, as sentences grow, on the embedded model (or any model).

For every sentence length (default 64, 256 and 1024 tokens: consecutive windows of the embedded
dataset's detection text, every language in turn) a fresh child process times, over the same batches:
a forward pass with the LM head (logits, as any user runs the model), the decoder alone
(`model.get_decoder()`: what detection runs, so the right floor), detection of the FFN groups and
detection of all six groups (probe plus top-k). The four are interleaved `--repeats` times; ratios are
taken within each repeat, then the median, so machine load cancels out. Peak memory is read after
each phase (resident memory on the CPU, allocated memory on a GPU).

    python bench/detection.py                                     # CPU, float32, 64/256/1024 tokens
    python bench/detection.py --device cuda --dtype bfloat16 --json gpu.json
    python bench/detection.py --corpus mgsm --per-lang 100        # the real MGSM questions, as the authors ran it
"""
import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MGSM = REPO.parent / "shared" / "data" / "mgsm"
SIX = ("fwd_up", "fwd_down", "attn_q", "attn_k", "attn_v", "attn_o")
MODES = {"forward": "forward with LM head", "decoder": "decoder only", "ffn": "detection, FFN groups",
         "all": "detection, all six groups"}


def sentences(tok, args, length: int | None) -> list[list[int]]:
    """Token lists: `length`-token windows of the embedded detection text (BOS first, languages in
    turn, text reused from the start if a language runs out), or the MGSM questions."""
    langs = args.langs.split(",")
    if length is None:
        texts = []
        for lang in langs:
            lines = (MGSM / f"mgsm_{lang}.tsv").read_text(encoding="utf-8").splitlines()[:args.per_lang]
            texts += [line.split("\t")[0] for line in lines]
        return [tok(t, truncation=True, max_length=256)["input_ids"] for t in texts]
    n = max(1, args.tokens // length)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    streams = {}
    for lang in langs:
        text = " ".join((args.dataset / "detect" / f"{lang}.txt").read_text(encoding="utf-8").split("\n"))
        streams[lang] = tok(text, add_special_tokens=False)["input_ids"]
    out, used = [], {lang: 0 for lang in langs}
    for i in range(n):
        lang = langs[i % len(langs)]
        body, start = length - len(bos), used[lang]
        stream = streams[lang] * (1 + (start + body) // len(streams[lang]))
        out.append(bos + stream[start:start + body])
        used[lang] = (start + body) % len(streams[lang])
    return out


def run_length(length: int | None, args, queue) -> None:
    import torch
    from langneurons.importance import ImportanceProbe
    from langneurons.data import batches_by_length, pad_batch
    from langneurons.model import Geometry, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, args.device, args.dtype)
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    geom = Geometry.from_config(model.config)
    seqs = sentences(tok, args, length)
    batches = [pad_batch([seqs[i] for i in idx], tok.pad_token_id, dev)
               for idx in batches_by_length([len(s) for s in seqs], args.batch_size)]
    decoder = model.get_decoder()
    probes = {"ffn": ImportanceProbe(model, groups=SIX[:2]), "all": ImportanceProbe(model, groups=SIX)}

    def detect(mode, ids, mask):
        scores = probes[mode](ids, mask)
        for g, s in scores.items():
            s.topk(max(1, int(0.01 * geom.group_size(g))), dim=-1)

    def call(mode, ids, mask):
        if mode == "forward":
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        elif mode == "decoder":
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        else:
            with probes[mode]:
                detect(mode, ids, mask)

    def peak() -> float:  # GiB
        if cuda:
            return torch.cuda.max_memory_allocated(dev) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    times = {m: [] for m in MODES}
    memory = {}
    with torch.no_grad():
        for mode in MODES:  # warm-up on one short sentence: allocator, kernels, code paths
            call(mode, batches[0][0][:1, :64], batches[0][1][:1, :64])
        for rep in range(args.repeats):
            for mode in MODES:
                if cuda:
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                t0 = time.perf_counter()
                for ids, mask in batches:
                    call(mode, ids, mask)
                if cuda:
                    torch.cuda.synchronize(dev)
                times[mode].append(time.perf_counter() - t0)
                memory[mode] = max(memory.get(mode, 0.0), peak())
    median = lambda xs: statistics.median(xs)
    ratio = lambda a, b: median([x / y for x, y in zip(times[a], times[b])])
    queue.put({"length": length or "mgsm", "sentences": len(seqs), "tokens": int(sum(len(s) for s in seqs)),
               "batch_size": args.batch_size, "repeats": args.repeats, "device": str(dev),
               "gpu": torch.cuda.get_device_name(dev) if cuda else None, "dtype": str(model.dtype),
               "threads": torch.get_num_threads(),
               "seconds": {m: median(t) for m, t in times.items()}, "runs": times,
               "ffn_over_decoder": ratio("ffn", "decoder"), "all_over_decoder": ratio("all", "decoder"),
               "ffn_over_forward": ratio("ffn", "forward"), "all_over_forward": ratio("all", "forward"),
               "decoder_over_forward": ratio("decoder", "forward"), "peak_gib": memory})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    p.add_argument("--lengths", default="64,256,1024", help="sentence lengths in tokens")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per length (sentences = tokens // length, at least 1)")
    p.add_argument("--corpus", choices=["dataset", "mgsm"], default="dataset",
                   help="dataset: windows of --lengths tokens; mgsm: the real MGSM questions (cut at 256 tokens)")
    p.add_argument("--dataset", type=Path, default=REPO / "dataset", help="the paper's layout (detect/<lang>.txt)")
    p.add_argument("--per-lang", type=int, default=100, help="MGSM questions per language (--corpus mgsm)")
    p.add_argument("--langs", default="en,zh,th,sw,fr,de")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.corpus == "mgsm" and not MGSM.is_dir():
        print(f"skipped: {MGSM} is absent (--corpus mgsm needs the real MGSM questions)")
        return
    lengths = [None] if args.corpus == "mgsm" else [int(x) for x in args.lengths.split(",")]
    ctx = mp.get_context("spawn")
    results = []
    for length in lengths:  # a fresh process each: peak memory per length, no cache carried over
        queue = ctx.Queue()
        proc = ctx.Process(target=run_length, args=(length, args, queue))
        proc.start()
        results.append(queue.get())
        proc.join()
        r = results[-1]
        print(f"{r['length']:>5} tokens x {r['sentences']:3d}: all six {r['all_over_decoder']:6.2f}x decoder, "
              f"FFN {r['ffn_over_decoder']:5.2f}x decoder", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    r0 = results[0]
    where = r0["gpu"] or f"CPU, {r0['threads']} threads"
    print(f"\n{args.model}, {r0['dtype']}, {where}, batch {args.batch_size}, median of {args.repeats} repeats\n")
    print("| tokens/sentence | sentences | decoder / forward | FFN / decoder | all six / decoder | "
          "FFN / forward | all six / forward | seconds: forward, decoder, FFN, all six | peak GiB: decoder -> all six |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["seconds"]
        print(f"| {r['length']} | {r['sentences']} | {r['decoder_over_forward']:.2f}x | {r['ffn_over_decoder']:.2f}x | "
              f"**{r['all_over_decoder']:.2f}x** | {r['ffn_over_forward']:.2f}x | {r['all_over_forward']:.2f}x | "
              f"{s['forward']:.2f}, {s['decoder']:.2f}, {s['ffn']:.2f}, {s['all']:.2f} | "
              f"{r['peak_gib']['decoder']:.2f} -> {r['peak_gib']['all']:.2f} |")


if __name__ == "__main__":
    main()
