"""The contract lives in docs/: every reference to it from code, tests and docs resolves.

A reference is ``docs/<file>.md`` with an optional ``#anchor``, and further ``#anchor``s after
a comma name more sections of the same file (``docs/proxy-rules.md#redirects, #pagination``).
Anchors are the ones GitHub makes from headings. Nothing may cite the first contract, which
lived outside the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SOURCES = [
    *ROOT.glob("broker/**/*.py"),
    *ROOT.glob("tests/**/*.py"),
    *ROOT.glob("bench/**/*.py"),
    *ROOT.glob("deploy/**/*"),
    ROOT / "README.md",
    ROOT / "bench" / "README.md",
]
REFERENCE = re.compile(r"docs/([\w-]+\.md)((?:#[\w-]+)?(?:, #[\w-]+)*)")
LINK = re.compile(r"\]\(([^)#\s]*)(#[\w-]+)?\)")
OLD_CONTRACT = "SPEC " + "\u00a7"


def slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.replace("`", "")).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            base = slug(heading.group(1))
            counts[base] = counts.get(base, -1) + 1
            found.add(base if counts[base] == 0 else f"{base}-{counts[base]}")
    return found


ANCHORS = {path.name: anchors(path) for path in DOCS.glob("*.md")}


def references() -> list[tuple[str, str, str]]:
    """``(where, file, anchor or "")`` for every reference into docs/."""
    found = []
    for source in SOURCES:
        if not source.is_file():
            continue
        text = source.read_text(encoding="utf-8", errors="replace")
        for match in REFERENCE.finditer(text):
            where = str(source.relative_to(ROOT))
            tags = re.findall(r"#([\w-]+)", match.group(2)) or [""]
            found += [(where, match.group(1), tag) for tag in tags]
    for doc in DOCS.glob("*.md"):
        for target, tag in LINK.findall(doc.read_text(encoding="utf-8")):
            if target.startswith("http") or not (target.endswith(".md") or not target):
                continue
            name = Path(target).name if target else doc.name
            if target and not (DOCS / target).resolve().is_relative_to(DOCS):
                continue
            found.append((f"docs/{doc.name}", name, tag.removeprefix("#")))
    return found


def test_the_contract_has_its_documents() -> None:
    assert {"README.md", "grants.md", "proxy-rules.md", "audit.md", "interfaces.md"} <= set(ANCHORS)


def test_code_and_tests_cite_the_contract() -> None:
    assert len(references()) > 40


@pytest.mark.parametrize(("where", "name", "anchor"), references())
def test_every_reference_into_docs_resolves(where: str, name: str, anchor: str) -> None:
    assert name in ANCHORS, f"{where} cites docs/{name}, which does not exist"
    if anchor:
        assert anchor in ANCHORS[name], f"{where} cites docs/{name}#{anchor}: no such heading"


def test_nothing_cites_the_first_contract_outside_the_repository() -> None:
    citing = [
        str(source.relative_to(ROOT))
        for source in SOURCES
        if source.is_file() and OLD_CONTRACT in source.read_text(encoding="utf-8", errors="replace")
    ]
    assert citing == []


def test_the_layout_the_readme_draws_is_the_tree() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Development", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"\b((?:broker|tests|docs|migrations)(?:/[\w.]+)*/?)(?![*\w])", layout))
    assert len(named) > 10
    missing = [name for name in sorted(named) if not (ROOT / name).exists()]
    assert missing == []
    packages = {
        path.name for path in (ROOT / "broker").iterdir() if (path / "__init__.py").is_file()
    }
    assert {f"broker/{package}/" for package in packages} <= named
