"""How many detection texts are enough: set stability against texts per language, from ONE detection run.

detection.py runs once (or an earlier run in --out is reused: its fingerprint matches) and keeps each text's
selection (neurons/per_text.safetensors). From those alone, without the model, for every n of --sizes: with
2n <= the texts of the smallest language, --resamples times two disjoint random draws of n texts per language
(without replacement), the sets of each draw, and their Jaccard (split-half agreement at n); with n equal to the
whole pool, the bootstrap Jaccard of n texts drawn with replacement against the full-data set (a pool of n texts
has no two disjoint halves of n). Sizes beyond that are skipped. Sets: shared, related_all and each language's
exclusive set (langneurons/stability.curve). Writes a JSON and a PNG (docs/stability.md reads them).

    python bench/stability.py                                   # embedded model and dataset: 160 texts per language
    python bench/stability.py --mgsm --sizes 10,20,40,80,125,250  # the real MGSM questions (../shared/data/mgsm)
    python bench/stability.py --neurons outputs/gemma-3-270m/neurons  # the per-text data of a run already made
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MGSM = REPO.parent / "shared" / "data" / "mgsm"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--langs", default="en,zh,th,sw,fr,de")
    p.add_argument("--dataset", type=Path, default=REPO / "dataset", help="the paper's layout (detect/<lang>.txt)")
    p.add_argument("--mgsm", action="store_true",
                   help=f"detect on the real MGSM questions in {MGSM} (250 per language) instead of detect/")
    p.add_argument("--neurons", type=Path, help="a detection output folder to read instead of running detection")
    p.add_argument("--out", type=Path, default=REPO / "outputs",
                   help="detection's --out (a second run reuses it)")
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--threshold", type=float, default=1.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default="10,20,40,80,160", help="texts per language")
    p.add_argument("--resamples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=REPO / "results" / "stability" / "stability_curve.json")
    p.add_argument("--png", type=Path, default=REPO / "docs" / "figures" / "stability.png")
    return p.parse_args()


def run_detection(args: argparse.Namespace) -> Path:
    """detection.py on the model and corpus (reused when its outputs are already there); its neurons folder."""
    from langneurons.layout import outputs
    cmd = [sys.executable, str(REPO / "detection.py"), "--model", args.model, "--langs", args.langs,
           "--out", str(args.out), "--ratio", str(args.ratio), "--threshold", str(args.threshold),
           "--device", args.device, "--seed", str(args.seed)]
    with tempfile.TemporaryDirectory() as tmp:
        if args.mgsm:
            # the dataset layout's test/mgsm/ is the shared MGSM folder
            (Path(tmp) / "test").mkdir()
            os.symlink(MGSM, Path(tmp) / "test" / "mgsm")
            cmd += ["--dataset", tmp, "--corpus", "mgsm"]
        else:
            cmd += ["--dataset", str(args.dataset)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO)
        print(f"detection: {time.perf_counter() - start:.0f} s")
    return outputs(args.out, args.model).neurons


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    names = doc["sets"]
    for i, name in enumerate(names):
        for kind, marker, fill in (("split_half", "o", True), ("bootstrap", "s", False)):
            pts = [p for p in doc["points"] if p["kind"] == kind]
            if not pts:
                continue
            x = [p["texts"] * (1 + 0.02 * (i - len(names) / 2)) for p in pts]  # a small offset per set
            y = [p["sets"][name]["jaccard"]["mean"] for p in pts]
            lo = [m - p["sets"][name]["jaccard"]["ci"][0] for m, p in zip(y, pts)]
            hi = [p["sets"][name]["jaccard"]["ci"][1] - m for m, p in zip(y, pts)]
            ax.errorbar(x, y, yerr=[lo, hi], marker=marker, capsize=2, lw=1 if kind == "split_half" else 0,
                        elinewidth=0.8, color=f"C{i}", mfc=f"C{i}" if fill else "white",
                        label=name if kind == "split_half" else None)
    ax.set_xscale("log", base=2)
    ax.set_xticks([p["texts"] for p in doc["points"]], [str(p["texts"]) for p in doc["points"]])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("detection texts per language")
    ax.set_ylabel("Jaccard (mean, 95% interval)")
    ax.set_title(f"{doc['model']}, {doc['corpus']}: filled = split halves of n, hollow = bootstrap vs all",
                 fontsize=8)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main() -> None:
    args = parse_args()
    from langneurons import stability
    from langneurons.model import Geometry
    nd = args.neurons or run_detection(args)
    meta = json.loads((nd / "meta.json").read_text())
    pt = stability.load_per_text(nd / "per_text.safetensors")
    geom = Geometry(**meta["geometry"])
    names = ["shared", "related_all"] + [f"exclusive_{l}" for l in pt.langs]
    start = time.perf_counter()
    points = stability.curve(pt, geom, meta["threshold"], meta["ratio"], [int(x) for x in args.sizes.split(",")],
                             args.resamples, args.seed, names)
    seconds = time.perf_counter() - start
    doc = {"model": meta["model"], "corpus": meta["corpus"]["name"], "method": meta["method"], "ratio": meta["ratio"],
           "threshold": meta["threshold"], "texts": dict(zip(pt.langs, pt.texts())), "resamples": args.resamples,
           "seed": args.seed, "seconds": round(seconds, 1), "sets": names, "points": points}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, args.png)
    print(f"{len(points)} sizes x {args.resamples} resamples in {seconds:.1f} s -> {args.json}, {args.png}")
    for p in points:
        row = "  ".join(f"{n} {p['sets'][n]['jaccard']['mean']:.2f} [{p['sets'][n]['jaccard']['ci'][0]:.2f}, "
                        f"{p['sets'][n]['jaccard']['ci'][1]:.2f}]" for n in names[:3])
        print(f"n={p['texts']:>4} {p['kind']:<10} {row}")


if __name__ == "__main__":
    main()
