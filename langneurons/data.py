"""Readers for the paper's dataset layout (METHOD.md section 8), strict about bad input."""
from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from .cli import InputError

LANGUAGE_NAMES = {"en": "English", "zh": "Chinese", "th": "Thai", "sw": "Swahili", "fr": "French",
                  "de": "German", "es": "Spanish", "ja": "Japanese", "ru": "Russian", "bn": "Bengali",
                  "te": "Telugu", "ar": "Arabic", "ko": "Korean", "it": "Italian", "pt": "Portuguese",
                  "hi": "Hindi", "id": "Indonesian", "yo": "Yoruba"}
MMLU_LOCALES = {"en": "EN-EN", "zh": "ZH-CN", "th": "TH-TH", "sw": "SW-KE", "fr": "FR-FR", "de": "DE-DE",
                "es": "ES-LA", "ja": "JA-JP", "ar": "AR-XY", "bn": "BN-BD", "hi": "HI-IN", "id": "ID-ID",
                "it": "IT-IT", "ko": "KO-KR", "pt": "PT-BR", "yo": "YO-NG"}


def read_text(path: str | Path, what: str) -> str:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path}: no such file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{what} {path}: line {line} is not UTF-8") from None


def read_lines(path: str | Path, what: str = "text file") -> list[str]:
    """Non-empty stripped lines; an empty file is an error."""
    lines = [s.strip() for s in read_text(path, what).splitlines()]
    lines = [s for s in lines if s]
    if not lines:
        raise InputError(f"{what} {path}: empty")
    return lines


def lang_file(dataset: str | Path, sub: str, lang: str, suffix: str) -> Path:
    path = Path(dataset) / sub / f"{lang}{suffix}"
    if not path.is_file():
        known = sorted(p.stem for p in (Path(dataset) / sub).glob(f"*{suffix}"))
        raise InputError(f"unknown language '{lang}': no {path} (have: {', '.join(known) or 'none'})")
    return path


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


def val_texts(dataset: str | Path, lang: str) -> list[str]:
    return read_lines(lang_file(dataset, "val", lang, ".txt"), "validation text")


def train_texts(dataset: str | Path, lang: str) -> list[str]:
    path = lang_file(dataset, "train", lang, ".jsonl")
    texts = []
    for i, line in enumerate(read_text(path, "training file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"training file {path}: line {i}: corrupt JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise InputError(f"training file {path}: line {i}: expected an object with a 'text' string")
        if obj["text"].strip():
            texts.append(obj["text"])
    if not texts:
        raise InputError(f"training file {path}: empty")
    return texts


def read_mgsm(dataset: str | Path, lang: str) -> list[tuple[str, float]]:
    """(question, gold number) pairs of test/mgsm/mgsm_<lang>.tsv."""
    path = Path(dataset) / "test" / "mgsm" / f"mgsm_{lang}.tsv"
    items = []
    for i, line in enumerate(read_text(path, "MGSM file").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 2:
            raise InputError(f"MGSM file {path}: line {i}: expected question<TAB>answer")
        try:
            gold = float(parts[1].strip().replace(",", ""))
        except ValueError:
            raise InputError(f"MGSM file {path}: line {i}: answer '{parts[1].strip()}' is not a number") from None
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
    rows = [line.split("\t") for line in read_text(path, "MGSM file").splitlines() if line.strip()]
    return [f"Question: {q}\nAnswer: {a}" for q, a in rows]


def read_mmlu(dataset: str | Path, lang: str) -> list[dict[str, str]]:
    """Rows of test/mmlu/mmlu_<LOCALE>.csv with Question, A-D, Answer, Subject."""
    locale = MMLU_LOCALES.get(lang, lang.upper())
    path = Path(dataset) / "test" / "mmlu" / f"mmlu_{locale}.csv"
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
