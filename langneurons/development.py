"""Language neurons across development (docs/development.md): which models of an output root form a series,
where each sits on it, and the neuron statistics figures.py draws against it.

A series is one of
  * the step models of one training run (train.py --save-every, tag `<base>@<run>-step<N>`), at x = N, with
    the base model they continue from at x = 0 when it has results too;
  * the hub revisions of one model (--revision, tag `<name>@<revision>`) whose revision names a step
    (`step1000`, `stage1-step1000-tokens4B`), at x = that step;
  * the tags listed in a release-order file (figures.py --order FILE: one tag per line), at x = 1, 2, ...
Where a model sits is read from the model record its neuron files carry (model.model_record: `checkpoint`,
`revision`), never from its tag's spelling."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .cli import InputError
from .data import read_text, text_lines
from .layout import Outputs

ORDER_SERIES = "release order"


def read_order(path: str | Path) -> list[str]:
    """The tags of a release-order file in order: one per line, blank lines and '#' comments left out; a tag
    named twice or a file without one is an error."""
    tags = [line.split("#", 1)[0].strip() for line in text_lines(read_text(path, "--order"))]
    tags = [t for t in tags if t]
    if not tags:
        raise InputError(f"--order {path}: names no model tag (one tag per line)")
    if twice := next((t for i, t in enumerate(tags) if t in tags[:i]), None):
        raise InputError(f"--order {path}: '{twice}' is listed twice")
    return tags


def neuron_record(o: Outputs) -> dict | None:
    """The model record (model.model_record) of a tag's neuron files, from neurons/shared.json's meta; None when
    there is none (no detection, or a file written before records)."""
    try:
        meta = json.loads(o.neuron_set("shared").read_text(encoding="utf-8")).get("meta")
    except (OSError, ValueError, AttributeError):
        return None
    rec = meta.get("model") if isinstance(meta, dict) else None
    return rec if isinstance(rec, dict) else None


def position(tag: str, record: dict | None) -> tuple[str, int, str] | None:
    """(series, x, what x is) of one tag from its model record: a step model's run and step, or a hub revision's
    model and step; None when the record places it on no series."""
    rec = record or {}
    ckpt, rev = rec.get("checkpoint"), rec.get("revision")
    if isinstance(ckpt, dict) and _int(ckpt.get("step")) is not None:
        return f"{ckpt.get('base_tag') or tag.split('@')[0]}@{ckpt.get('run')}", ckpt["step"], "training step"
    if isinstance(rev, dict) and _int(rev.get("step")) is not None:
        return tag.split("@")[0], rev["step"], "training step (revision)"
    return None


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) else None


def _ci(stab: dict | None, name: str) -> tuple[float, float] | None:
    """sets.<name>.size_bootstrap.ci of stability.json."""
    entry = ((stab or {}).get("sets") or {}).get(name) or {}
    ci = (entry.get("size_bootstrap") or {}).get("ci") if isinstance(entry, dict) else None
    if isinstance(ci, list) and len(ci) == 2 and all(_num(v) is not None for v in ci):
        return float(ci[0]), float(ci[1])
    return None


def statistics(stats: dict, stab: dict | None, deact: dict | None) -> dict[str, Any]:
    """The statistics of one model drawn against development, each with an interval where its inputs have one:
    shared ratio |shared| / mean_l |exclusive_l| (docs/method.md section 4), the shared and the mean exclusive
    fraction of all neurons, and LAS with deactivation.json's paired-bootstrap interval.

    The size intervals are stability.json's bootstrap intervals of each set's size (resampled detection texts).
    stability.json holds them per set, not jointly, so the mean exclusive fraction's interval is the mean of the
    languages' bounds (the interval of the mean were the sizes moving together; at least as wide as the true one
    for roughly normal sizes), and the shared ratio's the envelope [shared low / exclusive high, shared high /
    exclusive low]: conservative bounds, not percentiles."""
    sets, total = stats.get("sets") or {}, _num(stats.get("total_neurons"))
    excl = sorted(n for n in sets if n.startswith("exclusive_"))
    sizes = [_num((sets[n] or {}).get("size")) for n in excl]
    shared = _num((sets.get("shared") or {}).get("size"))
    out: dict[str, Any] = {"shared": shared, "exclusive_mean": float(np.mean(sizes)) if sizes and None not in sizes else None,
                           "langs": [n[len("exclusive_"):] for n in excl]}
    out["shared_ratio"] = _num(stats.get("shared_ratio"))
    out["shared_fraction"] = shared / total if shared is not None and total else None
    out["exclusive_fraction"] = out["exclusive_mean"] / total if out["exclusive_mean"] is not None and total else None
    s_ci, e_cis = _ci(stab, "shared"), [_ci(stab, n) for n in excl]
    e_ci = (float(np.mean([c[0] for c in e_cis])), float(np.mean([c[1] for c in e_cis]))) \
        if e_cis and None not in e_cis else None
    out["shared_fraction_ci"] = [s_ci[0] / total, s_ci[1] / total] if s_ci and total else None
    out["exclusive_fraction_ci"] = [e_ci[0] / total, e_ci[1] / total] if e_ci and total else None
    out["shared_ratio_ci"] = [s_ci[0] / e_ci[1], s_ci[1] / e_ci[0]] if s_ci and e_ci and e_ci[0] > 0 else None
    las, las_ci = (deact or {}).get("language_agnostic_score"), (deact or {}).get("language_agnostic_score_ci")
    out["las"] = _num(las)
    out["las_ci"] = [float(las_ci[0]), float(las_ci[1])] if (
        out["las"] is not None and isinstance(las_ci, list) and len(las_ci) == 2
        and all(_num(v) is not None for v in las_ci)) else None
    return out


def series(models: dict[str, dict], order: list[str] | None = None) -> dict[str, dict]:
    """{series: {"x_label", "points": [{"tag", "x", **statistics} in x order]}} of the models given as
    {tag: {"record": model record or None, "stats", "stability", "deactivation"}} (stats required for a point).
    With `order` (read_order), one series of exactly those tags at x = 1, 2, ...; a listed tag without neuron
    statistics is an error. Otherwise the step models and step revisions of each run or model, the base model of
    a run at step 0; only series of two or more points are kept."""
    def point(tag: str, x: int) -> dict:
        m = models[tag]
        return {"tag": tag, "x": x, **statistics(m["stats"], m.get("stability"), m.get("deactivation"))}

    with_stats = {t for t, m in models.items() if isinstance(m.get("stats"), dict)}
    if order is not None:
        if missing := [t for t in order if t not in with_stats]:
            raise InputError(f"--order: '{missing[0]}' has no neuron statistics (neurons/stats.json) under --out")
        return {ORDER_SERIES: {"x_label": "release order", "points": [point(t, i + 1) for i, t in enumerate(order)]}}
    found: dict[str, dict] = {}
    for tag in sorted(with_stats):
        pos = position(tag, models[tag].get("record"))
        if pos is None:
            continue
        name, x, label = pos
        entry = found.setdefault(name, {"x_label": label, "points": [], "base": None})
        entry["points"].append(point(tag, x))
        ckpt = (models[tag].get("record") or {}).get("checkpoint") or {}
        if ckpt.get("base_tag") in with_stats:  # the model the run continued from: its step 0
            entry["base"] = ckpt["base_tag"]
    out = {}
    for name, entry in sorted(found.items()):
        pts = entry["points"]
        if entry["base"] is not None and not any(p["x"] == 0 for p in pts):
            pts.append(point(entry["base"], 0))
        if len(pts) >= 2:
            out[name] = {"x_label": entry["x_label"], "points": sorted(pts, key=lambda p: (p["x"], p["tag"]))}
    return out
