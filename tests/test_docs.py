"""The documentation holds together: a README a newcomer reads in minutes, every relative link and #anchor in
README.md and docs/*.md lands on a file and a heading, every doc is reachable from the README's table, the
README's test command is the one CI runs, and CITATION.cff is well-formed. Pure file reading."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 260

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose(text: str) -> str:
    """The text outside fenced code blocks and code spans, where a link is a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text(encoding="utf-8")))
            if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '{anchor}' in {dest.relative_to(root.resolve())}")
    return broken


def test_slug_follows_github():
    assert slug("Deviations from METHOD.md / INTERFACE.md, and choices where they are silent") == \
        "deviations-from-methodmd--interfacemd-and-choices-where-they-are-silent"
    assert slug("The GPU check (`bench/gpu_check.sh`)") == "the-gpu-check-benchgpu_checksh"
    assert slug("What `bash run.sh` gives on the embedded model") == "what-bash-runsh-gives-on-the-embedded-model"


def test_checker_finds_broken_links(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n## Top\n[ok](#top-1) [ok](b.md#b) [bad](b.md#nope) [bad](c.md)\n"
                                   "[web](https://x.org/y.md) `[code](d.md)`\n```\n[fenced](e.md)\n```\n")
    (tmp_path / "b.md").write_text("# B\n")
    assert broken_links(tmp_path / "a.md", tmp_path) == ["b.md#nope: no heading 'nope' in b.md", "c.md: no such file"]


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}: details go to docs/)"


@pytest.mark.parametrize("path", [README] + DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_every_doc_is_in_the_readme_table():
    section = README.read_text(encoding="utf-8").split("\n## Documentation\n")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    linked = {(ROOT / t.partition("#")[0]).resolve() for line in table for t in LINK.findall(line)}
    missing = [str(p.relative_to(ROOT)) for p in DOCS if p.resolve() not in linked]
    assert DOCS, "no docs/*.md"
    assert missing == [], f"not in the README's documentation table: {missing}"


def commands(text: str) -> list[str]:
    """The command lines of a shell script or code block, comments and blank lines dropped."""
    return [line.split(" #")[0].strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_readme_test_command_is_what_ci_runs():
    first_block = FENCE.search(README.read_text(encoding="utf-8")).group(0).splitlines()[1:-1]
    readme = commands("\n".join(first_block))
    assert readme == ["bash run.sh", "bash test.sh"], readme
    ci = [c for c in commands((ROOT / ".ci" / "run").read_text(encoding="utf-8")) if "test.sh" in c]
    assert ci == [readme[1]], ci
    assert (ROOT / "run.sh").is_file() and (ROOT / "test.sh").is_file()


def test_citation_cff_is_well_formed():
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "Apache-2.0"
    assert cff["title"] == "langneurons" and cff["message"] and cff["authors"]
    paper = cff["preferred-citation"]
    assert "2506.09890" in paper["url"] and len(paper["authors"]) == 10
