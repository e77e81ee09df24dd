"""The one table of bench/gpu_check.sh: every step's status and time, every cuda test's outcome with the
numbers it recorded, and the benchmarks' results, read from the files the check wrote.

    python bench/gpu_summary.py FOLDER"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def tests(folder: Path) -> list[str]:
    xml = folder / "cuda_tests.xml"
    if not xml.is_file():
        return ["| cuda tests | no junit file (see cuda_tests.log) | | |"]
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, why = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                why = (el.get("message") or "").splitlines()[0][:120] if el.get("message") else ""
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        numbers = ", ".join(f"{k} {fmt(float(v)) if v.replace('.', '', 1).replace('e-', '', 1).isdigit() else v}"
                            for k, v in props.items())
        rows.append(f"| {case.get('name')} | {outcome} {why} | {float(case.get('time', 0)):.1f} s | {numbers} |")
    return rows


def bench(folder: Path, name: str) -> list[str]:
    f = folder / f"{name}.json"
    if not f.is_file():
        return [f"| {name} | no results (see {name}_bench.log) | | |"]
    data = json.loads(f.read_text())
    rows = []
    items = data if isinstance(data, list) else [{"mode": k, **v} if isinstance(v, dict) else {k: v}
                                                 for k, v in data.items() if k != "settings"]
    for item in items:
        label = item.get("mode") or item.get("groups") or item.get("name") or ""
        cells = ", ".join(f"{k} {fmt(v)}" for k, v in item.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "mode")
        rows.append(f"| {name} {label} | | | {cells} |")
    return rows


def main() -> None:
    folder = Path(sys.argv[1])
    read = lambda n: (folder / n).read_text().strip() if (folder / n).is_file() else "?"
    print(f"\n## GPU check\n\nmodel: {read('model.txt')}\n\n```\n{read('environment.txt')}\n```\n")
    print("| step / check | result | time | numbers |\n|---|---|---|---|")
    for line in read("steps.tsv").splitlines():
        name, rc, secs = (line.split("\t") + ["", "", ""])[:3]
        print(f"| step {name} | {'ok' if rc == '0' else 'TIMED OUT' if rc == '124' else rc if rc == 'skipped' else f'exit {rc}'} | {secs} s | |")
    for row in tests(folder) + bench(folder, "detection") + bench(folder, "training"):
        print(row)


if __name__ == "__main__":
    main()
