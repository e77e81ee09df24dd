"""Stage 3, neuron-targeted continued pretraining (docs/method.md section 6): next-token training on one
language's text in which only the selected neurons change; every other parameter entry stays bit-for-bit.

    python train.py --model gemma-3-270m --lang sw --neurons outputs/gemma-3-270m/neurons/exclusive_sw.json
    python train.py --lang sw --neurons full          # full fine-tuning baseline
    python train.py --lang sw --lora-rank 8           # LoRA baseline, merged into the saved model
    python train.py --lang sw --neurons full --train-data corpus/sw.parquet --sample-size 100000 --num-proc 8
    torchrun --nproc_per_node 8 train.py ...          # data-parallel, unchanged (or: accelerate launch train.py ...)

Defaults are the paper's: lr 5e-5, 3% linear warmup, 1 epoch, batch 128 (gradient accumulation over
--micro-batch-size), cutoff 1024 tokens per document, no packing, bf16 on GPU (full fine-tuning and LoRA
keep float32 master weights under bf16 autocast unless --pure-bf16). The training text goes through
`datasets`: tokenized once, cached in HF_DATASETS_CACHE and memory-mapped by later runs.
Writes outputs/<tag>/trained/<run-name>/: an ordinary transformers model directory, langneurons.json and
train_log.json (arguments, neuron set, loss curve, tokens seen, trainable parameters, optimizer-state bytes,
precision, validation loss/PPL of every --langs language and the target before and after)."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import PartialState

from langneurons import cli, layout, reuse
from langneurons.cli import (InputError, choice_list, common_parser, float_in, int_at_least, parse_langs,
                             split_list)
from langneurons.data import (PadCollator, lang_file, pad_id, read_corpus, tokenize_documents, training_documents,
                              val_file)
from langneurons.files import atomic_dir, read_json, remove_empty, safe_name, write_json, writing
from langneurons.metrics import perplexity_by_lang
from langneurons.model import (Geometry, check_model, load_model, load_tokenizer, lora_targets, model_record,
                               resolve_device, resolve_dtype, save_model_dir)
from langneurons.neurons import NeuronSet, load_neuron_set
from langneurons.runinfo import run_meta, seed_everything

STEP_PREFIX = "step-"            # <run>/step-<N>/: the model after N steps (--save-every)
CKPT_ARGS_FILE = "run_args.json"  # in the checkpoint folder: what the checkpoints were trained with
# arguments that cannot change the trained model: where it goes, how checkpoints are kept and resumed
NOT_RESULT_ARGS = ("run_name", "resume", "keep_checkpoints", "save_steps", "num_proc", "report_to")
# --report-to targets and the packages transformers' callback for each imports (any one of them)
REPORT_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def save_steps(text: str) -> float:
    """--save-steps: a fraction of the run below 1, else a whole number of steps (what TrainingArguments accepts)."""
    value = float_in(0, lo_open=True)(text)
    if value > 1 and not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text} is neither a fraction below 1 nor a whole number of steps")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--lang", required=True, help="language whose dataset/train/<lang>.jsonl is trained on; the "
                   "validation perplexity of --langs and of this language is measured before and after training")
    p.add_argument("--train-data", default=None, metavar="PATH|ID",
                   help="training text instead of <dataset>/train/<lang>.jsonl: a json/jsonl/parquet/arrow file, a "
                        "folder of such files, or a hub dataset id owner/name[:config] (from the local cache when "
                        "offline); {lang} is replaced by --lang")
    p.add_argument("--text-column", default="text", help="column holding the text in --train-data / --val-data")
    p.add_argument("--train-split", default="train", help="split of a --train-data folder or dataset id")
    p.add_argument("--val-data", default=None, metavar="PATH|ID",
                   help="validation text instead of <dataset>/val/<lang>.txt: a text file (one line each), or what "
                        "--train-data accepts (split 'train'); {lang} is replaced by each measured language")
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
                   help="LoRA scaling alpha (unset: 2 x rank)")
    p.add_argument("--pure-bf16", action="store_true",
                   help="full fine-tuning / LoRA in bf16: update bf16 weights directly (the authors' setting) "
                        "instead of float32 master weights under bf16 autocast")
    p.add_argument("--legacy-kv-mapping", action="store_true",
                   help="map the authors' query-head attn_k/attn_v indices with their code's i // n_rep")
    p.add_argument("--allow-other-model", action="store_true",
                   help="use a neuron file whose model record names another model than --model (refused "
                        "otherwise: its indices may fit and still mean nothing here); the outputs record it")
    p.add_argument("--lr", type=float_in(0, lo_open=True), default=5e-5,
                   help="peak learning rate (AdamW, linear decay)")
    p.add_argument("--warmup", type=float_in(0, 1, hi_open=True), default=0.03,
                   help="linear warmup, fraction of the steps")
    p.add_argument("--epochs", type=float_in(0, lo_open=True), default=1.0, help="passes over the training documents")
    p.add_argument("--max-steps", type=int_at_least(0), default=0,
                   help="stop after N optimizer steps (0: --epochs decides)")
    p.add_argument("--global-batch-size", "--batch-size", dest="global_batch_size", type=int_at_least(1), default=128,
                   help="documents per optimizer step, over all processes (--batch-size: the name in docs/outputs.md)")
    p.add_argument("--micro-batch-size", type=int_at_least(1), default=4, help="documents per forward pass per process "
                   "(gradient accumulation makes up --global-batch-size); also the validation batch")
    p.add_argument("--cutoff-len", type=int_at_least(2), default=1024,
                   help="tokens per document; longer ones are truncated")
    p.add_argument("--sample-size", type=int_at_least(0), default=0,
                   help="train on N documents drawn with the seed (0 = all; the paper: 100000)")
    p.add_argument("--max-length", type=int_at_least(2), default=512,
                   help="tokens per validation line for the perplexity before/after (as deactivation and evaluate)")
    p.add_argument("--val-limit", type=int_at_least(0), default=0,
                   help="first N lines of each language's validation text (0 = all)")
    p.add_argument("--save-steps", type=save_steps, default=0.1, help="checkpoint every N steps (a value below 1 "
                   "is a fraction of the run)")
    # SUPPRESS: unset, the flag is absent from the records, so runs without it keep their fingerprints
    p.add_argument("--save-every", type=int_at_least(1), default=argparse.SUPPRESS, metavar="N",
                   help="also keep the model every N optimizer steps (and at the last step) as an ordinary model "
                        "folder <run>/step-<N>/ with its own tag <tag>@<run>-step<N> and its step in langneurons.json: "
                        "a series of checkpoints for detection.sh/deactivation.sh and figures.py's development "
                        "figure (--neurons FILE or full; not with --lora-rank)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward "
                   "pass (less memory, ~30%% slower)")
    p.add_argument("--run-name", default=None, help="output folder name (unset: <lang>-<neuron file stem>, "
                   "<lang>-full or <lang>-lora<R>)")
    p.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                   help="resume from the last checkpoint of this run (an error when there is none) or from the "
                        "given checkpoint folder; without the flag a run resumes automatically when its "
                        "checkpoints exist, and --force discards them")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoint folder after success")
    p.add_argument("--report-to", type=choice_list(("none", *REPORT_PACKAGES)), default="none",
                   metavar="none|tensorboard|wandb[,...]",
                   help="the Trainer's report_to: where it also logs the loss curve; tensorboard writes into the "
                        "checkpoint folder's runs/ (removed after success unless --keep-checkpoints)")
    return p.parse_args(argv)


@dataclass
class Run:
    """One training run as resolved from the arguments, once, before any weights are loaded: what is trained,
    how, on what text, and where it goes; the fingerprint decides whether earlier results or checkpoints are
    reused."""
    args: argparse.Namespace
    mode: str                     # 'neurons', 'full' or 'lora'
    rank0: bool                   # the main process: it writes the outputs
    nset: NeuronSet | None        # the neurons to train (mode 'neurons')
    neuron_info: dict | None      # what the outputs record about their file
    set_name: str                 # neuron file stem, 'full' or 'lora<R>'
    name: str                     # the run's folder name
    device: str                   # this process's device
    half: torch.dtype             # the requested dtype, also the saved model's
    mixed: bool                   # float32 masters train under `half` autocast
    precision: dict[str, Any]     # train_log.json's record of both
    tag: str
    run_dir: Path
    ckpt_dir: Path
    targs: Any                    # the Trainer's TrainingArguments
    val_specs: dict[str, str]     # where each measured language's validation text comes from
    val: dict[str, list[str]]     # its lines
    train_spec: str               # where the training text comes from
    docs: Any                     # the training documents (a datasets.Dataset)
    train_id: str                 # the training text's id (content digest or datasets' fingerprint)
    fingerprint: dict


@dataclass
class Trained:
    """What training produced and measured, beside the Trainer (whose state holds the step log)."""
    model: Any                    # the plain trained model in the requested dtype
    state_dict: dict | None       # under FSDP/DeepSpeed: the gathered full state dict
    trainer: Any
    train_set: Any                # the tokenized sequences
    touched: dict                 # projections given deltas (neuron runs)
    trainable: int
    total_params: int
    opt_bytes: int
    runtime: float
    resume_from: Path | None
    before: dict
    after: dict | None


# ---------------------------------------------------------------- steps of main()

@contextlib.contextmanager
def processes(args: argparse.Namespace) -> Iterator[PartialState]:
    """accelerate's view of the launch (rank, world size, main process); the process group ends with the stage
    on every process: gloo aborts a process that exits with its group alive ("terminate called without an
    active exception")."""
    # cpu=... as TrainingArguments(use_cpu=...) will ask, so that both agree on the backend (gloo / nccl)
    state = PartialState(cpu=resolve_device(args.device) == "cpu")
    try:
        yield state
    finally:
        PartialState().destroy_process_group()


def check_args(args: argparse.Namespace, world: int) -> str:
    """Checks that need several flags (before any output); the mode: 'neurons', 'full' or 'lora'."""
    if args.micro_batch_size > args.global_batch_size:
        raise InputError(f"--micro-batch-size {args.micro_batch_size}: larger than --global-batch-size "
                         f"{args.global_batch_size}")
    if args.global_batch_size % (args.micro_batch_size * world):
        raise InputError(f"--global-batch-size {args.global_batch_size}: not a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x {world} processes")
    if args.lora_alpha is not None and args.lora_rank is None:
        raise InputError("--lora-alpha: needs --lora-rank")
    mode = "lora" if args.lora_rank is not None else ("full" if args.neurons == "full" else "neurons")
    if mode == "full" and args.dtype == "float16":
        raise InputError("--dtype float16 with --neurons full: float16 weights cannot be trained with loss "
                         "scaling; use bfloat16 or float32")
    if getattr(args, "save_every", None) and mode == "lora":
        raise InputError("--save-every with --lora-rank: step models are written for --neurons FILE and --neurons full")
    sharded = any(os.environ.get(v, "").lower() in ("1", "true") for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    if sharded and getattr(args, "save_every", None):
        raise InputError("--save-every under FSDP/DeepSpeed: the step models need the whole model on one process")
    if sharded and mode != "full":
        raise InputError(f"FSDP/DeepSpeed launch with --{'lora-rank' if mode == 'lora' else 'neurons FILE'}: "
                         "not supported; its trainable state is tiny, plain data parallelism (torchrun/accelerate "
                         "launch without FSDP/DeepSpeed) suffices")
    return mode


def report_targets(args: argparse.Namespace) -> list[str]:
    """--report-to as the Trainer's report_to list; a target whose package is missing is an error now, not
    when the Trainer starts after the data is prepared."""
    targets = split_list(args.report_to)
    if "none" in targets and len(targets) > 1:
        raise InputError(f"--report-to {args.report_to}: 'none' together with a target")
    for t in targets:
        if t != "none" and not any(importlib.util.find_spec(m) for m in REPORT_PACKAGES[t]):
            raise InputError(f"--report-to {t}: the package '{REPORT_PACKAGES[t][0]}' is not installed")
    return [t for t in targets if t != "none"]


def neuron_set(args: argparse.Namespace, mode: str, config) -> tuple[NeuronSet | None, dict | None]:
    """The neurons to train (checked against the model's config before anything is loaded) and what the
    outputs record about their file; none for full fine-tuning and LoRA."""
    if mode != "neurons":
        return None, None
    nfile = Path(args.neurons)
    if not nfile.is_file():
        raise InputError(f"--neurons {nfile}: no such file (or 'full')")
    nset, info = load_neuron_set(nfile, Geometry.from_config(config), legacy_kv=args.legacy_kv_mapping,
                                 model=model_record(args.model, config), allow_other_model=args.allow_other_model)
    if info["size"] == 0:
        raise InputError(f"--neurons {nfile}: the set is empty, nothing to train")
    return nset, info


def run_name(args: argparse.Namespace, mode: str, neuron_info: dict | None) -> tuple[str, str]:
    """The set's name (neuron file stem, 'full' or 'lora<R>') and the run's folder name."""
    set_name = {"neurons": neuron_info and neuron_info["name"], "full": "full", "lora": f"lora{args.lora_rank}"}[mode]
    name = args.run_name or f"{args.lang}-{set_name}"
    if safe_name(name) != name:
        raise InputError(f"--run-name: '{name}' is not a safe directory name")
    return set_name, name


def process_device(args: argparse.Namespace, state: PartialState) -> str:
    """Every process loads the model onto its own device; the Trainer wraps it for data parallelism."""
    if state.num_processes > 1 and torch.cuda.is_available() and args.device in ("auto", "cuda"):
        return f"cuda:{state.local_process_index}"
    return args.device


def precision(args: argparse.Namespace, mode: str, device: str) -> tuple[torch.dtype, bool, dict[str, Any]]:
    """The requested dtype (also the saved model's), whether float32 masters train under its autocast, and
    the record of both. Full fine-tuning and LoRA train float32 master weights under bf16 autocast (the
    Trainer's mixed precision for a float32-loaded model): pure bf16 updates of lr-sized steps mostly round
    away. --pure-bf16 keeps the authors' setting. Neuron runs keep float32 deltas over the weights anyway."""
    half = resolve_dtype(args.dtype, resolve_device(device))
    if args.pure_bf16 and (mode == "neurons" or half != torch.bfloat16):
        raise InputError("--pure-bf16: applies to --neurons full and --lora-rank with --dtype bfloat16 (or auto on a "
                         f"GPU), not to {'a neuron file' if mode == 'neurons' else str(half).replace('torch.', '')}")
    mixed = mode != "neurons" and half == torch.bfloat16 and not args.pure_bf16
    name = str(half).replace("torch.", "")
    return half, mixed, {"requested_dtype": name, "master_weights": name if args.pure_bf16 else "float32",
                         "autocast": None if half == torch.float32 else name, "pure_bf16": args.pure_bf16,
                         "saved_dtype": name}


def validation_text(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Where each measured language's validation text comes from, and its first --val-limit lines: the
    languages of --langs and the target (all read now, before the model loads)."""
    langs = parse_langs(args.langs)
    langs = langs if args.lang in langs else [args.lang, *langs]
    if args.val_data and "{lang}" not in args.val_data and langs != [args.lang]:
        raise InputError(f"--val-data {args.val_data}: has no {{lang}} but perplexity is measured in "
                         f"{','.join(langs)}; put {{lang}} in it or pass --langs {args.lang}")
    specs = {l: args.val_data.replace("{lang}", l) if args.val_data else str(val_file(args.dataset, l))
             for l in langs}
    return specs, {l: read_corpus(s, "validation text", args.text_column)[:args.val_limit or None]
                   for l, s in specs.items()}


def result_fingerprint(args: argparse.Namespace, mode: str, world: int, train_spec: str, docs,
                       val_specs: dict[str, str], val: dict[str, list[str]]) -> tuple[str, dict]:
    """What decides the result (a finished run or checkpoints with another one are not reused), and the
    training text's id: a local file by its content, a folder or hub dataset by datasets' fingerprint of it
    (and validation text that is not a file by the lines read)."""
    train_id = reuse.file_digest(train_spec) if Path(train_spec).is_file() else docs._fingerprint
    context: dict[str, Any] = {"world_size": world}
    if not Path(train_spec).is_file():
        context["train_data_fingerprint"] = train_id
    if not_files := [l for l, s in val_specs.items() if not Path(s).is_file()]:
        context["val_sha256"] = {l: reuse.text_digest(val[l]) for l in not_files}
    files = [s for s in (train_spec, *val_specs.values()) if Path(s).is_file()]
    fp = reuse.fingerprint(args, __file__, "train", ignore=NOT_RESULT_ARGS, models=[args.model], context=context,
                           files=[*dict.fromkeys(files), *([args.neurons] if mode == "neurons" else [])])
    return train_id, fp


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


def keep_finished_checkpoints(ckpt_dir: Path) -> None:
    """After a stopped run: its unfinished checkpoint goes; with no finished one left, so does the checkpoint
    folder, and the `trained/` and `<tag>/` folders when that leaves them empty."""
    last, _ = last_checkpoint(ckpt_dir, remove_unfinished=True)
    if last is None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        remove_empty([ckpt_dir.parent, ckpt_dir.parent.parent])


def resume_point(args: argparse.Namespace, ckpt_dir: Path, fingerprint: dict, rank0: bool) -> Path | None:
    """The checkpoint to resume from: --resume's folder, else the last finished one of this run's checkpoint
    folder when it was trained with the same fingerprint (another one is an error, not a silent restart)."""
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
    return resume_from


def training_set(run: Run, tok):
    """Each document is one sequence: BOS (when the tokenizer adds it) + text + EOS, truncated at the cutoff
    (the authors' preprocessing: a document longer than the cutoff loses its tail, EOS included); or, with
    --packing, blocks of --cutoff-len tokens cut from the concatenated documents."""
    args = run.args
    with run.targs.main_process_first(desc="tokenize the training text"):
        train_set = tokenize_documents(run.docs, tok, args.cutoff_len, args.text_column, args.packing,
                                       args.num_proc if args.num_proc > 1 else None)
    if len(train_set) == 0:
        raise InputError(f"training file {run.train_spec}: no " + ("block of --cutoff-len tokens" if args.packing
                                                                   else "document has two tokens"))
    return train_set


def validation_perplexity(model, tok, run: Run, label: str) -> dict[str, dict[str, float]]:
    """Loss, PPL and predicted tokens of each language's validation lines (metrics.perplexity, --max-length
    tokens per line, as deactivation and evaluate measure it)."""
    # float32 masters are measured under the same bf16 autocast that trains them
    with torch.autocast(model.device.type, dtype=run.half, enabled=run.mixed and model.dtype != run.half):
        out = perplexity_by_lang(model, tok, run.val, run.args.max_length, run.args.micro_batch_size, f"val {label}")
    out = {lang: {"loss": math.log(r["ppl"]) if r["ppl"] is not None else None, **r} for lang, r in out.items()}
    if run.rank0:
        for lang, r in out.items():
            loss, ppl = (float("nan") if v is None else v for v in (r["loss"], r["ppl"]))
            print(f"validation {lang} {label}: loss {loss:.4f}, ppl {ppl:.3f}")
    return out


def make_trainable(model, run: Run):
    """What may change: zero deltas on the selected neurons (everything else frozen), a LoRA adapter, or every
    parameter. Returns the model to train and the projections that got deltas."""
    args, mode, touched = run.args, run.mode, {}
    if mode == "neurons":
        from langneurons.sparse import attach_deltas
        touched = attach_deltas(model, run.nset)
    elif mode == "lora":
        from peft import LoraConfig, get_peft_model
        lcfg = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank, lora_dropout=0.0,
                          target_modules=lora_targets(model), task_type="CAUSAL_LM")
        # PEFT makes adapters float32 over a bf16 model; --pure-bf16 leaves them bf16 as the model
        model = get_peft_model(model, lcfg, autocast_adapter_dtype=not args.pure_bf16)
    else:
        for p_ in model.parameters():
            p_.requires_grad_(True)
    if args.gradient_checkpointing and mode != "full":
        model.enable_input_require_grads()  # frozen embeddings: the checkpointed blocks still need input grads
    model.config.use_cache = False
    return model, touched


def training_arguments(args: argparse.Namespace, ckpt_dir: Path, state: PartialState, mode: str,
                       half: torch.dtype, on_cpu: bool, report_to: list[str]):
    """The Trainer's settings: the paper's schedule, --global-batch-size by gradient accumulation."""
    from transformers import TrainingArguments
    checkpointing = {}
    if args.gradient_checkpointing:  # renamed activation_checkpointing in recent transformers
        key = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
               else "gradient_checkpointing")
        checkpointing = {key: True, f"{key}_kwargs": {"use_reentrant": False}}
    return TrainingArguments(
        output_dir=str(ckpt_dir), per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.global_batch_size // (args.micro_batch_size * state.num_processes),
        learning_rate=args.lr, weight_decay=0.0, warmup_steps=args.warmup, lr_scheduler_type="linear",
        optim="adamw_torch", num_train_epochs=args.epochs, max_steps=args.max_steps or -1,
        # autocast in the requested half precision; neuron deltas, LoRA adapters and (unless --pure-bf16) the
        # weights of a full fine-tuning stay float32 masters
        bf16=half == torch.bfloat16, fp16=half == torch.float16, use_cpu=on_cpu,
        logging_steps=1, save_strategy="steps", save_steps=args.save_steps, save_total_limit=2,
        seed=args.seed, data_seed=args.seed, report_to=report_to or "none", remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding", disable_tqdm=not state.is_main_process,
        ddp_find_unused_parameters=False if mode == "neurons" else None, **checkpointing)


def prepare_checkpoints(args: argparse.Namespace, ckpt_dir: Path, fingerprint: dict, resume_from: Path | None) -> None:
    """The checkpoint folder records what its checkpoints are trained with; --force drops older ones."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if args.force and resume_from is None:
        for old in [*ckpt_dir.glob("checkpoint-*"), *ckpt_dir.glob(f"{STEP_PREFIX}*")]:
            shutil.rmtree(old)
    write_json(ckpt_dir / CKPT_ARGS_FILE, fingerprint)


def make_trainer(model, run: Run, train_set, tok):
    """transformers' Trainer; for a neuron set, one whose checkpoints hold the deltas only; with --save-every,
    one that also writes the step models."""
    from transformers import Trainer
    from langneurons.sparse import sparse_trainer_class
    cls = sparse_trainer_class() if run.mode == "neurons" else Trainer
    trainer = cls(model=model, args=run.targs, train_dataset=train_set, data_collator=PadCollator(pad_id(tok)))
    if getattr(run.args, "save_every", None) and run.rank0:
        trainer.add_callback(step_saver(run, tok))
    return trainer


def step_tag(run: Run, step: int) -> str:
    """The tag of a step model: its own, so that its neurons and deactivation do not land on the base model's."""
    return f"{run.tag}@{run.name}-step{step}"


def step_saver(run: Run, tok):
    """A Trainer callback that writes the model after every --save-every-th optimizer step and after the last one,
    as an ordinary model folder staged in the checkpoint folder (so a stopped run keeps them and resumes past
    them); write_run moves them into the run folder. The model it saves is what the run folder would hold had
    training stopped there: deltas merged (sparse.merged_state_dict, the training model untouched), float32
    masters rounded once to the requested dtype."""
    from transformers import TrainerCallback
    from langneurons.sparse import merged_state_dict

    class StepSaver(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, **kwargs):
            step = state.global_step
            if step % run.args.save_every and step != state.max_steps:
                return
            state_dict = merged_state_dict(model) if run.mode == "neurons" else model.state_dict()
            if run.mixed:
                state_dict = {k: v.to(run.half) if v.is_floating_point() else v for k, v in state_dict.items()}
            use_cache, model.config.use_cache = model.config.use_cache, True  # as the run folder's model
            try:
                with atomic_dir(run.ckpt_dir / f"{STEP_PREFIX}{step}") as tmp:
                    save_model_dir(model, tok, run.args.model, tmp, state_dict=state_dict)
                    write_json(tmp / layout.PROVENANCE_FILE, step_provenance(run, step, state))
            finally:
                model.config.use_cache = use_cache

    return StepSaver()


def step_provenance(run: Run, step: int, state) -> dict[str, Any]:
    """langneurons.json of a step model: its own tag, the run it is a step of, the step and the tokens seen.
    It has no `trained_lang` (layout.provenance_role): a step model is the base model of its own tag."""
    args, info = run.args, run.neuron_info
    return {"schema_version": layout.SCHEMA_VERSION, "tag": step_tag(run, step), "base_model": args.model,
            "base_tag": run.tag, "checkpoint_of": run.name, "step": step, "max_steps": state.max_steps,
            "tokens_seen": int(state.num_input_tokens_seen), "mode": run.mode,
            "neurons": info["name"] if info else run.set_name, "neuron_file": info and info["file"],
            "train_data": run.train_spec, "train_lang": args.lang, "run": run_meta(args)}


def plain_model(trainer, run: Run):
    """Back to an ordinary model in the requested dtype: deltas merged (every other entry the loaded tensor,
    untouched) or LoRA merged; under FSDP/DeepSpeed also the gathered full state dict (a collective on every
    process), else None."""
    model, state_dict, half = trainer.model, None, run.half
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        model = trainer.accelerator.unwrap_model(trainer.model)
    if run.mode == "neurons":
        from langneurons.sparse import merge_deltas
        merge_deltas(model)
    elif run.mode == "lora":
        model = model.merge_and_unload()
    if run.mixed:  # the saved model keeps the requested dtype: one rounding of the trained float32 masters
        model.to(half)
        if state_dict is not None:
            state_dict = {k: v.to(half) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.config.use_cache = True
    return model.eval(), state_dict


def whole_run_loss(state) -> float:
    """Mean training loss over every step of the run, those before a resume included (the Trainer's own
    training_loss averages only the steps of this session). logging_steps=1 logs each step's loss, and a
    checkpoint's trainer_state.json carries that log from step 0; summed in step order from 0.0 as the
    Trainer sums them, so an uninterrupted run gets the Trainer's value to the bit."""
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    if len(losses) != state.global_step:
        raise RuntimeError(f"the Trainer logged {len(losses)} losses in {state.global_step} steps (logging_steps=1?)")
    total = 0.0
    for loss in losses:
        total += loss
    return total / max(state.global_step, 1)


def train_log(run: Run, t: Trained) -> dict[str, Any]:
    """train_log.json: what was trained, how, on what, and the validation perplexity before and after."""
    args, mode, state, targs = run.args, run.mode, t.trainer.state, run.targs
    world = targs.world_size
    return {"schema_version": layout.SCHEMA_VERSION, "run": run_meta(args), "fingerprint": run.fingerprint,
            "tag": run.tag, "base_model": args.model, "trained_lang": args.lang, "mode": mode,
            "neurons": run.neuron_info,
            "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha or 2 * args.lora_rank,
                     "targets": lora_targets(t.model)} if mode == "lora" else None,
            "touched_projections": len(t.touched) if mode == "neurons" else None,
            "trainable_parameters": t.trainable, "total_parameters": t.total_params,
            "optimizer_state_bytes": t.opt_bytes, "optimizer_state_note": "per process (every data-parallel "
            "process holds a full copy)",
            "world_size": world, "micro_batch_size": args.micro_batch_size,
            "gradient_accumulation_steps": targs.gradient_accumulation_steps,
            "effective_batch_size": args.micro_batch_size * targs.gradient_accumulation_steps * world,
            "train_data": {"source": run.train_spec, "split": args.train_split, "text_column": args.text_column,
                           "id": run.train_id, "packing": args.packing, "val_source": run.val_specs},
            "documents": len(run.docs), "sequences": len(t.train_set), "steps": state.global_step,
            "epochs_done": state.epoch, "tokens_seen": int(state.num_input_tokens_seen),
            "train_loss": whole_run_loss(state), "train_runtime_s": t.runtime,
            "resumed_from": str(t.resume_from) if t.resume_from else None,
            "step_models": [{"folder": d.name, "step": int(d.name[len(STEP_PREFIX):]),
                             "tag": step_tag(run, int(d.name[len(STEP_PREFIX):]))} for d in step_models(run.ckpt_dir)]
            if getattr(args, "save_every", None) else None,
            "dtype": run.precision["requested_dtype"], "precision": run.precision, "device": str(t.model.device),
            "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in state.log_history if "loss" in h],
            "val": {"lang": args.lang, "langs": list(run.val), "max_length": args.max_length,
                    "lines": {lang: len(lines) for lang, lines in run.val.items()}, "before": t.before,
                    "after": t.after}}


def write_run(run: Run, t: Trained, tok, log: dict) -> None:
    """The trained model folder, all at once: weights, tokenizer, provenance, neuron file copy, train_log."""
    args, info = run.args, run.neuron_info
    provenance = {"schema_version": layout.SCHEMA_VERSION, "tag": run.tag, "base_model": args.model,
                  "trained_lang": args.lang, "neurons": info["name"] if info else run.set_name, "mode": run.mode,
                  "neuron_file": info and info["file"], "other_model": bool(info and info["other_model"]),
                  "run_name": run.name, "run": log["run"]}
    with atomic_dir(run.run_dir) as tmp:
        save_model_dir(t.model, tok, args.model, tmp, state_dict=t.state_dict)
        if info:
            shutil.copy2(info["file"], tmp / layout.NEURON_FILE_COPY)
        write_json(tmp / layout.PROVENANCE_FILE, provenance)
        write_json(tmp / layout.TRAIN_LOG, log)
        for step_dir in step_models(run.ckpt_dir):  # --save-every: staged in the checkpoint folder
            shutil.move(str(step_dir), str(tmp / step_dir.name))


def step_models(ckpt_dir: Path) -> list[Path]:
    """The step models (--save-every) staged in a checkpoint folder, in step order."""
    found = [d for d in ckpt_dir.glob(f"{STEP_PREFIX}*") if d.is_dir() and re.fullmatch(rf"{STEP_PREFIX}\d+", d.name)]
    return sorted(found, key=lambda d: int(d.name[len(STEP_PREFIX):]))


def resolve_run(args: argparse.Namespace, state: PartialState) -> Run:
    """Every check and choice that needs no weights, in an order that fails early: the flags, the model's
    config against the neuron file, the output folder, then the validation and training text."""
    mode = check_args(args, state.num_processes)
    report_to = report_targets(args)
    seed_everything(args.seed)
    # the config checks the neuron file against the model before anything is loaded; the tokenizer and the
    # weight headers are checked too, so that a broken model folder fails now and not after the data is prepared
    nset, neuron_info = neuron_set(args, mode, check_model(args.model))
    set_name, name = run_name(args, mode, neuron_info)
    device = process_device(args, state)
    half, mixed, precision_info = precision(args, mode, device)
    out = layout.outputs(args.out, args.model)
    run_dir, ckpt_dir = out.run(name), out.checkpoints(name)
    reuse.check_writable(run_dir, f"--out {args.out}", folder=True)
    targs = training_arguments(args, ckpt_dir, state, mode, half, resolve_device(device) == "cpu", report_to)
    # data, checked before anything is written
    val_specs, val = validation_text(args)
    train_spec = (args.train_data or str(lang_file(args.dataset, "train", args.lang, ".jsonl"))).replace("{lang}", args.lang)
    # the main process (of each node) loads into datasets' cache first, the others then read it; --sample-size
    # is a seeded draw, like the paper's shuffle-then-take-100k (the sampler reshuffles the order anyway)
    with targs.main_process_first(desc="load the training text"):
        docs = training_documents(train_spec, "training file", args.text_column, args.train_split,
                                  args.sample_size, args.seed)
    train_id, fingerprint = result_fingerprint(args, mode, state.num_processes, train_spec, docs, val_specs, val)
    return Run(args=args, mode=mode, rank0=state.is_main_process, nset=nset,
               neuron_info=neuron_info, set_name=set_name, name=name, device=device, half=half, mixed=mixed,
               precision=precision_info, tag=out.tag, run_dir=run_dir, ckpt_dir=ckpt_dir, targs=targs,
               val_specs=val_specs, val=val, train_spec=train_spec, docs=docs, train_id=train_id,
               fingerprint=fingerprint)


def train_model(run: Run, resume_from: Path | None) -> tuple[Trained, Any]:
    """Tokenize, load, measure, train (resumed from `resume_from`), merge back to a plain model, measure again;
    also returns the model's tokenizer."""
    args = run.args
    train_set = training_set(run, load_tokenizer(args.model))
    model, tok = load_model(args.model, run.device, "float32" if run.mixed else args.dtype)
    total_params = sum(p.numel() for p in model.parameters())
    before = validation_perplexity(model, tok, run, "before")
    model, touched = make_trainable(model, run)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if run.rank0:
        prepare_checkpoints(args, run.ckpt_dir, run.fingerprint, resume_from)
    trainer = make_trainer(model, run, train_set, tok)
    if resume_from and run.rank0:
        print(f"Resuming from {resume_from}")
    t0 = time.time()
    try:
        with writing(run.ckpt_dir):  # the Trainer's checkpoints: a full disk is one line, not torch.save's trace
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except BaseException:  # stopped (Ctrl-C, a full disk, ...): keep what a rerun resumes from, nothing else
        if run.rank0:
            keep_finished_checkpoints(run.ckpt_dir)
        raise
    runtime = time.time() - t0
    from langneurons.sparse import optimizer_state_bytes
    opt_bytes = optimizer_state_bytes(trainer.optimizer)
    model, state_dict = plain_model(trainer, run)
    # under FSDP/DeepSpeed the validation after training is left to evaluate.py (it needs the sharded forward)
    after = None if state_dict is not None else validation_perplexity(model, tok, run, "after")
    return Trained(model=model, state_dict=state_dict, trainer=trainer, train_set=train_set, touched=touched,
                   trainable=trainable, total_params=total_params, opt_bytes=opt_bytes, runtime=runtime,
                   resume_from=resume_from, before=before, after=after), tok


def main() -> None:
    args = parse_args()
    with processes(args) as state:
        run = resolve_run(args, state)
        # a second run of the same name waits for this one, then reuses its model
        with reuse.unit(run.run_dir, f"--out {args.out}", force=args.force, record=run.run_dir / layout.TRAIN_LOG,
                        enabled=run.rank0) as unit:
            if run.rank0:
                reuse.remove_temporaries(run.ckpt_dir)
            if unit.up_to_date(run.fingerprint):
                if run.rank0 and not args.keep_checkpoints:  # left by a run killed after its model was in place
                    shutil.rmtree(run.ckpt_dir, ignore_errors=True)
                return
            resume_from = resume_point(args, run.ckpt_dir, run.fingerprint, run.rank0)
            trained, tok = train_model(run, resume_from)
            if not run.rank0:
                return
            log = train_log(run, trained)
            write_run(run, trained, tok, log)
            if not args.keep_checkpoints:
                shutil.rmtree(run.ckpt_dir, ignore_errors=True)
    print(f"trained {run.mode} ({run.set_name}): {trained.trainable:,} trainable parameters, optimizer state "
          f"{trained.opt_bytes / 2**20:.2f} MiB, {log['tokens_seen']:,} tokens in {log['steps']} steps")
    print(f"Wrote {run.run_dir}")


if __name__ == "__main__":
    cli.run(main)
