"""Figures and tables of the paper from the files the stages wrote (no model is loaded).

    python figures.py --out ./outputs [--models gemma-3-270m,Llama-3.2-1B]

Writes <out>/figures/*.png and <out>/figures/report.md (markdown tables of the same numbers, with links to
the figures). A figure whose inputs are missing is skipped with a note in report.md. Accuracies carry 95%
Wilson intervals; every trained, deactivated or intervened model is compared with the base on the same
questions (exact McNemar test, significant at p < 0.05; paired bootstrap interval, --seed, --resamples).

  neuron_distribution.png   shared / exclusive / unique neurons per language, % of all neurons (paper Fig. 2),
                            with the 95% bootstrap interval of each size where neurons/stability.json exists
  deactivation_<tag>.png    dPPL per language when random, shared or exclusive neurons are off (Fig. 4), with
                            95% intervals and the random controls' range
  importance_<tag>.png      Imp per language and LAS, with 95% intervals
  layers_<tag>.png          shared and exclusive neurons per layer (Fig. 6/7)
  experts_<tag>.png         mixture-of-experts models: share of each language's tokens routed to each expert,
                            per layer, against the uniform share; shared experts marked (neurons/experts.json)
  components.png            QK / VO / FFN split of shared and exclusive neurons (Table 2), with the 95% bootstrap
                            interval of each share where neurons/stability.json exists
  ability.png               shared ratio and LAS against multilingual ability across models (Fig. 3/5), with
                            Pearson and Spearman correlations and their bootstrap intervals over the models
  development.png           shared ratio, exclusive fraction and LAS against development: the training step of
                            step models (train.py --save-every) and hub revisions (--revision stepN), or the
                            release order of --order FILE, with 95% intervals (docs/development.md)
  comparison_<tag>.png      MGSM / MMMLU accuracy of the base and of each deactivated or intervened model, 95%
                            Wilson intervals, significant paired differences marked
  training_<tag>.png        validation perplexity of every language before/after targeted training, and the
                            accuracy change with its paired 95% interval, significant (exact McNemar p < 0.05)
                            and not significant changes told apart (Table 1)
  steering_<tag>.png        steering.py: rate of generations in the target language, source x target, for the
                            exclusive sets, one panel per intervention (docs/steering.md)
  dose_<tag>_<name>.png     steering.py --alphas: target rate against the scale factor, set and random controls,
                            with 95% Wilson intervals
  interventions_<tag>.png   every task per language under each intervention (evaluate.py --neurons) beside
                            the base model's"""
from __future__ import annotations

import argparse
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from langneurons import layout  # noqa: E402
from langneurons.cli import ArgumentParser, InputError, int_at_least, run, split_list  # noqa: E402
from langneurons.files import write_bytes  # noqa: E402
from langneurons.data import LANGUAGE_NAMES  # noqa: E402
from langneurons import development, uncertainty  # noqa: E402
from langneurons.reuse import unit  # noqa: E402
from langneurons.tasks import ACCURACY_TASKS, TASKS  # noqa: E402

COLORS = {"shared": "#1f77b4", "exclusive": "#ff7f0e", "unique": "#d62728", "random": "#7f7f7f",
          "random_exclusive": "#bcbd22", "QK": "#1f77b4", "VO": "#2ca02c", "FFN": "#ff7f0e",
          "before": "#9ecae1", "after": "#08519c", "not_significant": "#d9d9d9", "untested": "#f0f0f0"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="./outputs", help="output root the stages wrote to")
    p.add_argument("--models", default=None, help="comma list of model tags (directories under --out); "
                   "none: every one with results")
    p.add_argument("--seed", type=int_at_least(0, 2**32 - 1), default=0,
                   help="seed of the paired bootstrap intervals (the same seed, the same report)")
    p.add_argument("--resamples", type=int_at_least(100), default=uncertainty.RESAMPLES,
                   help="bootstrap resamples of each paired difference (and of each correlation across models)")
    p.add_argument("--order", default=None, metavar="FILE",
                   help="a release order for the development figure: one model tag per line (x = 1, 2, ...) "
                        "instead of the training steps of step models and revisions")
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


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (written with files.write_bytes: never half a file); the figure is closed."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def stats_langs(stats: dict, meta: dict | None) -> list[str]:
    """Languages from neurons/meta.json, else from the names of the related_<lang> sets."""
    if isinstance(meta, dict) and isinstance(meta.get("langs"), list):
        return [str(l) for l in meta["langs"]]
    return [n[len("related_"):] for n in stats.get("sets", {}) if n.startswith("related_") and n != "related_all"]


def set_value(stats: dict, name: str, key: str) -> Any:
    return stats.get("sets", {}).get(name, {}).get(key)


def stable_ci(stab: dict | None, name: str, *keys: str) -> list[float] | None:
    """The 95% interval [lo, hi] at stability.json's sets.<name>.<keys...>.ci (e.g. "size_bootstrap", or
    "component_shares", "QK"), None without stability.json or that entry."""
    entry: Any = (stab or {}).get("sets", {}).get(name)
    for k in keys:
        entry = entry.get(k) if isinstance(entry, dict) else None
    ci = entry.get("ci") if isinstance(entry, dict) else None
    return [float(ci[0]), float(ci[1])] if interval_err(0.0, ci) is not None else None


def span_err(ci: list[float], scale: float = 1.0) -> tuple[float, tuple[float, float]]:
    """(centre, (below, above)) that draws exactly [lo, hi] x scale as an error bar. A bootstrap interval need
    not contain the full-data value (at --threshold 1.0 a resample's shared set only grows), so the bar spans the
    interval itself rather than hanging on the full-data bar."""
    mid = scale * (ci[0] + ci[1]) / 2
    return mid, (mid - scale * ci[0], scale * ci[1] - mid)


def draw_intervals(ax, pts: list[tuple[float, float, tuple[float, float]]], horizontal: bool = False) -> None:
    """One error-bar series (position, centre, (below, above)) labelled as the sets' bootstrap intervals."""
    if not pts:
        return
    err = np.array([e for _, _, e in pts]).T
    pos, mid = [p for p, _, _ in pts], [m for _, m, _ in pts]
    kw = {"fmt": "none", "ecolor": "black", "capsize": 2, "lw": 0.8, "label": "95% interval (resampled texts)"}
    if horizontal:
        ax.errorbar(mid, pos, xerr=err, **kw)
    else:
        ax.errorbar(pos, mid, yerr=err, **kw)


# ---------------------------------------------------------------- figures (each returns its Figure)

def fig_distribution(models: dict[str, tuple[dict, list[str]]], stability: dict[str, dict] | None = None) -> Figure:
    """Paper Fig. 2: per model one panel; per language the shared neurons (the same for all languages)
    stacked under that language's exclusive ones (together: its language-related neurons), and the strictly
    unique ones beside them; % of all neurons. A model with a stability.json in `stability` (tag -> its content)
    gets each size's 95% bootstrap interval (size_bootstrap), the exclusive one on top of the shared bar."""
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
        stab, total = (stability or {}).get(tag), num(stats.get("total_neurons"))
        if stab and total:
            pts = []
            for i, l in enumerate(langs):
                for pos, name, base in ((x[i] - w / 2, "shared", 0.0), (x[i] - w / 2, f"exclusive_{l}", shared),
                                        (x[i] + w / 2, f"unique_{l}", 0.0)):
                    if (ci := stable_ci(stab, name, "size_bootstrap")) is not None:
                        mid, err = span_err(ci, 100 / total)
                        pts.append((pos, base + mid, err))
            draw_intervals(ax, pts)
        ax.set_xticks(x, [lang_name(l) for l in langs], rotation=30, ha="right")
        ax.set_ylabel("% of all neurons")
        ratio = num(stats.get("shared_ratio"))
        ax.set_title(f"{tag}\nshared ratio {ratio:.2f}" if ratio is not None else tag)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Language-related neurons: shared and exclusive per language")
    fig.tight_layout()
    return fig


def interval_err(value: float | None, ci: Any) -> tuple[float, float] | None:
    """(below, above) of an interval [lo, hi] around `value` for matplotlib's yerr (never negative: a
    percentile interval of a skewed statistic may end just short of its estimate); None without one."""
    if value is None or not (isinstance(ci, list) and len(ci) == 2) or num(ci[0]) is None or num(ci[1]) is None:
        return None
    return max(0.0, value - ci[0]), max(0.0, ci[1] - value)


def fig_deactivation(tag: str, deact: dict, langs: list[str]) -> Figure:
    """Paper Fig. 4: dPPL per language after deactivating random, shared and exclusive neurons, with the
    95% interval of each dPPL (bootstrap over the validation lines) and, beside a set with random controls,
    their mean and range."""
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
    ci_pts: list[tuple[float, float, tuple[float, float]]] = []
    ctl_pts: list[tuple[float, float, tuple[float, float]]] = []
    for i, (label, name, color) in enumerate(bars):
        v = [num(sets.get(name(l), {}).get("dppl", {}).get(l)) for l in langs]
        values += [a for a in v if a is not None]
        pos = x + (i - (len(bars) - 1) / 2) * w
        ax.bar(pos, [a if a is not None else 0.0 for a in v], w, color=color, label=label)
        for p, l, a in zip(pos, langs, v):
            s = sets.get(name(l), {})
            if (err := interval_err(a, (s.get("dppl_ci") or {}).get(l))) is not None:
                ci_pts.append((p, a, err))
            c = s.get("controls") or {}
            mean = num((c.get("dppl_mean") or {}).get(l))
            if (err := interval_err(mean, (c.get("dppl_range") or {}).get(l))) is not None:
                ctl_pts.append((p + w * 0.3, mean, err))
                values += [mean - err[0], mean + err[1]]
    for pts, label, style in ((ci_pts, "95% interval", {"fmt": "none", "ecolor": "black"}),
                              (ctl_pts, "random controls (mean, range)",
                               {"fmt": "D", "color": "dimgray", "ms": 3, "mfc": "white"})):
        if pts:
            ax.errorbar([p for p, _, _ in pts], [a for _, a, _ in pts],
                        yerr=np.array([e for _, _, e in pts]).T, capsize=2, lw=0.8, label=label, **style)
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


def fig_importance(tag: str, deact: dict) -> Figure:
    """Imp_l per language with its 95% interval, and LAS with its interval in the title; Imp = 1 (a shared
    neuron matters as much as an exclusive one) marked."""
    imp = deact.get("importance") or {}
    cis = deact.get("importance_ci") or {}
    langs = list(imp)
    fig, ax = plt.subplots(figsize=(max(5, 1.0 * len(langs) + 2), 3.8))
    x = np.arange(len(langs))
    v = [num(imp[l]) for l in langs]
    ax.bar(x, [a if a is not None else 0.0 for a in v], 0.6, color=COLORS["shared"], label="Imp")
    pts = [(p, a, err) for p, l, a in zip(x, langs, v) if (err := interval_err(a, cis.get(l))) is not None]
    if pts:
        ax.errorbar([p for p, _, _ in pts], [a for _, a, _ in pts], yerr=np.array([e for _, _, e in pts]).T,
                    fmt="none", ecolor="black", capsize=3, lw=0.8, label="95% interval")
    spread = [a for a in v if a is not None] + [a + e[1] for _, a, e in pts] + [a - e[0] for _, a, e in pts]
    if spread and max(abs(a) for a in spread) > 50:
        ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(1, color="black", lw=0.6, ls="--")
    ax.set_xticks(x, [lang_name(l) for l in langs], rotation=30, ha="right")
    ax.set_ylabel("Imp (shared / exclusive, per neuron)")
    las, las_ci = num(deact.get("language_agnostic_score")), deact.get("language_agnostic_score_ci")
    title = f"{tag}: importance of the shared neurons"
    if las is not None:
        title += f"\nLAS {las:.3f}" + (f" [{las_ci[0]:.3f}, {las_ci[1]:.3f}]" if interval_err(las, las_ci) else "")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if pts:
        ax.legend(fontsize=8)
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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers, never 2.5
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # so are neuron counts
        ax.set_xlabel("layer")
        ax.set_ylabel("neurons")
        ax.grid(alpha=0.3)
    if a2.lines:
        a2.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def component_rows(stats: dict, langs: list[str]) -> list[tuple[str, str, dict]]:
    """(label, set name, stats.json entry) of the shared and each exclusive set."""
    pairs = [("shared", "shared")] + [(f"exclusive {lang_name(l)}", f"exclusive_{l}") for l in langs]
    return [(label, n, stats["sets"][n]) for label, n in pairs if n in stats.get("sets", {})]


def fig_components(models: dict[str, tuple[dict, list[str]]], stability: dict[str, dict] | None = None) -> Figure:
    """Paper Table 2 as a figure: share of QK, VO and FFN neurons in the shared and each exclusive set. A model
    with a stability.json in `stability` (tag -> its content) gets one bar per component and set, each with the
    95% bootstrap interval of its share (intervals cannot be read off stacked segments); else stacked bars."""
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 0.45 * max(len(l) for _, l in models.values())
                                                      * (2 if stability else 1) + 2), squeeze=False)
    for ax, (tag, (stats, langs)) in zip(axes[0], models.items()):
        rows = component_rows(stats, langs)
        y = np.arange(len(rows))
        left = np.zeros(len(rows))
        stab = (stability or {}).get(tag)
        pts = []
        for i, comp in enumerate(("QK", "VO", "FFN")):
            v = np.array([100 * (num(s.get("component_shares", {}).get(comp)) or 0.0) for _, _, s in rows])
            if stab:
                h = 0.8 / 3
                pos = y + (i - 1) * h
                ax.barh(pos, v, h, color=COLORS[comp], label=comp)
                for p, (_, name, _) in zip(pos, rows):
                    if (ci := stable_ci(stab, name, "component_shares", comp)) is not None:
                        pts.append((p, *span_err(ci, 100)))
            else:
                ax.barh(y, v, left=left, color=COLORS[comp], label=comp)
                left += v
        draw_intervals(ax, pts, horizontal=True)
        ax.set_yticks(y, [label for label, _, _ in rows])
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of the set's neurons")
        ax.set_title(tag)
        if stab:  # grouped bars fill the panel: the legend goes outside
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        else:
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Where the neurons are: query/key, value/output, FFN")
    fig.tight_layout()
    return fig


def fig_ability(points: list[dict], resamples: int = uncertainty.RESAMPLES, seed: int = 0) -> Figure:
    """Paper Fig. 3/5: shared ratio and LAS of each model against its multilingual ability (mean accuracy), with
    Pearson and Spearman and their bootstrap intervals over the models (uncertainty.correlation)."""
    metrics = [m for m in ACCURACY_TASKS if sum(p.get(m) is not None for p in points) >= 2]
    fig, axes = plt.subplots(2, len(metrics), figsize=(5 * len(metrics), 8), squeeze=False)
    for j, metric in enumerate(metrics):
        for i, (key, label) in enumerate((("shared_ratio", "shared ratio |shared| / mean |exclusive|"),
                                          ("las", "language-agnostic score (LAS)"))):
            ax = axes[i][j]
            pts = [(p[metric], p[key], p["tag"], p.get(f"{metric}_ci")) for p in points
                   if p.get(metric) is not None and p.get(key) is not None]
            xs, ys = [a for a, _, _, _ in pts], [b for _, b, _, _ in pts]
            ax.scatter(xs, ys, color=COLORS["shared"])
            # the mean accuracy's 95% Wilson interval (where the languages have equal question counts)
            for a, b, _, ci in pts:
                if ci is not None:
                    ax.errorbar([a], [b], xerr=[[a - ci[0]], [ci[1] - a]], fmt="none", ecolor="black",
                                elinewidth=0.8, capsize=3)
            for a, b, t, _ in pts:
                ax.annotate(t, (a, b), fontsize=8, xytext=(3, 3), textcoords="offset points")
            cor = [(c, uncertainty.correlation(xs, ys, c, resamples, seed)) for c in uncertainty.CORRELATIONS]
            stats = ", ".join(f"{c.capitalize()} {v['r']:.2f}{interval(v['ci'], spec='.2f')}"
                              for c, v in cor if v["r"] is not None)
            ax.set_title(f"{label} vs {TASKS[metric].label}" + (f"\n{stats}" if stats else ""), fontsize=10)
            ax.set_xlabel(f"mean {TASKS[metric].label} accuracy over languages")
            ax.set_ylabel(label.split(" |")[0])
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def label_langs(ax, langs: list[str], target: str | None) -> None:
    """Language names under the bars; the target language's in bold, on a shaded column."""
    ax.set_xticks(np.arange(len(langs)), [lang_name(l) + (" (target)" if l == target else "") for l in langs],
                  rotation=30, ha="right")
    for i, (tick, l) in enumerate(zip(ax.get_xticklabels(), langs)):
        if l == target:
            tick.set_fontweight("bold")
            ax.axvspan(i - 0.5, i + 0.5, color="#fff3b0", zorder=0)


def perplexity_panel(ax, r: dict) -> None:
    """Validation perplexity of every language the run measured, before and after training."""
    ls = r["langs"]
    for key, off in (("before", -0.2), ("after", 0.2)):
        v = [num(r[key].get(l, {}).get("ppl")) for l in ls]
        ax.bar(np.arange(len(ls)) + off, [a if a is not None else 0 for a in v], 0.4, color=COLORS[key], label=key)
    # on each 'after' bar: before + the paired bootstrap interval of the change (where the log has per-line NLLs)
    xs, ys, err = [], [], [[], []]
    for i, l in enumerate(ls):
        c = (r.get("ppl_change") or {}).get(l)
        if c and c.get("delta_ci") and all(num(x) is not None for x in c["delta_ci"]):
            lo, hi = c["delta_ci"]
            xs.append(i + 0.2), ys.append(c["after"])
            err[0].append(max(0.0, c["delta"] - lo)), err[1].append(max(0.0, hi - c["delta"]))
    if xs:
        ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor="black", elinewidth=0.8, capsize=3,
                    label="95% interval of the change")
    label_langs(ax, ls, r["lang"])
    vals = [v for k in ("before", "after") for l in ls if (v := num(r[k].get(l, {}).get("ppl")))]
    if vals and max(vals) / max(min(vals), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"{r['run']} (target {lang_name(r['lang']) if r['lang'] else '?'}, neurons {r['neurons'] or '?'})",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


SIG_LEGEND = [Patch(facecolor=COLORS["after"], label="significant gain (p < 0.05)"),
              Patch(facecolor=COLORS["unique"], label="significant loss (p < 0.05)"),
              Patch(facecolor=COLORS["not_significant"], edgecolor="grey", hatch="//",
                    label="not significant (p ≥ 0.05)"),
              Patch(facecolor=COLORS["untested"], edgecolor="grey", hatch="..", label="no paired test")]


def mark_bars(bars, verdicts: list[bool | None], deltas: list[float]) -> None:
    """Colour each bar by its paired test: a gain or loss only when significant, hatched grey when not, dotted
    when no paired test was possible."""
    for bar, v, d in zip(bars, verdicts, deltas):
        if v is True:
            bar.set_color(COLORS["after"] if d >= 0 else COLORS["unique"])
        else:
            bar.set_facecolor(COLORS["not_significant"] if v is False else COLORS["untested"])
            bar.set_hatch("//" if v is False else "..")
            bar.set_edgecolor("grey")


def ci_errors(changes: list[dict], scale: float = 100.0) -> tuple[list[float], list[list[float]]]:
    """x positions and asymmetric error lengths of the changes that have a paired interval."""
    xs, err = [], [[], []]
    for i, c in enumerate(changes):
        if c.get("delta_ci"):
            lo, hi = c["delta_ci"]
            xs.append(i)
            err[0].append(scale * max(0.0, c["delta"] - lo))
            err[1].append(scale * max(0.0, hi - c["delta"]))
    return xs, err


def n_label(changes: list[dict]) -> str:
    ns = sorted({c["n"] for c in changes if c.get("n")})
    return f"n = {', '.join(map(str, ns))} questions" + ("" if len(ns) == 1 else " per language") if ns else "n unknown"


def accuracy_panel(ax, r: dict, task: str) -> None:
    """The change of one task's accuracy per language with its paired bootstrap 95% interval; only a change
    with exact McNemar p < 0.05 is drawn as a gain or loss."""
    changes = r["acc"].get(task, {})
    ls, cs = list(changes), list(changes.values())
    d = [100 * c["delta"] for c in cs]
    mark_bars(ax.bar(np.arange(len(ls)), d), [c["significant"] for c in cs], d)
    xs, err = ci_errors(cs)
    if xs:
        ax.errorbar(xs, [d[i] for i in xs], yerr=err, fmt="none", ecolor="black", elinewidth=0.8, capsize=3)
    ax.axhline(0, color="black", lw=0.6)
    label_langs(ax, ls, r["lang"])
    ax.set_ylabel(f"Δ {TASKS[task].label} accuracy (points)")
    ax.set_title(f"{r['run']}: {TASKS[task].label} after − before" + (f", {n_label(cs)}" if ls else
                                                                       "\n(no evaluation to compare)"), fontsize=9)
    ax.legend(handles=SIG_LEGEND, fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def fig_comparison(tag: str, base: dict, models: dict[str, tuple[dict, dict[str, dict]]]) -> Figure:
    """Accuracy per language of the base and of each compared model (name -> (its evaluation, task -> lang ->
    compare_accuracy)), with 95% Wilson intervals; a model's bar is coloured only where its paired difference
    to the base is significant (exact McNemar p < 0.05), and carries the model's name."""
    tasks = [m for m in ACCURACY_TASKS if any(c.get(m) for _, c in models.values())]
    fig, axes = plt.subplots(1, len(tasks), figsize=((1.5 * len(models) + 5) * len(tasks), 4.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        langs = list(dict.fromkeys(l for _, c in models.values() for l in c.get(task, {})))
        x, w = np.arange(len(langs)), 0.8 / (1 + len(models))
        rows = [("base", task_results(base, task), None)] + \
               [(name, task_results(ev, task), c.get(task, {})) for name, (ev, c) in models.items()]
        for i, (name, res, changes) in enumerate(rows):
            have = [j for j, l in enumerate(langs) if l in res]
            pos = x[have] + (i - len(models) / 2) * w
            acc = [100 * res[langs[j]]["accuracy"] for j in have]
            bars = ax.bar(pos, acc, w, color=COLORS["before"])
            if changes is not None:
                mark_bars(bars, [(changes.get(langs[j]) or {}).get("significant") for j in have],
                          [(changes.get(langs[j]) or {}).get("delta", 0.0) for j in have])
                for b in bars:  # which model a bar is: its name above it
                    ax.annotate(name, (b.get_x() + b.get_width() / 2, b.get_height()), fontsize=6, rotation=90,
                                ha="center", va="bottom", xytext=(0, 2), textcoords="offset points")
            ci = [wilson_of(res[langs[j]]) for j in have]
            ok = [k for k, c in enumerate(ci) if c is not None]
            if ok:
                ax.errorbar(pos[ok], [acc[k] for k in ok], yerr=[[acc[k] - 100 * ci[k][0] for k in ok],
                                                                 [100 * ci[k][1] - acc[k] for k in ok]],
                            fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        ax.set_xticks(x, [lang_name(l) for l in langs], rotation=30, ha="right")
        ax.set_ylabel(f"{TASKS[task].label} accuracy (%)")
        ax.set_title(f"{tag}: {TASKS[task].label} (95% Wilson intervals), "
                     + n_label([c for _, _, ch in rows[1:] for c in ch.values()]), fontsize=9)
        ax.legend(handles=[Patch(facecolor=COLORS["before"], label="base")] + SIG_LEGEND, fontsize=7,
                  loc="upper left", bbox_to_anchor=(1.01, 1))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def fig_training(tag: str, runs: list[dict]) -> Figure:
    """Paper Table 1 as a figure: per training run, the validation perplexity of every language before and
    after (the cross-lingual effect), and the change of MGSM / MMMLU accuracy per language where the trained
    model was evaluated."""
    tasks = [m for m in ACCURACY_TASKS if any(r["acc"].get(m) for r in runs)]
    fig, axes = plt.subplots(len(runs), 1 + len(tasks), figsize=(5.5 * (1 + len(tasks)), 3.8 * len(runs)),
                             squeeze=False)
    for row, r in zip(axes, runs):
        perplexity_panel(row[0], r)
        for ax, task in zip(row[1:], tasks):
            accuracy_panel(ax, r, task)
    fig.suptitle(f"{tag}: neuron-targeted continued pretraining")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- paired comparisons with the base

def task_results(ev: dict | None, task: str) -> dict[str, dict]:
    """lang -> one task's results (with a numeric accuracy) in an evaluation file."""
    res = ((ev or {}).get("results") or {}).get(task)
    return {str(l): v for l, v in (res.items() if isinstance(res, dict) else ())
            if isinstance(v, dict) and num(v.get("accuracy")) is not None}


def count(v: dict) -> int | None:
    n = v.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def outcomes(v: dict) -> list[int] | None:
    """The per-question outcomes (0/1 in item order) of one language's results, None when not recorded."""
    c = v.get("correct")
    ok = isinstance(c, list) and c and all(x in (0, 1) and not isinstance(x, float) for x in c)
    return [int(x) for x in c] if ok else None


def wilson_of(v: dict) -> tuple[float, float] | None:
    """The 95% Wilson interval of one language's accuracy: as recorded, else from accuracy and n."""
    ci = v.get("accuracy_ci")
    if isinstance(ci, list) and len(ci) == 2 and all(num(x) is not None for x in ci):
        return float(ci[0]), float(ci[1])
    n = count(v)
    return uncertainty.wilson(round(v["accuracy"] * n), n) if n else None


def unpaired_reason(before: dict, after: dict) -> str | None:
    """Why two results of one language cannot be compared question by question (None: they can)."""
    cb, ca = outcomes(before), outcomes(after)
    if cb is None or ca is None:
        return "no per-question outcomes recorded (`correct`): evaluate again"
    hb, ha = before.get("items_sha256"), after.get("items_sha256")
    if not isinstance(hb, str) or not isinstance(ha, str):
        return "no items_sha256 recorded: evaluate again"
    if hb != ha or len(cb) != len(ca):
        return f"different questions (items_sha256 differ; {len(cb)} and {len(ca)} questions)"
    return None


def compare_accuracy(before: dict, after: dict, resamples: int, seed: int) -> dict:
    """One language: after − before, and where both scored the same questions, the exact McNemar p-value and
    the paired bootstrap 95% interval of the difference (`reason` says why not, otherwise)."""
    out = {"before": float(before["accuracy"]), "after": float(after["accuracy"]),
           "delta": float(after["accuracy"]) - float(before["accuracy"]), "n": count(after),
           "before_ci": wilson_of(before), "after_ci": wilson_of(after),
           "delta_ci": None, "p": None, "significant": None, "reason": unpaired_reason(before, after)}
    if out["reason"] is None:
        out.update(uncertainty.paired_accuracy(outcomes(before), outcomes(after), resamples, seed))
    return out


def accuracy_changes(before: dict[str, dict], after: dict[str, dict], resamples: int = uncertainty.RESAMPLES,
                     seed: int = 0) -> dict[str, dict]:
    """lang -> compare_accuracy for the languages measured in both (task_results of two evaluations)."""
    return {l: compare_accuracy(before[l], a, resamples, seed) for l, a in after.items() if l in before}


def line_values(v: Any) -> tuple[list, list] | None:
    """(line_nll, line_tokens) of one language's perplexity results, None when not recorded."""
    if not isinstance(v, dict):
        return None
    nll, tok = v.get("line_nll"), v.get("line_tokens")
    if isinstance(nll, list) and isinstance(tok, list) and nll and len(nll) == len(tok):
        return nll, tok
    return None


def ppl_changes(before: Any, after: Any, resamples: int, seed: int) -> dict[str, dict]:
    """lang -> the paired bootstrap of the perplexity change after − before over the same validation lines
    ({"reason"} where the two cannot be paired), for the languages both have per-line values for."""
    out = {}
    for l in after if isinstance(after, dict) else ():
        b, a = line_values((before or {}).get(l) if isinstance(before, dict) else None), line_values(after[l])
        if b is None or a is None:
            continue
        try:
            out[str(l)] = uncertainty.paired_ppl_change(*b, *a, resamples=resamples, seed=seed)
        except ValueError as e:
            out[str(l)] = {"reason": f"not the same lines: {e}"}
    return out


def verdict(c: dict) -> str:
    """The report's word on one paired difference."""
    if c.get("significant") is None:
        return f"no paired test: {c['reason']}" if c.get("reason") else "no paired test"
    return "significant" if c["significant"] else "not significant"


# ---------------------------------------------------------------- reading the stages' files

def accuracies(ev: dict | None, task: str) -> dict[str, tuple[float, int | None]]:
    """lang -> (accuracy, number of items) of one task in an evaluation file."""
    return {l: (float(v["accuracy"]), count(v)) for l, v in task_results(ev, task).items()}


def mean_acc_ci(ev: dict | None, task: str) -> tuple[float, float] | None:
    """The 95% Wilson interval of the mean accuracy over languages, when every language scored the same number
    of questions (then the mean is the pooled proportion); None otherwise."""
    res = task_results(ev, task)
    ns = {count(v) for v in res.values()}
    if not res or len(ns) != 1 or None in ns:
        return None
    n = ns.pop()
    right = sum(sum(c) if (c := outcomes(v)) else round(v["accuracy"] * n) for v in res.values())
    return uncertainty.wilson(right, n * len(res))


def mean_acc(ev: dict | None, task: str) -> float | None:
    vals = [a for a, _ in accuracies(ev, task).values()]
    return float(np.mean(vals)) if vals else None


def eval_role(ev: dict) -> str:
    """'base' | 'variant' | 'trained' | 'intervened': the file's meta.role, or for a file written before
    evaluate recorded it, the role its provenance gives (none: the base model). A model evaluated under
    `evaluate.py --neurons/--intervention` (its recorded arguments) is never the base's own evaluation."""
    meta = ev.get("meta") if isinstance(ev.get("meta"), dict) else {}
    prov = meta.get("provenance")
    role = meta["role"] if isinstance(meta.get("role"), str) else \
        layout.provenance_role(prov) if isinstance(prov, dict) else "base"
    args = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    return "intervened" if role == "base" and (args.get("neurons") or args.get("intervention")) else role


def intervention_of(ev: dict) -> dict | None:
    """meta.intervention of an evaluation under an intervention (evaluate.py --neurons), else None."""
    rec = (ev.get("meta") or {}).get("intervention") if isinstance(ev.get("meta"), dict) else None
    return rec if isinstance(rec, dict) else None


def run_evaluation(evals: dict[str, dict], run_name: str) -> str | None:
    """The evaluation of trained run `run_name`: role 'trained' and provenance.run_name == the run (the first
    in sorted order if several), never found by its file name."""
    return next((name for name, ev in sorted(evals.items()) if eval_role(ev) == "trained"
                 and ((ev.get("meta") or {}).get("provenance") or {}).get("run_name") == run_name), None)


def read_train_log(log: dict, run_name: str) -> dict | None:
    """The before/after validation numbers of one training run from its train_log.json, per language ("val":
    {"lang", "langs", "before": {lang: {"loss", "ppl", "tokens"}}, "after": {...}}); logs written before train.py
    measured every language hold the target's only ("before": {"loss", "ppl"}). None without them."""
    val, neurons = log.get("val"), log.get("neurons")
    if not isinstance(val, dict) or not isinstance(val.get("before"), dict) or not isinstance(val.get("after"), dict):
        return None
    lang = val.get("lang") or log.get("trained_lang")
    pick = lambda v: {k: float(v[k]) for k in ("loss", "ppl") if num(v.get(k)) is not None} if isinstance(v, dict) else {}
    per_lang = lambda v: ({str(l): pick(x) for l, x in v.items()} if all(isinstance(x, dict) for x in v.values())
                          else {lang: pick(v)})
    before, after = per_lang(val["before"]), per_lang(val["after"])
    langs = [str(l) for l in val["langs"]] if isinstance(val.get("langs"), list) else list(dict.fromkeys([*before, *after]))
    langs = [l for l in langs if l in before or l in after] + ([lang] if lang not in langs else [])
    name = neurons.get("name") if isinstance(neurons, dict) else log.get("mode")
    return {"run": run_name, "lang": lang, "neurons": name, "langs": langs, "before": before, "after": after}


@dataclass
class TagResults:
    """What the stages wrote for one model tag; None or empty where a stage has not run."""
    outputs: layout.Outputs
    stats: dict | None = None
    langs: list[str] = field(default_factory=list)         # detection's languages
    stability: dict | None = None                          # neurons/stability.json (detection.py --resamples)
    deact: dict | None = None
    deact_langs: list[str] = field(default_factory=list)
    evals: dict[str, dict] = field(default_factory=dict)   # evaluation name -> its file's content
    runs: list[dict] = field(default_factory=list)         # read_train_log per run, with "eval", "acc", "seed", ...
    compared: dict[str, dict] = field(default_factory=dict)  # deactivated/intervened evaluation -> task -> changes
    compared_ppl: dict[str, dict] = field(default_factory=dict)  # the same -> lang -> paired PPL change

    @property
    def tag(self) -> str:
        return self.outputs.tag

    @property
    def base_evals(self) -> list[str]:
        """The evaluations of the base model (role 'base', under no intervention), sorted: the first is the one
        the figures use."""
        return [name for name, ev in sorted(self.evals.items()) if eval_role(ev) == "base" and not intervention_of(ev)]

    @property
    def base_eval(self) -> dict | None:
        return self.evals[self.base_evals[0]] if self.base_evals else None

    def file(self, path: Path) -> str:
        """`path` relative to the tag's folder, as the report names it."""
        return str(path.relative_to(self.outputs.root))


# train.py arguments that do not make two runs different runs (where they went, how they were checkpointed);
# with the seed left out too, runs that agree on everything else are repeats of one run
NOT_RUN_ARGS = {"seed", "run_name", "resume", "keep_checkpoints", "save_steps", "num_proc", "report_to", "force", "out"}


def run_identity(log: dict) -> tuple[int | None, str | None]:
    """(seed, key): runs with the same key differ only in their seed (from the fingerprint's arguments, which
    leave out where a run went; else from the recorded arguments)."""
    run = log.get("run") if isinstance(log.get("run"), dict) else {}
    args = ((log.get("fingerprint") or {}).get("args") if isinstance(log.get("fingerprint"), dict) else None) \
        or run.get("args")
    if not isinstance(args, dict):
        return None, None
    seed = args.get("seed", run.get("seed"))
    key = json.dumps({k: v for k, v in sorted(args.items()) if k not in NOT_RUN_ARGS}, sort_keys=True, default=str)
    return (seed if isinstance(seed, int) and not isinstance(seed, bool) else None), key


def load_tag(o: layout.Outputs, notes: list[str], resamples: int = uncertainty.RESAMPLES, seed: int = 0) -> TagResults:
    """Read every result file of one tag (an unreadable one counts as missing: its figures are skipped) and
    pair each trained, deactivated or intervened model with the base (bootstraps with `resamples`, `seed`)."""
    t = TagResults(o)
    stats = load(o.neurons / layout.STATS)
    if isinstance(stats, dict) and isinstance(stats.get("sets"), dict):
        t.stats, t.langs = stats, stats_langs(stats, load(o.neurons / layout.META))
    else:
        notes.append(f"{t.tag}: no readable {t.file(o.neurons / layout.STATS)} (run detection.py): neuron figures skipped")
    stab = load(o.neurons / layout.STABILITY)
    if isinstance(stab, dict) and isinstance(stab.get("sets"), dict) and stab["sets"]:
        t.stability = stab
    deact = load(o.deactivation)
    if isinstance(deact, dict) and isinstance(deact.get("sets"), dict):
        t.deact = deact
        t.deact_langs = (deact.get("meta") or {}).get("langs") or list((deact.get("results") or {}).get("ppl", {}))
    else:
        notes.append(f"{t.tag}: no readable {t.file(o.deactivation)} (run deactivation.py --measure-ppl): "
                     "Fig. 4 skipped")
    t.evals = {name: ev for name in o.evaluations() if isinstance(ev := load(o.evaluation(name)), dict)}
    if len(t.base_evals) > 1:
        notes.append(f"{t.tag}: several evaluations of the base model ({', '.join(t.base_evals)}): "
                     f"used {t.file(o.evaluation(t.base_evals[0]))}")
    for name in o.runs():
        log = load(o.run(name) / layout.TRAIN_LOG)
        r = read_train_log(log, name) if isinstance(log, dict) else None
        if r is None:
            notes.append(f"{o.run(name) / layout.TRAIN_LOG}: no readable before/after validation numbers: "
                         "left out of Table 1")
            continue
        r["eval"] = run_evaluation(t.evals, name)
        r["acc"] = {m: accuracy_changes(task_results(t.base_eval, m), task_results(t.evals.get(r["eval"]), m),
                                        resamples, seed) for m in ACCURACY_TASKS}
        val = log["val"]  # the same validation lines before and after, when train.py recorded them per line
        r["ppl_change"] = ppl_changes(val["before"], val["after"], resamples, seed)
        r["seed"], r["group"] = run_identity(log)
        t.runs.append(r)
    base = t.base_eval
    for name, ev in sorted(t.evals.items()):
        if base is None or eval_role(ev) in ("base", "trained"):
            continue
        t.compared[name] = {m: accuracy_changes(task_results(base, m), task_results(ev, m), resamples, seed)
                            for m in ACCURACY_TASKS}
        t.compared_ppl[name] = ppl_changes((base.get("results") or {}).get("ppl"), (ev.get("results") or {}).get("ppl"),
                                           resamples, seed)
    return t


def select(out: Path, models: str | None) -> list[layout.Outputs]:
    """The tags to draw: every one with results under --out, or those --models names."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: {out} is a file, not a folder")
    if not out.is_dir():
        raise InputError(f"--out {out}: no such directory (the output root the stages wrote to)")
    found = {o.tag: o for o in layout.tagged(out)}
    if models is None:
        return list(found.values())
    only = split_list(models, "--models")
    if not only:
        raise InputError(f"--models '{models}': no model tag given")
    if missing := [t for t in only if t not in found]:
        raise InputError(f"--models {missing[0]}: no stage results for this tag under {out}")
    return [found[t] for t in only]


# ---------------------------------------------------------------- report sections (each: markdown text)

Emit = Callable[[Figure, str], str]  # writes a figure, returns its markdown link


def neuron_models(tags: list[TagResults]) -> dict[str, tuple[dict, list[str]]]:
    return {t.tag: (t.stats, t.langs) for t in tags if t.stats is not None}


def stability_of(tags: list[TagResults]) -> dict[str, dict]:
    """tag -> stability.json of the tags with neuron stats that have one."""
    return {t.tag: t.stability for t in tags if t.stats is not None and t.stability is not None}


def intervals_note(tags: list[TagResults], stab: dict[str, dict], what: str) -> str:
    """What the brackets are, and which models have none (no stability.json)."""
    text = ""
    if stab:
        first = next(iter(stab.values()))
        text += (f"\nIn brackets and as error bars: the 95% interval of {what} over {first.get('resamples')} bootstrap "
                 "resamples of each language's detection texts at the same model (neurons/stability.json, "
                 "docs/stability.md); it need not contain the full-data value (at --threshold 1.0 a resample's "
                 "shared and related sets only grow).\n")
    if without := [t.tag for t in tags if t.stats is not None and t.tag not in stab]:
        text += (f"\n_No intervals for {', '.join(without)}: no neurons/stability.json "
                 "(detection.py --resamples N)._\n")
    return text


def pct_with_ci(stats: dict, stab: dict | None, name: str) -> str:
    """A set's % of all neurons, with its bootstrap interval in brackets where stability.json has one."""
    total, ci = num(stats.get("total_neurons")), stable_ci(stab, name, "size_bootstrap")
    return pct(set_value(stats, name, "fraction")) + (f" [{pct(ci[0] / total)}, {pct(ci[1] / total)}]"
                                                      if ci and total else "")


def size_with_ci(stats: dict, stab: dict | None, name: str) -> str:
    ci = stable_ci(stab, name, "size_bootstrap")
    return str(set_value(stats, name, "size")) + (f" [{ci[0]:.0f}, {ci[1]:.0f}]" if ci else "")


def report_distribution(tags: list[TagResults], emit: Emit) -> str:
    text = "\n## Shared and exclusive neurons per language (paper Fig. 2)\n"
    models = neuron_models(tags)
    if not models:
        return text + "_Skipped: no model has neurons/stats.json._\n"
    stab = stability_of(tags)
    rows = [[tag, lang_name(l)] + [pct_with_ci(stats, stab.get(tag), n)
                                   for n in (f"related_{l}", "shared", f"exclusive_{l}", f"unique_{l}")]
            for tag, (stats, langs) in models.items() for l in langs]
    return (text + emit(fig_distribution(models, stab), "neuron_distribution.png") + "\n% of all neurons of the model.\n"
            + intervals_note(tags, stab, "each set's size") + "\n"
            + table(["model", "language", "related", "shared", "exclusive", "strictly unique"], rows) + "\n"
            + table(["model", "total neurons", "shared", "shared ratio"],
                    [[t, str(s.get("total_neurons", "–")), size_with_ci(s, stab.get(t), "shared"),
                      fmt(s.get("shared_ratio"))] for t, (s, _) in models.items()]))


def fmt_ci(ci: Any, spec: str = ".3g") -> str:
    """ " [lo, hi]" of an interval, "" without one."""
    if not (isinstance(ci, list) and len(ci) == 2) or num(ci[0]) is None or num(ci[1]) is None:
        return ""
    return f" [{format(ci[0], spec)}, {format(ci[1], spec)}]"


def report_deactivation(tags: list[TagResults], emit: Emit) -> str:
    text = "\n## Perplexity increase after deactivation (paper Fig. 4)\n"
    done = [t for t in tags if t.deact is not None]
    if not done:
        return text + "_Skipped: no model has deactivation.json._\n"
    for t in done:
        deact, langs = t.deact, t.deact_langs
        base = (deact.get("results") or {}).get("ppl", {})
        rows = [["base", "–"] + [fmt((base.get(l) or {}).get("ppl")) for l in langs]]
        for name, s in deact["sets"].items():
            rows.append([name, str(s.get("size", "–"))]
                        + [f"{fmt(((s.get('ppl') or {}).get(l) or {}).get('ppl'))} ({fmt((s.get('dppl') or {}).get(l), '+.3f')}"
                           f"{fmt_ci((s.get('dppl_ci') or {}).get(l))})" for l in langs])
            if c := s.get("controls"):
                rows.append([f"↳ {c.get('k', '?')} random controls", "–"]
                            + [f"{fmt((c.get('dppl_mean') or {}).get(l), '+.3f')}{fmt_ci((c.get('dppl_range') or {}).get(l))}"
                               f" (×{fmt((c.get('dppl_ratio') or {}).get(l), '.3g')})" for l in langs])
        imp = deact.get("importance") or {}
        imp_ci = deact.get("importance_ci") or {}
        text += (f"\n### {t.tag}\n\n" + emit(fig_deactivation(t.tag, deact, langs), f"deactivation_{t.tag}.png")
                 + "\nPPL per language, ΔPPL and its 95% interval (paired bootstrap over the validation lines) in "
                   "brackets; under a set, its random controls' mean ΔPPL, [min, max] and (× the set's ΔPPL over "
                   "their mean).\n\n" + table(["set", "size"] + [lang_name(l) for l in langs], rows)
                 + "\n" + table(["", *[lang_name(l) for l in imp], "LAS"],
                                [["Imp", *[fmt(v, ".4g") + fmt_ci(imp_ci.get(l)) for l, v in imp.items()],
                                  fmt(deact.get("language_agnostic_score"), ".4f")
                                  + fmt_ci(deact.get("language_agnostic_score_ci"), ".4f")]]))
        if imp:
            text += "\n" + emit(fig_importance(t.tag, deact), f"importance_{t.tag}.png")
    return text


def report_layers(tags: list[TagResults], emit: Emit) -> str:
    text = "\n## Shared and exclusive neurons per layer (paper Fig. 6/7)\n"
    models = neuron_models(tags)
    if not models:
        return text + "_Skipped: no model has neurons/stats.json._\n"
    for tag, (stats, langs) in models.items():
        shared = set_value(stats, "shared", "layers") or []
        excl = {l: set_value(stats, f"exclusive_{l}", "layers") or [] for l in langs}
        rows = [[str(i), str(shared[i])] + [str(excl[l][i]) if i < len(excl[l]) else "–" for l in langs]
                for i in range(len(shared))]
        text += (f"\n### {tag}\n\n" + emit(fig_layers(tag, stats, langs), f"layers_{tag}.png") + "\n"
                 + table(["layer", "shared"] + [f"exclusive {lang_name(l)}" for l in langs], rows))
    return text


def report_experts(tags: list[TagResults], emit: Emit) -> str:
    """Which experts each language uses (mixture-of-experts models, neurons/experts.json): one heatmap per language
    of the share of its tokens routed to each (layer, expert) divided by the uniform share top_k / E (1 = uniform),
    the shared experts (related to every language) marked, and a table of their counts per layer."""
    found = [(t.tag, ex) for t in tags if isinstance(ex := load(t.outputs.neurons / layout.EXPERTS), dict)
             and isinstance(ex.get("share"), dict) and ex["share"]]
    if not found:
        return ""
    text = "\n## Experts per language (mixture-of-experts models)\n"
    for tag, ex in found:
        langs, uniform = list(ex["share"]), float(ex["uniform_share"])
        ratio = {l: np.asarray(ex["share"][l], dtype=float) / uniform for l in langs}
        top = max(2.0, max(float(r.max()) for r in ratio.values()))
        fig, axes = plt.subplots(1, len(langs), figsize=(2.2 + 2.4 * len(langs), 0.5 + 0.35 * ex["num_layers"] + 1.5),
                                 squeeze=False, sharey=True)
        for ax, l in zip(axes[0], langs):
            im = ax.imshow(ratio[l], cmap="RdBu_r", vmin=0, vmax=top, aspect="auto", origin="lower")
            for li, experts in ex["shared"].items():
                ax.scatter(experts, [int(li)] * len(experts), marker="o", s=12, facecolors="none", edgecolors="k")
            ax.set_title(lang_name(l), fontsize=9)
            ax.set_xlabel("expert")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0][0].set_ylabel("layer")
        fig.colorbar(im, ax=axes[0].tolist(), label="share / uniform share (circles: shared experts)")
        fig.suptitle(f"{tag}: tokens routed to each expert (top {ex['top_k']} of {ex['num_experts']})", fontsize=10)
        rows = [[li, str(len(ex["shared"][li]))] + [str(len(ex["exclusive"][l][li])) for l in langs]
                for li in sorted(ex["shared"], key=int)]
        text += (f"\n### {tag}\n\n" + emit(fig, f"experts_{tag}.png") + "\n"
                 + table(["layer", "shared experts"] + [f"exclusive {lang_name(l)}" for l in langs], rows))
    return text


def report_components(tags: list[TagResults], emit: Emit) -> str:
    text = "\n## QK / VO / FFN split (paper Table 2)\n"
    models = neuron_models(tags)
    if not models:
        return text + "_Skipped: no model has neurons/stats.json._\n"
    stab = stability_of(tags)

    def share(s: dict, tag: str, name: str, c: str) -> str:
        ci = stable_ci(stab.get(tag), name, "component_shares", c)
        return pct(s.get("component_shares", {}).get(c)) + (f" [{pct(ci[0])}, {pct(ci[1])}]" if ci else "")
    rows = [[tag, label] + [share(s, tag, name, c) for c in ("QK", "VO", "FFN")]
            + [size_with_ci(stats, stab.get(tag), name)]
            for tag, (stats, langs) in models.items() for label, name, s in component_rows(stats, langs)]
    return (text + emit(fig_components(models, stab), "components.png")
            + "\nShare of each set's neurons (the paper, Llama-3.1-8B: shared 92.5 / 2.9 / 4.6, exclusive 59.5 / 23.8 / "
              "16.7).\n" + intervals_note(tags, stab, "each share and size") + "\n"
            + table(["model", "set", "QK", "VO", "FFN", "size"], rows))


def report_ability(tags: list[TagResults], emit: Emit, resamples: int = uncertainty.RESAMPLES, seed: int = 0) -> str:
    text = "\n## Shared ratio and LAS against multilingual ability (paper Fig. 3 and 5)\n"
    points = [{"tag": t.tag, **{m: mean_acc(t.base_eval, m) for m in ACCURACY_TASKS},
               **{f"{m}_ci": mean_acc_ci(t.base_eval, m) for m in ACCURACY_TASKS},
               "eval": t.file(t.outputs.evaluation(t.base_evals[0])) if t.base_evals else "–",
               "shared_ratio": num(t.stats.get("shared_ratio")) if t.stats else None,
               "las": num(t.deact.get("language_agnostic_score")) if t.deact else None} for t in tags]
    usable = [p for p in points if any(p[m] is not None for m in ACCURACY_TASKS)
              and (p["shared_ratio"] is not None or p["las"] is not None)]
    if len(usable) >= 2:
        text += emit(fig_ability(usable, resamples, seed), "ability.png")
    else:
        text += (f"_Figure skipped: needs at least two models with an evaluation of the base model "
                 f"({' or '.join(TASKS[m].label for m in ACCURACY_TASKS)}) "
                 f"and stats.json or deactivation.json; have {len(usable)}._\n")
    if not points:
        return text
    text += ("\nAccuracy from the evaluation of each base model (meta.role 'base'), with the 95% Wilson interval "
             "of the mean where every language scored the same number of questions (the error bars).\n\n"
             + table(["model", "shared ratio", "LAS", *(f"mean {TASKS[m].label}" for m in ACCURACY_TASKS),
                      "evaluation"],
                     [[p["tag"], fmt(p["shared_ratio"]), fmt(p["las"], ".4f"),
                       *(fmt(p[m]) + interval(p[f"{m}_ci"]) for m in ACCURACY_TASKS), p["eval"]] for p in points]))
    for key, label in (("shared_ratio", "shared ratio"), ("las", "LAS")):
        for m in ACCURACY_TASKS:
            pts = [(p[m], p[key]) for p in points if p[m] is not None and p[key] is not None]
            cor = {c: uncertainty.correlation(*zip(*pts), c, resamples, seed) if len(pts) >= 3 else {"r": None}
                   for c in uncertainty.CORRELATIONS}
            if any(c["r"] is not None for c in cor.values()):
                p_, s_ = cor["pearson"], cor["spearman"]
                text += (f"\n{label} vs mean {TASKS[m].label}: Pearson {fmt(p_['r'], '.2f')}, Spearman "
                         f"{fmt(s_['r'], '.2f')} ({len(pts)} models; 95% bootstrap intervals over the models "
                         f"({resamples} resamples, seed {seed}): Pearson{interval(p_.get('ci'), spec='.2f') or ' –'}, "
                         f"Spearman{interval(s_.get('ci'), spec='.2f') or ' –'}; p {fmt(p_.get('p'), '.2g')} / "
                         f"{fmt(s_.get('p'), '.2g')}; the paper: 0.92 / 0.88 within a family)\n")
    return text


DEVELOPMENT_PANELS = (("shared_ratio", "shared ratio |shared| / mean |exclusive|", 1.0),
                      ("exclusive_fraction", "mean exclusive neurons, % of all", 100.0),
                      ("las", "language-agnostic score (LAS)", 1.0))


def fig_development(found: dict[str, dict]) -> Figure:
    """The neuron statistics of each series against development (development.series): one line per series in
    each panel, with each point's 95% interval as an error bar where it has one."""
    fig, axes = plt.subplots(1, len(DEVELOPMENT_PANELS), figsize=(5 * len(DEVELOPMENT_PANELS), 4), squeeze=False,
                             sharex=True)
    for ax, (key, label, scale) in zip(axes[0], DEVELOPMENT_PANELS):
        for name, entry in found.items():
            pts = [p for p in entry["points"] if p[key] is not None]
            line = ax.plot([p["x"] for p in pts], [scale * p[key] for p in pts], marker="o", label=name)[0]
            bars = [(p["x"], *span_err(p[f"{key}_ci"], scale)) for p in pts if p.get(f"{key}_ci")]
            if bars:
                ax.errorbar([b[0] for b in bars], [b[1] for b in bars], yerr=np.array([b[2] for b in bars]).T,
                            fmt="none", ecolor=line.get_color(), capsize=3, lw=0.8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(" / ".join(sorted({e["x_label"] for e in found.values()})))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def report_development(tags: list[TagResults], emit: Emit, order: list[str] | None = None) -> str:
    """The development section: the figure and, per series, a table of every point with its intervals."""
    text = "\n## Language neurons across development\n"
    models = {t.tag: {"record": development.neuron_record(t.outputs), "stats": t.stats, "stability": t.stability,
                      "deactivation": t.deact} for t in tags}
    found = development.series(models, order)
    if not found:
        return text + ("_Skipped: no series of two or more models with neuron statistics (step models of "
                       "train.py --save-every, hub revisions named step<N>, or figures.py --order FILE)._\n")
    text += emit(fig_development(found), "development.png")
    text += ("\nIn brackets and as error bars: LAS, the paired-bootstrap 95% interval of deactivation.json; the "
             "fractions, the 95% bootstrap interval of each set's size over resampled detection texts "
             "(neurons/stability.json), for the mean exclusive fraction the mean of the languages' bounds and for "
             "the shared ratio the envelope shared low / exclusive high to shared high / exclusive low: "
             "conservative bounds, since stability.json holds each set's interval on its own. A size interval need "
             "not contain the full-data value (at --threshold 1.0 a resample's shared set only grows).\n")
    for name, entry in found.items():
        rows = [[str(p["x"]), p["tag"], fmt(p["shared"], ".0f"), fmt(p["shared_ratio"]) + interval(p["shared_ratio_ci"]),
                 pct(p["shared_fraction"]) + interval(p["shared_fraction_ci"], 100, ".3f"),
                 pct(p["exclusive_fraction"]) + interval(p["exclusive_fraction_ci"], 100, ".3f"),
                 fmt(p["las"]) + interval(p["las_ci"])] for p in entry["points"]]
        text += (f"\n### {name}\n\n" + table([entry["x_label"], "model", "shared", "shared ratio", "shared %",
                                               "mean exclusive %", "LAS"], rows))
    return text


PAIRED_RULE = ("Δ is after − before on the same questions. *significant*: exact McNemar test on the questions "
               "only one of the two models got right, p < 0.05; its 95% interval is a paired bootstrap over the "
               "questions ({resamples} resamples, seed {seed}). Two results are paired only when they scored the "
               "same questions (equal `items_sha256`); otherwise the row says why there is no test.")
PPL_RULE = ("ΔPPL is after − before on the same validation lines, with a paired bootstrap 95% interval over lines "
            "({resamples} resamples, seed {seed}); *significant* when the interval excludes 0.")


def interval(ci: Any, scale: float = 1.0, spec: str = ".3f") -> str:
    """' [lo, hi]' of an interval, '' when there is none."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or any(num(x) is None for x in ci):
        return ""
    return f" [{format(scale * ci[0], spec)}, {format(scale * ci[1], spec)}]"


def accuracy_row(c: dict) -> list[str]:
    """before [CI], after [CI], Δ [CI] in points, p, n, verdict."""
    return [fmt(c["before"]) + interval(c["before_ci"]), fmt(c["after"]) + interval(c["after_ci"]),
            fmt(100 * c["delta"], "+.1f") + interval(c["delta_ci"], 100, "+.1f"),
            fmt(c["p"], ".3g") if c["p"] is not None else "–", str(c["n"] or "–"), verdict(c)]


ACC_HEADER = ["before [95% CI]", "after [95% CI]", "Δ (points) [95% CI]", "McNemar p", "questions", "paired test"]
PPL_HEADER = ["PPL before", "after", "ΔPPL [95% CI]", "lines", "paired test"]


def ppl_row(c: dict) -> list[str]:
    if "reason" in c:
        return ["–", "–", "–", "–", f"no paired test: {c['reason']}"]
    return [fmt(c["before"]), fmt(c["after"]), fmt(c["delta"], "+.3f") + interval(c["delta_ci"], 1, "+.3f"),
            str(c["lines"]), verdict(c)]


def seed_spread(runs: list[dict]) -> list[tuple[list[dict], str, dict]]:
    """Groups of runs that differ only in their seed (two seeds or more): per group and language the spread of
    the validation perplexity change after − before over the seeds."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        if r.get("group") is not None and r.get("seed") is not None:
            groups.setdefault(r["group"], []).append(r)
    out = []
    for rs in groups.values():
        if len({r["seed"] for r in rs}) < 2:
            continue
        rs = sorted(rs, key=lambda r: r["seed"])
        for l in dict.fromkeys(l for r in rs for l in r["langs"]):
            changes = [a - b for r in rs if (b := num(r["before"].get(l, {}).get("ppl"))) is not None
                       and (a := num(r["after"].get(l, {}).get("ppl"))) is not None]
            out.append((rs, l, uncertainty.spread(changes)))
    return out


def report_seeds(t: TagResults) -> str:
    rows = [[", ".join(r["run"] for r in rs), ", ".join(str(r["seed"]) for r in rs),
             lang_name(l) + (" (target)" if l == rs[0]["lang"] else ""), str(sp["n"]),
             fmt(sp["mean"], "+.3f"), fmt(sp["min"], "+.3f"), fmt(sp["max"], "+.3f"), fmt(sp["sd"])]
            for rs, l, sp in seed_spread(t.runs)]
    if not rows:
        return ""
    return ("\nRuns that differ only in their seed (`SEEDS` in train.sh): the spread over seeds of the validation "
            "perplexity change after − before (sd: sample standard deviation).\n\n"
            + table(["runs", "seeds", "language", "seeds measured", "mean ΔPPL", "min", "max", "sd"], rows))


def report_training(tags: list[TagResults], emit: Emit, resamples: int = uncertainty.RESAMPLES, seed: int = 0) -> str:
    text = "\n## Neuron-targeted continued pretraining (paper Table 1)\n"
    done = [t for t in tags if t.runs]
    if not done:
        return text + "_Skipped: no trained/<run>/train_log.json with before/after validation numbers._\n"
    for t in done:
        val_rows = [[r["run"], lang_name(r["lang"]) if r["lang"] else "–", str(r["neurons"] or "–"),
                     lang_name(l) + (" (target)" if l == r["lang"] else ""),
                     *[fmt(r[k].get(l, {}).get(v)) for v in ("loss", "ppl") for k in ("before", "after")]]
                    for r in t.runs for l in r["langs"]]
        ppl_rows = [[r["run"], lang_name(l) + (" (target)" if l == r["lang"] else ""), *ppl_row(c)]
                    for r in t.runs for l, c in r["ppl_change"].items()]
        acc_rows = [[r["run"], TASKS[m].label, lang_name(l) + (" (target)" if l == r["lang"] else ""), *accuracy_row(c)]
                    for r in t.runs for m in ACCURACY_TASKS for l, c in r["acc"][m].items()]
        used = (f"the base model's evaluation {t.file(t.outputs.evaluation(t.base_evals[0]))}" if t.base_evals
                else "no evaluation of the base model (none has meta.role 'base')")
        runs_eval = ", ".join(f"{r['run']}: " + (t.file(t.outputs.evaluation(r["eval"])) if r["eval"] else "none")
                              for r in t.runs)
        text += (f"\n### {t.tag}\n\n" + emit(fig_training(t.tag, t.runs), f"training_{t.tag}.png")
                 + "\nValidation loss and perplexity of every language each run measured, from its train_log.json.\n\n"
                 + table(["run", "target", "neurons", "language", "val loss before", "after", "val PPL before", "after"],
                         val_rows)
                 + (f"\n{PPL_RULE.format(resamples=resamples, seed=seed)}\n\n"
                    + table(["run", "language", *PPL_HEADER], ppl_rows) if ppl_rows else "")
                 + report_seeds(t)
                 + f"\nAccuracy before: {used}; after: the run's evaluation (meta.role 'trained', provenance.run_name = "
                   f"the run; {runs_eval}). {PAIRED_RULE.format(resamples=resamples, seed=seed)}\n\n"
                 + (table(["run", "task", "language", *ACC_HEADER], acc_rows) if acc_rows
                    else "_No accuracy to compare._\n"))
    return text


def report_comparison(tags: list[TagResults], emit: Emit, resamples: int = uncertainty.RESAMPLES, seed: int = 0) -> str:
    """Every evaluated deactivated or intervened model (meta.role neither 'base' nor 'trained') against the
    base model's evaluation, question by question."""
    text = "\n## Deactivated and intervened models against the base\n"
    done = [t for t in tags if t.compared]
    if not done:
        return text + ("_Skipped: no evaluation of a deactivated or intervened model next to an evaluation of the "
                       "base model._\n")
    for t in done:
        acc_rows = [[name, TASKS[m].label, lang_name(l), *accuracy_row(c)]
                    for name, by_task in t.compared.items() for m in ACCURACY_TASKS for l, c in by_task[m].items()]
        ppl_rows = [[name, lang_name(l), *ppl_row(c)] for name, by_lang in t.compared_ppl.items()
                    for l, c in by_lang.items()]
        models = {name: (t.evals[name], by_task) for name, by_task in t.compared.items()
                  if any(by_task.get(m) for m in ACCURACY_TASKS)}
        text += (f"\n### {t.tag}\n\n"
                 + (emit(fig_comparison(t.tag, t.base_eval, models), f"comparison_{t.tag}.png") if models else "")
                 + f"\nBefore: {t.file(t.outputs.evaluation(t.base_evals[0]))} (the base model); after: each model's "
                   f"evaluation. {PAIRED_RULE.format(resamples=resamples, seed=seed)}\n\n"
                 + (table(["model", "task", "language", *ACC_HEADER], acc_rows) if acc_rows
                    else "_No accuracy to compare._\n")
                 + (f"\n{PPL_RULE.format(resamples=resamples, seed=seed)}\n\n"
                    + table(["model", "language", *PPL_HEADER], ppl_rows) if ppl_rows else ""))
    return text


# ---------------------------------------------------------------- steering (docs/steering.md)

def steering_runs(o: layout.Outputs, notes: list[str]) -> dict[str, dict]:
    """name -> steering file content, for the files with a readable results table."""
    runs = {}
    for name in o.steerings():
        obj = load(o.steering_file(name))
        if isinstance(obj, dict) and isinstance(obj.get("results"), dict) and isinstance(obj.get("meta"), dict):
            runs[name] = obj
        else:
            notes.append(f"{o.tag}: steering/{name}.json has no readable results: left out")
    return runs


def steering_kind(meta: dict) -> str:
    """The intervention with the target written as TGT and a shift's source as SRC, so that runs on different
    targets share one panel."""
    iv, tgt = meta.get("intervention") or {}, meta.get("target")
    if iv.get("kind") == "mean":
        return "mean=TGT" if iv.get("lang") == tgt else f"mean={iv.get('lang')}"
    if iv.get("kind") == "shift":
        return f"shift={iv.get('source')}:" + ("TGT" if iv.get("target") == tgt else str(iv.get("target")))
    return str(iv.get("spec"))


def random_rate(table: dict, src: str) -> float | None:
    """The mean target rate of the random controls for one source language."""
    rates = [num((by_src.get(src) or {}).get("target_rate")) for c, by_src in table.items() if c.startswith("random-")]
    rates = [r for r in rates if r is not None]
    return sum(rates) / len(rates) if rates else None


def exclusive_cells(runs: dict[str, dict]) -> dict[str, dict[tuple[str, str], float]]:
    """intervention kind -> {(source, target): target rate of the set} over the runs on exclusive sets."""
    cells: dict[str, dict[tuple[str, str], float]] = {}
    for obj in runs.values():
        meta = obj["meta"]
        set_name, tgt = (meta.get("set") or {}).get("name", ""), meta.get("target")
        if not str(set_name).startswith("exclusive_") or set_name not in obj["results"]:
            continue
        for src, row in obj["results"][set_name].items():
            if (r := num(row.get("target_rate"))) is not None:
                cells.setdefault(steering_kind(meta), {})[(src, tgt)] = r
    return cells


def fig_steering(tag: str, cells: dict[str, dict[tuple[str, str], float]]) -> Figure:
    """One heatmap per intervention: rows source languages, columns target languages, the rate of generations
    identified as the target with the intervention on the target's (or source's) exclusive set."""
    # every panel on the same rows and columns, so that they line up and one row label serves them all
    srcs = sorted({s for c in cells.values() for s, _ in c})
    tgts = sorted({t for c in cells.values() for _, t in c})
    fig, axes = plt.subplots(1, len(cells), figsize=(0.8 * len(tgts) * len(cells) + 2.5, 0.6 * len(srcs) + 2.4),
                             squeeze=False, layout="constrained")
    for k, (ax, (kind, c)) in enumerate(zip(axes[0], cells.items())):
        grid = np.full((len(srcs), len(tgts)), np.nan)
        for (s, t), r in c.items():
            grid[srcs.index(s), tgts.index(t)] = r
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for i in range(len(srcs)):
            for j in range(len(tgts)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                            color="white" if grid[i, j] < 0.5 else "black", fontsize=8)
        ax.set_xticks(range(len(tgts)), [lang_name(t) for t in tgts], rotation=30, ha="right")
        ax.set_yticks(range(len(srcs)), [lang_name(s) for s in srcs] if k == 0 else [])
        ax.set_xlabel("target")
        if k == 0:  # the panels share their rows' meaning; a label on each would overlap the next panel's ticks
            ax.set_ylabel("source")
        ax.set_title(kind)
    fig.colorbar(im, ax=axes[0].tolist(), label="rate in the target language")
    fig.suptitle(f"{tag}: steering with the exclusive sets")
    return fig


def fig_dose(tag: str, name: str, obj: dict) -> Figure:
    """Target rate against the scale factor, per source language: the set (with its 95% Wilson interval) and
    the mean of the random controls."""
    strengths = obj["strengths"]
    set_name, tgt = obj["meta"]["set"]["name"], obj["meta"]["target"]
    alphas = [(float(k.split("=", 1)[1]), t) for k, t in strengths.items()]
    alphas.sort()
    srcs = list(next(iter(strengths.values()))[set_name])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for src in srcs:
        xs = [a for a, _ in alphas]
        rows = [t[set_name][src] for _, t in alphas]
        ys = [r["target_rate"] for r in rows]
        err = [[y - r["target_rate_ci"][0] for y, r in zip(ys, rows)], [r["target_rate_ci"][1] - y for y, r in zip(ys, rows)]]
        line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{set_name}, from {lang_name(src)}")
        rnd = [random_rate(t, src) for _, t in alphas]
        if any(r is not None for r in rnd):
            ax.plot(xs, rnd, ls="--", color=line[0].get_color(), alpha=0.7, label=f"random controls, from {lang_name(src)}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("scale factor A")
    ax.set_ylabel(f"rate in {lang_name(tgt)}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{tag}: {name}")
    fig.tight_layout()
    return fig


def intervention_label(ev: dict) -> str:
    rec = intervention_of(ev) or {}
    return f"{(rec.get('neuron_set') or {}).get('name', '?')} @ {rec.get('spec', '?')}"


def task_values(ev: dict | None, task: str, langs: list[str]) -> list[float | None]:
    res = ((ev or {}).get("results") or {}).get(task) or {}
    return [num((res.get(l) or {}).get(TASKS[task].metric)) if isinstance(res.get(l), dict) else None for l in langs]


def fig_interventions(tag: str, base: dict | None, under: dict[str, dict], tasks: list[str],
                      langs: list[str]) -> Figure:
    """One panel per task: the value per language of the base model and under each intervention."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6, (1.2 * len(langs) + 2) * len(tasks)), 4.2), squeeze=False)
    rows = ([("base", base)] if base is not None else []) + [(intervention_label(ev), ev) for ev in under.values()]
    colors = plt.cm.tab10(np.arange(len(rows)) % 10)
    x, w = np.arange(len(langs)), 0.8 / max(1, len(rows))
    for ax, task in zip(axes[0], tasks):
        for i, (label, ev) in enumerate(rows):
            v = task_values(ev, task, langs)
            ax.bar(x + (i - (len(rows) - 1) / 2) * w, [a if a is not None else 0.0 for a in v], w,
                   color="#7f7f7f" if label == "base" else colors[i], label=label)
        if TASKS[task].metric == "ppl":
            ax.set_yscale("log")  # an intervention can raise PPL by orders of magnitude
        ax.set_xticks(x, [lang_name(l) for l in langs], rotation=30, ha="right")
        ax.set_title(TASKS[task].label)
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"{tag}: evaluation under interventions, beside the base model")
    fig.tight_layout()
    return fig


def report_steering(tags: list[TagResults], emit: Emit) -> str:
    text = "\n## Output-language steering (docs/steering.md)\n"
    notes: list[str] = []
    done = [(t, r) for t in tags if (r := steering_runs(t.outputs, notes))]
    if not done:
        return text + "_Skipped: no steering/<name>.json (run steering.py)._\n" + "".join(f"\n{n}\n" for n in notes)
    for t, runs in done:
        text += f"\n### {t.tag}\n\n"
        if cells := exclusive_cells(runs):
            text += emit(fig_steering(t.tag, cells), f"steering_{t.tag}.png")
        rows = []
        for name, obj in runs.items():
            meta, res = obj["meta"], obj["results"]
            set_name = (meta.get("set") or {}).get("name")
            for src, row in (res.get(set_name) or {}).items():
                none = (res.get("none") or {}).get(src) or {}
                lo, hi = row.get("target_rate_ci") or (None, None)
                rows.append([name, str(set_name), str((meta.get("intervention") or {}).get("spec")), lang_name(src),
                             lang_name(str(meta.get("target"))), str(row.get("n")), fmt(none.get("target_rate"), ".2f"),
                             f"{fmt(row.get('target_rate'), '.2f')} [{fmt(lo, '.2f')}, {fmt(hi, '.2f')}]",
                             fmt(random_rate(res, src), ".2f"), fmt(row.get("source_rate"), ".2f"),
                             fmt((none.get("fluency") or {}).get("ppl"), ".1f"),
                             fmt((row.get("fluency") or {}).get("ppl"), ".1f"),
                             fmt((row.get("fluency") or {}).get("repeated_ngrams"), ".2f")])
            if isinstance(obj.get("strengths"), dict) and set_name:
                text += emit(fig_dose(t.tag, name, obj), f"dose_{t.tag}_{name}.png")
        text += ("\nRate of generations identified as the target: without intervention (none), with it on the set "
                 "(95% Wilson interval), and the mean over the random controls; PPL of the generations under the "
                 "unmodified model; rep = share of repeated token 3-grams.\n\n"
                 + table(["run", "set", "intervention", "source", "target", "n", "none", "set", "random", "still source",
                          "PPL none", "PPL set", "rep"], rows))
    return text + "".join(f"\n{n}\n" for n in notes)
def report_interventions(tags: list[TagResults], emit: Emit) -> str:
    text = "\n## Evaluation under interventions (evaluate.py --neurons --intervention)\n"
    done = [t for t in tags if any(intervention_of(ev) for ev in t.evals.values())]
    if not done:
        return text + "_Skipped: no eval/<name>.json under an intervention._\n"
    for t in done:
        under = {n: ev for n, ev in sorted(t.evals.items()) if intervention_of(ev)}
        evs = [*under.values(), *([t.base_eval] if t.base_eval else [])]
        tasks = [k for k in TASKS if any(k in (ev.get("results") or {}) for ev in evs)]
        langs = list(dict.fromkeys(l for ev in evs for k in tasks for l in ((ev.get("results") or {}).get(k) or {})))
        rows = [[label, name, TASKS[k].label, *(fmt(v) for v in task_values(ev, k, langs))]
                for label, name, ev in ([("base", t.base_evals[0], t.base_eval)] if t.base_eval else [])
                + [(intervention_label(ev), n, ev) for n, ev in under.items()] for k in tasks]
        text += (f"\n### {t.tag}\n\n" + emit(fig_interventions(t.tag, t.base_eval, under, tasks, langs),
                                              f"interventions_{t.tag}.png")
                 + "\nEach task per language under each intervention (set @ SPEC, docs/interventions.md) and for the "
                   "base model (" + (t.file(t.outputs.evaluation(t.base_evals[0])) if t.base_eval else "none") + ").\n\n"
                 + table(["intervention", "evaluation", "task", *(lang_name(l) for l in langs)], rows))
    return text


def plot_stability(tags: list[TagResults], emit: Emit) -> str:
    """Set stability (neurons/stability.json, detection.py --resamples): per set, the split-half Jaccard and the
    bootstrap Jaccard against the full-data set, each a mean with its 95% interval; one figure and table per tag."""
    text = "\n## Stability of the neuron sets under a redraw of the detection texts\n"
    found = {t.tag: t.stability for t in tags if t.stability is not None}
    if not found:
        return text + "_Skipped: no model has neurons/stability.json (detection.py --resamples N)._\n"
    for tag, doc in found.items():
        names = list(doc["sets"])
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4))
        x = np.arange(len(names))
        for offset, key, label in ((-0.15, "split_half", "split halves"), (0.15, "bootstrap", "bootstrap vs all texts")):
            mean = np.array([num(doc["sets"][n][key]["mean"]) or 0.0 for n in names])
            lo = np.array([num(doc["sets"][n][key]["ci"][0]) or 0.0 for n in names])
            hi = np.array([num(doc["sets"][n][key]["ci"][1]) or 0.0 for n in names])
            # the mean can sit outside a percentile interval of skewed draws: bars never go negative
            ax.errorbar(x + offset, mean, yerr=[np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)],
                        fmt="o", ms=4, capsize=3, label=label)
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("Jaccard (mean, 95% interval)")
        ax.set_title(f"{tag}: {doc.get('resamples')} resamples of {min((doc.get('texts') or {0: 0}).values())}+ "
                     "texts per language")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        ci = lambda s: f"{fmt(s['mean'], '.2f')} [{fmt(s['ci'][0], '.2f')}, {fmt(s['ci'][1], '.2f')}]"
        rows = [[n, str(s.get("size", "–")), ci(s["split_half"]), ci(s["bootstrap"]),
                 f"{fmt(s['size_bootstrap']['mean'], '.1f')} [{fmt(s['size_bootstrap']['ci'][0], '.0f')}, "
                 f"{fmt(s['size_bootstrap']['ci'][1], '.0f')}]"] for n, s in doc["sets"].items()]
        text += (f"\n### {tag}\n\n" + emit(fig, f"stability_{tag}.png")
                 + f"\nJaccard of two empty sets = 1. Texts per language: {doc.get('texts')}.\n\n"
                 + table(["set", "size", "split-half Jaccard", "bootstrap Jaccard", "bootstrap size"], rows))
    return text


class FigureFolder:
    """<out>/figures: writes each figure (files.write_bytes: never half a file) and removes, at the end, the
    figures of models or inputs gone since the last run."""

    def __init__(self, folder: Path):
        self.folder, self.made = folder, []

    def emit(self, fig: Figure, name: str) -> str:
        write_bytes(self.folder / name, png(fig))
        self.made.append(name)
        return f"![{name}]({name})\n"

    def remove_stale(self) -> None:
        for stale in set(self.folder.glob("*.png")) - {self.folder / n for n in self.made}:
            stale.unlink()


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    selected = select(out, args.models)
    figs = FigureFolder(layout.figures_dir(out))
    order = development.read_order(args.order) if args.order else None  # a bad file: one line, before any output
    # a second run waits for this one; figures are always redrawn
    with unit(figs.folder, f"--out {args.out}", force=True):
        notes: list[str] = []
        tags = [load_tag(o, notes, args.resamples, args.seed) for o in selected]
        report = (f"# Language neurons: figures and tables\n\nGenerated by `figures.py` from the files under "
                  f"`{out}` (models: {', '.join(t.tag for t in tags) or 'none'}).\n")
        for section in (report_distribution, report_deactivation, report_layers, report_components):
            report += section(tags, figs.emit)
        report += report_ability(tags, figs.emit, args.resamples, args.seed)
        report += report_development(tags, figs.emit, order)
        for section in (report_interventions, plot_stability, report_steering):
            report += section(tags, figs.emit)
        report += report_experts(tags, figs.emit)
        for paired in (report_comparison, report_training):  # the sections with seeded bootstrap intervals
            report += paired(tags, figs.emit, args.resamples, args.seed)
        if notes:
            report += "\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes)
        write_bytes(figs.folder / layout.REPORT, report.encode("utf-8"))
        figs.remove_stale()
    print(f"Wrote {len(figs.made)} figures and {figs.folder / layout.REPORT}: {', '.join(figs.made) or 'none'}")
    for n in notes:
        print(f"note: {n}")


if __name__ == "__main__":
    run(main)
