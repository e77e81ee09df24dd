"""The authors' published Llama-3.1-8B neuron files, analysed with our statistics code.

Their attn_k/attn_v indices are in query-head space; we count them three ways: as written in the
file, mapped to the true key/value rows ((h // n_rep) * head_dim + d), and with their code's legacy
i // n_rep mapping. Needs ../shared/data (skips cleanly without it).

    python bench/reference_neurons.py [--json FILE]
"""
import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"

from langneurons.model import GROUPS, Geometry  # noqa: E402
from langneurons.neurons import COMPONENTS, read_neuron_file, set_stats  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()
    ref = DATA / "reference_neurons"
    if not ref.is_dir():
        print(f"skipped: {ref} is absent")
        return
    from transformers import AutoConfig
    cfg = json.loads((DATA / "configs" / "llama-3.1-8b.json").read_text())
    geom = Geometry.from_config(AutoConfig.for_model(**cfg))
    files = {"shared": ref / "Llama-3.1-8B_shared_neurons_0.05.json"}
    files |= {f"exclusive_{l}": ref / f"Llama-3.1-8B_exclusive_{l}_neuron_0.05.json"
              for l in ("en", "zh", "th", "sw", "fr", "de")}
    out = {"geometry": geom.__dict__, "total_neurons": geom.total_neurons, "sets": {}}
    print(f"Llama-3.1-8B: {geom.total_neurons:,} neurons ({geom.num_layers} layers; k/v rows per layer "
          f"{geom.group_size('attn_k')}, query-head space {geom.group_size('attn_q')})\n")
    print(f"{'set':<14}{'mapping':<10}{'size':>8}{'% all':>8}{'QK %':>7}{'VO %':>7}{'FFN %':>7}   attn_k / attn_v")
    for name, f in files.items():
        raw = json.loads(f.read_text())
        file_counts = {g: sum(len(v) for v in raw.get(g, {}).values()) for g in GROUPS}
        n = sum(file_counts.values())
        row = {"as_written": {"size": n, "fraction": n / geom.total_neurons, "groups": file_counts,
                              "component_shares": {c: sum(file_counts[g] for g in gs) / n for c, gs in COMPONENTS.items()}}}
        for mapping, legacy in (("kv_rows", False), ("legacy", True)):
            s, _ = read_neuron_file(f, geom, legacy_kv=legacy)
            row[mapping] = set_stats(s, geom)
        out["sets"][name] = row
        for mapping in ("as_written", "kv_rows", "legacy"):
            st = row[mapping]
            sh = st["component_shares"]
            print(f"{name:<14}{mapping:<10}{st['size']:>8}{100 * st['fraction']:>7.3f}%{100 * sh['QK']:>6.1f}"
                  f"{100 * sh['VO']:>7.1f}{100 * sh['FFN']:>7.1f}   {st['groups']['attn_k']} / {st['groups']['attn_v']}")
    layers = out["sets"]["shared"]["kv_rows"]["layers"]
    print(f"\nshared neurons per layer (kv_rows): {layers}")
    excl = [out["sets"][f"exclusive_{l}"]["kv_rows"]["size"] for l in ("en", "zh", "th", "sw", "fr", "de")]
    print(f"shared ratio |shared| / mean |exclusive| (kv_rows): {out['sets']['shared']['kv_rows']['size'] / (sum(excl) / 6):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
