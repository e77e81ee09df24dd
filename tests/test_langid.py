"""Language identification (langneurons/langid.py) and detection's corpus language check."""
import json
import socket

import pytest

from conftest import run_script
from langneurons import langid
from tiny import SENTENCES, save_tiny, tiny_dataset

SAMPLES = {"en": "The children walked to school in the rain this morning.",
           "fr": "Les enfants sont allés à l'école sous la pluie ce matin.",
           "de": "Die Kinder sind heute Morgen im Regen zur Schule gegangen.",
           "zh": "今天早上孩子们冒着雨走路去上学。",
           "th": "เช้านี้เด็กๆ เดินไปโรงเรียนท่ามกลางสายฝน",
           "sw": "Watoto walitembea kwenda shuleni kwenye mvua asubuhi ya leo."}


def test_identifies_our_languages_without_network(monkeypatch):
    # every socket fails: the identifier's model must come from inside the package
    def no_network(*a, **k):
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    langid._identifier.cache_clear()  # load it again under the failing sockets
    assert langid.identify(SAMPLES.values()) == list(SAMPLES)
    # no letters: no language can be told
    assert langid.identify(["", "  \n", "12 + 30 = 42 !"]) == [langid.UNDETERMINED] * 3


def test_corpus_check_counts_the_foreign_texts():
    corpora = {"en": [SAMPLES["en"], SAMPLES["de"], SAMPLES["en"]], "fr": [SAMPLES["fr"]]}
    r = langid.corpus_check(corpora)
    assert r["en"] == {"texts": 3, "other_language": 1, "share": pytest.approx(1 / 3), "identified_as": {"de": 1},
                       "indices": [1]}
    assert r["fr"]["other_language"] == 0 and r["fr"]["share"] == 0.0


@pytest.fixture(scope="module")
def tiny_foreign(tmp_path_factory):
    """The tiny model and dataset, with two German lines in the English detection corpus."""
    root = tmp_path_factory.mktemp("tiny_lid")
    model, data = save_tiny("qwen2", root / "model"), tiny_dataset(root / "data")
    en = data / "detect" / "en.txt"
    en.write_text(en.read_text(encoding="utf-8") + "\n".join(SENTENCES["de"][:2]) + "\n", encoding="utf-8")
    return model, data


def test_detection_warns_records_and_drops_other_language(tiny_foreign, tmp_path):
    model, data = tiny_foreign
    common = ["--model", model, "--dataset", data, "--langs", "en,fr", "--ratio", "0.2"]
    r = run_script("detection.py", *common, "--out", tmp_path / "keep", check=True)
    assert "detection corpus en: 2 of 8 texts (25.0%) identified as another language (de 2)" in r.stderr
    assert "detection corpus fr" not in r.stderr
    meta = json.loads((tmp_path / "keep" / "model" / "neurons" / "meta.json").read_text())
    check = meta["corpus"]["language_check"]
    assert check["dropped"] is False and check["identifier"].startswith("py3langid")
    assert check["langs"]["en"]["other_language"] == 2 and check["langs"]["en"]["share"] == 0.25
    assert meta["corpus"]["sentences"]["en"] == 8
    # without the flag it is not part of the fingerprint: runs before this check keep being reused
    assert "drop_other_language" not in meta["fingerprint"]["args"]

    r = run_script("detection.py", *common, "--out", tmp_path / "drop", "--drop-other-language", check=True)
    assert "en: dropped 2 of 8 texts, 6 left" in r.stdout
    assert "dropped (--drop-other-language)" in r.stderr
    meta = json.loads((tmp_path / "drop" / "model" / "neurons" / "meta.json").read_text())
    assert meta["corpus"]["sentences"] == {"en": 6, "fr": 6}
    assert meta["corpus"]["language_check"]["dropped"] is True
    assert meta["fingerprint"]["args"]["drop_other_language"] is True
    from safetensors.torch import load_file
    assert load_file(tmp_path / "drop" / "model" / "neurons" / "firing.safetensors")["sentences"].tolist() == [6, 6]
