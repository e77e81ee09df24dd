"""Query/key scoring on a device against float32 scoring: the products in bf16 or TF32 (of the float32-formed
probability differences, float32 accumulation), pruned top-k, and the device against the CPU, compared by the
top lists detection keeps.

The attention inputs of every layer are captured from one probed forward over detection-like batches (the
same sentences as bench/detection.py), then scored per layer: float32 exhaustive on the device (the
reference), float32 on the CPU, the pruned top-k path, and each --products precision. For every text, layer
and query/key group it reports whether the top-k list (k from --ratio, as detection) equals the reference's,
the mean overlap and the seconds; a precision is accepted only if every list agrees. It also runs the
stabilised path (scores changing by hundreds) on the device against the plain formula.

    python bench/qk_precision.py --device cuda --config bench/llama-3.1-8b.config.json --layers 2 --json qk.json
    python bench/qk_precision.py --device cpu --lengths 32 --products bfloat16     # CPU dry run
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def capture(model, batches) -> list[tuple]:
    """Per batch and layer, what the attention function received: (query, key, value, keep, valid, scaling, softcap)."""
    from langneurons.importance import ImportanceProbe, visible_keys

    class Recording(ImportanceProbe):
        def query_key_importance(self, module, query, key, value, attention_mask, scaling, softcap):
            keep = visible_keys(attention_mask, query.shape[2], key.shape[2], query.device)
            self.calls.append((query, key, value, keep, self._valid.to(query.device), scaling, softcap))
            for g in self.groups:  # the probe's own result is not needed, only its shape
                self._scores[g][self.layer_of[id(module)]] = query.new_zeros(query.shape[0], 1)

    probe = Recording(model, groups=("attn_q", "attn_k"))
    probe.calls = []
    with probe:
        for ids, mask in batches:
            probe(ids, mask)
    return probe.calls


def synchronize(dev) -> None:
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    import torch
    from bench.detection import load, sentences
    from langneurons.data import batches_by_length, pad_batch, pad_id
    from langneurons.importance import qk_importance, qk_importance_reference
    from langneurons.model import Geometry

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--config", help="random weights with this config's layer shapes (as bench/detection.py)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", help="the model's dtype (the scores are float32 either way)")
    p.add_argument("--lengths", default="64,256")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--dataset", type=Path, default=REPO / "dataset")
    p.add_argument("--langs", default="en,zh,th,sw,fr,de")
    p.add_argument("--per-lang", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--products", default="bfloat16,tf32", help="low-precision products to check (tf32: GPU only)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.corpus = "dataset"
    model, tok, what = load(args)
    dev = next(model.parameters()).device
    geom = Geometry.from_config(model.config)
    vocab = model.get_input_embeddings().weight.shape[0]
    k = {g: max(1, int(args.ratio * geom.group_size(g))) for g in ("attn_q", "attn_k")}
    products = [x for x in args.products.split(",") if x and (x != "tf32" or dev.type == "cuda")]
    report = {"model": what, "device": str(dev), "ratio": args.ratio, "top_k": k, "lengths": {}}
    for length in args.lengths.split(","):
        seqs = sentences(tok, args, None if length == "mgsm" else int(length), vocab)
        batches = [pad_batch([seqs[i] for i in idx], pad_id(tok), dev)
                   for idx in batches_by_length([len(s) for s in seqs], args.batch_size)]
        with torch.no_grad():
            calls = capture(model, batches)
        variants = ["float32 cpu", "pruned"] + products
        agree = {v: {"lists": 0, "equal": 0, "overlap": 0.0} for v in variants}
        seconds = {v: 0.0 for v in ["float32"] + variants}
        for q, key, v, keep, valid, scaling, softcap in calls:
            def timed(name, fn):
                synchronize(dev)
                t0 = time.perf_counter()
                out = fn()
                synchronize(dev)
                seconds[name] += time.perf_counter() - t0
                return out
            ref = timed("float32", lambda: qk_importance(q, key, v, keep, valid, scaling, softcap))
            got = {"float32 cpu": timed("float32 cpu", lambda: qk_importance(
                       q.cpu(), key.cpu(), v.cpu(), keep.cpu(), valid.cpu(), scaling, softcap)),
                   "pruned": timed("pruned", lambda: qk_importance(q, key, v, keep, valid, scaling, softcap,
                                                                    top_k=(k["attn_q"], k["attn_k"])))}
            for prod in products:
                got[prod] = timed(prod, lambda: qk_importance(q, key, v, keep, valid, scaling, softcap, product=prod))
            for name, scores in got.items():
                for a, b, kk in zip(ref, scores, (k["attn_q"], k["attn_k"])):
                    ta = a.float().cpu().topk(kk, -1).indices.sort(-1).values
                    tb = b.float().cpu().topk(kk, -1).indices.sort(-1).values
                    agree[name]["lists"] += ta.shape[0]
                    agree[name]["equal"] += int((ta == tb).all(-1).sum())
                    agree[name]["overlap"] += sum(len(set(x.tolist()) & set(y.tolist())) / kk for x, y in zip(ta, tb))
        for name, a in agree.items():
            a["overlap"] = a["overlap"] / max(1, a["lists"])
            a["accepted"] = a["equal"] == a["lists"]
        report["lengths"][length] = {"sentences": len(seqs), "agreement": agree, "seconds": seconds}
        print(f"{length:>5} tokens: " + "; ".join(
            f"{n}: {a['equal']}/{a['lists']} lists equal (overlap {a['overlap']:.3f}), {seconds[n]:.2f} s"
            for n, a in agree.items()) + f"; float32 {seconds['float32']:.2f} s", flush=True)
    # the stabilised path (every perturbed row shifted by its maximum) on the device against the formula
    torch.manual_seed(1)
    q, key, v = torch.randn(2, 2, 24, 8) * 30, torch.randn(2, 1, 24, 8) * 30, torch.randn(2, 1, 24, 8)
    keep = torch.ones(24, 24, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    valid = torch.ones(2, 24, dtype=torch.bool)
    ref = qk_importance_reference(q, key, v, keep, valid, 0.5)
    got = qk_importance(q.to(dev), key.to(dev), v.to(dev), keep.to(dev), valid.to(dev), 0.5)
    err = max(float(((a.cpu() - b) / b.clamp(min=1e-6)).abs().max()) for a, b in zip(got, ref))
    report["stabilised_max_relative_error"] = err
    print(f"stabilised path on {dev}: max relative error {err:.2e} against the formula")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
