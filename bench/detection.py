"""Detection cost against the decoder alone, as sentences grow, on the embedded model, any model, or a
random-weight model with the layer shapes of a real one (--config).

For every length (default 64, 256 and 1024 tokens: consecutive windows of the embedded dataset's
detection text, every language in turn; `mgsm`: the real MGSM questions, cut and padded as detection
cuts and pads them) a fresh child process times, over the same batches: the decoder alone
(`model.get_decoder()`: what detection runs, so the right floor), detection of the FFN groups, of every
group but query/key, of all six groups scoring every query/key channel (`exhaustive`) and of all six as
detection runs them (`all`: query/key channels that provably cannot enter a text's top-k are not scored
exactly; same top lists). Modes are interleaved `--repeats` times; ratios are taken within each repeat,
then the median, so machine load cancels out. Each row also reports the arithmetic floor counted from the
shapes (`floor_counts`), the query/key part's achieved GFLOP/s, the split and the fraction of channels
pruned, and, unless --no-profile, one profiled pass per mode (where the time goes, in --json).

    python bench/detection.py                                     # embedded model, CPU, float32
    python bench/detection.py --config bench/llama-3.1-8b.config.json --layers 2 --lengths mgsm,256 --threads 1
    python bench/detection.py --device cuda --dtype bfloat16 --json gpu.json
"""
from __future__ import annotations

import argparse
import contextlib
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
         "noqk": "detection, all groups but query/key", "exhaustive": "detection, all six, every q/k channel scored",
         "all": "detection, all six, pruned top-k (as detection.py runs it)"}
MODE_GROUPS = {"ffn": SIX[:2], "noqk": ("fwd_up", "fwd_down", "attn_v", "attn_o"), "exhaustive": SIX, "all": SIX}


# ---------------------------------------------------------------- the arithmetic floor, counted from the shapes

def layer_macs(n: int, linear_params: int, heads: int, head_dim: int, window: int | None = None) -> tuple[int, int]:
    """(decoder, exact query/key) multiply-adds of one decoder layer on one sentence of n real tokens.

    Decoder: every token through the layer's linear weights (`linear_params` entries) plus the attention's
    two products (Q K^T and P V: heads * head_dim per visible key). Query/key: the exact scores of
    importance.qk_importance, one product of each (head, channel, query row)'s perturbed probabilities over
    its visible keys with the values' triangular factor, in which key s (1-based) has min(s, head_dim)
    entries: heads * head_dim * sum_t sum over the row's visible keys s of min(s, head_dim). A row sees
    keys t-n_t+1..t, n_t = t causal, min(t, window) with a sliding window."""
    visible = [min(t, window) if window else t for t in range(1, n + 1)]
    # reach[s] = sum_{s' <= s} min(s', head_dim): a row's product is reach[t] - reach[t - n_t]
    reach = [0]
    for s in range(1, n + 1):
        reach.append(reach[-1] + min(s, head_dim))
    decoder = n * linear_params + 2 * heads * head_dim * sum(visible)
    qk = heads * head_dim * sum(reach[t] - reach[t - v] for t, v in enumerate(visible, 1))
    return decoder, qk


def layer_shapes(model) -> list[dict]:
    """Per decoder layer, what `layer_macs` needs: the entries of its linear weights, heads, head_dim and
    sliding window (None for full attention), from the model's modules and config."""
    from langneurons.model import Geometry, decoder_layers, projections, text_config
    cfg, geom = text_config(model.config), Geometry.from_config(model.config)
    types = getattr(cfg, "layer_types", None) or []
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        p = projections(layer)
        params = sum(p[k].weight.numel() for k in ("q", "k", "v", "o", "up", "gate", "down") if k in p)
        sliding = i < len(types) and types[i] == "sliding_attention"
        out.append({"linear_params": params, "heads": geom.num_heads, "head_dim": geom.head_dim,
                    "window": getattr(cfg, "sliding_window", None) if sliding else None})
    return out


def floor_counts(shapes: list[dict], lengths: list[int]) -> dict:
    """Multiply-adds of the decoder and of the exact query/key scores over sentences of these real
    lengths (padding is never scored), and the floor 1 + query/key / decoder."""
    dec = qk = 0
    for n in lengths:
        for s in shapes:
            d, q = layer_macs(n, s["linear_params"], s["heads"], s["head_dim"], s["window"])
            dec, qk = dec + d, qk + q
    return {"decoder_macs": dec, "qk_macs": qk, "floor": 1 + qk / dec if dec else 1.0}


# ---------------------------------------------------------------- sentences

def sentences(tok, args, length: int | None, vocab: int) -> list[list[int]]:
    """Token lists: `length`-token windows of the embedded detection text (BOS first, languages in
    turn, text reused from the start if a language runs out), or the MGSM questions (length None) cut at
    256 tokens as detection cuts them. Ids beyond a cut vocabulary are folded into it (timings depend on
    the shapes only)."""
    langs = args.langs.split(",")
    if length is None:
        texts = []
        for lang in langs:
            lines = (MGSM / f"mgsm_{lang}.tsv").read_text(encoding="utf-8").splitlines()[:args.per_lang]
            texts += [line.split("\t")[0] for line in lines]
        out = [tok(t, truncation=True, max_length=256)["input_ids"] for t in texts]
    else:
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
    return [[i % vocab for i in s] for s in out]


def load(args):
    """(model, tokenizer that sets the lengths, what the model is)."""
    from langneurons.model import load_model
    if not args.config:
        model, tok = load_model(args.model, args.device, args.dtype)
        return model, tok, args.model
    from bench.random_model import byte_tokenizer, random_config, random_model
    from langneurons.model import resolve_device, resolve_dtype
    cfg = json.loads(Path(args.config).read_text(encoding="utf-8"))
    overrides = {"num_hidden_layers": args.layers, "vocab_size": args.vocab}
    if "layer_types" in cfg:
        overrides["layer_types"] = cfg["layer_types"][:args.layers]
    config = random_config(args.config, **overrides)
    config._attn_implementation = "eager"
    dev = resolve_device(args.device)
    model = random_model(config, resolve_dtype(args.dtype, dev)).to(dev)
    # the lengths of real text come from a real tokenizer: the embedded model's when it is here
    try:
        tok = _embedded_tokenizer()
        lengths_from = "the embedded model's tokenizer"
    except Exception:
        tok, lengths_from = byte_tokenizer(), "the byte tokenizer (the embedded tokenizer is absent)"
    name = Path(args.config).name.removesuffix(".json").removesuffix(".config")
    return model, tok, f"random {name}, {args.layers} layers, vocabulary cut to {args.vocab}; lengths from {lengths_from}"


def _embedded_tokenizer():
    from transformers import AutoTokenizer
    from langneurons.model import resolve_model
    path, _ = resolve_model("gemma-3-270m")
    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- timing

def run_length(length: int | None, args, queue) -> None:
    import torch
    from langneurons.importance import ImportanceProbe
    from langneurons.data import batches_by_length, pad_batch, pad_id
    from langneurons.model import Geometry

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, what = load(args)
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    geom = Geometry.from_config(model.config)
    vocab = model.get_input_embeddings().weight.shape[0]
    seqs = sentences(tok, args, length, vocab)
    batches = [pad_batch([seqs[i] for i in idx], pad_id(tok), dev)
               for idx in batches_by_length([len(s) for s in seqs], args.batch_size)]
    decoder = model.get_decoder()
    top_k = {g: max(1, int(args.ratio * geom.group_size(g))) for g in SIX}  # as detection.TopImportance
    modes = [m for m in args.modes.split(",")]
    probes = {m: ImportanceProbe(model, groups=MODE_GROUPS[m], top_k=top_k if m == "all" else None)
              for m in modes if m in MODE_GROUPS}

    def call(mode, ids, mask):
        if mode == "forward":
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        elif mode == "decoder":
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        else:
            for g, s in probes[mode](ids, mask).items():
                s.topk(top_k[g], dim=-1)

    def peak() -> float:  # GiB
        if cuda:
            return torch.cuda.max_memory_allocated(dev) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    times = {m: [] for m in modes}
    memory, profile = {}, {}
    # on the CPU the process's own CPU time: other jobs on a shared machine barely move it (wall time would
    # count their share of the cores); on a GPU the wall time
    use_cpu_clock = args.clock == "cpu" or (args.clock == "auto" and not cuda)
    clock = time.process_time if use_cpu_clock else time.perf_counter
    warm = (batches[0][0][:1, :64], batches[0][1][:1, :64])
    with torch.no_grad():
        for mode in modes:  # warm-up on one short sentence: allocator, kernels, code paths
            with probes.get(mode, contextlib.nullcontext()):
                call(mode, *warm)
        pruning = {"scored": 0, "channels": 0}
        for rep in range(args.repeats):
            for mode in modes:
                # one probe at a time (attention functions are global); entered, and its weight column
                # norms computed on the warm-up sentence, outside the timing, as detection.py enters its
                # probe once for a whole run
                with probes.get(mode, contextlib.nullcontext()):
                    if mode in probes:
                        call(mode, *warm)
                    if cuda:
                        torch.cuda.synchronize(dev)
                        torch.cuda.reset_peak_memory_stats(dev)
                    before = dict(probes[mode].qk_stats) if mode in probes else None
                    t0 = clock()
                    for ids, mask in batches:
                        call(mode, ids, mask)
                    if cuda:
                        torch.cuda.synchronize(dev)
                    times[mode].append(clock() - t0)
                    if mode == "all":  # the warm-up sentence does not count in the pruned fraction
                        for key in pruning:
                            pruning[key] += probes[mode].qk_stats[key] - before[key]
                memory[mode] = max(memory.get(mode, 0.0), peak())
        if args.profile:
            profile = profiled(modes, batches, call, cuda, probes, geom.num_layers)
    stats = pruning
    median = statistics.median
    ratio = lambda a, b: median([x / y for x, y in zip(times[a], times[b])]) if a in times and b in times else None
    part = lambda a, b: (median([(x - y) / z for x, y, z in zip(times[a], times[b], times["decoder"])])
                         if a in times and b in times else None)
    counted = floor_counts(layer_shapes(model), [len(s) for s in seqs])
    qk_seconds = median([x - y for x, y in zip(times["exhaustive"], times["noqk"])]) \
        if "exhaustive" in times and "noqk" in times else None
    queue.put({"length": length or "mgsm", "model": what, "sentences": len(seqs),
               "tokens": int(sum(len(s) for s in seqs)), "padded_tokens": int(sum(m.numel() for _, m in batches)),
               "batch_size": args.batch_size, "repeats": args.repeats, "device": str(dev),
               "gpu": torch.cuda.get_device_name(dev) if cuda else None, "dtype": str(model.dtype),
               "threads": torch.get_num_threads(), "ratio_top_k": args.ratio, **counted,
               "clock": "process CPU time" if use_cpu_clock else "wall time",
               "load_average": list(__import__("os").getloadavg()), "cores": __import__("os").cpu_count(),
               "seconds": {m: median(t) for m, t in times.items()}, "runs": times,
               "over_decoder": {m: ratio(m, "decoder") for m in modes},
               "split": {"ffn": ratio("ffn", "decoder"), "all_but_qk": ratio("noqk", "decoder"),
                         "qk": part("exhaustive", "noqk")},
               "qk_gflops": 2 * counted["qk_macs"] / qk_seconds / 1e9 if qk_seconds and qk_seconds > 0 else None,
               "pruned_fraction": 1 - stats["scored"] / stats["channels"] if stats["channels"] else None,
               "peak_gib": memory, "profile": profile})


def profiled(modes, batches, call, cuda: bool, probes: dict, layers: int, top: int = 12) -> dict:
    """One more pass per mode under torch.profiler: per mode the operators taking the most self time
    [name, milliseconds, calls] and the total, so a row says where its time goes."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = {}
    for mode in modes:
        with probes.get(mode, contextlib.nullcontext()):
            if mode in probes:
                call(mode, batches[0][0][:1, :64], batches[0][1][:1, :64])
            with profile(activities=acts) as prof:
                for ids, mask in batches:
                    call(mode, ids, mask)
        rows = prof.key_averages()
        key = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
        count = lambda *names: sum(e.count for e in rows if e.key.startswith(names))
        rows = sorted(rows, key=key, reverse=True)
        out[mode] = {"total_ms": sum(key(e) for e in rows) / 1e3,
                     "top": [[e.key, round(key(e) / 1e3, 2), e.count] for e in rows[:top]]}
        if cuda:  # what the issue counts: kernel launches and host synchronisations, per layer and batch
            per = layers * len(batches)
            out[mode].update(launches_per_layer=count("cudaLaunchKernel", "cuLaunchKernel") / per,
                             syncs_per_layer=count("cudaStreamSynchronize", "cudaDeviceSynchronize") / per,
                             copies_per_layer=count("cudaMemcpy") / per)
    return out


def fmt(x, spec=".2f", suffix="x") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--config", help="random weights with this config's layer shapes instead of --model "
                                    "(bench/llama-3.1-8b.config.json, bench/qwen2.5-7b.config.json, ...; "
                                    "several, comma-separated, each timed in turn)")
    p.add_argument("--layers", type=int, default=2, help="--config: decoder layers kept (ratios are per layer)")
    p.add_argument("--vocab", type=int, default=512, help="--config: vocabulary cut to this size")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    p.add_argument("--lengths", default="64,256,1024", help="sentence lengths in tokens; 'mgsm' for the real MGSM questions")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per length (sentences = tokens // length, at least 1)")
    p.add_argument("--corpus", choices=["dataset", "mgsm"], default="dataset",
                   help="mgsm: the same as --lengths mgsm")
    p.add_argument("--dataset", type=Path, default=REPO / "dataset", help="the paper's layout (detect/<lang>.txt)")
    p.add_argument("--per-lang", type=int, default=100, help="MGSM questions per language (length mgsm)")
    p.add_argument("--langs", default="en,zh,th,sw,fr,de")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.01, help="top-k fraction per layer and group, as detection's --ratio")
    p.add_argument("--modes", default="forward,decoder,ffn,noqk,exhaustive,all",
                   help="what is timed (decoder is always included): " + ", ".join(f"{k}: {v}" for k, v in MODES.items()))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                   help="auto: the process's CPU time on the CPU (robust to other jobs), wall time on a GPU")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiled pass per mode")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    modes = args.modes.split(",")
    if "decoder" not in modes:
        modes.insert(0, "decoder")
    if args.config:
        modes = [m for m in modes if m != "forward"]  # a cut vocabulary: the LM head means nothing there
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"--modes: unknown {', '.join(sorted(unknown))}")
    args.modes = ",".join(modes)
    lengths = ["mgsm"] if args.corpus == "mgsm" else args.lengths.split(",")
    if "mgsm" in lengths and not MGSM.is_dir():
        print(f"length mgsm skipped: {MGSM} is absent (it needs the real MGSM questions)")
        lengths = [x for x in lengths if x != "mgsm"]
    ctx = mp.get_context("spawn")
    results = []
    configs = args.config.split(",") if args.config else [None]
    # a fresh process per shape and length: peak memory per length, no cache carried over
    for config, length in [(c, n) for c in configs for n in lengths]:
        args.config = config
        queue = ctx.Queue()
        proc = ctx.Process(target=run_length, args=(None if length == "mgsm" else int(length), args, queue))
        proc.start()
        results.append(queue.get())
        proc.join()
        r = results[-1]
        o = r["over_decoder"]
        print(f"{r['length']:>5} tokens x {r['sentences']:3d}: all six {fmt(o.get('all'))} decoder "
              f"(exhaustive {fmt(o.get('exhaustive'))}, floor {r['floor']:.2f}x), FFN {fmt(o.get('ffn'))}, pruned "
              f"{fmt(None if r['pruned_fraction'] is None else 100 * r['pruned_fraction'], '.0f', '%')}", flush=True)
        for mode, prof in r["profile"].items():
            launches = (f" [{prof['launches_per_layer']:.0f} launches, {prof['syncs_per_layer']:.1f} syncs per layer]"
                        if "launches_per_layer" in prof else "")
            print(f"      {mode:<10} {prof['total_ms']:9.0f} ms{launches}: " + ", ".join(
                f"{name} {ms:.0f}" for name, ms, _ in prof["top"][:5]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    r0 = results[0]
    where = r0["gpu"] or f"CPU, {r0['threads']} threads"
    print(f"\n{'; '.join(dict.fromkeys(r['model'] for r in results))}\n{r0['dtype']}, {where}, batch {args.batch_size}, top {args.ratio:g}, "
          f"median of {args.repeats} repeats of {r0['clock']}, load average {r0['load_average'][0]:.1f} on "
          f"{r0['cores']} cores\n")
    print("| model | tokens/sentence | sentences (tokens, padded) | floor | **all six / decoder** | exhaustive / decoder | "
          "FFN / decoder | all but q/k / decoder | q/k part / decoder | q/k GFLOP/s | pruned | seconds: decoder, all six |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        o, s, sp = r["over_decoder"], r["seconds"], r["split"]
        print(f"| {r['model'].split(',')[0]} | {r['length']} | {r['sentences']} ({r['tokens']}, {r['padded_tokens']}) | {r['floor']:.2f}x | "
              f"**{fmt(o.get('all'))}** | {fmt(o.get('exhaustive'))} | {fmt(sp['ffn'])} | {fmt(sp['all_but_qk'])} | "
              f"{fmt(sp['qk'])} | {fmt(r['qk_gflops'], '.0f', '')} | {fmt(None if r['pruned_fraction'] is None else 100 * r['pruned_fraction'], '.0f', '%')} | "
              f"{s['decoder']:.2f}, {fmt(s.get('all'), '.2f', '')} |")


if __name__ == "__main__":
    main()
