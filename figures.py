"""Figures and tables of the paper from the files the stages wrote (no model is loaded).

    python figures.py --out ./outputs [--models gemma-3-270m,Llama-3.2-1B]

Writes <out>/figures/*.png and <out>/figures/report.md (markdown tables of the same numbers, with links to
the figures). A figure whose inputs are missing is skipped with a note in report.md.

  neuron_distribution.png   shared / exclusive / unique neurons per language, % of all neurons (paper Fig. 2)
  deactivation_<tag>.png    dPPL per language when random, shared or exclusive neurons are off (Fig. 4)
  layers_<tag>.png          shared and exclusive neurons per layer (Fig. 6/7)
  components.png            QK / VO / FFN split of shared and exclusive neurons (Table 2)
  ability.png               shared ratio and LAS against multilingual ability across models (Fig. 3/5)
  training_<tag>.png        validation perplexity of every language before/after targeted training, and the
                            accuracy change, changes within the evaluation's noise marked as such (Table 1)"""
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
from langneurons.cli import ArgumentParser, InputError, run, split_list  # noqa: E402
from langneurons.files import write_bytes  # noqa: E402
from langneurons.metrics import pearson, spearman  # noqa: E402
from langneurons.data import LANGUAGE_NAMES  # noqa: E402
from langneurons.reuse import unit  # noqa: E402
from langneurons.tasks import ACCURACY_TASKS, TASKS  # noqa: E402

COLORS = {"shared": "#1f77b4", "exclusive": "#ff7f0e", "unique": "#d62728", "random": "#7f7f7f",
          "random_exclusive": "#bcbd22", "QK": "#1f77b4", "VO": "#2ca02c", "FFN": "#ff7f0e",
          "before": "#9ecae1", "after": "#08519c", "noise": "#d9d9d9"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="./outputs", help="output root the stages wrote to")
    p.add_argument("--models", default=None, help="comma list of model tags (directories under --out); "
                   "none: every one with results")
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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers, never 2.5
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # so are neuron counts
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
    metrics = [m for m in ACCURACY_TASKS if sum(p.get(m) is not None for p in points) >= 2]
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
    label_langs(ax, ls, r["lang"])
    vals = [v for k in ("before", "after") for l in ls if (v := num(r[k].get(l, {}).get("ppl")))]
    if vals and max(vals) / max(min(vals), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"{r['run']} (target {lang_name(r['lang']) if r['lang'] else '?'}, neurons {r['neurons'] or '?'})",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def accuracy_panel(ax, r: dict, task: str) -> None:
    """The change of one task's accuracy per language, ±2 SE; a change within the noise is a hatched grey
    bar, not drawn as an effect."""
    changes = r["acc"].get(task, {})
    ls = list(changes)
    d = [100 * c["delta"] for c in changes.values()]
    noise = [c["within_noise"] is True for c in changes.values()]
    bars = ax.bar(np.arange(len(ls)), d, color=[COLORS["noise"] if n else COLORS["after"] if v >= 0
                                                 else COLORS["unique"] for v, n in zip(d, noise)])
    for bar, n in zip(bars, noise):
        if n:
            bar.set_hatch("//")
            bar.set_edgecolor("grey")
    se = [200 * c["se"] if c["se"] is not None else 0.0 for c in changes.values()]
    ax.errorbar(np.arange(len(ls)), d, yerr=se, fmt="none", ecolor="black", elinewidth=0.8, capsize=3)
    ax.axhline(0, color="black", lw=0.6)
    label_langs(ax, ls, r["lang"])
    ax.set_ylabel(f"Δ {TASKS[task].label} accuracy (points)")
    ax.set_title(f"{r['run']}: {TASKS[task].label} after − before" + ("" if ls else "\n(no evaluation to compare)"),
                 fontsize=9)
    ax.legend(handles=[Patch(facecolor=COLORS["after"], label="gain"), Patch(facecolor=COLORS["unique"], label="loss"),
                       Patch(facecolor=COLORS["noise"], edgecolor="grey", hatch="//",
                             label="within noise (|Δ| < 2 SE)")], fontsize=7)
    ax.grid(axis="y", alpha=0.3)


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


# ---------------------------------------------------------------- evaluation noise

def difference_se(p1: float, n1: int, p2: float, n2: int) -> float:
    """The standard error of the difference of two accuracies p1, p2 measured on n1 and n2 items."""
    return math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)


def within_noise(before: float, n_before: int | None, after: float, n_after: int | None) -> bool | None:
    """Whether the change after − before is smaller than the evaluation's noise: |Δ| < 2 SE of the difference
    (no change at all is never an effect, even where SE is 0); None when an item count is unknown."""
    if not n_before or not n_after:
        return None
    delta = after - before
    return delta == 0 or abs(delta) < 2 * difference_se(before, n_before, after, n_after)


def accuracy_changes(before: dict[str, tuple], after: dict[str, tuple]) -> dict[str, dict]:
    """lang -> before, after, Δ, SE of Δ and whether Δ is within noise, for the languages measured in both."""
    out = {}
    for l, (p2, n2) in after.items():
        if l in before:
            p1, n1 = before[l]
            out[l] = {"before": p1, "after": p2, "delta": p2 - p1,
                      "se": difference_se(p1, n1, p2, n2) if n1 and n2 else None,
                      "within_noise": within_noise(p1, n1, p2, n2)}
    return out


# ---------------------------------------------------------------- reading the stages' files

def accuracies(ev: dict | None, task: str) -> dict[str, tuple[float, int | None]]:
    """lang -> (accuracy, number of items) of one task in an evaluation file."""
    res = ((ev or {}).get("results") or {}).get(task)
    out = {}
    for l, v in res.items() if isinstance(res, dict) else ():
        if isinstance(v, dict) and (a := num(v.get("accuracy"))) is not None:
            n = v.get("n")
            out[str(l)] = (a, n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None)
    return out


def mean_acc(ev: dict | None, task: str) -> float | None:
    vals = [a for a, _ in accuracies(ev, task).values()]
    return float(np.mean(vals)) if vals else None


def eval_role(ev: dict) -> str:
    """'base' | 'variant' | 'trained': the file's meta.role, or for a file written before evaluate recorded
    it, the role its provenance gives (none: the base model)."""
    meta = ev.get("meta") if isinstance(ev.get("meta"), dict) else {}
    if isinstance(meta.get("role"), str):
        return meta["role"]
    prov = meta.get("provenance")
    return layout.provenance_role(prov) if isinstance(prov, dict) else "base"


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
    deact: dict | None = None
    deact_langs: list[str] = field(default_factory=list)
    evals: dict[str, dict] = field(default_factory=dict)   # evaluation name -> its file's content
    runs: list[dict] = field(default_factory=list)         # read_train_log per run, with "eval" and "acc"

    @property
    def tag(self) -> str:
        return self.outputs.tag

    @property
    def base_evals(self) -> list[str]:
        """The evaluations of the base model (role 'base'), sorted: the first is the one the figures use."""
        return [name for name, ev in sorted(self.evals.items()) if eval_role(ev) == "base"]

    @property
    def base_eval(self) -> dict | None:
        return self.evals[self.base_evals[0]] if self.base_evals else None

    def file(self, path: Path) -> str:
        """`path` relative to the tag's folder, as the report names it."""
        return str(path.relative_to(self.outputs.root))


def load_tag(o: layout.Outputs, notes: list[str]) -> TagResults:
    """Read every result file of one tag (an unreadable one counts as missing: its figures are skipped)."""
    t = TagResults(o)
    stats = load(o.neurons / layout.STATS)
    if isinstance(stats, dict) and isinstance(stats.get("sets"), dict):
        t.stats, t.langs = stats, stats_langs(stats, load(o.neurons / layout.META))
    else:
        notes.append(f"{t.tag}: no readable {t.file(o.neurons / layout.STATS)} (run detection.py): neuron figures skipped")
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
        r["acc"] = {m: accuracy_changes(accuracies(t.base_eval, m), accuracies(t.evals.get(r["eval"]), m))
                    for m in ACCURACY_TASKS}
        t.runs.append(r)
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


def report_distribution(tags: list[TagResults], emit: Emit) -> str:
    text = "\n## Shared and exclusive neurons per language (paper Fig. 2)\n"
    models = neuron_models(tags)
    if not models:
        return text + "_Skipped: no model has neurons/stats.json._\n"
    rows = [[tag, lang_name(l), pct(set_value(stats, f"related_{l}", "fraction")),
             pct(set_value(stats, "shared", "fraction")), pct(set_value(stats, f"exclusive_{l}", "fraction")),
             pct(set_value(stats, f"unique_{l}", "fraction"))] for tag, (stats, langs) in models.items() for l in langs]
    return (text + emit(fig_distribution(models), "neuron_distribution.png") + "\n% of all neurons of the model.\n\n"
            + table(["model", "language", "related", "shared", "exclusive", "strictly unique"], rows) + "\n"
            + table(["model", "total neurons", "shared", "shared ratio"],
                    [[t, str(s.get("total_neurons", "–")), str(set_value(s, "shared", "size")),
                      fmt(s.get("shared_ratio"))] for t, (s, _) in models.items()]))


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
                        + [f"{fmt(((s.get('ppl') or {}).get(l) or {}).get('ppl'))} ({fmt((s.get('dppl') or {}).get(l), '+.3f')})"
                           for l in langs])
        imp = deact.get("importance") or {}
        text += (f"\n### {t.tag}\n\n" + emit(fig_deactivation(t.tag, deact, langs), f"deactivation_{t.tag}.png")
                 + "\nPPL per language, ΔPPL in brackets.\n\n" + table(["set", "size"] + [lang_name(l) for l in langs], rows)
                 + "\n" + table(["", *[lang_name(l) for l in imp], "LAS"],
                                [["Imp", *[fmt(v, ".4g") for v in imp.values()],
                                  fmt(deact.get("language_agnostic_score"), ".4f")]]))
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


def report_components(tags: list[TagResults], emit: Emit) -> str:
    text = "\n## QK / VO / FFN split (paper Table 2)\n"
    models = neuron_models(tags)
    if not models:
        return text + "_Skipped: no model has neurons/stats.json._\n"
    rows = [[tag, label] + [pct(s.get("component_shares", {}).get(c)) for c in ("QK", "VO", "FFN")]
            + [str(s.get("size", "–"))] for tag, (stats, langs) in models.items() for label, s in component_rows(stats, langs)]
    return (text + emit(fig_components(models), "components.png")
            + "\nShare of each set's neurons (the paper, Llama-3.1-8B: shared 92.5 / 2.9 / 4.6, exclusive 59.5 / 23.8 / "
              "16.7).\n\n" + table(["model", "set", "QK", "VO", "FFN", "size"], rows))


def report_ability(tags: list[TagResults], emit: Emit) -> str:
    text = "\n## Shared ratio and LAS against multilingual ability (paper Fig. 3 and 5)\n"
    points = [{"tag": t.tag, **{m: mean_acc(t.base_eval, m) for m in ACCURACY_TASKS},
               "eval": t.file(t.outputs.evaluation(t.base_evals[0])) if t.base_evals else "–",
               "shared_ratio": num(t.stats.get("shared_ratio")) if t.stats else None,
               "las": num(t.deact.get("language_agnostic_score")) if t.deact else None} for t in tags]
    usable = [p for p in points if any(p[m] is not None for m in ACCURACY_TASKS)
              and (p["shared_ratio"] is not None or p["las"] is not None)]
    if len(usable) >= 2:
        text += emit(fig_ability(usable), "ability.png")
    else:
        text += (f"_Figure skipped: needs at least two models with an evaluation of the base model "
                 f"({' or '.join(TASKS[m].label for m in ACCURACY_TASKS)}) "
                 f"and stats.json or deactivation.json; have {len(usable)}._\n")
    if not points:
        return text
    text += ("\nAccuracy from the evaluation of each base model (meta.role 'base').\n\n"
             + table(["model", "shared ratio", "LAS", *(f"mean {TASKS[m].label}" for m in ACCURACY_TASKS),
                      "evaluation"],
                     [[p["tag"], fmt(p["shared_ratio"]), fmt(p["las"], ".4f"), *(fmt(p[m]) for m in ACCURACY_TASKS),
                       p["eval"]] for p in points]))
    for key, label in (("shared_ratio", "shared ratio"), ("las", "LAS")):
        for m in ACCURACY_TASKS:
            pts = [(p[m], p[key]) for p in points if p[m] is not None and p[key] is not None]
            r, rho = (pearson(*zip(*pts)), spearman(*zip(*pts))) if len(pts) >= 3 else (None, None)
            if r is not None or rho is not None:
                text += (f"\n{label} vs mean {TASKS[m].label}: Pearson {fmt(r, '.2f')}, Spearman {fmt(rho, '.2f')} "
                         f"({len(pts)} models; the paper: 0.92 / 0.88 within a family)\n")
    return text


NOISE_RULE = ("A change counts as an effect only when |Δ| ≥ 2 SE, with SE = √(p₁(1−p₁)/n₁ + p₂(1−p₂)/n₂) the "
              "standard error of the difference of two accuracies measured on n₁ and n₂ items; a smaller change is "
              "marked *within noise* (hatched grey in the figure). With 12 MGSM items per language SE is up to "
              "0.20, so most changes there are within noise.")


def noise_verdict(c: dict) -> str:
    return {True: "within noise", False: "beyond noise", None: "n unknown"}[c["within_noise"]]


def report_training(tags: list[TagResults], emit: Emit) -> str:
    text = "\n## Neuron-targeted continued pretraining (paper Table 1)\n"
    done = [t for t in tags if t.runs]
    if not done:
        return text + "_Skipped: no trained/<run>/train_log.json with before/after validation numbers._\n"
    for t in done:
        val_rows = [[r["run"], lang_name(r["lang"]) if r["lang"] else "–", str(r["neurons"] or "–"),
                     lang_name(l) + (" (target)" if l == r["lang"] else ""),
                     *[fmt(r[k].get(l, {}).get(v)) for v in ("loss", "ppl") for k in ("before", "after")]]
                    for r in t.runs for l in r["langs"]]
        acc_rows = [[r["run"], TASKS[m].label, lang_name(l) + (" (target)" if l == r["lang"] else ""), fmt(c["before"]),
                     fmt(c["after"]), fmt(100 * c["delta"], "+.1f"), fmt(200 * c["se"] if c["se"] is not None else None, ".1f"),
                     noise_verdict(c)] for r in t.runs for m in ACCURACY_TASKS for l, c in r["acc"][m].items()]
        used = (f"the base model's evaluation {t.file(t.outputs.evaluation(t.base_evals[0]))}" if t.base_evals
                else "no evaluation of the base model (none has meta.role 'base')")
        runs_eval = ", ".join(f"{r['run']}: " + (t.file(t.outputs.evaluation(r["eval"])) if r["eval"] else "none")
                              for r in t.runs)
        text += (f"\n### {t.tag}\n\n" + emit(fig_training(t.tag, t.runs), f"training_{t.tag}.png")
                 + "\nValidation loss and perplexity of every language each run measured, from its train_log.json.\n\n"
                 + table(["run", "target", "neurons", "language", "val loss before", "after", "val PPL before", "after"],
                         val_rows)
                 + f"\nAccuracy before: {used}; after: the run's evaluation (meta.role 'trained', provenance.run_name = "
                   f"the run; {runs_eval}). {NOISE_RULE}\n\n"
                 + (table(["run", "task", "language", "before", "after", "Δ (points)", "2 SE (points)", "noise"], acc_rows)
                    if acc_rows else "_No accuracy to compare._\n"))
    return text


def plot_stability(tags: list[TagResults], emit: Emit) -> str:
    """Set stability (neurons/stability.json, detection.py --resamples): per set, the split-half Jaccard and the
    bootstrap Jaccard against the full-data set, each a mean with its 95% interval; one figure and table per tag."""
    text = "\n## Stability of the neuron sets under a redraw of the detection texts\n"
    found = {t.tag: doc for t in tags if isinstance(doc := load(t.outputs.neurons / layout.STABILITY), dict)
             and isinstance(doc.get("sets"), dict) and doc["sets"]}
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
    # a second run waits for this one; figures are always redrawn
    with unit(figs.folder, f"--out {args.out}", force=True):
        notes: list[str] = []
        tags = [load_tag(o, notes) for o in selected]
        report = (f"# Language neurons: figures and tables\n\nGenerated by `figures.py` from the files under "
                  f"`{out}` (models: {', '.join(t.tag for t in tags) or 'none'}).\n")
        for section in (report_distribution, report_deactivation, report_layers, report_components, report_ability,
                        report_training, plot_stability):
            report += section(tags, figs.emit)
        if notes:
            report += "\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes)
        write_bytes(figs.folder / layout.REPORT, report.encode("utf-8"))
        figs.remove_stale()
    print(f"Wrote {len(figs.made)} figures and {figs.folder / layout.REPORT}: {', '.join(figs.made) or 'none'}")
    for n in notes:
        print(f"note: {n}")


if __name__ == "__main__":
    run(main)
