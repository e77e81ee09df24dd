"""langneurons/data.py's corpora through `datasets`: every format gives the same texts, tokenization equals
the per-document list code it replaced (and run_clm's packing), its cache is reused by a later process and
invalidated when the data or the tokenizer changes, --sample-size draws with the seed, bad input is one line naming
file and line; detection.py --corpus reads files with {lang}. Nothing is downloaded."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_script, script_env
from langneurons.cli import InputError
from langneurons.data import (detection_corpus, external_corpus, load_text_dataset, read_corpus, read_lines,
                              tokenize_documents, training_documents)
from tiny import SENTENCES, save_tiny, tiny_dataset, tiny_tokenizer

DOCS = [a + " " + b for a, b in zip(SENTENCES["en"], SENTENCES["fr"])] + ["   ", "x", "Ein langer Satz. " * 12]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """A private datasets cache per test: no test sees another's cache, none writes into ~/.cache."""
    import datasets.config
    cache = tmp_path / "hf_datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


def write_jsonl(path: Path, texts: list[str], column: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({column: t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    return path


def todays_list(texts: list[str], tok, cutoff: int) -> list[list[int]]:
    """The per-document code train.py had before `datasets` (the reference)."""
    out = []
    for text in texts:
        ids = (tok(text)["input_ids"] + [tok.eos_token_id])[:cutoff]
        if len(ids) >= 2:
            out.append(ids)
    return out


def test_every_format_gives_the_same_texts(tmp_path):
    import datasets
    jl = write_jsonl(tmp_path / "a.jsonl", DOCS)
    (tmp_path / "b.json").write_text(json.dumps([{"text": t} for t in DOCS]), encoding="utf-8")
    ds = datasets.Dataset.from_dict({"text": DOCS})
    ds.to_parquet(str(tmp_path / "c.parquet"))
    folder = tmp_path / "folder"
    write_jsonl(folder / "part-0.jsonl", DOCS[:4])
    write_jsonl(folder / "part-1.jsonl", DOCS[4:])
    arrow = tmp_path / "arrow"
    ds.save_to_disk(str(arrow))
    arrow_file = next(arrow.glob("*.arrow"))
    (tmp_path / "d.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    want = [t.strip() for t in DOCS if t.strip()]
    for spec in (jl, tmp_path / "b.json", tmp_path / "c.parquet", folder, arrow_file, tmp_path / "d.txt"):
        assert read_corpus(str(spec), "corpus") == want, spec
    assert read_corpus(str(tmp_path / "d.txt"), "corpus") == read_lines(tmp_path / "d.txt")
    # training documents keep their text unstripped and drop blank ones only
    assert list(training_documents(str(jl), "training file")["text"]) == [t for t in DOCS if t.strip()]
    # another column
    write_jsonl(tmp_path / "body.jsonl", DOCS, column="body")
    assert read_corpus(str(tmp_path / "body.jsonl"), "corpus", text_column="body") == want


@pytest.mark.parametrize("cutoff", [5, 64])
def test_tokenization_equals_the_per_document_list(tmp_path, cutoff):
    tok = tiny_tokenizer()
    docs = training_documents(str(write_jsonl(tmp_path / "t.jsonl", DOCS)), "training file")
    got = list(tokenize_documents(docs, tok, cutoff)["input_ids"])
    assert got == todays_list(docs["text"], tok, cutoff)
    assert any(len(x) == cutoff for x in got) and [1, tok.convert_tokens_to_ids("x"), 2] in got  # cut; short kept
    # packing: every document's tokens + EOS concatenated and cut into full blocks (run_clm's group_texts)
    packed = list(tokenize_documents(docs, tok, cutoff, packing=True)["input_ids"])
    flat = [t for text in docs["text"] for t in tok(text)["input_ids"] + [tok.eos_token_id]]
    assert packed == [flat[i:i + cutoff] for i in range(0, len(flat) // cutoff * cutoff, cutoff)]
    # several processes give the same rows in the same order
    assert list(tokenize_documents(docs, tok, cutoff, num_proc=2)["input_ids"]) == got


def test_sample_size_draws_with_the_seed(tmp_path):
    texts = [f"document number {i}" for i in range(50)]
    jl = str(write_jsonl(tmp_path / "t.jsonl", texts))
    a = list(training_documents(jl, "training file", sample_size=10, seed=3)["text"])
    assert len(a) == 10 == len(set(a)) and set(a) <= set(texts)
    assert list(training_documents(jl, "training file", sample_size=10, seed=3)["text"]) == a
    assert list(training_documents(jl, "training file", sample_size=10, seed=4)["text"]) != a
    assert a != texts[:10]  # a draw, not the head of the file
    assert list(training_documents(jl, "training file", sample_size=500, seed=3)["text"]) == texts  # more than there are: all


# A process of its own (not pytest, so without pytest.ini's pythonpath): it finds the package through argv[1].
CACHE_PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from transformers import AutoTokenizer
import langneurons.data as data
if sys.argv[4] == "must-reuse":  # a cache hit never calls the tokenization function
    def refuse(*a, **k):
        raise RuntimeError("tokenized again")
    data._tokenize_batch = refuse
tok = AutoTokenizer.from_pretrained(sys.argv[3])
docs = data.training_documents(sys.argv[2], "training file")
ids = data.tokenize_documents(docs, tok, 32)
print(json.dumps({"ids": list(ids["input_ids"]), "files": [f["filename"] for f in ids.cache_files]}))
"""


def test_tokenization_cache_is_reused_and_invalidated(tmp_path, datasets_cache):
    tok_dir = save_tiny("llama", tmp_path / "model")
    env = script_env({"HF_DATASETS_CACHE": datasets_cache})
    jl = write_jsonl(tmp_path / "t.jsonl", DOCS)

    def probe(mode: str, tok=tok_dir) -> dict:
        r = subprocess.run([sys.executable, "-c", CACHE_PROBE, str(REPO), str(jl), str(tok), mode],
                           env=env, capture_output=True, text=True, timeout=300)
        if mode == "must-reuse" and r.returncode != 0:
            assert "tokenized again" in r.stderr, r.stderr[-2000:]
            return {"tokenized": True}
        assert r.returncode == 0, r.stderr[-2000:]
        return {"tokenized": mode == "fresh", **json.loads(r.stdout.strip().splitlines()[-1])}

    tok = tiny_tokenizer()
    first = probe("fresh")
    assert first["ids"] == todays_list([t for t in DOCS if t.strip()], tok, 32)
    again = probe("must-reuse")  # another process, the same data and tokenizer: read from the cache
    assert not again["tokenized"] and again["ids"] == first["ids"] and again["files"] == first["files"]

    # the data change: the cache is not used, and the new text is what gets tokenized
    write_jsonl(jl, DOCS[::-1])
    assert probe("must-reuse")["tokenized"]
    changed = probe("fresh")
    assert changed["ids"] == todays_list([t for t in DOCS[::-1] if t.strip()], tok, 32)
    assert probe("must-reuse")["ids"] == changed["ids"]

    # the tokenizer changes (it lower-cases now): tokenized again, with the new tokenizer
    from tokenizers import normalizers
    from transformers import AutoTokenizer
    other = tmp_path / "other_tok"
    t2 = tiny_tokenizer()
    t2.backend_tokenizer.normalizer = normalizers.Lowercase()
    t2.save_pretrained(other)
    assert probe("must-reuse", tok=other)["tokenized"]
    new = probe("fresh", tok=other)
    assert new["ids"] != changed["ids"]
    assert new["ids"] == todays_list([t for t in DOCS[::-1] if t.strip()], AutoTokenizer.from_pretrained(other), 32)
    assert probe("must-reuse", tok=other)["ids"] == new["ids"]


def test_bad_corpora_are_one_line_errors(tmp_path):
    jl = tmp_path / "bad.jsonl"
    cases = [('{"text": "a"}\n\n{"text": "b"\n', "line 3: corrupt JSON"),
             ('{"text": "a"}\n{"body": "b"}\n', "line 2: expected an object with a 'text' string"),
             ('{"text": "a"}\n{"text": 3}\n', "line 2: expected an object with a 'text' string"),
             ('{"text": "a"}\n[1, 2]\n', "line 2"),
             ('{"body": "a"}\n', "no column 'text' (has: body)"),
             ('{"text": "  "}\n{"text": ""}\n', "empty"), ("\n", "empty"), ("", "empty")]
    for content, msg in cases:
        jl.write_text(content, encoding="utf-8")
        with pytest.raises(InputError, match="^training file .*bad.jsonl: " + re.escape(msg)):
            training_documents(str(jl), "training file")
    folder = tmp_path / "folder"
    write_jsonl(folder / "a.jsonl", ["fine"])
    (folder / "b.jsonl").write_text('{"text": "ok"}\n{"text": "x", \n', encoding="utf-8")
    with pytest.raises(InputError, match=r"b\.jsonl: line 2: corrupt JSON"):
        training_documents(str(folder), "training file")
    (tmp_path / "x.csv").write_text("text\na\n")
    with pytest.raises(InputError, match="unknown format"):
        load_text_dataset(str(tmp_path / "x.csv"), "training file")
    # not a file, and offline the hub is never asked: a one-line error, nothing downloaded
    with pytest.raises(InputError, match="nobody/no-such-dataset: no such file or folder"):
        load_text_dataset("nobody/no-such-dataset", "training file")
    with pytest.raises(InputError, match="no such file or folder, and not a dataset id"):
        load_text_dataset(str(tmp_path / "missing dir" / "f.jsonl"), "training file")


def test_detection_reads_a_corpus_file_per_language(tmp_path):
    """--corpus DIR/{lang}.jsonl with the detect sentences gives the very files of --corpus detect."""
    model = save_tiny("llama", tmp_path / "llama")
    ds = tiny_dataset(tmp_path / "dataset", langs=("en", "fr"))
    for lang in ("en", "fr"):
        write_jsonl(tmp_path / "corpus" / f"{lang}.jsonl", read_lines(ds / "detect" / f"{lang}.txt"))
    assert external_corpus(str(tmp_path / "corpus" / "{lang}.jsonl"), "fr", 3, 0) == detection_corpus(ds, "fr", 3, 0)
    outs = {}
    for name, corpus in (("a", "detect"), ("b", str(tmp_path / "corpus" / "{lang}.jsonl"))):
        outs[name] = tmp_path / name
        r = run_script("detection.py", "--model", model, "--dataset", ds, "--langs", "en,fr", "--out", outs[name],
                       "--corpus", corpus, "--ratio", "0.1", "--sample-size", "4", "--device", "cpu",
                       env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = outs["a"] / "llama" / "neurons", outs["b"] / "llama" / "neurons"
    assert (a / "firing.safetensors").read_bytes() == (b / "firing.safetensors").read_bytes()
    assert (a / "shared.json").read_bytes() == (b / "shared.json").read_bytes()
    r = run_script("detection.py", "--model", model, "--dataset", ds, "--langs", "en,fr", "--out", tmp_path / "c",
                   "--corpus", tmp_path / "corpus" / "en.jsonl", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "{lang}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_a_byte_order_mark_is_not_part_of_any_text(tmp_path):
    """Files saved by Windows tools or spreadsheets start with a UTF-8 byte-order mark: every reader gives what it
    gives for the same file without one (the first detection sentence, the first MGSM prompt, the MMMLU columns,
    JSON and JSON Lines). Without the stripping the first text keeps U+FEFF and the MMMLU file lacks 'Question'."""
    import shutil
    from langneurons.data import mgsm_texts, read_mgsm, read_mmlu, read_text, val_texts
    from langneurons.files import read_json
    plain, bom = tmp_path / "plain", tmp_path / "bom"
    shutil.copytree(REPO / "dataset", plain)
    shutil.copytree(REPO / "dataset", bom)
    for f in [p for p in bom.rglob("*") if p.is_file() and p.suffix in (".txt", ".tsv", ".csv", ".jsonl")]:
        f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    assert detection_corpus(bom, "en", 0, 0) == detection_corpus(plain, "en", 0, 0)
    assert val_texts(bom, "fr") == val_texts(plain, "fr")
    assert read_mgsm(bom, "de") == read_mgsm(plain, "de")
    assert mgsm_texts(bom, "de", "authors")[0] == mgsm_texts(plain, "de", "authors")[0]
    assert read_mmlu(bom, "en") == read_mmlu(plain, "en")
    jsonl = next((bom / "train").glob("*.jsonl"))
    assert read_corpus(jsonl, "train") == read_corpus(plain / "train" / jsonl.name, "train")
    assert not any(t.startswith("\ufeff") for t in detection_corpus(bom, "en", 0, 0))
    obj = {"fwd_up": {"0": [1, 2]}, "meta": {"kv_index_space": "kv_rows"}}
    (tmp_path / "set.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(obj).encode())
    assert read_json(tmp_path / "set.json") == obj
    assert read_text(jsonl, "x") == (plain / "train" / jsonl.name).read_text(encoding="utf-8")


def test_a_line_is_cut_only_at_a_newline(tmp_path):
    """U+2028 (line separator), U+0085 (next line) and form feeds stand inside sentences of web text, and JSON
    allows U+2028 unescaped in a string (json.dumps(ensure_ascii=False) writes it so): a text file's line and
    a JSON Lines record are one text each, as `datasets` reads them; str.splitlines() would cut them."""
    from langneurons.data import json_lines_texts, read_mgsm
    sentences = ["One sentence\u2028with a line separator.", "Next\x85line\x0cand form feed.", "Plain, CRLF."]
    txt = tmp_path / "en.txt"
    txt.write_bytes("\r\n".join(sentences).encode("utf-8"))
    assert read_lines(txt) == sentences
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"text": s}, ensure_ascii=False) + "\n" for s in sentences), encoding="utf-8")
    assert json_lines_texts(jsonl, "training file") == sentences
    assert read_corpus(str(jsonl), "corpus") == sentences  # the datasets path agrees
    (tmp_path / "test" / "mgsm").mkdir(parents=True)
    (tmp_path / "test" / "mgsm" / "mgsm_en.tsv").write_text("Tom has\u20282 apples and 3 more?\t5\n", encoding="utf-8")
    assert read_mgsm(tmp_path, "en") == [("Tom has\u20282 apples and 3 more?", 5.0)]
