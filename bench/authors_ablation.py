"""What the differences between the paper's formulas and the authors' code explain (issue 10).

On one model and the MGSM texts, detection is run as the paper's formulas (`--method importance`, the
question alone), as the authors' code (`--method authors`), and as the authors' code with each of its
differences undone one at a time (`--authors-undo top_counts|ffn|qk|vo|prompt`). One forward pass per
text format yields both definitions of every group (`AuthorsProbe` with the paper's groups beside),
so the seven variants cost two passes over the corpus; the firing counts and sets are exactly what
detection.py would write (`--check-cli` verifies this by running it). Per variant: sizes of the shared,
exclusive and strictly unique sets, their QK / VO / FFN split (in the variant's own index space, as its
files store it), Jaccard overlap with the paper-formula sets (after mapping the authors' query-head k/v
indices to k_proj/v_proj rows, as deactivation does), and the deactivation control of deactivation.py
--measure-ppl: dPPL of shared and exclusive sets against random sets of equal size.

    python bench/authors_ablation.py                                   # 100 questions x 6 languages, ratio 0.01
    python bench/authors_ablation.py --per-lang 8 --ppl-lines 2 --check-cli --out /tmp/ablation   # quick check
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from langneurons import authors  # noqa: E402
from langneurons.data import detection_corpus  # noqa: E402
from langneurons.data import batches_by_length, pad_batch  # noqa: E402
from langneurons.model import GROUPS, Geometry, load_model  # noqa: E402
from langneurons.neurons import (COMPONENTS, language_sets, read_neuron_file, related_from_counts, size, stats,  # noqa: E402
                                 write_neuron_file)

MGSM = REPO.parent / "shared" / "data" / "mgsm"
# name -> (texts, pieces undone); 'paper' is --method importance on the question alone
VARIANTS = {"paper": ("question", None), "authors": ("authors", ()),
            **{f"undo {p}": ("question" if p == "prompt" else "authors", (p,)) for p in authors.PIECES}}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--mgsm", default=str(MGSM), help="folder with mgsm_<lang>.tsv (the real MGSM)")
    p.add_argument("--val", default=str(REPO / "dataset" / "val"), help="folder with <lang>.txt for perplexity")
    p.add_argument("--langs", default="en,zh,th,sw,fr,de")
    p.add_argument("--per-lang", type=int, default=100, help="MGSM items per language (sampled with --seed)")
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--attention", choices=["causal", "bidirectional"], default="causal",
                   help="the authors' attention setting for every authors-code variant")
    p.add_argument("--ppl-lines", type=int, default=4, help="val lines per language for the deactivation control")
    p.add_argument("--control", default=",".join(VARIANTS),
                   help="variants that get the deactivation control (each costs 14 perplexity runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one: the per-channel loops are many small kernels)")
    p.add_argument("--check-cli", action="store_true",
                   help="also run detection.py for paper, authors and 'undo qk' and require identical sets")
    p.add_argument("--out", default=str(REPO / "results" / "authors-ablation"))
    p.add_argument("--report-only", action="store_true", help="rewrite table.md and ablation.png from --out's ablation.json")
    p.add_argument("--cache", help="keep the firing counts in this file and reuse them when the detection "
                                   "arguments are the same (the reporting part can then be rerun alone)")
    return p.parse_args()


def variant_setup(name: str, geom: Geometry, ratio: float):
    """(group definitions, index sizes, per-text top counts, kv_index_space) of a variant."""
    undo = VARIANTS[name][1]
    if undo is None:  # the paper's method: every definition the paper's, its counts, k/v on rows
        defs = {g: "paper" for g in GROUPS}
        sizes = authors.score_sizes(geom, defs)
        return defs, sizes, authors.top_counts(geom, ratio, sizes, swapped=False), "kv_rows"
    defs = authors.definitions(undo)
    sizes = authors.score_sizes(geom, defs)
    return defs, sizes, authors.top_counts(geom, ratio, sizes, "top_counts" not in undo), authors.kv_index_space(defs)


def count_firing(model, tok, corpora: dict[str, dict[str, list[str]]], geom: Geometry, args):
    """{variant: {group: int64 [langs, layers, n]}}, sentences [langs]: two passes (one per text format)."""
    langs = args.langs.split(",")
    setups = {v: variant_setup(v, geom, args.ratio) for v in VARIANTS}
    firing = {v: {g: torch.zeros(len(langs), geom.num_layers, setups[v][1][g], dtype=torch.int64) for g in GROUPS}
              for v in VARIANTS}
    seen = torch.zeros(len(langs), dtype=torch.int64)
    with authors.AuthorsProbe(model, paper_groups=GROUPS, attention=args.attention) as probe:
        for fmt in ("question", "authors"):
            mine = [v for v in VARIANTS if VARIANTS[v][0] == fmt]
            for li, lang in enumerate(langs):
                seqs = [tok(s)["input_ids"][:args.max_length] for s in corpora[fmt][lang]]
                for idx in tqdm(batches_by_length([len(s) for s in seqs], args.batch_size), desc=f"{fmt} {lang}"):
                    scores = dict(zip(("authors", "paper"), probe(*pad_batch([seqs[i] for i in idx], tok.pad_token_id,
                                                                              "cpu"))))
                    for v in mine:
                        defs, _, k, _ = setups[v]
                        for g in GROUPS:
                            s = scores[defs[g]][g]
                            top = s.topk(k[g], dim=-1).indices
                            firing[v][g][li] += torch.zeros(s.shape, dtype=torch.int64).scatter_(-1, top, 1).sum(0)
                    if fmt == "question":
                        seen[li] += len(idx)
    return firing, seen, setups


def jaccard(a, b) -> float:
    inter = sum(int((a[g] & b[g]).sum()) for g in GROUPS)
    union = sum(int((a[g] | b[g]).sum()) for g in GROUPS)
    return inter / union if union else 1.0


def deactivation_control(model_arg: str, dataset: Path, nd: Path, langs: list[str], args, work: Path) -> dict:
    """deactivation.py --measure-ppl on shared, exclusive and their random controls."""
    names = ["shared", "random_shared"] + [f"{k}_{l}" for l in langs for k in ("exclusive", "random_exclusive")]
    cmd = [sys.executable, str(REPO / "deactivation.py"), "--model", model_arg, "--dataset", str(dataset),
           "--langs", ",".join(langs), "--out", str(work), "--measure-ppl", "--save-variants", "none",
           "--limit", str(args.ppl_lines), "--device", "cpu", "--dtype", "float32", "--force"]
    for n in names:
        cmd += ["--neurons", f"{n}={nd / (n + '.json')}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode:
        raise SystemExit(f"deactivation.py failed:\n{r.stderr[-3000:]}")
    res = json.loads(next(work.glob("*/deactivation.json")).read_text())
    d = {n: res["sets"][n]["dppl"] for n in names}
    return {"dppl_shared": float(np.mean([d["shared"][l] for l in langs])),
            "dppl_random_shared": float(np.mean([d["random_shared"][l] for l in langs])),
            # an exclusive set on its own language, against its random control there
            "dppl_exclusive_own": float(np.mean([d[f"exclusive_{l}"][l] for l in langs])),
            "dppl_random_exclusive_own": float(np.mean([d[f"random_exclusive_{l}"][l] for l in langs])),
            "size_kv_rows": {n: res["sets"][n]["size"] for n in names},
            "language_agnostic_score": res.get("language_agnostic_score"),
            "base_ppl": {l: res["results"]["ppl"][l]["ppl"] for l in langs}}


def check_cli(args, dataset: Path, sets: dict, setups: dict, geom: Geometry, work: Path) -> None:
    """detection.py gives exactly the sets computed here (paper, authors, undo qk)."""
    for v, extra in [("paper", ["--method", "importance"]), ("authors", ["--method", "authors"]),
                     ("undo qk", ["--method", "authors", "--authors-undo", "qk"])]:
        out = work / v.replace(" ", "_")
        cmd = [sys.executable, str(REPO / "detection.py"), "--model", args.model, "--dataset", str(dataset),
               "--corpus", "mgsm", "--langs", args.langs, "--sample-size", str(args.per_lang), "--ratio",
               str(args.ratio), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--seed", str(args.seed), "--device", "cpu", "--dtype", "float32", "--out", str(out), *extra]
        if v != "paper":
            cmd += ["--authors-attention", args.attention]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode:
            raise SystemExit(f"detection.py failed:\n{r.stderr[-3000:]}")
        nd = next(out.glob("*/neurons"))
        for name in ("shared", "exclusive_" + args.langs.split(",")[0]):
            raw = json.loads((nd / f"{name}.json").read_text())
            assert raw["meta"]["kv_index_space"] == setups[v][3], (v, name)
            for g in GROUPS:
                ours = {str(l): torch.nonzero(sets[v][name][g][l]).flatten().tolist() for l in range(geom.num_layers)}
                assert ours == raw[g], (v, name, g)
        print(f"check-cli: detection.py gives the same sets for '{v}'")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    langs = args.langs.split(",")
    out = Path(args.out)
    if args.report_only:
        saved = json.loads((out / "ablation.json").read_text())
        (out / "table.md").write_text(table(saved["variants"], saved["meta"]))
        figure(saved["variants"], out / "ablation.png", saved["meta"])
        print((out / "table.md").read_text())
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = tmp / "dataset"  # the paper's layout over the given folders
        (dataset / "test").mkdir(parents=True)
        (dataset / "test" / "mgsm").symlink_to(Path(args.mgsm).resolve())
        (dataset / "val").symlink_to(Path(args.val).resolve())
        # both formats from the same sampled items (same seed, same number of lines)
        corpora = {fmt: {l: detection_corpus(dataset, l, args.per_lang, args.seed, "mgsm", fmt) for l in langs}
                   for fmt in ("question", "authors")}
        key = {k: getattr(args, k) for k in ("model", "mgsm", "langs", "per_lang", "ratio", "batch_size",
                                             "max_length", "attention", "seed")}
        cached = torch.load(args.cache) if args.cache and Path(args.cache).is_file() else None
        if cached is not None and cached["key"] == key:
            print(f"firing counts from {args.cache}")
            geom = Geometry(**cached["geometry"])
            firing, seen = cached["firing"], cached["seen"]
            setups = {v: variant_setup(v, geom, args.ratio) for v in VARIANTS}
        else:
            model, tok = load_model(args.model, "cpu", "float32")
            geom = Geometry.from_config(model.config)
            firing, seen, setups = count_firing(model, tok, corpora, geom, args)
            del model
            if args.cache:
                torch.save({"key": key, "geometry": geom.__dict__, "firing": firing, "seen": seen}, args.cache)

        sets, rows, on_rows = {}, {}, {}
        for v in VARIANTS:
            related = related_from_counts(firing[v], seen, langs, 1.0)
            sets[v] = language_sets(related, geom, args.seed)
            nd = tmp / "neurons" / v.replace(" ", "_")
            for name, s in sets[v].items():
                write_neuron_file(nd / f"{name}.json", s, {"variant": v, "set": name}, setups[v][3])
            st = stats(sets[v], langs, geom)
            sset = st["sets"]
            # the variant's sets on k_proj/v_proj rows, read back as deactivation reads them
            on_rows[v] = {n: read_neuron_file(nd / f"{n}.json", geom)[0]
                          for n in ["shared"] + [f"exclusive_{l}" for l in langs]}
            mean = lambda key: float(np.mean([sset[f"{key}_{l}"]["size"] for l in langs]))
            share = lambda n: {c: sset[n]["component_shares"][c] for c in COMPONENTS}
            excl_share = {c: float(np.mean([sset[f"exclusive_{l}"]["component_shares"][c] for l in langs]))
                          for c in COMPONENTS}
            control = None
            if v in args.control.split(","):
                print(f"deactivation control: {v}", flush=True)
                control = deactivation_control(args.model, dataset, nd, langs, args, tmp / "deact" / v.replace(" ", "_"))
            rows[v] = {"texts": VARIANTS[v][0], "undo": VARIANTS[v][1], "definitions": setups[v][0],
                       "top_counts": setups[v][2], "kv_index_space": setups[v][3],
                       "total_neurons_index_space": st["total_neurons"],
                       "shared": sset["shared"]["size"], "exclusive_mean": mean("exclusive"),
                       "unique_mean": mean("unique"), "related_all": sset["related_all"]["size"],
                       "shared_split": share("shared"), "exclusive_split": excl_share,
                       "control": control}
        for v in VARIANTS:
            p, r = on_rows["paper"], on_rows[v]
            rows[v]["shared_kv_rows"] = size(r["shared"])
            rows[v]["jaccard_vs_paper"] = {
                "shared": jaccard(r["shared"], p["shared"]),
                "exclusive_mean": float(np.mean([jaccard(r[f"exclusive_{l}"], p[f"exclusive_{l}"]) for l in langs]))}
        if args.check_cli:
            check_cli(args, dataset, sets, setups, geom, tmp / "cli")

    meta = {"model": args.model, "geometry": geom.__dict__, "langs": langs, "per_lang": args.per_lang,
            "ratio": args.ratio, "attention": args.attention, "ppl_lines": args.ppl_lines, "seed": args.seed,
            "sentences": seen.tolist(), "argv": sys.argv}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps({"meta": meta, "variants": rows}, indent=1) + "\n")
    (out / "table.md").write_text(table(rows, meta))
    figure(rows, out / "ablation.png", meta)
    print((out / "table.md").read_text())
    print(f"written: {out}/ablation.json, table.md, ablation.png")


def table(rows: dict, meta: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}"
    head = ("| variant | shared | excl. (mean) | unique (mean) | shared QK / VO / FFN % | excl. QK / VO / FFN % "
            "| Jaccard shared / excl. vs paper | dPPL shared (random) | dPPL excl. own lang (random) |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for v, r in rows.items():
        c = r["control"]
        dppl = lambda a, b: f"{c[a]:.4g} ({c[b]:.3g})" if c else "–"
        lines.append(f"| {v} | {r['shared']} | {r['exclusive_mean']:.1f} | {r['unique_mean']:.1f} "
                     f"| {' / '.join(pct(r['shared_split'][k]) for k in COMPONENTS)} "
                     f"| {' / '.join(pct(r['exclusive_split'][k]) for k in COMPONENTS)} "
                     f"| {r['jaccard_vs_paper']['shared']:.2f} / {r['jaccard_vs_paper']['exclusive_mean']:.2f} "
                     f"| {dppl('dppl_shared', 'dppl_random_shared')} "
                     f"| {dppl('dppl_exclusive_own', 'dppl_random_exclusive_own')} |")
    return (f"{meta['model']}, MGSM, {meta['per_lang']} items x {len(meta['langs'])} languages, ratio {meta['ratio']}, "
            f"authors' attention {meta['attention']}; dPPL on {meta['ppl_lines']} val lines per language, mean over "
            f"languages (exclusive sets on their own language). Sizes and splits count each variant's own index "
            f"space (the authors' attn_k/attn_v in query-head space); Jaccard is on k_proj/v_proj rows.\n\n"
            + head + "\n".join(lines) + "\n")


def figure(rows: dict, path: Path, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = {"QK": "#4c72b0", "VO": "#dd8452", "FFN": "#55a868"}
    for ax, key, title in ((axes[0], "shared_split", "shared"), (axes[1], "exclusive_split", "exclusive (mean)")):
        bottom = np.zeros(len(names))
        for c in COMPONENTS:
            vals = np.array([100 * rows[n][key][c] for n in names])
            ax.bar(names, vals, bottom=bottom, color=colors[c], label=c)
            bottom += vals
        ax.set_title(f"{title}: QK / VO / FFN split (%)")
        ax.tick_params(axis="x", rotation=40)
    axes[0].legend(loc="lower left", fontsize=8, framealpha=0.9)
    x = np.arange(len(names))
    axes[2].bar(x - 0.2, [rows[n]["jaccard_vs_paper"]["shared"] for n in names], 0.4, label="shared")
    axes[2].bar(x + 0.2, [rows[n]["jaccard_vs_paper"]["exclusive_mean"] for n in names], 0.4, label="exclusive (mean)")
    axes[2].set_xticks(x, names, rotation=40)
    axes[2].set_title("Jaccard with the paper-formula sets (k/v on rows)")
    axes[2].legend()
    fig.suptitle(f"{meta['model']}: paper formulas vs the authors' code, ratio {meta['ratio']}, "
                 f"{meta['per_lang']} MGSM items x {len(meta['langs'])} languages")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
