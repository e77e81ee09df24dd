"""How well the query/key channel score predicts the effect of zeroing the q_proj/k_proj row itself.

The channel score (docs/method.md section 2, the paper's) measures removing channel d from the queries and
keys that attention sees, after rotary embedding and q/k normalisation; deactivation and training
switch off row d of q_proj/k_proj, before both. Per layer, per sentence, the truth is brute force:
each row (and its bias entry) zeroed in turn, the attention module replayed alone on that layer's
captured inputs (rows batched, one per copy of the sentence; checked against masking.zeroed on a
few rows), and ||change of O|| measured, O being the attention output that enters o_proj, as the
score is defined. Reported per layer: Spearman rank correlation between score and truth over all rows
and the overlap of their top 1% (and 10%), averaged over sentences. On a model without q/k norms the
exact row score (`--qk-score row`) is scored the same way.

    python bench/qk_rows.py                          # embedded model + tiny llama, 2 MGSM questions x 4 languages
    python bench/qk_rows.py --layers all --per-lang 1
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
MGSM = REPO.parent / "shared" / "data" / "mgsm"

from langneurons.importance import ImportanceProbe  # noqa: E402
from langneurons.metrics import spearman  # noqa: E402
from langneurons.masking import zeroed  # noqa: E402
from langneurons.model import Geometry, decoder_layers, load_model, projections  # noqa: E402
from langneurons.neurons import empty_set  # noqa: E402

GROUP_PROJ = {"attn_q": "q", "attn_k": "k"}


def capture(model, ids, layers, qk_scores):
    """{qk_score: scores} of the probe, and each chosen layer's attention (args, kwargs) of that forward."""
    calls, handles = {}, []
    for i in layers:
        attn = projections(decoder_layers(model)[i])["attn"]
        handles.append(attn.register_forward_pre_hook(
            lambda m, a, k, i=i: calls.__setitem__(i, (a, k)), with_kwargs=True))
    mask = torch.ones_like(ids)
    scores = {}
    try:
        for qk in qk_scores:
            with ImportanceProbe(model, groups=("attn_q", "attn_k"), qk_score=qk) as probe:
                scores[qk] = probe(ids, mask)
    finally:
        for h in handles:
            h.remove()
    return scores, calls


class _Stop(Exception):
    """Raised once O is captured: o_proj and the rest of the layer are not needed."""


@torch.no_grad()
def attention_output(p, args, kwargs, copies=1, rows=None, proj=None):
    """O (input of o_proj) of the replayed attention module, for `copies` copies of the sentence; copy n
    with output channel rows[n] of `proj` switched off (= that row and its bias entry zeroed). The
    projections run once and their outputs are repeated: the copies differ only after them."""
    got = {}

    def take(m, a):
        got["x"] = a[0]
        raise _Stop

    handles = [p["o"].register_forward_pre_hook(take)]
    if copies > 1:
        off = torch.ones(copies, 1, proj.out_features, device=proj.weight.device, dtype=proj.weight.dtype)
        off[torch.arange(copies), 0, rows] = 0
        for key in ("q", "k", "v"):
            handles.append(p[key].register_forward_pre_hook(lambda m, a: (a[0][:1],) + tuple(a[1:])))
            handles.append(p[key].register_forward_hook(
                lambda m, a, o: o.expand(copies, *o.shape[1:]) * off if m is proj else o.expand(copies, *o.shape[1:])))
    # the hidden states (first argument) repeated; masks and rotary tables broadcast over the copies
    many = lambda x: x.expand(copies, *x.shape[1:])
    args, kwargs = ((many(args[0]),) + tuple(args[1:]), kwargs) if args else \
        (args, {**kwargs, "hidden_states": many(kwargs["hidden_states"])})
    try:
        p["attn"](*args, **kwargs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got["x"].float()


def brute_force(model, layer, call, group, batch):
    """||change of O|| for every row of the group's projection, zeroed one at a time."""
    p = projections(decoder_layers(model)[layer])
    proj = p[GROUP_PROJ[group]]
    args, kwargs = call
    base = attention_output(p, args, kwargs)
    out = []
    for r0 in range(0, proj.out_features, batch):
        rows = torch.arange(r0, min(proj.out_features, r0 + batch))
        changed = attention_output(p, args, kwargs, len(rows), rows, proj)
        out.append((changed - base).flatten(1).norm(dim=1))
    truth = torch.cat(out).cpu()
    # the batched hook against zeroing the weights themselves, on a few rows
    nset = empty_set(Geometry.from_config(model.config))
    for r in (0, proj.out_features // 2, proj.out_features - 1):
        nset[group][:] = False
        nset[group][layer, r] = True
        with zeroed(model, nset):
            ref = (attention_output(p, args, kwargs) - base).norm().cpu()
        torch.testing.assert_close(truth[r], ref, rtol=1e-3, atol=1e-5)
    return truth


def top_overlap(score: torch.Tensor, truth: torch.Tensor, fraction: float) -> float:
    k = max(1, int(fraction * len(score)))  # as detection counts its top --ratio
    return len(set(score.topk(k).indices.tolist()) & set(truth.topk(k).indices.tolist())) / k


def measure(name, model, tok, texts, layers, qk_scores, args):
    model.set_attn_implementation("eager")
    seqs = [tok(t, truncation=True, max_length=args.max_tokens)["input_ids"] for t in texts]
    per = {}  # (qk_score, group, layer) -> list of per-sentence metrics
    for ids in tqdm(seqs, desc=name):
        ids = torch.tensor([ids])
        scores, calls = capture(model, ids, layers, qk_scores)
        for layer in layers:
            for group in GROUP_PROJ:
                truth = brute_force(model, layer, calls[layer], group, args.batch)
                for qk in qk_scores:
                    s = scores[qk][group][0, layer]
                    per.setdefault((qk, group, layer), []).append(
                        {"spearman": spearman(s.tolist(), truth.tolist()), "top1": top_overlap(s, truth, 0.01),
                         "top10": top_overlap(s, truth, 0.10),
                         "max_rel_error": float(((s - truth).abs() / truth.clamp(min=1e-12)).max())})
    rows = []
    for (qk, group, layer), ms in per.items():
        mean = {k: sum(m[k] for m in ms) / len(ms) for k in ms[0]}
        rows.append({"model": name, "qk_score": qk, "group": group, "layer": layer, "sentences": len(ms),
                     "rows": len(scores[qk][group][0, layer]), **mean})
    return rows, [len(s) for s in seqs]


def table(rows) -> str:
    """Per layer, then the mean over the layers measured, for each model and score."""
    metrics = ("spearman", "top1", "top10")
    lines = ["| model | score | layer | query: Spearman | query: top-1% | query: top-10% "
             "| key: Spearman | key: top-1% | key: top-10% |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    cell = lambda r: f"{r['spearman']:.3f} | {r['top1']:.2f} | {r['top10']:.2f}"
    for model, qk in dict.fromkeys((r["model"], r["qk_score"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["qk_score"]) == (model, qk)]
        by = {(r["layer"], r["group"]): r for r in mine}
        layers = sorted({r["layer"] for r in mine})
        for layer in layers:
            lines.append(f"| {model} | {qk} | {layer} | {cell(by[layer, 'attn_q'])} | {cell(by[layer, 'attn_k'])} |")
        mean = {g: {m: sum(by[l, g][m] for l in layers) / len(layers) for m in metrics} for g in GROUP_PROJ}
        lines.append(f"| {model} | {qk} | **mean** | {cell(mean['attn_q'])} | {cell(mean['attn_k'])} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m", help="a model with q/k norms: only the channel score")
    p.add_argument("--langs", default="en,zh,sw,fr")
    p.add_argument("--per-lang", type=int, default=2, help="MGSM questions per language")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per sentence (cut)")
    p.add_argument("--layers", default="0,3,6,9,12,15,17", help="comma-separated layer indices, or all")
    p.add_argument("--batch", type=int, default=128, help="rows zeroed per replay (one per copy)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "results" / "qk-rows"))
    args = p.parse_args()
    if not MGSM.is_dir():
        print(f"skipped: {MGSM} is absent (the benchmark needs the real MGSM questions)")
        return
    torch.set_num_threads(args.threads)
    texts = [line.split("\t")[0] for lang in args.langs.split(",")
             for line in (MGSM / f"mgsm_{lang}.tsv").read_text(encoding="utf-8").splitlines()[:args.per_lang]]

    model, tok = load_model(args.model, "cpu", "float32")
    n = Geometry.from_config(model.config).num_layers
    layers = list(range(n)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    rows, lengths = measure(args.model, model, tok, texts, layers, ("channel",), args)
    del model

    from tiny import tiny_model, tiny_tokenizer
    tiny = tiny_model("llama")  # rotary, no q/k norms, grouped-query attention
    tiny_rows, tiny_lengths = measure("tiny llama (random)", tiny, tiny_tokenizer(), texts,
                                      list(range(Geometry.from_config(tiny.config).num_layers)),
                                      ("channel", "row"), args)
    rows += tiny_rows

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = table(rows)
    record = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "texts": texts,
              "tokens": {args.model: lengths, "tiny llama (random)": tiny_lengths}, "rows": rows}
    (out / "qk_rows.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "qk_rows.md").write_text(md + "\n", encoding="utf-8")
    print(md)
    print(f"\n{out}/qk_rows.json, {out}/qk_rows.md")


if __name__ == "__main__":
    main()
