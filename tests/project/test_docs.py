"""The README and docs/ as a contract: generated tables match the code, every relative link resolves, and the
README stays a front door."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support.helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(page) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)}


def test_the_generated_tables_are_fresh():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    links = [m.group(1) for m in LINK.finditer(text)]
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: link {link} points at nothing"
        if anchor and target.suffix == ".md":
            assert anchor in anchors(target), f"{page.name}: link {link} names a heading {target.name} lacks"


def test_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"
    text = "\n".join(lines)
    assert text.index("make demo") < text.index("## "), "the two commands come before any section"
    for setting in ("on this machine", "in Docker on a GPU", "on Kubernetes"):
        assert f"Quick start: your data {setting}" in text
    linked = {m.group(1) for m in LINK.finditer(text)}
    for page in (REPO / "docs").glob("*.md"):
        assert any(link.split("#")[0] == f"docs/{page.name}" for link in linked), f"README never links {page.name}"
