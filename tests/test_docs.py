"""The README is a front page and docs/ holds the reference: every page is linked from the
front page, every link lands, and the reference names everything the code accepts."""

from __future__ import annotations

import pathlib
import re
from pathlib import Path

import pytest

import models
from bench import precision, store
from bench.cli import build_parser
from bench.config import PRESETS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_every_docs_page_is_linked_from_the_front_page():
    text = README.read_text(encoding="utf-8")
    assert DOCS and [p.name for p in DOCS if f"(docs/{p.name})" not in text] == []


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_lands_on_a_file_and_heading(page):
    for target in _LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        found = (page.parent / path).resolve() if path else page
        assert found.exists(), (page.name, target)
        if anchor:
            assert anchor in _anchors(found), (page.name, target)


def test_the_quick_start_is_the_two_nox_commands():
    quick = README.read_text(encoding="utf-8").split("## Quick start", 1)[1].split("```")[1]
    commands = [line.split("#")[0].strip() for line in quick.splitlines()[1:] if line.strip()]
    assert commands[1:] == ["nox -s bench", "nox -s tests"], commands


def test_the_front_page_excerpt_is_marked_and_its_figure_exists():
    text = README.read_text(encoding="utf-8")
    [(report, excerpt)] = re.findall(r"<!-- excerpt: (\S+) -->\n(.*?)<!-- /excerpt -->", text,
                                     flags=re.S)
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", excerpt)
    assert figures and all((ROOT / f).exists() for f in figures), figures
    assert all(f.startswith(str(pathlib.PurePosixPath(report).parent)) for f in figures)
    # Copied from that report, not written by hand: its summary table's rows are there.
    rows = [line for line in excerpt.splitlines() if line.startswith("| ")]
    published = (ROOT / report).read_text(encoding="utf-8")
    assert rows and all(row in published for row in rows)


def test_the_front_page_lists_every_command():
    (sub,) = (a for a in build_parser()._actions if a.choices and "run" in a.choices)
    text = README.read_text(encoding="utf-8")
    assert [c for c in sub.choices if f"`ampbench {c}`" not in text
            and f", `{c}`" not in text] == []


@pytest.mark.parametrize(("page", "names"), [
    ("runner.md", tuple(PRESETS)),
    ("policies.md", precision.NAMES),
    ("models.md", models.NAMES),
    ("run-directory.md", store.FIELDS),
])
def test_the_reference_names_everything_the_code_accepts(page, names):
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    # As a word of its own: "fp8" is not named by "fp8-rowwise", nor "throttled" by "throttle".
    missing = [n for n in names if not re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text)]
    assert missing == []
