"""Evaluation: MGSM answer extraction, MMMLU scoring and perplexity against direct computations, the CLI's
results file, its errors, and lm-evaluation-harness compatibility of our model directories."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from conftest import run_script
from tiny import save_tiny, tiny_dataset, tiny_model, tiny_tokenizer

from langneurons import metrics


# ---------------------------------------------------------------- MGSM answer extraction

EXTRACTION = [
    ("The answer is 1,234.", 1234.0),
    ("$18", 18.0),
    ("She pays $18.00 in total.", 18.0),
    ("18.0", 18.0),
    ("答案是１８。", 18.0),
    ("所以她一共有１，２００元", 1200.0),
    ("-5", -5.0),
    ("The temperature drops to -5 degrees.", -5.0),
    ("He buys 3 apples for 2 dollars each, so 3 * 2 = 6. The answer is 6.", 6.0),
    ("Janet sells 16 - 3 - 4 = 9 eggs. 9 * 2 = 18. So 18\n\nQuestion: Tom has 5 cars. Answer: 5", 18.0),
    ("I don't know.", None),
    ("", None),
    ("Question: what is 2+2?", None),
    ("The shop earns €1,000.50 a day", 1000.5),
    ("Hours 3-5 are free, so 40 remain", 40.0),
    ("La réponse est 42 €.", 42.0),
    ("Jibu ni 1,000,000", 1_000_000.0),
    ("Die Antwort ist 3 + 4 = 7.\nQuestion: 2 + 2 = ?", 7.0),  # the prompt's scaffold is English in every language
    ("x = 12,5", 5.0),
    ("The answer is 12.\n\nThe next problem has 30 apples.", 12.0),  # a decimal comma is not a thousands group: 12 and 5, the last is 5
]


@pytest.mark.parametrize("text,expected", EXTRACTION)
def test_extract_answer(text, expected):
    got = metrics.extract_answer(text)
    assert got == expected


NNBSP, NBSP = "\u202f", "\u00a0"
EXTRACTION_BY_LANGUAGE = [
    ("Die Antwort ist 1.200 Euro.", "de", 1200.0),
    ("Die Antwort ist 1.234.567,25 Euro.", "de", 1234567.25),
    ("Sie braucht 2,5 Stunden.", "de", 2.5),
    ("Die Antwort ist 2.5", "de", 2.5),  # a point that cannot group thousands: an English-style decimal point
    ("Die Antwort ist 1,200", "de", 1.2),  # German reading of an ambiguous form
    ("La réponse est 1 200 €.", "fr", 1200.0),
    (f"La réponse est 1{NBSP}200.", "fr", 1200.0),
    (f"La réponse est 12{NNBSP}345{NNBSP}678,5 €.", "fr", 12345678.5),
    ("Il a 3 ans et 200 €.", "fr", 200.0),  # digits separated by words are separate numbers
    ("La réponse est 1.200", "fr", 1200.0),
    ("The answer is 1,200.", "en", 1200.0),
    ("The answer is 1.200", "en", 1.2),
    (f"The answer is 1{NNBSP}200.", "en", 1200.0),  # a narrow no-break space only ever groups thousands
    ("x = 12,5", "en", 5.0),
    ("คำตอบคือ ๑,๒๐๐ บาท", "th", 1200.0),  # Thai digits
    ("Jibu ni 1,200.", "sw", 1200.0),
    ("所以答案是１，２００元。", "zh", 1200.0),
    ("Die Antwort ist -1.200,5", "de", -1200.5),
    ("La réponse est 18.\n\nQuestion: 5", "fr", 18.0),
]


@pytest.mark.parametrize("text,lang,expected", EXTRACTION_BY_LANGUAGE)
def test_extract_answer_by_language(text, lang, expected):
    assert metrics.extract_answer(text, lang) == expected


def usual_format(n: float, thousands: str, decimal: str) -> str:
    """`n` as a speaker writes it: thousands groups and the decimal mark of the language."""
    whole, _, frac = f"{n:,.6f}".rstrip("0").rstrip(".").partition(".")
    return whole.replace(",", thousands) + (decimal + frac if frac else "")


# the answer sentence each language ends with, after a working line with a decimal; its usual number formats
ANSWER_SENTENCES = {
    "en": ("Step: 2.5 + 1 = 3.5. The answer is {} dollars.", [(",", ".")]),
    "de": ("Schritt: 2,5 + 1 = 3,5. Die Antwort lautet {} Euro.", [(".", ",")]),
    "fr": ("Étape : 2,5 + 1 = 3,5. La réponse est {} €.", [(" ", ","), (NBSP, ","), (NNBSP, ",")]),
    "zh": ("步骤：2.5 + 1 = 3.5。所以答案是{}。", [(",", ".")]),
    "th": ("ขั้นตอน: 2.5 + 1 = 3.5 ดังนั้นคำตอบคือ {} บาท", [(",", ".")]),
    "sw": ("Hatua: 2.5 + 1 = 3.5. Kwa hiyo jibu ni {}.", [(",", ".")]),
}


def test_every_real_mgsm_answer_parses_back():
    from conftest import SHARED_DATA
    files = sorted((SHARED_DATA / "mgsm").glob("mgsm_*.tsv"))
    if not files:
        pytest.skip("no MGSM data in ../shared/data/mgsm")
    large = 0
    for f in files:
        lang = f.stem.split("_", 1)[1]
        sentence, formats = ANSWER_SENTENCES[lang]
        golds = [float(line.split("\t")[1].replace(",", "")) for line in f.read_text(encoding="utf-8").splitlines()
                 if line.strip()]
        assert len(golds) == 250
        large += sum(g >= 1000 for g in golds)
        for thousands, decimal in formats:
            for gold in golds:
                text = sentence.format(usual_format(gold, thousands, decimal))
                assert metrics.extract_answer(text, lang) == gold, text
                if lang == "th":  # Thai digits as well
                    thai = text.translate(str.maketrans("0123456789", "๐๑๒๓๔๕๖๗๘๙"))
                    assert metrics.extract_answer(thai, lang) == gold, thai
    assert large >= 20 * len(files)  # the thousands forms are really exercised


def test_answer_correct():
    assert metrics.answer_correct(18.0, 18)
    assert metrics.answer_correct(1234.0, 1234.0)
    assert not metrics.answer_correct(None, 0.0)
    assert not metrics.answer_correct(17.0, 18.0)


# ---------------------------------------------------------------- MMMLU scoring

ROWS = [{"Question": "What is 2+2?", "A": "3", "B": "4", "C": "5", "D": "22", "Answer": "B"},
        {"Question": "Which planet is closest to the Sun? A much longer question to vary the lengths.",
         "A": "Mercury", "B": "Venus", "C": "Mars", "D": "Earth", "Answer": "A"},
        {"Question": "Sky?", "A": "green", "B": "red", "C": "blue", "D": "black", "Answer": "C"},
        {"Question": "Le chat dort sur le tapis chaud. Où dort le chat ?", "A": "lit", "B": "tapis",
         "C": "table", "D": "jardin", "Answer": "B"},
        {"Question": "x", "A": "a", "B": "b", "C": "c", "D": "d", "Answer": "D"}]


def direct_loglik(model, tok, prompt: str, continuation: str) -> float:
    """log P(continuation | prompt), one sequence at a time, continuation tokenized on its own."""
    ctx = tok(prompt)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
    return float(sum(logp[len(ctx) + j - 1, t] for j, t in enumerate(cont)))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("choices", [(" A", " B", " C", " D"), ("A", "B", "C", "D")])
def test_mmmlu_scores_equal_direct_loglik(arch, choices):
    # the byte tokenizer makes " A" two tokens (space, letter): exercises the common-prefix path
    model, tok = tiny_model(arch), tiny_tokenizer()
    prompts = [metrics.mmlu_prompt(r) for r in ROWS]
    batched = metrics.score_choices(model, tok, prompts, choices, batch_size=3)
    single = metrics.score_choices(model, tok, prompts, choices, batch_size=1)
    direct = torch.tensor([[direct_loglik(model, tok, p, c) for c in choices] for p in prompts], dtype=torch.float64)
    assert batched.shape == (len(ROWS), 4)
    assert torch.allclose(batched, direct, atol=1e-4), (batched - direct).abs().max()
    assert torch.allclose(batched, single, atol=1e-5)
    assert (batched.argmax(1) == direct.argmax(1)).all()


def test_mmmlu_prompt_ends_with_answer():
    p = metrics.mmlu_prompt(ROWS[0])
    assert p == "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"


def test_mmmlu_long_prompt_keeps_the_end():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    long = {**ROWS[0], "Question": "word " * 400}
    s = metrics.score_choices(model, tok, [metrics.mmlu_prompt(long)], batch_size=1, max_length=64)
    assert torch.isfinite(s).all()
    # the end of the prompt is kept ("Answer:"), BOS stays in front, the space token is appended
    ids = tok(metrics.mmlu_prompt(long))["input_ids"]
    kept = [ids[0]] + ids[len(ids) - 62:] + tok(" ", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([kept])).logits.double(), -1)[0]
    space = tok(" ", add_special_tokens=False)["input_ids"][0]
    a = tok(" A", add_special_tokens=False)["input_ids"][-1]
    assert math.isclose(float(s[0, 0]), float(logp[-2, space] + logp[-1, a]), abs_tol=1e-4)


# ---------------------------------------------------------------- perplexity

def test_perplexity_equals_independent_computation():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    texts = ["The cat sleeps on the warm mat.", "Rain.", "Die Katze schläft auf der warmen Matte, sagt man.",
             "x y", "Le train pour la ville part à neuf heures."]
    got = metrics.perplexity(model, tok, texts, max_length=32, batch_size=2)
    nll, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t, truncation=True, max_length=32)["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.double()
        n = ids.shape[1] - 1
        nll += float(loss) * n
        count += n
    assert got["tokens"] == count
    assert math.isclose(got["ppl"], math.exp(nll / count), rel_tol=1e-5)


# ---------------------------------------------------------------- generation

def test_generate_greedy_batched_equals_single():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts = [metrics.MGSM_PROMPT.format(question=q) for q in ["2 + 3 = ?", "A farmer has 18 cows. How many legs?",
                                                                  "x"]]
    batched = metrics.generate_greedy(model, tok, prompts, max_new_tokens=12, batch_size=3, stop=None)
    single = [metrics.generate_greedy(model, tok, [p], max_new_tokens=12, batch_size=1, stop=None)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(o, str) for o in batched)


def word_level_tokenizer():
    """A real word-level tokenizer (tokenizers' WordLevel model): tokens are whole words, decoded with spaces;
    transformers' stop_strings cannot map such a vocabulary back to text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<bos>", "<eos>", "<unk>", "Question:", "Answer:", "Question", ":", "\n", "the", "cat", "has",
             "apples", "1", "2", "3", "5", "+", "=", "?", "so", "is", "answer"]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def bigram_model(tok, successor: dict[str, str]):
    """A real llama whose greedy continuation is scripted: attention and MLP write nothing, so the last
    position's hidden state is its token's embedding, a one-hot vector; the LM head then gives the token's
    `successor` the only non-zero logit."""
    from transformers import AutoModelForCausalLM
    from tiny import tiny_config
    cfg = tiny_config("llama")
    cfg.vocab_size = len(tok)
    assert cfg.hidden_size >= len(tok)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.get_input_embeddings().weight.zero_()
        model.lm_head.weight.zero_()
        vocab = tok.get_vocab()
        for i in range(len(tok)):
            model.get_input_embeddings().weight[i, i] = 1.0
        for word, nxt in successor.items():
            model.lm_head.weight[vocab[nxt], vocab[word]] = 1.0
    return model


def count_generated(model) -> list[int]:
    """Wrap model.generate to record how many tokens each call generated (stopped rows are padded)."""
    counts, generate = [], model.generate

    def counting(*args, **kwargs):
        out = generate(*args, **kwargs)
        counts.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out
    model.generate = counting
    return counts


def test_generate_stops_at_question():
    tok = word_level_tokenizer()
    # "... Answer:" -> so the answer is 5 Question: cat has 3 apples -> so ... (a cycle through "Question:")
    chain = ["Answer:", "so", "the", "answer", "is", "5", "Question:", "cat", "has", "3", "apples", "so"]
    model = bigram_model(tok, dict(zip(chain, chain[1:])))
    counts = count_generated(model)
    prompts = ["Question: 2 + 3 = ?\nAnswer:", "Question: the cat has"]
    full = metrics.generate_greedy(model, tok, prompts[:1], max_new_tokens=20, stop=None)[0]
    assert full == "so the answer is 5 Question: cat has 3 apples so the answer is 5 Question: cat has 3 apples"
    assert counts[-1] == 20
    # the MGSM stops: the text is cut after "Question:" and generation ended there, 14 tokens early
    stopped = metrics.generate_greedy(model, tok, prompts[:1], max_new_tokens=20)[0]
    assert stopped == "so the answer is 5 Question:" and counts[-1] == 6
    # in one batch each row stops at its own "Question:"; the batch ends when the last row has stopped
    both = metrics.generate_greedy(model, tok, prompts, max_new_tokens=20, batch_size=2)
    assert both == ["so the answer is 5 Question:", "3 apples so the answer is 5 Question:"]
    assert counts[-1] == 8


def test_generate_with_a_word_level_tokenizer():
    from transformers import AutoModelForCausalLM
    from tiny import tiny_config
    tok = word_level_tokenizer()
    cfg = tiny_config("llama")
    cfg.vocab_size = len(tok)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # large weights: varied words rather than one repeated
    prompt = "Question: 2 + 3 = ?\nAnswer:"
    full = metrics.generate_greedy(model, tok, [prompt], max_new_tokens=30, stop=None)[0]
    words = full.split()
    assert len(set(words)) > 2 and "Question:" in words, full  # this seed's model writes the MGSM stop text
    # the MGSM stops (the default) work with this vocabulary, and cut where their text first appears
    default = metrics.generate_greedy(model, tok, [prompt], max_new_tokens=30)[0]
    assert default == metrics.cut_at_stop(full, metrics.MGSM_STOPS)
    stop = next(w for w in words[3:] if w not in words[:3])  # a word the model produces after a few others
    stopped = metrics.generate_greedy(model, tok, [prompt], max_new_tokens=30, stop=(stop,))[0]
    assert stopped == full[:full.index(stop) + len(stop)] and len(stopped) < len(full)


def test_generate_long_prompt_keeps_its_end():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompt = "word " * 100 + metrics.MGSM_PROMPT.format(question="2 + 3 = ?")
    # the byte tokenizer gives one token per ASCII character after BOS: 47 characters fit beside BOS in 48 tokens
    cut = metrics.generate_greedy(model, tok, [prompt], max_new_tokens=8, max_length=48, stop=None)[0]
    tail = metrics.generate_greedy(model, tok, [prompt[-47:]], max_new_tokens=8, stop=None)[0]
    head = metrics.generate_greedy(model, tok, [prompt[:47]], max_new_tokens=8, stop=None)[0]
    assert prompt[-47:].endswith("\nAnswer:")
    assert cut == tail and cut != head


# ---------------------------------------------------------------- the task registry

def test_every_task_has_its_file_reader_runner_and_metric(tmp_path):
    """A task is one entry of langneurons.tasks.TASKS: its file is in the dataset layout, its reader reads it, its
    runner scores a model on the items and reports the task's metric for every language."""
    from langneurons.tasks import TASKS
    dataset = tiny_dataset(tmp_path / "dataset", langs=("en", "fr"))
    model, tok = tiny_model("llama"), tiny_tokenizer()
    args = argparse.Namespace(max_new_tokens=4, batch_size=2, max_length=64)
    assert TASKS
    for name, task in TASKS.items():
        assert task.name == name and task.label and task.metric in ("ppl", "accuracy"), name
        data = {}
        for l in ("en", "fr"):
            assert task.file(dataset, l).is_file(), (name, l)
            data[l] = task.read(dataset, l)[:2]
            assert len(data[l]) == 2, (name, l)
        res = task.evaluate(model, tok, data, args)
        assert set(res) == {"en", "fr"}, name
        for l in res:
            assert math.isfinite(res[l][task.metric]), (name, l)
            assert res[l].get("n", res[l].get("tokens", 0)) > 0, (name, l)
        assert (task.prompt is None) == (task.scoring is None), name


def test_cli_tasks_and_their_arguments_come_from_the_registry():
    import evaluate  # the repository's evaluate.py (pytest.ini puts the root first on sys.path)
    from langneurons.tasks import TASKS, prompts
    assert evaluate.parse_args([]).tasks == ",".join(TASKS)  # every task by default, in the registry's order
    for name in TASKS:
        assert evaluate.parse_args(["--tasks", name]).tasks == name
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--tasks", "bleu"])
    args = evaluate.parse_args(["--tasks", "ppl"])
    for name, task in TASKS.items():
        kept = evaluate.result_args(args, name)
        assert all(a in kept for a in task.own_args), name  # a task's own arguments decide its reuse...
        assert not any(a in kept for t in TASKS.values() if t is not task for a in t.own_args - task.own_args), name
    assert "max_new_tokens" in TASKS["mgsm"].own_args  # ...MGSM's answer length changes MGSM's numbers only
    assert prompts() == {k: v for t in TASKS.values() if t.prompt
                         for k, v in ((t.name, t.prompt), (f"{t.name}_scoring", t.scoring))}
    assert list(prompts()) == ["mgsm", "mgsm_scoring", "mmmlu", "mmmlu_scoring"]  # the results files' keys


# ---------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return save_tiny("llama", root / "tinyllama"), tiny_dataset(root / "dataset"), root


def test_cli_writes_results_and_reuses(tiny_setup):
    model, dataset, root = tiny_setup
    out = root / "out"
    r = run_script("evaluate.py", "--model", model, "--langs", "en,fr", "--dataset", dataset, "--out", out,
                   "--device", "cpu", "--tasks", "ppl,mmmlu", "--limit", 2, "--batch-size", 2)
    assert r.returncode == 0, r.stderr
    f = out / "tinyllama" / "eval" / "tinyllama.json"
    res = json.loads(f.read_text())
    assert res["model"] == str(model)
    assert res["meta"]["args"]["limit"] == 2 and "versions" in res["meta"]
    assert set(res["results"]) == {"ppl", "mmmlu"}
    assert set(res["results"]["ppl"]) == {"en", "fr"}
    assert res["results"]["ppl"]["en"]["tokens"] > 0 and res["results"]["ppl"]["en"]["ppl"] > 1
    assert res["results"]["mmmlu"]["fr"]["n"] == 2
    assert 0 <= res["results"]["mmmlu"]["fr"]["accuracy"] <= 1
    assert "mmmlu" in r.stdout and "en" in r.stdout

    # a second task fills the same file; the earlier ones are reused, not recomputed
    r = run_script("evaluate.py", "--model", model, "--langs", "en,fr", "--dataset", dataset, "--out", out,
                   "--device", "cpu", "--tasks", "mgsm,ppl", "--limit", 2, "--max-new-tokens", 4)
    assert r.returncode == 0, r.stderr
    assert "Reusing ppl" in r.stdout
    res2 = json.loads(f.read_text())
    assert set(res2["results"]) == {"ppl", "mgsm", "mmmlu"}
    assert res2["results"]["ppl"] == res["results"]["ppl"]
    assert res2["results"]["mgsm"]["en"]["n"] == 2

    # --name chooses the file
    r = run_script("evaluate.py", "--model", model, "--langs", "en", "--dataset", dataset, "--out", out,
                   "--device", "cpu", "--tasks", "ppl", "--limit", 1, "--name", "base model")
    assert r.returncode == 0, r.stderr
    assert (out / "tinyllama" / "eval" / "base_model.json").is_file()


def test_cli_pipeline_dir_uses_base_tag(tiny_setup, tmp_path):
    model, dataset, _ = tiny_setup
    variant = save_tiny("llama", tmp_path / "shared")
    (variant / "langneurons.json").write_text(json.dumps({"tag": "mybase", "neuron_set": "shared"}))
    r = run_script("evaluate.py", "--model", variant, "--langs", "en", "--dataset", dataset, "--out", tmp_path / "out",
                   "--device", "cpu", "--tasks", "ppl", "--limit", 1)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "mybase" / "eval" / "shared.json").is_file()


def test_cli_records_the_role_of_base_variant_and_trained_models(tiny_setup, tmp_path):
    from langneurons.layout import PROVENANCE_FILE, SCHEMA_VERSION, outputs
    from langneurons.model import Geometry
    from langneurons.neurons import random_set, write_neuron_file
    from tiny import tiny_config
    model, dataset, _ = tiny_setup
    out = tmp_path / "out"
    # a real variant: deactivation.py writes it (and its provenance) from the tiny model
    write_neuron_file(tmp_path / "shared.json", random_set(20, Geometry.from_config(tiny_config("llama")), 0, "s"))
    run_script("deactivation.py", "--model", model, "--out", out, "--neurons", tmp_path / "shared.json",
               "--device", "cpu", check=True)
    variant = outputs(out, str(model)).variants / "shared"
    # a trained model: train.py's provenance names the language it was trained on
    trained = save_tiny("llama", tmp_path / "run1")
    (trained / PROVENANCE_FILE).write_text(json.dumps({"tag": "tinyllama", "trained_lang": "fr", "run_name": "run1"}))
    for m, role in ((model, "base"), (variant, "variant"), (trained, "trained")):
        r = run_script("evaluate.py", "--model", m, "--langs", "en", "--dataset", dataset, "--out", out, "--device", "cpu",
                     "--tasks", "ppl", "--limit", 1)
        assert r.returncode == 0, r.stderr
        res = json.loads(outputs(out, str(model)).evaluation(m.name).read_text())  # one tag for all three
        assert res["meta"]["role"] == role and res["meta"]["schema_version"] == SCHEMA_VERSION, m
    assert res["meta"]["provenance"]["run_name"] == "run1"
    assert sorted(p.stem for p in outputs(out, str(model)).eval.glob("*.json")) == ["run1", "shared", "tinyllama"]


@pytest.mark.parametrize("task,file,content,line", [
    ("mgsm", "test/mgsm/mgsm_en.tsv", "2 + 3 = ?\t5\nno tab here\n", 2),
    ("mgsm", "test/mgsm/mgsm_en.tsv", "2 + 3 = ?\t5\n4 + 4 = ?\t5\nfive?\tfive\n", 3),
    ("mmmlu", "test/mmlu/mmlu_EN-EN.csv", ",Question,A,B,C,D,Answer,Subject\n0,q,a,b,c,d,A,s\n1,q,a,b,c,d,E,s\n", 3),
])
def test_cli_malformed_task_file(tiny_setup, tmp_path, task, file, content, line):
    model, _, _ = tiny_setup
    dataset = tiny_dataset(tmp_path / "dataset", langs=("en",))
    (dataset / file).write_text(content, encoding="utf-8")
    r = run_script("evaluate.py", "--model", model, "--langs", "en", "--dataset", dataset, "--out", tmp_path / "out",
                   "--device", "cpu", "--tasks", task)
    assert r.returncode == 2
    msg = r.stderr.strip().splitlines()
    assert len(msg) == 1, r.stderr
    assert str(dataset / file) in msg[0] and f"line {line}" in msg[0]
    assert not (tmp_path / "out").exists()


def test_cli_bad_flags(forked, tiny_setup, tmp_path):
    model, dataset, _ = tiny_setup
    for argv, needle in ((["--tasks", "ppl,bleu"], "--tasks"), (["--limit", "-1"], "--limit"),
                         (["--langs", "en,xx"], "xx")):
        r = forked("evaluate.py", "--model", model, "--dataset", dataset, "--out", tmp_path / "out", *argv)
        assert r.returncode == 2, r.stderr
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- lm-evaluation-harness

def test_lm_eval_harness_scores_a_saved_variant_like_we_do(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from transformers import AutoModelForCausalLM
    from langneurons.masking import zero_neurons
    from langneurons.model import Geometry, save_model_dir
    from langneurons.neurons import random_set
    src = save_tiny("llama", tmp_path / "base")
    model, tok = AutoModelForCausalLM.from_pretrained(src), tiny_tokenizer()
    zero_neurons(model, random_set(40, Geometry.from_config(model.config), seed=0, name="variant"))
    variant = tmp_path / "variant"
    save_model_dir(model, tok, str(src), variant)
    lm = get_model("hf").create_from_arg_string(f"pretrained={variant},dtype=float32",
                                                {"batch_size": 1, "device": "cpu"})
    prompts = [metrics.mmlu_prompt(r) for r in ROWS[:3]]
    pairs = [(p, f" {c}") for p in prompts for c in metrics.CHOICES]  # score_choices' default continuations
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    theirs = torch.tensor([ll for ll, _ in lm.loglikelihood(reqs)], dtype=torch.float64).view(len(prompts), -1)
    ours = metrics.score_choices(model, tok, prompts)
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()
