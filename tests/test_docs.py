"""The README and docs/: short, every relative link resolving inside the repository, and a
configuration table that names every setting the code reads."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from otcclip.service.core.config import Settings

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
#: Where the code, scripts and CI read ``OTCCLIP_*`` variables by name.
CODE = [REPO / "otcclip", REPO / "scripts", REPO / "bench", REPO / ".ci", REPO / "Makefile", *REPO.glob("tests/**/conftest.py")]

#: ``[text](target "title")`` and ``![alt](target)``; a target in ``<...>`` may hold spaces.
_INLINE = re.compile(r"\[[^\]]*\]\(\s*(?:<([^>\n]+)>|([^)\s]+))")
_REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def links(text: str) -> list[str]:
    """Link and image targets of a markdown text (inline and reference style), code blocks left out."""
    text = _FENCE.sub("", text)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [a or b for a, b in _INLINE.findall(text)] + _REFDEF.findall(text)


def test_links_parser_sees_every_kind_of_link():
    text = ("[a](docs/x.md) ![i](img.png) [b](<with space.md> \"t\")\n[c]: ../out.md\n"
            "`[no](code.md)`\n```\n[no](block.md)\n```\n[web](https://example.org)")
    assert sorted(links(text)) == sorted(["docs/x.md", "img.png", "with space.md", "../out.md", "https://example.org"])


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n < 200, f"README.md has {n} lines (a user's guide stays under 200)"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve_inside_the_repository(page: Path):
    assert DOCS, "docs/*.md not found"
    for target in links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the same page
        path = unquote(target.split("#", 1)[0])
        assert not path.startswith("/"), f"{page.name}: {target} is absolute"
        resolved = (page.parent / path).resolve()
        assert resolved.is_relative_to(REPO), f"{page.name}: {target} points outside the repository"
        assert resolved.exists(), f"{page.name}: {target} does not exist"


def test_docs_pages_exist():
    assert {p.name for p in DOCS} >= {"design.md", "method.md", "benchmarks.md", "deployment.md", "ARCHITECTURE.md"}


def _table_variables(text: str) -> list[str]:
    """First-column ``OTCCLIP_*`` names of the markdown tables in ``text``."""
    return re.findall(r"^\|\s*`(OTCCLIP_[A-Z0-9_]+)`\s*\|", text, re.M)


def test_configuration_table_names_every_setting():
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = _table_variables(section)
    assert len(documented) == len(set(documented)), "a variable is listed twice"
    settings = {f"OTCCLIP_{name.upper()}" for name in Settings.model_fields}
    missing = settings - set(documented)
    assert not missing, f"settings missing from README's configuration table: {sorted(missing)}"
    read_by_code: set[str] = set()
    for root in CODE:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and p.suffix in ("", ".py", ".sh")]
        for f in files:
            read_by_code |= set(re.findall(r"OTCCLIP_[A-Z0-9]+(?:_[A-Z0-9]+)*", f.read_text(errors="replace")))
    missing = read_by_code - set(documented)
    assert not missing, f"variables the code reads, missing from the configuration tables: {sorted(missing)}"
    unknown = set(documented) - settings - read_by_code
    assert not unknown, f"documented variables nothing reads: {sorted(unknown)}"
