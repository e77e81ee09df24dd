"""Readers for the paper's dataset layout (docs/method.md section 8), strict about bad input."""
from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import random
import re
from pathlib import Path

import torch

from .cli import InputError

LANGUAGE_NAMES = {"en": "English", "zh": "Chinese", "th": "Thai", "sw": "Swahili", "fr": "French",
                  "de": "German", "es": "Spanish", "ja": "Japanese", "ru": "Russian", "bn": "Bengali",
                  "te": "Telugu", "ar": "Arabic", "ko": "Korean", "it": "Italian", "pt": "Portuguese",
                  "hi": "Hindi", "id": "Indonesian", "yo": "Yoruba"}
MMLU_LOCALES = {"en": "EN-EN", "zh": "ZH-CN", "th": "TH-TH", "sw": "SW-KE", "fr": "FR-FR", "de": "DE-DE",
                "es": "ES-LA", "ja": "JA-JP", "ar": "AR-XY", "bn": "BN-BD", "hi": "HI-IN", "id": "ID-ID",
                "it": "IT-IT", "ko": "KO-KR", "pt": "PT-BR", "yo": "YO-NG"}


def not_a_file(path: Path) -> str:
    """Why `path` cannot be read as a file, in words: a folder, a symlink loop, a dangling link or nothing."""
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        return "a link to a missing file" if path.is_symlink() else "no such file"
    return "a folder, not a file" if path.is_dir() else "not a regular file"


def read_text(path: str | Path, what: str) -> str:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path}: {not_a_file(path)}")
    raw = path.read_bytes()
    try:
        # utf-8-sig: a byte-order mark (Windows tools, spreadsheets) is not part of the first line
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{what} {path}: line {line} is not UTF-8") from None


def text_lines(text: str) -> list[str]:
    """The lines of a text file's content: split at "\n" (a "\r\n" ending counts as one), as line-based tools
    and JSON Lines split them. str.splitlines() also splits at U+2028, U+0085 and other separators that may
    stand inside a sentence, or inside a JSON string, where they are valid unescaped."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def read_lines(path: str | Path, what: str = "text file") -> list[str]:
    """Non-empty stripped lines; an empty file is an error."""
    lines = [s.strip() for s in text_lines(read_text(path, what))]
    lines = [s for s in lines if s]
    if not lines:
        raise InputError(f"{what} {path}: empty")
    return lines


def lang_file(dataset: str | Path, sub: str, lang: str, suffix: str) -> Path:
    path = Path(dataset) / sub / f"{lang}{suffix}"
    if os.path.lexists(path) and not path.is_file():  # there, but unreadable: say why, not "unknown language"
        raise InputError(f"{path}: {not_a_file(path)}")
    if not path.is_file():
        known = sorted(p.stem for p in (Path(dataset) / sub).glob(f"*{suffix}") if p.is_file())
        raise InputError(f"unknown language '{lang}': no {path} (have: {', '.join(known) or 'none'})")
    return path


def mgsm_file(dataset: str | Path, lang: str) -> Path:
    return Path(dataset) / "test" / "mgsm" / f"mgsm_{lang}.tsv"


def mmlu_file(dataset: str | Path, lang: str) -> Path:
    return Path(dataset) / "test" / "mmlu" / f"mmlu_{MMLU_LOCALES.get(lang, lang.upper())}.csv"


def corpus_file(dataset: str | Path, lang: str, corpus: str = "detect") -> Path:
    """The file detection_corpus reads."""
    return mgsm_file(dataset, lang) if corpus == "mgsm" else lang_file(dataset, "detect", lang, ".txt")


def detection_corpus(dataset: str | Path, lang: str, sample_size: int, seed: int, corpus: str = "detect",
                     mgsm_format: str = "question") -> list[str]:
    """`sample_size` sentences of detect/<lang>.txt (or, with corpus 'mgsm', the MGSM texts, as the
    authors ran it; see mgsm_texts) drawn with the seed (all, in order, when 0)."""
    if corpus == "mgsm":
        lang_file(dataset, "test/mgsm", f"mgsm_{lang}", ".tsv")
        lines = mgsm_texts(dataset, lang, mgsm_format)
    else:
        lines = read_lines(lang_file(dataset, "detect", lang, ".txt"), "detection corpus")
    if 0 < sample_size < len(lines):
        lines = random.Random(f"{seed}-{lang}").sample(lines, sample_size)
    return lines


def val_file(dataset: str | Path, lang: str) -> Path:
    return lang_file(dataset, "val", lang, ".txt")


def val_texts(dataset: str | Path, lang: str) -> list[str]:
    return read_lines(val_file(dataset, lang), "validation text")


def train_texts(dataset: str | Path, lang: str) -> list[str]:
    path = lang_file(dataset, "train", lang, ".jsonl")
    texts = [t for t in json_lines_texts(path, "training file") if t.strip()]
    if not texts:
        raise InputError(f"training file {path}: empty")
    return texts


def json_lines_texts(path: Path, what: str, text_column: str = "text") -> list[str]:
    """The `text_column` string of every line of a JSON Lines file; the first bad line is an error naming
    file and line."""
    texts = []
    for i, line in enumerate(text_lines(read_text(path, what)), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{what} {path}: line {i}: corrupt JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_column), str):
            raise InputError(f"{what} {path}: line {i}: expected an object with a '{text_column}' string")
        texts.append(obj[text_column])
    return texts


# ---------------------------------------------------------------- any corpus through `datasets`
# `datasets` is imported inside these functions only: the GPU box may lack it unless it is carried there.

DATA_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?")
TOKENIZE_VERSION = 1  # part of the tokenization cache key: bump when the preprocessing below changes


def _datasets():
    import datasets
    datasets.logging.set_verbosity_error()
    return datasets


def _json_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(path.rglob("*"))
    return [f for f in files if f.is_file() and f.suffix.lower() in (".json", ".jsonl")]


def _explain_json(path: Path, what: str, text_column: str) -> None:
    """Raise the one-line error for the first bad line of the JSON (Lines) files at `path`, if there is one,
    or for a source without a single row. Only called once `datasets` has refused a source, so a good corpus
    is never read twice."""
    rows = 0
    for f in _json_files(path):
        text = read_text(f, what)
        try:  # a .json file may hold one document (a list of objects) rather than one object per line
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            for i, obj in enumerate(whole):
                if not isinstance(obj, dict) or not isinstance(obj.get(text_column), str):
                    raise InputError(f"{what} {f}: item {i}: expected an object with a '{text_column}' string")
            rows += len(whole)
        else:
            rows += len(json_lines_texts(f, what, text_column))
    if rows == 0 and (path.is_file() or any(p.is_file() for p in path.rglob("*"))):
        raise InputError(f"{what} {path}: empty")


def load_text_dataset(spec: str, what: str, text_column: str = "text", split: str = "train"):
    """A `datasets.Dataset` whose string column `text_column` has no missing value, from a local
    json/jsonl/parquet/arrow file, a folder of such files (or of .txt files: one row per line), or a hub
    dataset id `owner/name[:config]` (offline: from the local hub cache). Loaded once into datasets' cache
    (HF_DATASETS_CACHE) and memory-mapped from there afterwards. Bad input raises InputError naming the
    source, and the line of a bad JSON line."""
    ds_lib = _datasets()
    path = Path(spec)
    if path.is_file():
        fmt = DATA_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise InputError(f"{what} {path}: unknown format '{path.suffix}' (expected .json, .jsonl, .parquet, "
                             ".arrow, or a folder)")
        load = lambda: ds_lib.load_dataset(fmt, data_files=str(path), split="train")  # noqa: E731
    elif path.is_dir():
        load = lambda: ds_lib.load_dataset(str(path), split=split)  # noqa: E731
    elif _HUB_ID.fullmatch(spec):
        name, _, config = spec.partition(":")
        load = lambda: ds_lib.load_dataset(name, config or None, split=split)  # noqa: E731
    else:
        raise InputError(f"{what} {spec}: no such file or folder, and not a dataset id")
    # loading is quick next to tokenization; silent, so that a failure prints our one line only
    quiet, verbosity = ds_lib.utils.are_progress_bars_disabled(), ds_lib.logging.get_verbosity()
    ds_lib.disable_progress_bars()
    ds_lib.logging.set_verbosity(ds_lib.logging.CRITICAL)
    try:
        ds = load()
    except Exception as e:  # datasets raises many types (generation, file, connection, config errors)
        if path.exists():
            _explain_json(path, what, text_column)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "" if path.exists() else "no such file or folder, and the hub dataset cannot be loaded: "
        raise InputError(f"{what} {spec}: {where}{reason}") from None
    finally:
        ds_lib.logging.set_verbosity(verbosity)
        if not quiet:
            ds_lib.enable_progress_bars()
    if isinstance(ds, ds_lib.DatasetDict):  # a folder or hub id without the split
        raise InputError(f"{what} {spec}: no split '{split}' (has: {', '.join(ds)})")
    if len(ds) == 0:
        raise InputError(f"{what} {spec}: empty")
    if text_column not in ds.column_names:
        raise InputError(f"{what} {spec}: no column '{text_column}' (has: {', '.join(ds.column_names) or 'none'})")
    feature = ds.features[text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string") or ds.data.column(text_column).null_count:
        if path.exists():
            _explain_json(path, what, text_column)
        col = ds.data.column(text_column)
        if getattr(feature, "dtype", None) in ("string", "large_string"):
            import pyarrow.compute as pc
            row = pc.index(pc.is_null(col), True).as_py()
            raise InputError(f"{what} {spec}: row {row} has no '{text_column}'")
        raise InputError(f"{what} {spec}: column '{text_column}' is not text ({feature})")
    return ds


def _nonblank(texts: list[str]) -> list[bool]:
    return [bool(t.strip()) for t in texts]


def training_documents(spec: str, what: str, text_column: str = "text", split: str = "train", sample_size: int = 0,
                       seed: int = 0):
    """The non-blank documents of a corpus (see `load_text_dataset`) as a Dataset; with `sample_size`, that
    many drawn with the seed (shuffle then select, through the dataset's cached index mappings)."""
    from datasets.fingerprint import Hasher
    ds = load_text_dataset(spec, what, text_column, split)
    ds_lib = _datasets()
    quiet = ds_lib.utils.are_progress_bars_disabled()
    ds_lib.disable_progress_bars()
    try:
        ds = ds.filter(_nonblank, batched=True, input_columns=[text_column],
                       new_fingerprint=Hasher.hash([ds._fingerprint, "nonblank", text_column]))
        if len(ds) == 0:
            raise InputError(f"{what} {spec}: empty")
        if 0 < sample_size < len(ds):
            ds = ds.shuffle(seed=seed).select(range(sample_size))
    finally:
        if not quiet:
            ds_lib.enable_progress_bars()
    return ds


def _tokenize_batch(batch: dict, tokenizer, text_column: str, cutoff_len: int, packing: bool) -> dict:
    eos = tokenizer.eos_token_id
    ids = [x + [eos] if eos is not None else x for x in tokenizer(batch[text_column])["input_ids"]]
    if packing:  # run_clm.py's group_texts: concatenate the batch's documents, cut into full blocks
        flat = [t for x in ids for t in x]
        n = len(flat) // cutoff_len * cutoff_len
        return {"input_ids": [flat[i:i + cutoff_len] for i in range(0, n, cutoff_len)]}
    ids = [x[:cutoff_len] for x in ids]
    return {"input_ids": [x for x in ids if len(x) >= 2]}


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides a tokenizer's output: its full definition (vocabulary, merges, normalizer, pre- and
    post-processor: the backend's JSON) and its Python-side settings. datasets' generic Hasher pickles the whole
    object instead, ~10 s for a 262k vocabulary, which would cost a cached rerun more than everything else."""
    import hashlib
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: let datasets hash it
        from datasets.fingerprint import Hasher
        return Hasher.hash(tokenizer)
    h = hashlib.sha256(backend.to_str().encode("utf-8"))
    settings = {k: v for k, v in tokenizer.init_kwargs.items() if k != "name_or_path"}
    h.update(repr((type(tokenizer).__name__, sorted(settings.items(), key=lambda kv: kv[0]),
                   tokenizer.eos_token_id)).encode("utf-8"))
    return h.hexdigest()


def tokenize_documents(docs, tokenizer, cutoff_len: int, text_column: str = "text", packing: bool = False,
                       num_proc: int | None = None):
    """Each document as BOS (when the tokenizer adds it) + text + EOS, truncated at `cutoff_len` (documents
    of fewer than two tokens dropped); with `packing`, the documents of every 1000 concatenated and cut into
    blocks of `cutoff_len` (the remainder dropped), as transformers' run_clm.py does. A batched
    `Dataset.map` whose result datasets caches next to the data under a key of the data's fingerprint, the
    tokenizer and these settings: a rerun loads it (memory-mapped) instead of tokenizing again."""
    from datasets import Features, Sequence, Value
    from datasets.fingerprint import Hasher
    key = Hasher.hash([docs._fingerprint, tokenizer_fingerprint(tokenizer), text_column, cutoff_len, packing,
                       TOKENIZE_VERSION])
    return docs.map(_tokenize_batch, batched=True, batch_size=1000, remove_columns=docs.column_names,
                    fn_kwargs={"tokenizer": tokenizer, "text_column": text_column, "cutoff_len": cutoff_len,
                               "packing": packing},
                    features=Features({"input_ids": Sequence(Value("int32"))}), num_proc=num_proc,
                    new_fingerprint=key, desc="tokenize")


def read_corpus(spec: str, what: str, text_column: str = "text", split: str = "train") -> list[str]:
    """Non-empty stripped texts of a plain text file (one per line) or of anything `load_text_dataset`
    reads (one per row)."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() not in DATA_FORMATS:
        return read_lines(path, what)
    ds = load_text_dataset(spec, what, text_column, split)
    lines = [t.strip() for t in ds[text_column] if t.strip()]
    if not lines:
        raise InputError(f"{what} {spec}: empty")
    return lines


def read_mgsm(dataset: str | Path, lang: str) -> list[tuple[str, float]]:
    """(question, gold number) pairs of test/mgsm/mgsm_<lang>.tsv."""
    path = mgsm_file(dataset, lang)
    items = []
    for i, line in enumerate(text_lines(read_text(path, "MGSM file")), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 2:
            raise InputError(f"MGSM file {path}: line {i}: expected question<TAB>answer")
        try:
            gold = float(parts[1].strip().replace(",", ""))
        except ValueError:
            raise InputError(f"MGSM file {path}: line {i}: answer '{parts[1].strip()}' is not a number") from None
        if not math.isfinite(gold):  # float() reads "nan" and "inf", which no answer equals (and JSON cannot hold)
            raise InputError(f"MGSM file {path}: line {i}: answer '{parts[1].strip()}' is not a finite number")
        items.append((parts[0].strip(), gold))
    if not items:
        raise InputError(f"MGSM file {path}: empty")
    return items


def mgsm_texts(dataset: str | Path, lang: str, fmt: str = "question") -> list[str]:
    """MGSM items as detection texts: the question alone ('question'), or the authors' gsm format
    ('authors'): 'Question: <question>\nAnswer: <gold answer as written in the tsv>'."""
    items = read_mgsm(dataset, lang)  # validates the file
    if fmt == "question":
        return [q for q, _ in items]
    path = Path(dataset) / "test" / "mgsm" / f"mgsm_{lang}.tsv"
    rows = [line.split("\t") for line in text_lines(read_text(path, "MGSM file")) if line.strip()]
    return [f"Question: {q}\nAnswer: {a}" for q, a in rows]


def read_mmlu(dataset: str | Path, lang: str) -> list[dict[str, str]]:
    """Rows of test/mmlu/mmlu_<LOCALE>.csv with Question, A-D, Answer, Subject."""
    path = mmlu_file(dataset, lang)
    reader = csv.DictReader(io.StringIO(read_text(path, "MMMLU file")))
    need = ["Question", "A", "B", "C", "D", "Answer"]
    missing = [c for c in need if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(f"MMMLU file {path}: missing column {', '.join(missing)}")
    rows = []
    for row in reader:
        line = reader.line_num
        if row["Answer"] is None or row["Answer"].strip() not in ("A", "B", "C", "D"):
            raise InputError(f"MMMLU file {path}: line {line}: answer '{row['Answer']}' is not A, B, C or D")
        if any(row[c] is None for c in need):
            raise InputError(f"MMMLU file {path}: line {line}: missing fields")
        rows.append({c: row[c].strip() for c in need} | {"Subject": (row.get("Subject") or "").strip()})
    if not rows:
        raise InputError(f"MMMLU file {path}: empty")
    return rows


def external_corpus(spec: str, lang: str, sample_size: int, seed: int, text_column: str = "text") -> list[str]:
    """Detection sentences of language `lang` from a file, folder or dataset id (`{lang}` in `spec` is
    replaced by the language), drawn with the seed as `detection_corpus` draws them."""
    lines = read_corpus(spec.replace("{lang}", lang), "detection corpus", text_column)
    if 0 < sample_size < len(lines):
        lines = random.Random(f"{seed}-{lang}").sample(lines, sample_size)
    return lines


# ---------------------------------------------------------------- batching: token ids into padded batches

def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding); order does not change results."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_id(tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad token (model.load_tokenizer makes EOS the pad token when
    there is none), else 0 for a tokenizer with neither. Padding is masked everywhere (attention mask 0, never
    predicted, counted or scored), so which id fills it never reaches a result."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_batch(seqs: list[list[int]], pad_id: int, device, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)


class PadCollator:
    """The Trainer's collator: right-pads a batch; padding gets attention mask 0 and label -100 (never
    predicted, never counted). Labels come from the mask, not from the token id, so an EOS that doubles as
    padding is still learnt."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([f["input_ids"] for f in features], self.pad_id, "cpu")
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
