"""Metrics shared by deactivation, evaluation and the figures (docs/method.md section 7): perplexity, MGSM and
MMMLU scoring, the language-agnostic score, correlations."""
from __future__ import annotations

import inspect
import math
import re
import unicodedata

import numpy as np
from scipy import stats
import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from .data import batches_by_length, pad_batch, pad_id, tokenize
from .files import json_safe
from .uncertainty import ppl_of_lines


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], max_length: int = 512, batch_size: int = 8,
               desc: str = "ppl") -> dict:
    """PPL = exp(sum of token NLLs / predicted tokens) over all lines; each line scored on its own,
    its first token not predicted, padding never counted. Also each line's summed NLL and predicted tokens
    (`line_nll`, `line_tokens`, in the order of `texts`): the PPL of any resample of the lines is
    uncertainty.ppl_of_lines of them, and the PPL here is that of all lines, computed the same way."""
    seqs = tokenize(tokenizer, texts, max_length)
    device = next(model.parameters()).device
    line_nll, line_tokens = [0.0] * len(seqs), [0] * len(seqs)
    for idx in tqdm(batches_by_length([len(s) for s in seqs], batch_size), desc=desc, leave=False):
        ids, mask = pad_batch([seqs[i] for i in idx], pad_id(tokenizer), device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tok_nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        valid = mask[:, 1:].bool()
        # per line, in float64; padded positions are filled with 0, not multiplied (their NLL may be inf)
        sums = tok_nll.double().masked_fill(~valid, 0.0).sum(1).tolist()
        counts = valid.sum(1).tolist()
        for row, i in enumerate(idx):
            line_nll[i], line_tokens[i] = float(sums[row]), int(counts[row])
    return {"ppl": ppl_of_lines(line_nll, line_tokens), "tokens": sum(line_tokens),
            "line_nll": line_nll, "line_tokens": line_tokens}


def perplexity_by_lang(model, tokenizer, texts: dict[str, list[str]], max_length: int, batch_size: int,
                       label: str, per_line: bool = False) -> dict[str, dict]:
    """{lang: {"ppl", "tokens"}} of each language's lines (perplexity; null PPL when no token is predicted):
    how deactivation, evaluation and training's validation all measure it. `per_line` adds each line's
    summed NLL and predicted tokens ("line_nll", "line_tokens"), for intervals over resampled lines."""
    res = {}
    for lang, lines in texts.items():
        r = perplexity(model, tokenizer, lines, max_length, batch_size, desc=f"{label}/{lang}")
        res[lang] = {"ppl": json_safe(r["ppl"]), "tokens": r["tokens"]}
        if per_line:
            res[lang].update(line_nll=[json_safe(x) for x in r["line_nll"]], line_tokens=r["line_tokens"])
    return res


# ---------------------------------------------------------------- MGSM (docs/method.md section 7)

MGSM_PROMPT = "Question: {question}\nAnswer:"
# an answer ends where the model starts the next item or a new paragraph (as lm-evaluation-harness's MGSM)
MGSM_STOPS = ("Question:", "\n\n")

# full-width signs (Chinese/Japanese outputs) and Unicode minus signs; digits of every script are mapped separately
_WIDE = str.maketrans("，．－＋−–", ",.-+--")
# No-break, narrow no-break and thin spaces between digits group thousands in every language that uses them
# (French typesetting writes 1 200 with a narrow no-break space); they are never a decimal mark.
_SPACE_GROUPS = "\u00a0\u202f\u2009"
# How each language writes numbers: (thousands separators, decimal mark). Languages not listed write 1,234.5
# (English, Chinese, Thai, Swahili, Japanese, Korean, Hindi, Bengali, Telugu, Yoruba, ...).
NUMBER_STYLES = {
    "en": (",", "."),
    "de": (".", ","),   # 1.234,5
    "it": (".", ","), "es": (".", ","), "pt": (".", ","), "id": (".", ","),
    "fr": (" .", ","),  # 1 234,5 (also with a plain space) and 1.234,5
    "ru": (" ", ","),
}


def _number_pattern(groups: str, decimal: str) -> re.Pattern:
    """An optional minus, an integer with thousands groups (1,234,567 / 1.234.567 / 1 234 567) or plain digits,
    and an optional decimal part. Where the decimal mark is a comma, a point that cannot be a thousands group
    ("2.5", "2.50") is read as a decimal point too: models often write English-style numbers in any language."""
    marks = decimal + ("." if decimal == "," else "")
    return re.compile(rf"(-?)(\d{{1,3}}(?:[{re.escape(groups + _SPACE_GROUPS)}]\d{{3}})+(?!\d)|\d+)"
                      rf"(?:[{re.escape(marks)}](\d+))?(?!\d)")


_PATTERNS = {style: _number_pattern(*style) for style in {(",", "."), *NUMBER_STYLES.values()}}


def _ascii_digits(text: str) -> str:
    """Digits of any script (full-width, Thai ๐-๙, Devanagari, Arabic-Indic, ...) as ASCII digits."""
    return text if text.isascii() else re.sub(r"\d", lambda m: str(unicodedata.decimal(m.group())), text)


def extract_answer(text: str, lang: str | None = None) -> float | None:
    """The last number of a generated MGSM answer (None when there is none), read as language `lang` writes
    numbers (NUMBER_STYLES; English when None or not listed).

    Text after a following "Question:" or a blank line is ignored (MGSM_STOPS). Currency signs, "18.0",
    digits of any script and negative numbers are handled; a '-' directly after a letter or digit ("3-5",
    "COVID-19") is a hyphen, not a sign. Ambiguous forms are decided by the language: "1,200" is 1200 in
    English and 1.2 in German or French, "1.200" is 1.2 in English and 1200 in German or French; where the
    decimal mark is a point, "12,5" is the two numbers 12 and 5 (a comma group needs three digits)."""
    for stop in MGSM_STOPS:
        text = text.split(stop, 1)[0]
    groups, decimal = NUMBER_STYLES.get(lang or "en", (",", "."))
    text = _ascii_digits(text.translate(_WIDE))
    last = None
    for m in _PATTERNS[(groups, decimal)].finditer(text):
        sign = m.group(1)
        if sign and m.start() > 0 and text[m.start() - 1].isalnum():
            sign = ""
        integer = re.sub(r"\D", "", m.group(2))
        last = float(sign + integer + ("." + m.group(3) if m.group(3) else ""))
    return last


def answer_correct(pred: float | None, gold: float) -> bool:
    return pred is not None and math.isclose(pred, gold, rel_tol=1e-9, abs_tol=1e-6)


class StopOnText(StoppingCriteria):
    """A stopping criterion for `generate`: a row is done once the text it has generated contains one of
    `stops`. It decodes the new tokens, so it works with every tokenizer; transformers' own stop_strings
    instead maps each vocabulary entry back to text by its spelling, which fails for e.g. word-level
    vocabularies ("substring not found")."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_width: int):
        self.tokenizer, self.stops, self.prompt_width = tokenizer, stops, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool,
                            device=input_ids.device)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to the end of the first stop string in it (the text of a token that completes a stop string
    can run past it; cutting there makes the answer independent of how the tokenizer splits text)."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return text[:min(ends)] if ends else text


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 8,
                    max_length: int = 512, stop: tuple[str, ...] | None = MGSM_STOPS,
                    desc: str = "generate") -> list[str]:
    """Greedy continuations of `prompts` (the generated text only), in batches of similar length with left
    padding; a sequence stops at EOS or once its text contains one of the `stop` strings, and is cut after
    the first of them. A prompt longer than `max_length` tokens loses its start (BOS is kept), never the
    trailing "Answer:" that the answer follows."""
    bos = tokenizer.bos_token_id
    seqs = [_truncate_left(tokenizer(p)["input_ids"], max_length, bos) for p in prompts]
    device = next(model.parameters()).device
    out: list[str] = [""] * len(prompts)
    pad = pad_id(tokenizer)
    for idx in tqdm(batches_by_length([len(s) for s in seqs], batch_size), desc=desc, leave=False):
        ids, mask = pad_batch([seqs[i] for i in idx], pad, device, left=True)
        kw = {"stopping_criteria": StoppingCriteriaList([StopOnText(tokenizer, stop, ids.shape[1])])} if stop else {}
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=pad, **kw)
        for row, i in enumerate(idx):
            text = tokenizer.decode(gen[row, ids.shape[1]:], skip_special_tokens=True)
            out[i] = cut_at_stop(text, stop) if stop else text
    return out


def repeated_ngram_share(seqs: list[list[int]], n: int) -> float | None:
    """Of all token n-grams of the sequences, the share that already occurred earlier in the same sequence
    (0 for text that never repeats itself, near 1 for a loop); None when no sequence has n tokens."""
    total = repeated = 0
    for s in seqs:
        seen = set()
        for i in range(len(s) - n + 1):
            g = tuple(s[i:i + n])
            repeated += g in seen
            seen.add(g)
            total += 1
    return repeated / total if total else None


# ---------------------------------------------------------------- MMMLU (docs/method.md section 7)

CHOICES = ("A", "B", "C", "D")


def mmlu_prompt(row: dict[str, str]) -> str:
    """Question, the four options, then "Answer:"; the option letter is scored as the next token."""
    options = "".join(f"\n{c}. {row[c]}" for c in CHOICES)
    return f"{row['Question']}{options}\nAnswer:"


def _truncate_left(ids: list[int], max_length: int, bos: int | None) -> list[int]:
    """Keep the end of a long prompt (where "Answer:" is), and its BOS token."""
    if len(ids) <= max_length:
        return ids
    if bos is not None and ids and ids[0] == bos:
        return [bos] + ids[len(ids) - max_length + 1:]
    return ids[-max_length:]


@torch.no_grad()
def score_choices(model, tokenizer, prompts: list[str], choices: tuple[str, ...] = tuple(" " + c for c in CHOICES),
                  batch_size: int = 8, max_length: int = 1024, desc: str = "mmmlu") -> torch.Tensor:
    """Log-likelihood [len(prompts), len(choices)] of each continuation after each prompt, one forward pass
    per batch of prompts.

    The continuations are tokenized on their own and appended to the prompt (as lm-evaluation-harness
    does). Their common leading tokens (e.g. a space token) are appended to every prompt and scored once;
    after it each continuation must be a single distinct token, so its log-probability is read from the
    last position. The result is the full log-likelihood of the continuation, common part included."""
    enc = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    common = 0
    while all(len(e) > common + 1 for e in enc) and len({e[common] for e in enc}) == 1:
        common += 1
    prefix = enc[0][:common]
    last = [e[common] if len(e) == common + 1 else None for e in enc]
    if None in last or len(set(last)) != len(last):
        raise ValueError(f"choices {choices} are not single distinct tokens after a common prefix")
    bos = tokenizer.bos_token_id
    seqs = [_truncate_left(tokenizer(p)["input_ids"], max_length - len(prefix), bos) + prefix for p in prompts]
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    out = torch.empty(len(prompts), len(choices), dtype=torch.float64)
    last_ids = torch.tensor(last, device=device)
    # Left padding puts the positions we need (the last common+1) in the same columns of every row, so only
    # their logits are computed (logits_to_keep): with a large vocabulary the head over all positions would
    # cost more than the rest of the model. Position ids are given explicitly so padding does not shift them.
    keep = common + 1
    has_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    for idx in tqdm(batches_by_length([len(s) for s in seqs], batch_size), desc=desc, leave=False):
        ids, mask = pad_batch([seqs[i] for i in idx], pad, device, left=True)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kw = {"logits_to_keep": keep} if has_keep else {}
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kw).logits
        logp = torch.log_softmax(logits[:, -keep:].float(), -1)  # [batch, keep, vocab]
        score = logp[:, -1, last_ids].double()
        for j in range(common):  # the shared prefix tokens, predicted from the positions before them
            score += logp[:, j, prefix[j]].double()[:, None]
        out[idx] = score.cpu()
    return out


# ---------------------------------------------------------------- deactivation: Imp and LAS (docs/method.md section 5)

def language_agnostic(sets: dict[str, dict], langs: list[str]) -> tuple[dict[str, float | None], float | None]:
    """Imp_l = (dPPL_l(shared)/|shared|) / (dPPL_l(exclusive_l)/|exclusive_l|), LAS = log(1 + mean_l Imp_l).

    `sets` maps a set name to {"size": N, "dppl": {lang: x}}. Languages without an exclusive set are left
    out; an empty set or a zero/undefined dPPL gives Imp null; LAS averages the defined Imp (null if none,
    or if 1 + mean <= 0)."""
    shared = sets.get("shared")
    if shared is None:
        return {}, None
    imp: dict[str, float | None] = {}
    for l in langs:
        excl = sets.get(f"exclusive_{l}")
        if excl is None:
            continue
        d_sh, d_ex = shared["dppl"].get(l), excl["dppl"].get(l)
        if not shared["size"] or not excl["size"] or d_sh is None or d_ex is None or d_ex == 0:
            imp[l] = None
        else:
            imp[l] = json_safe((d_sh / shared["size"]) / (d_ex / excl["size"]))
    vals = [v for v in imp.values() if v is not None]
    las = math.log1p(float(np.mean(vals))) if vals and 1 + float(np.mean(vals)) > 0 else None
    return imp, las


# ---------------------------------------------------------------- correlations (figures, benchmarks)

def pearson(x, y) -> float | None:
    """Pearson's r of two equally long sequences (scipy); None below 3 points or for a constant sequence."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(stats.pearsonr(x, y).statistic)


def spearman(x, y) -> float | None:
    """Spearman's rho (scipy: Pearson's r of the average ranks); None where pearson of the ranks is."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(stats.spearmanr(x, y).statistic)
