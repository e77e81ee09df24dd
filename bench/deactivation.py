"""Benchmark: peak memory and time of writing one deactivated variant of a model, streaming the
safetensors shards (`deactivation.py --streaming`) against the in-memory path (load the model, zero,
save_pretrained). Each run is a separate `deactivation.py` process; its peak RSS comes from
os.wait4's rusage of exactly that child (torch's allocations are invisible to tracemalloc).

    python bench/deactivation.py                      # the embedded gemma-3-270m
    python bench/deactivation.py --model DIR --neurons FILE --repeats 3
"""
from __future__ import annotations

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

from langneurons.cli import EMBEDDED_MODEL  # noqa: E402
from langneurons.model import Geometry, cache_root, embedded_model_dir  # noqa: E402
from langneurons.layout import model_tag  # noqa: E402


def child(cmd: list[str]) -> dict:
    """Run `cmd`; wall time and the peak resident set of that process alone."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"benchmark child failed ({p.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}  # Linux: ru_maxrss in KiB


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors import safe_open
    def keys(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, framework="pt") as fh:
                out.update({k: f for k in fh.keys()})
        return out
    ka, kb = keys(a), keys(b)
    if set(ka) != set(kb):
        return False
    for k in ka:
        with safe_open(ka[k], framework="pt") as fa, safe_open(kb[k], framework="pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            if x.dtype != y.dtype or x.shape != y.shape or not x.contiguous().view(-1).view(
                    __import__("torch").uint8).equal(y.contiguous().view(-1).view(__import__("torch").uint8)):
                return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL, help="a local safetensors model directory, or the embedded model")
    p.add_argument("--neurons", help="neuron file; default outputs/<tag>/neurons/shared.json if present, "
                   "else a seeded random set of 0.3%% of all neurons (the paper's shared-set scale)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--wait", type=int, default=1800, help="seconds to wait for a running embedded-model conversion")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()

    if args.model == EMBEDDED_MODEL:  # a conversion may be under way in another process: wait for it
        target = cache_root() / EMBEDDED_MODEL
        deadline = time.time() + args.wait
        while not (target / "config.json").is_file() and any(target.parent.glob(".tmp*")) and time.time() < deadline:
            time.sleep(10)
        model_dir = embedded_model_dir()
    else:
        model_dir = Path(args.model)
    from transformers import AutoConfig
    geom = Geometry.from_config(AutoConfig.from_pretrained(model_dir))

    with tempfile.TemporaryDirectory(prefix="bench-deact-") as tmp:
        tmp = Path(tmp)
        neurons = args.neurons or REPO / "outputs" / model_tag(args.model) / "neurons" / "shared.json"
        if not Path(neurons).is_file():
            from langneurons.neurons import random_set, write_neuron_file
            neurons = tmp / "random.json"
            write_neuron_file(neurons, random_set(int(0.003 * geom.total_neurons), geom, 0, "bench"))
        weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 2**20
        print(f"model {model_dir} ({weights:.0f} MiB safetensors), neurons {neurons}")

        base = [sys.executable, str(REPO / "deactivation.py"), "--model", str(model_dir), "--neurons", str(neurons),
                "--device", "cpu", "--dtype", "float32", "--force"]
        floor = child([sys.executable, "-c", "import torch, transformers, langneurons.masking, safetensors.torch"])
        runs = {"in-memory": [], "streaming": []}
        for r in range(args.repeats):
            for mode, extra in (("in-memory", []), ("streaming", ["--streaming"])):
                runs[mode].append(child(base + ["--out", str(tmp / mode)] + extra))
                print(f"  run {r + 1} {mode:>9}: {runs[mode][-1]['wall_s']:6.1f} s, "
                      f"peak RSS {runs[mode][-1]['peak_rss_mb']:7.0f} MiB")
        tag = model_tag(str(model_dir))
        identical = same_tensors(*(tmp / m / tag / "variants" / Path(neurons).stem for m in runs))

    best = {m: {"wall_s": min(x["wall_s"] for x in v), "peak_rss_mb": min(x["peak_rss_mb"] for x in v)}
            for m, v in runs.items()}
    res = {"model": str(model_dir), "weights_mib": weights, "import_floor": floor, "best": best,
           "ratio_streaming_over_in_memory": {k: best["streaming"][k] / best["in-memory"][k] for k in ("wall_s", "peak_rss_mb")},
           "ratio_above_import_floor": (best["streaming"]["peak_rss_mb"] - floor["peak_rss_mb"])
                                       / (best["in-memory"]["peak_rss_mb"] - floor["peak_rss_mb"]),
           "identical_tensors": identical, "repeats": args.repeats}
    print(f"\n{'mode':>10} {'time s':>8} {'peak RSS MiB':>13}")
    print(f"{'imports':>10} {floor['wall_s']:8.1f} {floor['peak_rss_mb']:13.0f}")
    for m, b in best.items():
        print(f"{m:>10} {b['wall_s']:8.1f} {b['peak_rss_mb']:13.0f}")
    r = res["ratio_streaming_over_in_memory"]
    print(f"streaming / in-memory: time {r['wall_s']:.2f}x, peak RSS {r['peak_rss_mb']:.2f}x "
          f"({res['ratio_above_import_floor']:.2f}x above the import floor); identical tensors: {identical}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
