"""Figures and tables of the paper from the files the stages wrote (no model is loaded).

    python figures.py --out ./outputs [--models gemma-3-270m,Llama-3.2-1B]

Writes <out>/figures/*.png and <out>/figures/report.md (markdown tables of the same numbers, with links to
the figures). A figure whose inputs are missing is skipped with a note in report.md.

  neuron_distribution.png   shared / exclusive / unique neurons per language, % of all neurons (paper Fig. 2)
  deactivation_<tag>.png    dPPL per language when random, shared or exclusive neurons are off (Fig. 4)
  layers_<tag>.png          shared and exclusive neurons per layer (Fig. 6/7)
  components.png            QK / VO / FFN split of shared and exclusive neurons (Table 2)
  ability.png               shared ratio and LAS against multilingual ability across models (Fig. 3/5)
  training_<tag>.png        validation perplexity and accuracy before/after targeted training (Table 1)"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from langneurons.cli import ArgumentParser, InputError, run, split_list  # noqa: E402
from langneurons.files import temp_name, write_bytes  # noqa: E402
from langneurons.metrics import pearson, spearman  # noqa: E402
from langneurons.data import LANGUAGE_NAMES  # noqa: E402
from langneurons.reuse import check_writable, hold_lock, remove_temporaries  # noqa: E402

COLORS = {"shared": "#1f77b4", "exclusive": "#ff7f0e", "unique": "#d62728", "random": "#7f7f7f",
          "random_exclusive": "#bcbd22", "QK": "#1f77b4", "VO": "#2ca02c", "FFN": "#ff7f0e",
          "before": "#9ecae1", "after": "#08519c"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="./outputs", help="output root the stages wrote to")
    p.add_argument("--models", default=None, help="comma list of model tags (directories under --out); "
                   "default: every one with results")
    return p.parse_args(argv)


def lang_name(l: str) -> str:
    return LANGUAGE_NAMES.get(l, l)


def load(path: Path) -> Any:
    """A JSON file, or None when it is missing or unreadable (the figure needing it is then skipped)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def fmt(x: Any, spec: str = ".3f") -> str:
    v = num(x)
    return format(v, spec) if v is not None else "–"


def pct(x: Any) -> str:
    v = num(x)
    return f"{100 * v:.3f}%" if v is not None else "–"


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def save(fig: Figure, path: Path) -> None:
    """Write under a temporary name, then rename: no half-written PNG is ever left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def stats_langs(stats: dict, meta: dict | None) -> list[str]:
    """Languages from neurons/meta.json, else from the names of the related_<lang> sets."""
    if isinstance(meta, dict) and isinstance(meta.get("langs"), list):
        return [str(l) for l in meta["langs"]]
    return [n[len("related_"):] for n in stats.get("sets", {}) if n.startswith("related_") and n != "related_all"]


def set_value(stats: dict, name: str, key: str) -> Any:
    return stats.get("sets", {}).get(name, {}).get(key)


# ---------------------------------------------------------------- figures (each returns its Figure)

def fig_distribution(models: dict[str, tuple[dict, list[str]]]) -> Figure:
    """Paper Fig. 2: per model one panel; per language the shared neurons (the same for all languages)
    stacked under that language's exclusive ones (together: its language-related neurons), and the strictly
    unique ones beside them; % of all neurons."""
    fig, axes = plt.subplots(1, len(models), figsize=(max(4.5, 1.0 * max(len(l) for _, l in models.values()) + 2)
                                                      * len(models), 4.2), squeeze=False)
    for ax, (tag, (stats, langs)) in zip(axes[0], models.items()):
        x = np.arange(len(langs))
        shared = 100 * (num(set_value(stats, "shared", "fraction")) or 0.0)
        excl = [100 * (num(set_value(stats, f"exclusive_{l}", "fraction")) or 0.0) for l in langs]
        uniq = [100 * (num(set_value(stats, f"unique_{l}", "fraction")) or 0.0) for l in langs]
        w = 0.38
        ax.bar(x - w / 2, [shared] * len(langs), w, color=COLORS["shared"], label="shared")
        ax.bar(x - w / 2, excl, w, bottom=[shared] * len(langs), color=COLORS["exclusive"], label="exclusive")
        ax.bar(x + w / 2, uniq, w, color=COLORS["unique"], label="strictly unique")
        ax.set_xticks(x, [lang_name(l) for l in langs], rotation=30, ha="right")
        ax.set_ylabel("% of all neurons")
        ratio = num(stats.get("shared_ratio"))
        ax.set_title(f"{tag}\nshared ratio {ratio:.2f}" if ratio is not None else tag)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Language-related neurons: shared and exclusive per language")
    fig.tight_layout()
    return fig


def fig_deactivation(tag: str, deact: dict, langs: list[str]) -> Figure:
    """Paper Fig. 4: dPPL per language after deactivating random, shared and exclusive neurons."""
    sets = deact.get("sets", {})
    bars = [("random (shared size)", lambda l: "random_shared", COLORS["random"]),
            ("shared", lambda l: "shared", COLORS["shared"]),
            ("random (exclusive size)", lambda l: f"random_exclusive_{l}", COLORS["random_exclusive"]),
            ("exclusive", lambda l: f"exclusive_{l}", COLORS["exclusive"])]
    bars = [b for b in bars if any(b[1](l) in sets for l in langs)]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(langs) + 2), 4.2))
    x = np.arange(len(langs))
    w = 0.8 / max(1, len(bars))
    values = []
    for i, (label, name, color) in enumerate(bars):
        v = [num(sets.get(name(l), {}).get("dppl", {}).get(l)) for l in langs]
        values += [a for a in v if a is not None]
        ax.bar(x + (i - (len(bars) - 1) / 2) * w, [a if a is not None else 0.0 for a in v], w, color=color, label=label)
    # dPPL spans orders of magnitude (random ~0, shared/exclusive often > 100x); symlog keeps small and
    # negative values visible
    if values and max(abs(a) for a in values) > 50:
        ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x, [lang_name(l) for l in langs], rotation=30, ha="right")
    ax.set_ylabel("ΔPPL (deactivated − base)")
    las = num(deact.get("language_agnostic_score"))
    ax.set_title(f"{tag}: perplexity increase after deactivation" + (f" (LAS {las:.3f})" if las is not None else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: bars reach the top
    fig.tight_layout()
    return fig


def fig_layers(tag: str, stats: dict, langs: list[str]) -> Figure:
    """Paper Fig. 6/7: shared neurons per layer, and exclusive neurons per layer for each language."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    shared = set_value(stats, "shared", "layers") or []
    a1.bar(np.arange(len(shared)), shared, color=COLORS["shared"])
    a1.set_title(f"{tag}: shared neurons per layer")
    for l in langs:
        layers = set_value(stats, f"exclusive_{l}", "layers")
        if layers:
            a2.plot(np.arange(len(layers)), layers, marker="o", ms=3, label=lang_name(l))
    a2.set_title(f"{tag}: exclusive neurons per layer")
    for ax in (a1, a2):
        ax.set_xlabel("layer")
        ax.set_ylabel("neurons")
        ax.grid(alpha=0.3)
    if a2.lines:
        a2.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def component_rows(stats: dict, langs: list[str]) -> list[tuple[str, dict]]:
    names = [("shared", "shared")] + [(f"exclusive {lang_name(l)}", f"exclusive_{l}") for l in langs]
    return [(label, stats["sets"][n]) for label, n in names if n in stats.get("sets", {})]


def fig_components(models: dict[str, tuple[dict, list[str]]]) -> Figure:
    """Paper Table 2 as a figure: share of QK, VO and FFN neurons in the shared and each exclusive set."""
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 0.45 * max(len(l) for _, l in models.values())
                                                      + 2), squeeze=False)
    for ax, (tag, (stats, langs)) in zip(axes[0], models.items()):
        rows = component_rows(stats, langs)
        y = np.arange(len(rows))
        left = np.zeros(len(rows))
        for comp in ("QK", "VO", "FFN"):
            v = np.array([100 * (num(s.get("component_shares", {}).get(comp)) or 0.0) for _, s in rows])
            ax.barh(y, v, left=left, color=COLORS[comp], label=comp)
            left += v
        ax.set_yticks(y, [label for label, _ in rows])
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of the set's neurons")
        ax.set_title(tag)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Where the neurons are: query/key, value/output, FFN")
    fig.tight_layout()
    return fig


def fig_ability(points: list[dict]) -> Figure:
    """Paper Fig. 3/5: shared ratio and LAS of each model against its multilingual ability (mean accuracy)."""
    metrics = [m for m in ("mgsm", "mmmlu") if sum(p.get(m) is not None for p in points) >= 2]
    fig, axes = plt.subplots(2, len(metrics), figsize=(5 * len(metrics), 8), squeeze=False)
    for j, metric in enumerate(metrics):
        for i, (key, label) in enumerate((("shared_ratio", "shared ratio |shared| / mean |exclusive|"),
                                          ("las", "language-agnostic score (LAS)"))):
            ax = axes[i][j]
            pts = [(p[metric], p[key], p["tag"]) for p in points if p.get(metric) is not None and p.get(key) is not None]
            xs, ys = [a for a, _, _ in pts], [b for _, b, _ in pts]
            ax.scatter(xs, ys, color=COLORS["shared"])
            for a, b, t in pts:
                ax.annotate(t, (a, b), fontsize=8, xytext=(3, 3), textcoords="offset points")
            r, rho = pearson(xs, ys), spearman(xs, ys)
            stats = ", ".join(s for s in (f"Pearson {r:.2f}" if r is not None else "",
                                          f"Spearman {rho:.2f}" if rho is not None else "") if s)
            ax.set_title(f"{label} vs {metric.upper()}" + (f"\n{stats}" if stats else ""), fontsize=10)
            ax.set_xlabel(f"mean {metric.upper()} accuracy over languages")
            ax.set_ylabel(label.split(" |")[0])
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def fig_training(tag: str, runs: list[dict], langs: list[str]) -> Figure:
    """Paper Table 1 as a figure: per training run, validation perplexity per language before and after,
    and the change of MGSM / MMMLU accuracy per language where the trained model was evaluated."""
    acc_metrics = [m for m in ("mgsm", "mmmlu") if any(r["acc_after"].get(m) for r in runs)]
    ncols = 1 + len(acc_metrics)
    fig, axes = plt.subplots(len(runs), ncols, figsize=(5.5 * ncols, 3.6 * len(runs)), squeeze=False)
    for i, r in enumerate(runs):
        ax = axes[i][0]
        ls = [l for l in langs if l in r["before"] or l in r["after"]] or sorted(set(r["before"]) | set(r["after"]))
        x = np.arange(len(ls))
        for k, (key, off) in enumerate((("before", -0.2), ("after", 0.2))):
            v = [num(r[key].get(l, {}).get("ppl")) for l in ls]
            ax.bar(x + off, [a if a is not None else 0 for a in v], 0.4, color=COLORS[key], label=key)
        ax.set_xticks(x, [lang_name(l) for l in ls], rotation=30, ha="right")
        ax.set_ylabel("validation perplexity")
        vals = [num(r[k].get(l, {}).get("ppl")) for k in ("before", "after") for l in ls]
        vals = [v for v in vals if v]
        if vals and max(vals) / max(min(vals), 1e-9) > 20:
            ax.set_yscale("log")
        ax.set_title(f"{r['run']} (target {lang_name(r['lang']) if r['lang'] else '?'}, neurons {r['neurons'] or '?'})",
                     fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        for j, m in enumerate(acc_metrics, 1):
            ax = axes[i][j]
            after, before = r["acc_after"].get(m, {}), r["acc_before"].get(m, {})
            ls2 = [l for l in langs if l in after] or sorted(after)
            d = [100 * (after[l] - before[l]) if l in before else 0.0 for l in ls2]
            ax.bar(np.arange(len(ls2)), d, color=[COLORS["after"] if v >= 0 else COLORS["unique"] for v in d])
            ax.axhline(0, color="black", lw=0.6)
            ax.set_xticks(np.arange(len(ls2)), [lang_name(l) for l in ls2], rotation=30, ha="right")
            ax.set_ylabel(f"Δ {m.upper()} accuracy (points)")
            ax.set_title(f"{r['run']}: {m.upper()} after − before", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{tag}: neuron-targeted continued pretraining")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- reading the stages' files

def eval_accuracy(ev: dict | None) -> dict[str, dict[str, float]]:
    """task -> lang -> accuracy (or ppl) from an eval/<name>.json."""
    out: dict[str, dict[str, float]] = {}
    for task, res in ((ev or {}).get("results") or {}).items():
        key = "ppl" if task == "ppl" else "accuracy"
        if isinstance(res, dict):
            out[task] = {l: v[key] for l, v in res.items() if isinstance(v, dict) and num(v.get(key)) is not None}
    return out


def mean_acc(acc: dict[str, dict[str, float]], task: str) -> float | None:
    vals = list(acc.get(task, {}).values())
    return float(np.mean(vals)) if vals else None


def read_train_log(log: dict, run_name: str) -> dict | None:
    """The before/after validation numbers of one training run (train.py's train_log.json:
    "val": {"lang", "before": {"loss", "ppl", "tokens"}, "after": {...}}), or None without them."""
    val, neurons = log.get("val"), log.get("neurons")
    if not isinstance(val, dict) or not isinstance(val.get("before"), dict) or not isinstance(val.get("after"), dict):
        return None
    lang = val.get("lang") or log.get("trained_lang")
    pick = lambda v: {k: float(v[k]) for k in ("loss", "ppl") if num(v.get(k)) is not None}
    name = neurons.get("name") if isinstance(neurons, dict) else log.get("mode")
    return {"run": run_name, "lang": lang, "neurons": name,
            "before": {lang: pick(val["before"])}, "after": {lang: pick(val["after"])}}


def discover(out: Path, only: list[str] | None) -> list[str]:
    if only:
        return only
    found = []
    for d in sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []:
        if d.name == "figures" or d.name.startswith("."):
            continue
        if ((d / "neurons" / "stats.json").is_file() or (d / "deactivation.json").is_file()
                or (d / "eval").is_dir() or (d / "trained").is_dir()):
            found.append(d.name)
    return found


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {args.out}: {out} is a file, not a folder")
    if not out.is_dir():
        raise InputError(f"--out {out}: no such directory (the output root the stages wrote to)")
    fig_dir = out / "figures"
    only = split_list(args.models) if args.models is not None else None
    if only is not None and not only:
        raise InputError(f"--models '{args.models}': no model tag given")
    if only and (missing := [t for t in only if not (out / t).is_dir()]):
        raise InputError(f"--models {missing[0]}: no directory {out / missing[0]}")
    check_writable(fig_dir, f"--out {args.out}", folder=True)
    hold_lock(fig_dir)  # a second run waits for this one
    remove_temporaries(fig_dir)  # of a killed run
    tags = discover(out, only)
    report = ["# Language neurons: figures and tables\n",
              f"Generated by `figures.py` from the files under `{out}` (models: {', '.join(tags) or 'none'}).\n"]
    notes: list[str] = []
    made: list[str] = []

    def emit(fig: Figure, name: str) -> str:
        save(fig, fig_dir / name)
        made.append(name)
        return f"![{name}]({name})\n"

    # ---------------------------------------------------------------- load everything there is
    neuron_models: dict[str, tuple[dict, list[str]]] = {}
    deacts: dict[str, tuple[dict, list[str]]] = {}
    evals: dict[str, dict[str, dict]] = {}
    for tag in tags:
        d = out / tag
        stats = load(d / "neurons" / "stats.json")
        if isinstance(stats, dict) and isinstance(stats.get("sets"), dict):
            neuron_models[tag] = (stats, stats_langs(stats, load(d / "neurons" / "meta.json")))
        else:
            notes.append(f"{tag}: no readable neurons/stats.json (run detection.py): neuron figures skipped")
        deact = load(d / "deactivation.json")
        if isinstance(deact, dict) and isinstance(deact.get("sets"), dict):
            langs = (deact.get("meta") or {}).get("langs") or list((deact.get("results") or {}).get("ppl", {}))
            deacts[tag] = (deact, langs)
        else:
            notes.append(f"{tag}: no readable deactivation.json (run deactivation.py --measure-ppl): Fig. 4 skipped")
        evals[tag] = {f.stem: e for f in sorted((d / "eval").glob("*.json")) if isinstance(e := load(f), dict)}

    # ---------------------------------------------------------------- Fig. 2: distribution
    report.append("\n## Shared and exclusive neurons per language (paper Fig. 2)\n")
    if neuron_models:
        report.append(emit(fig_distribution(neuron_models), "neuron_distribution.png"))
        rows = []
        for tag, (stats, langs) in neuron_models.items():
            for l in langs:
                rows.append([tag, lang_name(l), pct(set_value(stats, f"related_{l}", "fraction")),
                             pct(set_value(stats, "shared", "fraction")),
                             pct(set_value(stats, f"exclusive_{l}", "fraction")),
                             pct(set_value(stats, f"unique_{l}", "fraction"))])
        report.append("\n% of all neurons of the model.\n\n")
        report.append(table(["model", "language", "related", "shared", "exclusive", "strictly unique"], rows))
        report.append("\n" + table(["model", "total neurons", "shared", "shared ratio"],
                                   [[t, str(s.get("total_neurons", "–")), str(set_value(s, "shared", "size")),
                                     fmt(s.get("shared_ratio"))] for t, (s, _) in neuron_models.items()]))
    else:
        report.append("_Skipped: no model has neurons/stats.json._\n")

    # ---------------------------------------------------------------- Fig. 4: deactivation
    report.append("\n## Perplexity increase after deactivation (paper Fig. 4)\n")
    if not deacts:
        report.append("_Skipped: no model has deactivation.json._\n")
    for tag, (deact, langs) in deacts.items():
        report.append(f"\n### {tag}\n\n" + emit(fig_deactivation(tag, deact, langs), f"deactivation_{tag}.png"))
        base = (deact.get("results") or {}).get("ppl", {})
        rows = [["base", "–"] + [fmt((base.get(l) or {}).get("ppl")) for l in langs]]
        for name, s in deact["sets"].items():
            rows.append([name, str(s.get("size", "–"))]
                        + [f"{fmt(((s.get('ppl') or {}).get(l) or {}).get('ppl'))} ({fmt((s.get('dppl') or {}).get(l), '+.3f')})"
                           for l in langs])
        report.append("\nPPL per language, ΔPPL in brackets.\n\n"
                      + table(["set", "size"] + [lang_name(l) for l in langs], rows))
        imp = deact.get("importance") or {}
        report.append("\n" + table(["", *[lang_name(l) for l in imp], "LAS"],
                                   [["Imp", *[fmt(v, ".4g") for v in imp.values()],
                                     fmt(deact.get("language_agnostic_score"), ".4f")]]))

    # ---------------------------------------------------------------- Fig. 6/7: layers
    report.append("\n## Shared and exclusive neurons per layer (paper Fig. 6/7)\n")
    if not neuron_models:
        report.append("_Skipped: no model has neurons/stats.json._\n")
    for tag, (stats, langs) in neuron_models.items():
        report.append(f"\n### {tag}\n\n" + emit(fig_layers(tag, stats, langs), f"layers_{tag}.png"))
        shared = set_value(stats, "shared", "layers") or []
        excl = {l: set_value(stats, f"exclusive_{l}", "layers") or [] for l in langs}
        rows = [[str(i), str(shared[i]) if i < len(shared) else "–"]
                + [str(excl[l][i]) if i < len(excl[l]) else "–" for l in langs] for i in range(len(shared))]
        report.append("\n" + table(["layer", "shared"] + [f"exclusive {lang_name(l)}" for l in langs], rows))

    # ---------------------------------------------------------------- Table 2: components
    report.append("\n## QK / VO / FFN split (paper Table 2)\n")
    if neuron_models:
        report.append(emit(fig_components(neuron_models), "components.png"))
        rows = [[tag, label] + [pct(s.get("component_shares", {}).get(c)) for c in ("QK", "VO", "FFN")]
                + [str(s.get("size", "–"))]
                for tag, (stats, langs) in neuron_models.items() for label, s in component_rows(stats, langs)]
        report.append("\nShare of each set's neurons (the paper, Llama-3.1-8B: shared 92.5 / 2.9 / 4.6, "
                      "exclusive 59.5 / 23.8 / 16.7).\n\n" + table(["model", "set", "QK", "VO", "FFN", "size"], rows))
    else:
        report.append("_Skipped: no model has neurons/stats.json._\n")

    # ---------------------------------------------------------------- Fig. 3/5: across models
    report.append("\n## Shared ratio and LAS against multilingual ability (paper Fig. 3 and 5)\n")
    points = []
    for tag in tags:
        acc = eval_accuracy(evals.get(tag, {}).get(tag))  # the base model's evaluation is eval/<tag>.json
        p = {"tag": tag, "mgsm": mean_acc(acc, "mgsm"), "mmmlu": mean_acc(acc, "mmmlu"),
             "shared_ratio": num(neuron_models[tag][0].get("shared_ratio")) if tag in neuron_models else None,
             "las": num(deacts[tag][0].get("language_agnostic_score")) if tag in deacts else None}
        points.append(p)
    usable = [p for p in points if (p["mgsm"] is not None or p["mmmlu"] is not None)
              and (p["shared_ratio"] is not None or p["las"] is not None)]
    if len(usable) >= 2:
        report.append(emit(fig_ability(usable), "ability.png"))
    else:
        report.append(f"_Figure skipped: needs at least two models with eval/<tag>.json (MGSM or MMMLU) and "
                      f"stats.json or deactivation.json; have {len(usable)}._\n")
    if points:
        report.append("\n" + table(["model", "shared ratio", "LAS", "mean MGSM", "mean MMMLU"],
                                   [[p["tag"], fmt(p["shared_ratio"]), fmt(p["las"], ".4f"), fmt(p["mgsm"]),
                                     fmt(p["mmmlu"])] for p in points]))
        for key, label in (("shared_ratio", "shared ratio"), ("las", "LAS")):
            for m in ("mgsm", "mmmlu"):
                pts = [(p[m], p[key]) for p in points if p[m] is not None and p[key] is not None]
                r, rho = pearson(*zip(*pts)) if len(pts) >= 3 else None, spearman(*zip(*pts)) if len(pts) >= 3 else None
                if r is not None or rho is not None:
                    report.append(f"\n{label} vs mean {m.upper()}: Pearson {fmt(r, '.2f')}, Spearman {fmt(rho, '.2f')} "
                                  f"({len(pts)} models; the paper: 0.92 / 0.88 within a family)\n")

    # ---------------------------------------------------------------- Table 1: training
    report.append("\n## Neuron-targeted continued pretraining (paper Table 1)\n")
    any_runs = False
    for tag in tags:
        runs = []
        for log_file in sorted((out / tag / "trained").glob("*/train_log.json")):
            log = load(log_file)
            r = read_train_log(log, log_file.parent.name) if isinstance(log, dict) else None
            if r is None:
                notes.append(f"{log_file}: no val_before/val_after numbers: left out of Table 1")
                continue
            base = eval_accuracy(evals[tag].get(tag))
            after = eval_accuracy(evals[tag].get(r["run"]))
            r["acc_before"] = {m: base.get(m, {}) for m in ("mgsm", "mmmlu")}
            r["acc_after"] = {m: after.get(m, {}) for m in ("mgsm", "mmmlu")}
            runs.append(r)
        if not runs:
            continue
        any_runs = True
        langs = (neuron_models.get(tag) or deacts.get(tag) or (None, []))[1] or \
            sorted({l for r in runs for l in list(r["before"]) + list(r["after"])})
        report.append(f"\n### {tag}\n\n" + emit(fig_training(tag, runs, langs), f"training_{tag}.png"))
        rows = []
        for r in runs:
            ls = [l for l in langs if l in r["before"] or l in r["after"]]
            for l in ls:
                b, a = r["before"].get(l, {}), r["after"].get(l, {})
                cells = [r["run"], lang_name(r["lang"]) if r["lang"] else "–", str(r["neurons"] or "–"),
                         lang_name(l) + (" (target)" if l == r["lang"] else ""), fmt(b.get("loss")),
                         fmt(a.get("loss")), fmt(b.get("ppl")), fmt(a.get("ppl"))]
                for m in ("mgsm", "mmmlu"):
                    cells += [fmt(r["acc_before"][m].get(l)), fmt(r["acc_after"][m].get(l))]
                rows.append(cells)
        report.append("\nValidation loss/perplexity from train_log.json; accuracy before = eval/<tag>.json of the "
                      "base model, after = eval/<run>.json of the trained model.\n\n"
                      + table(["run", "target", "neurons", "language", "val loss before", "after", "val PPL before",
                               "after", "MGSM before", "after", "MMMLU before", "after"], rows))
    if not any_runs:
        report.append("_Skipped: no trained/<run>/train_log.json with before/after validation numbers._\n")

    if notes:
        report.append("\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes))
    write_bytes(fig_dir / "report.md", "".join(report).encode("utf-8"))
    for stale in set(fig_dir.glob("*.png")) - {fig_dir / n for n in made}:  # of models or figures gone since
        stale.unlink()
    print(f"Wrote {len(made)} figures and {fig_dir / 'report.md'}: {', '.join(made) or 'none'}")
    for n in notes:
        print(f"note: {n}")


if __name__ == "__main__":
    run(main)
