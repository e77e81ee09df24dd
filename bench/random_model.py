"""A random-weight model directory with the shape of a real model, for checks on machines the real
weights cannot reach (the embedded model's 1.1 GB do not travel to a lent GPU box).

    python bench/random_model.py OUT_DIR                       # bench/gemma-3-270m.config.json, bfloat16
    python bench/random_model.py OUT_DIR --config C.json --dtype float32

The config is the real one (every size from it); the tokenizer is the tests' byte-level tokenizer
(tests/tiny.py: ids 0-258), since the real tokenizer files are not available either. Timings and memory
depend only on the shapes; the numbers it scores are meaningless."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "bench" / "gemma-3-270m.config.json"


def random_config(config_file: str | Path = CONFIG, **overrides):
    """The config of `config_file` with the byte tokenizer's special ids (and any overrides)."""
    from transformers import AutoConfig
    cfg = json.loads(Path(config_file).read_text(encoding="utf-8"))
    cfg.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def random_model(config, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def byte_tokenizer():
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import tiny_tokenizer
    return tiny_tokenizer()


def save_random_model(out: str | Path, config_file: str | Path = CONFIG, dtype: str = "bfloat16",
                      num_layers: int = 0) -> Path:
    """num_layers > 0 keeps only the first layers (a quick dry run on the CPU)."""
    out = Path(out)
    overrides = {}
    if num_layers:
        cfg = json.loads(Path(config_file).read_text(encoding="utf-8"))
        overrides["num_hidden_layers"] = num_layers
        if "layer_types" in cfg:
            overrides["layer_types"] = cfg["layer_types"][:num_layers]
    model = random_model(random_config(config_file, **overrides), getattr(torch, dtype))
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    (out / "langneurons.json").write_text(json.dumps(
        {"tag": f"random-{Path(config_file).name.removesuffix('.config.json').removesuffix('.json')}",
         "origin": f"random weights from {Path(config_file).name} (no real weights)"}, indent=1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--num-layers", type=int, default=0, help="keep only the first N layers (0 = all)")
    args = p.parse_args()
    print(f"Wrote {save_random_model(args.out, args.config, args.dtype, args.num_layers)}")


if __name__ == "__main__":
    main()
