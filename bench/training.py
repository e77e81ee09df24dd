"""Benchmark: training throughput (tokens/s) and optimizer-state memory of neuron-targeted training
(`train.py --neurons FILE`) against full fine-tuning (`--neurons full`) of the same model, in one process,
with the same batches. Targets: masked >= 0.9x the tokens/s of full, optimizer state <= 10% of full.

    python bench/training.py                                  # embedded gemma-3-270m, 0.3% random neurons
    python bench/training.py --neurons outputs/gemma-3-270m/neurons/exclusive_sw.json --steps 8
    python bench/training.py --tiny                           # a tiny random Llama (seconds; smoke test)

Each mode loads the model afresh, runs one untimed warm-up step, then --steps timed optimizer steps of
forward + backward + AdamW (the loop the Trainer runs, without its bookkeeping). The batches are blocks of
--seq-len tokens cut from dataset/train/<lang>.jsonl, so every mode sees exactly the same tokens."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from langneurons.cli import EMBEDDED_MODEL  # noqa: E402
from langneurons.runinfo import seed_everything  # noqa: E402
from langneurons.data import train_texts  # noqa: E402
from langneurons.model import Geometry, load_model  # noqa: E402
from langneurons.neurons import random_set, read_neuron_file, size  # noqa: E402
from langneurons.sparse import attach_deltas, optimizer_state_bytes  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--tiny", action="store_true", help="use a tiny random Llama from tests/tiny.py instead")
    p.add_argument("--neurons", default=None, help="neuron file; default: a seeded random set of --fraction")
    p.add_argument("--fraction", type=float, default=0.003, help="size of the random set, fraction of all neurons "
                   "(the paper: shared/exclusive sets ~0.3%%)")
    p.add_argument("--dataset", default=str(REPO / "dataset"))
    p.add_argument("--lang", default="sw")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per mode")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the modes (interleaved); the fastest "
                   "round of each mode is reported")
    p.add_argument("--modes", default="neurons,full", help="comma list of neurons, full, lora")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args()


def load(args: argparse.Namespace):
    if not args.tiny:
        return load_model(args.model, args.device, args.dtype)
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import tiny_model, tiny_tokenizer
    return tiny_model("llama"), tiny_tokenizer()


def batches(args: argparse.Namespace, tok, n: int) -> list[torch.Tensor]:
    """n micro-batches [micro, seq_len] of consecutive tokens of the training text (repeated if short)."""
    stream: list[int] = []
    for t in train_texts(args.dataset, args.lang):
        stream += tok(t)["input_ids"]
    need = n * args.micro_batch_size * args.seq_len
    while len(stream) < need:
        stream += stream
    ids = torch.tensor(stream[:need]).view(n, args.micro_batch_size, args.seq_len)
    return list(ids)


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    seed_everything(0)
    model, tok = load(args)
    geom = Geometry.from_config(model.config)
    info: dict = {"mode": mode}
    if mode == "neurons":
        if args.neurons:
            nset, _ = read_neuron_file(args.neurons, geom)
        else:
            nset = random_set(round(args.fraction * geom.total_neurons), geom, 0, "bench")
        attach_deltas(model, nset)
        info["neurons"] = size(nset)
        info["neuron_fraction"] = size(nset) / geom.total_neurons
    elif mode == "lora":
        from peft import LoraConfig, get_peft_model
        from langneurons.model import lora_targets
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=lora_targets(model)))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    device = next(model.parameters()).device
    data = batches(args, tok, args.steps + 1)
    # half-precision weights train under autocast like the Trainer's bf16 flag
    dtype = next(model.parameters()).dtype
    ctx = (torch.autocast(device.type, dtype=dtype) if dtype in (torch.bfloat16, torch.float16)
           else torch.autocast(device.type, enabled=False))

    def step(ids: torch.Tensor) -> float:
        ids = ids.to(device)
        with ctx:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step(data[0])  # warm-up: allocator, kernels, optimizer state
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    losses = [step(b) for b in data[1:]]
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tokens = args.steps * args.micro_batch_size * args.seq_len
    info.update(trainable_parameters=sum(p.numel() for p in params),
                total_parameters=sum(p.numel() for p in model.parameters()),
                optimizer_state_bytes=optimizer_state_bytes(opt), seconds=elapsed, tokens=tokens,
                tokens_per_s=tokens / elapsed, last_loss=losses[-1], device=str(device), dtype=str(dtype))
    return info


def main() -> None:
    args = parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results: dict = {}
    for _ in range(args.repeats):  # interleaved, so that warm-up effects of the process hit every mode alike
        for mode in modes:
            r = run_mode(mode, args)
            if mode not in results or r["tokens_per_s"] > results[mode]["tokens_per_s"]:
                results[mode] = r
    for mode in modes:
        r = results[mode]
        print(f"{mode:8s} {r['tokens_per_s']:10.1f} tokens/s  optimizer state {r['optimizer_state_bytes'] / 2**20:10.2f} MiB"
              f"  trainable {r['trainable_parameters']:>12,} / {r['total_parameters']:,}"
              + (f"  ({r['neurons']} neurons, {100 * r['neuron_fraction']:.2f}%)" if mode == "neurons" else ""))
    if "neurons" in results and "full" in results:
        n, f = results["neurons"], results["full"]
        speed = n["tokens_per_s"] / f["tokens_per_s"]
        mem = n["optimizer_state_bytes"] / f["optimizer_state_bytes"]
        results["ratios"] = {"tokens_per_s": speed, "optimizer_state": mem}
        print(f"masked / full: tokens/s {speed:.2f}x (target >= 0.9x: {'ok' if speed >= 0.9 else 'MISSED'}), "
              f"optimizer state {100 * mem:.3f}% (target <= 10%: {'ok' if mem <= 0.10 else 'MISSED'})")
    results["settings"] = {k: v for k, v in vars(args).items() if k != "json"} | {"threads": torch.get_num_threads()}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
