"""Language identification of texts: which language a generation is written in (steering.py), and whether a
detection corpus holds texts of another language (detection.py).

The identifier is py3langid (a maintained fork of langid.py): its naive Bayes model over byte n-grams ships inside
the package (data/model.npz.xz), so it reads nothing from the network, ever. It was chosen on measured accuracy on
the six languages' validation lines (docs/steering.md#language-identification). Its answers are ISO 639-1 codes,
the same codes the dataset's languages use, with the identifier's Wu and Cantonese labels (wuu, yue) folded into
zh: on Han-script text they are its errors on Mandarin (5 of the 160 zh detection texts), and a language code
of the dataset never names them. A text with no letters at all gets UNDETERMINED."""
from __future__ import annotations

import functools
import re
import sys
from collections import Counter
from typing import Iterable

LIBRARY = "py3langid"
# what an empty text, or one of digits, punctuation and spaces only, is identified as: no language can be told
UNDETERMINED = "und"
# a text needs at least one letter (of any script) for its language to be told
_LETTER = re.compile(r"[^\W\d_]")
# labels of the identifier counted as one of the dataset's languages (see the module's docstring)
FOLDED = {"wuu": "zh", "yue": "zh"}


@functools.lru_cache(maxsize=1)
def _identifier():
    # loaded once per process (about half a second); imported here so that stages that never identify a
    # language do not pay for it
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    return LanguageIdentifier.from_model_file(MODEL_FILE)


def identify(texts: Iterable[str]) -> list[str]:
    """The language code of each text (ISO 639-1, as the dataset's languages are written; UNDETERMINED for a
    text without letters). Line breaks count as spaces: a generation is identified as one text."""
    ident = _identifier()
    out = []
    for t in texts:
        flat = " ".join(str(t).split())
        code = str(ident.classify(flat)[0]) if _LETTER.search(flat) else UNDETERMINED
        out.append(FOLDED.get(code, code))
    return out


def known_codes() -> list[str]:
    """Every language code the identifier can answer."""
    return sorted({FOLDED.get(str(c), str(c)) for c in _identifier().nb_classes})


def library_version() -> str:
    from importlib.metadata import version
    return f"{LIBRARY} {version(LIBRARY)}"


def corpus_check(corpora: dict[str, list[str]]) -> dict[str, dict]:
    """Per language: how many of its texts are identified as another language, their share, the languages
    they were identified as (most frequent first) and their indices in the corpus."""
    report = {}
    for lang, texts in corpora.items():
        got = identify(texts)
        other = [i for i, g in enumerate(got) if g != lang]
        report[lang] = {"texts": len(texts), "other_language": len(other),
                        "share": len(other) / len(texts) if texts else 0.0,
                        "identified_as": dict(Counter(got[i] for i in other).most_common()),
                        "indices": other}
    return report


def warn_other_language(report: dict[str, dict], what: str, dropped: bool) -> None:
    """One line on stderr per language with texts of another language: how many, as what, and whether they
    were dropped (never silently)."""
    for lang, r in report.items():
        if r["other_language"]:
            as_ = ", ".join(f"{k} {v}" for k, v in r["identified_as"].items())
            fate = "dropped (--drop-other-language)" if dropped else "kept (--drop-other-language drops them)"
            print(f"warning: {what} {lang}: {r['other_language']} of {r['texts']} texts "
                  f"({100 * r['share']:.1f}%) identified as another language ({as_}) by {LIBRARY}; {fate}",
                  file=sys.stderr)
