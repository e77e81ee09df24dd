"""Stage 3, neuron-targeted continued pretraining (METHOD.md section 6): next-token training on one
language's text in which only the selected neurons change; every other parameter entry stays bit-for-bit.

    python train.py --model gemma-3-270m --lang sw --neurons outputs/gemma-3-270m/neurons/exclusive_sw.json
    python train.py --lang sw --neurons full          # full fine-tuning baseline
    python train.py --lang sw --lora-rank 8           # LoRA baseline, merged into the saved model
    python train.py --lang sw --neurons full --train-data corpus/sw.parquet --limit 100000 --num-proc 8
    torchrun --nproc_per_node 8 train.py ...          # data-parallel, unchanged (or: accelerate launch train.py ...)

Defaults are the paper's: lr 5e-5, 3% linear warmup, 1 epoch, batch 128 (gradient accumulation over
--micro-batch-size), cutoff 1024 tokens per document, no packing, bf16 on GPU (full fine-tuning and LoRA
keep float32 master weights under bf16 autocast unless --pure-bf16). The training text goes through
`datasets`: tokenized once, cached in HF_DATASETS_CACHE and memory-mapped by later runs.
Writes outputs/<tag>/trained/<run-name>/: an ordinary transformers model directory, langneurons.json and
train_log.json (arguments, neuron set, loss curve, tokens seen, trainable parameters, optimizer-state bytes,
precision, validation loss/PPL before and after)."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch

from langneurons import reuse
from langneurons.cli import InputError, common_parser, float_in, int_at_least, run
from langneurons.files import atomic_dir, read_json, write_json
from langneurons.runinfo import run_meta, seed_everything
from langneurons.model import (Geometry, check_model, load_model, load_tokenizer, lora_targets, resolve_device,
                               resolve_dtype, save_model_dir)
from langneurons.layout import PROVENANCE_FILE, model_tag
from langneurons.neurons import read_neuron_file, size

CKPT_ARGS_FILE = "run_args.json"  # in the checkpoint folder: what the checkpoints were trained with
# arguments that cannot change the trained model: where it goes, how checkpoints are kept and resumed, and
# --langs, which this stage does not use
NOT_RESULT_ARGS = ("run_name", "resume", "keep_checkpoints", "save_steps", "langs", "num_proc")


def save_steps(text: str) -> float:
    """--save-steps: a fraction of the run below 1, else a whole number of steps (what TrainingArguments accepts)."""
    value = float_in(0, lo_open=True)(text)
    if value > 1 and not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text} is neither a fraction below 1 nor a whole number of steps")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--lang", required=True, help="language whose dataset/train/<lang>.jsonl is trained on "
                   "(validation on dataset/val/<lang>.txt); --langs is not used by this stage")
    p.add_argument("--train-data", default=None, metavar="PATH|ID",
                   help="training text instead of <dataset>/train/<lang>.jsonl: a json/jsonl/parquet/arrow file, a "
                        "folder of such files, or a hub dataset id owner/name[:config] (from the local cache when "
                        "offline); {lang} is replaced by --lang")
    p.add_argument("--text-column", default="text", help="column holding the text in --train-data / --val-data")
    p.add_argument("--train-split", default="train", help="split of a --train-data folder or dataset id")
    p.add_argument("--val-data", default=None, metavar="PATH|ID",
                   help="validation text instead of <dataset>/val/<lang>.txt: a text file (one line each), or what "
                        "--train-data accepts (split 'train'); {lang} is replaced by --lang")
    p.add_argument("--num-proc", type=int_at_least(1), default=1, help="processes that tokenize the training text (first run)")
    p.add_argument("--packing", action="store_true", help="concatenate the documents and cut them into "
                   "--cutoff-len blocks, as transformers' run_clm.py (off: one document per sequence, as the authors)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--neurons", metavar="FILE|full",
                      help="neuron file (ours or the authors' format): only these neurons are trained; "
                           "'full' trains every parameter")
    what.add_argument("--lora-rank", type=int_at_least(1), metavar="R",
                      help="train a LoRA adapter of rank R on q/k/v/o/up/gate/down instead, merged into the saved model")
    p.add_argument("--lora-alpha", type=float_in(0, lo_open=True), default=None,
                   help="LoRA scaling alpha (default: 2 x rank)")
    p.add_argument("--pure-bf16", action="store_true",
                   help="full fine-tuning / LoRA in bf16: update bf16 weights directly (the authors' setting) "
                        "instead of float32 master weights under bf16 autocast")
    p.add_argument("--legacy-kv-mapping", action="store_true",
                   help="map the authors' query-head attn_k/attn_v indices with their code's i // n_rep")
    p.add_argument("--lr", type=float_in(0, lo_open=True), default=5e-5,
                   help="peak learning rate (AdamW, linear decay)")
    p.add_argument("--warmup", type=float_in(0, 1, hi_open=True), default=0.03,
                   help="linear warmup, fraction of the steps")
    p.add_argument("--epochs", type=float_in(0, lo_open=True), default=1.0, help="passes over the training documents")
    p.add_argument("--max-steps", type=int_at_least(0), default=0,
                   help="stop after N optimizer steps (0: --epochs decides)")
    p.add_argument("--batch-size", type=int_at_least(1), default=128,
                   help="documents per optimizer step, over all processes")
    p.add_argument("--micro-batch-size", type=int_at_least(1), default=4, help="documents per forward pass per process "
                   "(gradient accumulation makes up --batch-size)")
    p.add_argument("--cutoff-len", type=int_at_least(2), default=1024,
                   help="tokens per document; longer ones are truncated")
    p.add_argument("--limit", type=int_at_least(0), default=0,
                   help="train on N documents drawn with the seed (0 = all; the "
                   "paper: 100000)")
    p.add_argument("--val-limit", type=int_at_least(0), default=0, help="first N lines of val/<lang>.txt (0 = all)")
    p.add_argument("--save-steps", type=save_steps, default=0.1, help="checkpoint every N steps (a value below 1 "
                   "is a fraction of the run)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward "
                   "pass (less memory, ~30%% slower)")
    p.add_argument("--run-name", default=None, help="output folder name (default: <lang>-<neuron file stem>, "
                   "<lang>-full or <lang>-lora<R>)")
    p.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                   help="resume from the last checkpoint of this run (an error when there is none) or from the "
                        "given checkpoint folder; without the flag a run resumes automatically when its "
                        "checkpoints exist, and --force discards them")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoint folder after success")
    return p.parse_args(argv)


class PadCollator:
    """Right-pads a batch; padding gets attention mask 0 and label -100 (never predicted, never counted).
    Labels come from the mask, not from the token id, so an EOS that doubles as padding is still learnt."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        from langneurons.data import pad_batch
        ids, mask = pad_batch([f["input_ids"] for f in features], self.pad_id, "cpu")
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def finished_checkpoint(folder: Path) -> bool:
    """The Trainer writes trainer_state.json last: without it (readable) a checkpoint's saving was interrupted."""
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def last_checkpoint(ckpt_dir: Path, remove_unfinished: bool) -> tuple[Path | None, list[Path]]:
    """The finished checkpoint-N with the largest N, and the unfinished ones (removed when asked: a run
    killed while saving must not block the next one)."""
    steps = {}
    for d in ckpt_dir.glob("checkpoint-*"):
        if d.is_dir() and re.fullmatch(r"checkpoint-\d+", d.name):
            steps[d] = int(d.name.split("-")[1])
    unfinished = sorted((d for d in steps if not finished_checkpoint(d)), key=steps.get)
    if remove_unfinished:
        for d in unfinished:
            shutil.rmtree(d, ignore_errors=True)
    finished = [d for d in steps if d not in unfinished]
    return (max(finished, key=steps.get) if finished else None), unfinished


def training_arguments(args: argparse.Namespace, ckpt_dir: Path, world: int, mode: str, half: torch.dtype,
                       on_cpu: bool):
    from transformers import TrainingArguments
    checkpointing = {}
    if args.gradient_checkpointing:  # renamed activation_checkpointing in recent transformers
        key = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
               else "gradient_checkpointing")
        checkpointing = {key: True, f"{key}_kwargs": {"use_reentrant": False}}
    return TrainingArguments(
        output_dir=str(ckpt_dir), per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // (args.micro_batch_size * world),
        learning_rate=args.lr, weight_decay=0.0, warmup_steps=args.warmup, lr_scheduler_type="linear",
        optim="adamw_torch", num_train_epochs=args.epochs, max_steps=args.max_steps or -1,
        # autocast in the requested half precision; neuron deltas, LoRA adapters and (unless --pure-bf16) the
        # weights of a full fine-tuning stay float32 masters
        bf16=half == torch.bfloat16, fp16=half == torch.float16, use_cpu=on_cpu,
        logging_steps=1, save_strategy="steps", save_steps=args.save_steps, save_total_limit=2,
        seed=args.seed, data_seed=args.seed, report_to="none", remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding", disable_tqdm=not reuse.main_process(),
        ddp_find_unused_parameters=False if mode == "neurons" else None, **checkpointing)


def main() -> None:
    # ---------------------------------------------------------------- arguments (all checked before any output)
    args = parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank0 = reuse.main_process()
    if args.micro_batch_size > args.batch_size:
        raise InputError(f"--micro-batch-size {args.micro_batch_size} is larger than --batch-size {args.batch_size}")
    if args.batch_size % (args.micro_batch_size * world):
        raise InputError(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x {world} processes")
    if args.lora_alpha is not None and args.lora_rank is None:
        raise InputError("--lora-alpha: needs --lora-rank")
    mode = "lora" if args.lora_rank is not None else ("full" if args.neurons == "full" else "neurons")
    if mode == "full" and args.dtype == "float16":
        raise InputError("--dtype float16 with --neurons full: float16 weights cannot be trained with loss "
                         "scaling; use bfloat16 or float32")

    sharded = any(os.environ.get(v, "").lower() in ("1", "true") for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    if sharded and mode != "full":
        raise InputError(f"FSDP/DeepSpeed launch with --{'lora-rank' if mode == 'lora' else 'neurons FILE'}: "
                         "not supported; its trainable state is tiny, plain data parallelism (torchrun/accelerate "
                         "launch without FSDP/DeepSpeed) suffices")

    seed_everything(args.seed)
    tag = model_tag(args.model)
    # the config checks the neuron file against the model before anything is loaded; the tokenizer and the weight
    # headers are checked too, so that a broken model folder fails now and not after the data is prepared
    config = check_model(args.model)
    geom = Geometry.from_config(config)

    neuron_info, nset = None, None
    if mode == "neurons":
        nfile = Path(args.neurons)
        if not nfile.is_file():
            raise InputError(f"--neurons {nfile}: no such file (or 'full')")
        nset, fmeta = read_neuron_file(nfile, geom, legacy_kv=args.legacy_kv_mapping)
        if size(nset) == 0:
            raise InputError(f"--neurons {nfile}: the set is empty, nothing to train")
        neuron_info = {"name": nfile.stem, "file": str(nfile.resolve()), "sha256": reuse.file_digest(nfile),
                       "size": size(nset), "fraction": size(nset) / geom.total_neurons,
                       "groups": {g: int(m.sum()) for g, m in nset.items()},
                       "format": "ours" if "meta" in read_json(nfile, "neuron file") else "authors",
                       "kv_index_space": fmeta.get("kv_index_space", "query_heads"),
                       "legacy_kv_mapping": args.legacy_kv_mapping}
    set_name = {"neurons": neuron_info and neuron_info["name"], "full": "full", "lora": f"lora{args.lora_rank}"}[mode]
    run_name = args.run_name or f"{args.lang}-{set_name}"
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", run_name):
        raise InputError(f"--run-name: '{run_name}' is not a safe directory name")

    # every process loads the model onto its own device; the Trainer wraps it for data parallelism
    device = args.device
    if world > 1 and torch.cuda.is_available() and device in ("auto", "cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    half = resolve_dtype(args.dtype, resolve_device(device))  # the requested dtype, also of the saved model
    # Full fine-tuning and LoRA train float32 master weights under bf16 autocast (the Trainer's mixed precision
    # for a float32-loaded model): pure bf16 updates of lr-sized steps mostly round away. --pure-bf16 keeps
    # the authors' setting. Neuron runs keep float32 deltas over the weights in the requested dtype anyway.
    if args.pure_bf16 and (mode == "neurons" or half != torch.bfloat16):
        raise InputError("--pure-bf16: applies to --neurons full and --lora-rank with --dtype bfloat16 (or auto on a "
                         f"GPU), not to {'a neuron file' if mode == 'neurons' else str(half).replace('torch.', '')}")
    mixed = mode != "neurons" and half == torch.bfloat16 and not args.pure_bf16
    dtype_name = str(half).replace("torch.", "")
    precision = {"requested_dtype": dtype_name, "master_weights": dtype_name if args.pure_bf16 else "float32",
                 "autocast": None if half == torch.float32 else dtype_name, "pure_bf16": args.pure_bf16,
                 "saved_dtype": dtype_name}

    from langneurons.data import lang_file, read_corpus, training_documents
    train_spec = args.train_data or str(lang_file(args.dataset, "train", args.lang, ".jsonl"))
    val_spec = args.val_data or str(lang_file(args.dataset, "val", args.lang, ".txt"))
    train_spec, val_spec = train_spec.replace("{lang}", args.lang), val_spec.replace("{lang}", args.lang)

    run_dir = Path(args.out) / tag / "trained" / run_name
    ckpt_dir = run_dir.parent / f".{run_name}.ckpt"
    reuse.check_writable(run_dir, f"--out {args.out}", folder=True)
    # what decides the result: a finished run or checkpoints with another fingerprint are not reused
    targs = training_arguments(args, ckpt_dir, world, mode, half, on_cpu=resolve_device(device) == "cpu")

    # ---------------------------------------------------------------- data (checked before anything is written)
    # the main process (of each node) loads and tokenizes into datasets' cache first; the others then read it
    with targs.main_process_first(desc="load the training text"):
        # --limit: a seeded draw, like the paper's shuffle-then-take-100k; the sampler reshuffles the order anyway
        docs = training_documents(train_spec, "training file", args.text_column, args.train_split, args.limit,
                                  args.seed)
    val = read_corpus(val_spec, "validation text", args.text_column)[:args.val_limit or None]
    # what decides the result: a finished run or checkpoints with another fingerprint are not reused. A local
    # file is identified by its content; a folder or hub dataset by datasets' fingerprint of it / the text read
    train_id = reuse.file_digest(train_spec) if Path(train_spec).is_file() else docs._fingerprint
    context = {"world_size": world}
    if not Path(train_spec).is_file():
        context["train_data_fingerprint"] = train_id
    if not Path(val_spec).is_file():
        context["val_sha256"] = reuse.text_digest(val)
    fingerprint = reuse.fingerprint(
        args, __file__, ignore=NOT_RESULT_ARGS, models=[args.model], context=context,
        files=[*(s for s in (train_spec, val_spec) if Path(s).is_file()),
               *([args.neurons] if mode == "neurons" else [])])
    reuse.hold_lock(run_dir, enabled=rank0)  # a second run of the same name waits, then reuses this one's
    if rank0:
        reuse.remove_temporaries(ckpt_dir)
    if reuse.up_to_date(run_dir / "train_log.json", fingerprint, args.force, run_dir):
        if rank0 and not args.keep_checkpoints:  # left by a run killed after its model was in place
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        return

    resume_from, unfinished = None, []
    if args.resume not in (None, "last"):
        resume_from = Path(args.resume)
        if not (resume_from.is_dir() and finished_checkpoint(resume_from)):
            raise InputError(f"--resume {resume_from}: not a finished checkpoint folder "
                             "(no readable trainer_state.json)")
    elif not args.force and ckpt_dir.is_dir():
        last, unfinished = last_checkpoint(ckpt_dir, remove_unfinished=rank0)
        for u in unfinished:
            print(f"Ignoring {u}: its saving was interrupted (no readable trainer_state.json)")
        if last is not None:
            old = read_json(ckpt_dir / CKPT_ARGS_FILE, "checkpoint arguments") if (ckpt_dir / CKPT_ARGS_FILE).is_file() else None
            if diffs := reuse.changes(old, fingerprint):
                raise InputError(f"checkpoints in {ckpt_dir} come from a run with other arguments or inputs "
                                 f"({'; '.join(diffs[:2])}); --force discards them, --run-name picks another folder")
            resume_from = last
        elif args.resume == "last" and unfinished:  # nothing to resume, but not the user's fault
            print("--resume: no finished checkpoint; training from the start")
    if args.resume == "last" and resume_from is None and not unfinished:
        raise InputError(f"--resume: no checkpoint in {ckpt_dir}" + (" (--force discards them)" if args.force else ""))

    # ---------------------------------------------------------------- tokenize
    # Each document is one sequence: BOS (when the tokenizer adds it) + text + EOS, truncated at the cutoff
    # (the authors' preprocessing: a document longer than the cutoff loses its tail, EOS included); or, with
    # --packing, blocks of --cutoff-len tokens cut from the concatenated documents.
    from langneurons.data import tokenize_documents
    tok = load_tokenizer(args.model)
    with targs.main_process_first(desc="tokenize the training text"):
        train_set = tokenize_documents(docs, tok, args.cutoff_len, args.text_column, args.packing,
                                       args.num_proc if args.num_proc > 1 else None)
    if len(train_set) == 0:
        raise InputError(f"training file {train_spec}: no " + ("block of --cutoff-len tokens" if args.packing
                                                               else "document has two tokens"))

    # ---------------------------------------------------------------- load
    model, tok = load_model(args.model, device, "float32" if mixed else args.dtype)
    total_params = sum(p.numel() for p in model.parameters())

    from langneurons.metrics import perplexity

    def val_loss(label: str) -> dict:
        # float32 masters are measured under the same bf16 autocast that trains them
        with torch.autocast(model.device.type, dtype=half, enabled=mixed and model.dtype != half):
            r = perplexity(model, tok, val, max_length=args.cutoff_len, batch_size=args.micro_batch_size,
                           desc=f"val {args.lang} ({label})")
        return {"loss": math.log(r["ppl"]), "ppl": r["ppl"], "tokens": r["tokens"]}

    before = val_loss("before")
    if rank0:
        print(f"validation {args.lang} before: loss {before['loss']:.4f}, ppl {before['ppl']:.3f}")

    # ---------------------------------------------------------------- what may change
    touched = {}
    if mode == "neurons":
        from langneurons.sparse import attach_deltas
        touched = attach_deltas(model, nset)  # everything frozen; zero deltas on the selected rows/columns
    elif mode == "lora":
        from peft import LoraConfig, get_peft_model
        lcfg = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank, lora_dropout=0.0,
                          target_modules=lora_targets(model), task_type="CAUSAL_LM")
        # PEFT makes adapters float32 over a bf16 model; --pure-bf16 leaves them bf16 as the model
        model = get_peft_model(model, lcfg, autocast_adapter_dtype=not args.pure_bf16)
    else:
        for p_ in model.parameters():
            p_.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.gradient_checkpointing and mode != "full":
        model.enable_input_require_grads()  # frozen embeddings: the checkpointed blocks still need input grads
    model.config.use_cache = False

    # ---------------------------------------------------------------- train
    from transformers import Trainer
    if rank0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if args.force and resume_from is None:
            for old in ckpt_dir.glob("checkpoint-*"):
                shutil.rmtree(old)
        write_json(ckpt_dir / CKPT_ARGS_FILE, fingerprint)
    if mode == "neurons":
        from langneurons.sparse import sparse_trainer_class
        trainer_cls = sparse_trainer_class()  # checkpoints hold the deltas only
    else:
        trainer_cls = Trainer
    trainer = trainer_cls(model=model, args=targs, train_dataset=train_set, data_collator=PadCollator(tok.pad_token_id))
    if resume_from and rank0:
        print(f"Resuming from {resume_from}")
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    runtime = time.time() - t0

    from langneurons.sparse import optimizer_state_bytes
    opt_bytes = optimizer_state_bytes(trainer.optimizer)
    state = trainer.state
    loss_curve = [{"step": h["step"], "loss": h["loss"]} for h in state.log_history if "loss" in h]

    # ---------------------------------------------------------------- back to an ordinary model
    model = trainer.model
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # sharded full fine-tuning: gather the full weights (a collective on every process), save on the
        # first; the validation after training is left to evaluate.py (it would need the sharded forward)
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        model = trainer.accelerator.unwrap_model(trainer.model)
        after = None
    else:
        state_dict = None
    if mode == "neurons":
        from langneurons.sparse import merge_deltas
        merge_deltas(model)  # W[selected] += delta; every other entry is the loaded tensor, untouched
    elif mode == "lora":
        model = model.merge_and_unload()
    if mixed:  # the saved model keeps the requested dtype: one rounding of the trained float32 masters
        model.to(half)
        if state_dict is not None:
            state_dict = {k: v.to(half) if v.is_floating_point() else v for k, v in state_dict.items()}
    if state_dict is None:
        model.eval()
        after = val_loss("after")
    if not rank0:
        return
    if after is not None:
        print(f"validation {args.lang} after:  loss {after['loss']:.4f}, ppl {after['ppl']:.3f}")

    # ---------------------------------------------------------------- write
    model.config.use_cache = True
    provenance = {"tag": tag, "base_model": args.model, "trained_lang": args.lang,
                  "neurons": neuron_info["name"] if neuron_info else set_name, "mode": mode,
                  "neuron_file": neuron_info and neuron_info["file"], "run_name": run_name, "run": run_meta(args)}
    log = {"run": run_meta(args), "fingerprint": fingerprint, "tag": tag, "base_model": args.model,
           "trained_lang": args.lang, "mode": mode, "neurons": neuron_info,
           "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha or 2 * args.lora_rank,
                    "targets": lora_targets(model)} if mode == "lora" else None,
           "touched_projections": len(touched) if mode == "neurons" else None,
           "trainable_parameters": trainable, "total_parameters": total_params,
           "optimizer_state_bytes": opt_bytes, "optimizer_state_note": "per process (every data-parallel "
           "process holds a full copy)",
           "world_size": world, "micro_batch_size": args.micro_batch_size,
           "gradient_accumulation_steps": targs.gradient_accumulation_steps,
           "effective_batch_size": args.micro_batch_size * targs.gradient_accumulation_steps * world,
           "train_data": {"source": train_spec, "split": args.train_split, "text_column": args.text_column,
                          "id": train_id, "packing": args.packing, "val_source": val_spec},
           "documents": len(docs), "sequences": len(train_set), "steps": state.global_step, "epochs_done": state.epoch,
           "tokens_seen": int(state.num_input_tokens_seen), "train_loss": result.training_loss,
           "train_runtime_s": runtime, "resumed_from": str(resume_from) if resume_from else None,
           "dtype": str(half).replace("torch.", ""), "precision": precision, "device": str(model.device),
           "loss_curve": loss_curve, "val": {"lang": args.lang, "lines": len(val), "before": before, "after": after}}
    with atomic_dir(run_dir) as tmp:
        save_model_dir(model, tok, args.model, tmp, state_dict=state_dict)
        if neuron_info:
            shutil.copy2(neuron_info["file"], tmp / "neurons.json")
        write_json(tmp / PROVENANCE_FILE, provenance)
        write_json(tmp / "train_log.json", log)
    if not args.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    print(f"trained {mode} ({set_name}): {trainable:,} trainable parameters, optimizer state "
          f"{opt_bytes / 2**20:.2f} MiB, {log['tokens_seen']:,} tokens in {state.global_step} steps")
    print(f"Wrote {run_dir}")


if __name__ == "__main__":
    run(main)
