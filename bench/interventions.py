"""Benchmark: evaluating K neuron sets under an intervention on the one loaded model (interventions.intervened)
against saving K deactivated variants and evaluating each (what deactivation.py + evaluate.py on the variants
do): wall time and disk, on the same texts, and whether both give the same perplexities (zero equals the
variant).

    python bench/interventions.py                                  # embedded gemma-3-270m, 3 sets, 8 lines/lang
    python bench/interventions.py --model DIR --sets 3 --limit 16 --langs en,fr --json OUT
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from langneurons.cli import EMBEDDED_MODEL  # noqa: E402
from langneurons.data import val_texts  # noqa: E402
from langneurons.interventions import intervened, parse_intervention  # noqa: E402
from langneurons.masking import zeroed  # noqa: E402
from langneurons.metrics import perplexity_by_lang  # noqa: E402
from langneurons.model import Geometry, load_model, save_model_dir  # noqa: E402
from langneurons.neurons import random_set  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--dataset", default=str(REPO / "dataset"))
    p.add_argument("--langs", default="en,zh,sw")
    p.add_argument("--limit", type=int, default=8, help="validation lines per language")
    p.add_argument("--sets", type=int, default=3, help="number of neuron sets (random, 0.5%% of the neurons each)")
    p.add_argument("--fraction", type=float, default=0.005)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--intervention", default="zero")
    p.add_argument("--json", default=None, help="write the figures here as JSON")
    args = p.parse_args()

    langs = args.langs.split(",")
    texts = {l: val_texts(args.dataset, l)[:args.limit] for l in langs}
    t0 = time.perf_counter()
    model, tok = load_model(args.model, args.device, "float32")
    load_s = time.perf_counter() - t0
    geom = Geometry.from_config(model.config)
    n = int(args.fraction * geom.total_neurons)
    sets = {f"set{i}": random_set(n, geom, seed=i, name=f"set{i}") for i in range(args.sets)}
    iv = parse_intervention(args.intervention)
    print(f"model {args.model} ({geom.total_neurons:,} neurons), {args.sets} sets of {n}, {args.intervention}, "
          f"langs {langs}, {args.limit} lines each, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"model load {load_s:.1f}s")

    # under an intervention: the loaded model, hooks per set, nothing written
    t0 = time.perf_counter()
    hooked = {}
    for name, s in sets.items():
        with intervened(model, s, iv):
            hooked[name] = perplexity_by_lang(model, tok, texts, args.max_length, args.batch_size, name)
    hooked_s = time.perf_counter() - t0

    # saved variants: zero in place, save a model folder, load it back, evaluate
    tmp = Path(tempfile.mkdtemp(prefix="bench-iv-"))
    try:
        t0 = time.perf_counter()
        disk, saved = 0, {}
        for name, s in sets.items():
            with zeroed(model, s):
                save_model_dir(model, tok, args.model, tmp / name)
            disk += folder_bytes(tmp / name)
            variant, vtok = load_model(str(tmp / name), args.device, "float32")
            saved[name] = perplexity_by_lang(variant, vtok, texts, args.max_length, args.batch_size, name)
            del variant
        saved_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    diff = max(abs(hooked[k][l]["ppl"] - saved[k][l]["ppl"]) / saved[k][l]["ppl"] for k in sets for l in langs)
    res = {"model": args.model, "sets": args.sets, "neurons_per_set": n, "intervention": iv.spec,
           "lines_per_lang": args.limit, "langs": langs, "device": args.device,
           "threads": torch.get_num_threads(), "model_load_s": round(load_s, 2),
           "intervention_s": round(hooked_s, 2), "variants_s": round(saved_s, 2),
           "variants_disk_bytes": disk, "intervention_disk_bytes": 0, "max_rel_ppl_difference": diff}
    print(f"under the intervention: {hooked_s:.1f}s, 0 bytes written")
    print(f"saved variants:         {saved_s:.1f}s, {disk / 2**20:.1f} MiB written")
    print(f"largest relative PPL difference between the two: {diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
